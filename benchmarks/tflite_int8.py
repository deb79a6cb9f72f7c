"""tflite-int8 from the QAT model on the precision plan, against fp32, on the LiteRT interpreter, in one run.

Two models on digits (16x16, params.yaml's data): the reference model (params.yaml: MobileNetV2 width 0.5,
4 stages) and a model the project did not write (SiLU, hard-swish, squeeze-excite, a residual add:
tests/test_pruning.py's UserNet). Each is trained, analysed (sensitivity), planned (precision plan,
0.5-point budget) and QAT-trained by edgeship's stages, then compiled as tflite-fp32 and tflite-int8 by
litert-torch (int8: PT2E of the QAT-finetuned weights, the plan's float layers float) and, where
.venv/tf-converter exists, tflite-int8 by TensorFlow's route (PTQ of the same weights, all int8).
Accuracy is each artifact's on the LiteRT interpreter over the test split (~270 images: 1 image = 0.37
points), against the fp32 PyTorch model.

Target: tflite-int8 (litert-torch route) within 1 point of fp32 on both models.

    .venv/bin/python benchmarks/tflite_int8.py      # about 10 minutes here

Writes benchmarks/results/tflite_int8.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_POINTS = 1.0
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def run_model(name: str, model_params, data, work: Path) -> dict:
    from edgeship.config import PrecisionParams, QatParams, SensitivityParams, TrainParams
    from edgeship.tasks.compile import CompileInputs, get_target
    from edgeship.tasks.compile.litert import tf_available as available
    from edgeship.tasks.host_check import host_check, reference_logits
    from edgeship.tasks.precision_plan import plan_precision
    from edgeship.tasks.qat import quantization_aware_train
    from edgeship.tasks.sensitivity import analyze_sensitivity
    from edgeship.tasks.train import train

    started = time.perf_counter()
    trained = train(data, model_params, TrainParams(epochs=10), work / "fp32")
    qat = QatParams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = analyze_sensitivity(trained, data, SensitivityParams(converse=False, latency=False), qat,
                                     work / "sensitivity")
        plan = plan_precision(trained, data, report, PrecisionParams(max_drop_points=0.5, compare_strategies=False,
                                                                     measure_candidates=False, frontier_steps=0), qat)
        quantized = quantization_aware_train(trained, data, qat, work / "qat", plan=plan.layers)
    reference = reference_logits(trained, data)
    rows = {"onnx-int8 (QAT, ONNX Runtime)": {"accuracy": quantized.onnx_test_accuracy}}
    variants = [("tflite-fp32", {}), ("tflite-int8", {"route": "litert-torch"})]
    if available():
        variants.append(("tflite-int8", {"route": "tf"}))
    for target, options in variants:
        label = f"{target} ({options.get('route', 'litert-torch')})"
        artifact = get_target(target).compile(CompileInputs(trained=trained, data=data, quantized=quantized,
                                                            output_dir=work / label.replace(" ", "_"),
                                                            options=options))
        check = host_check(artifact, data, reference)
        rows[label] = {"accuracy": check.accuracy, "top1_agreement": check.top1_agreement, "bytes": artifact.bytes,
                       "weights": artifact.notes.get("weights"), "float_layers": artifact.notes.get("float_layers")}
    for row in rows.values():
        row["drop_points"] = round(100 * (trained.test_accuracy - row["accuracy"]), 2)
    print(f"\n{name}: fp32 (PyTorch) test {trained.test_accuracy:.4f}; plan {len(plan.float_layers)} float "
          f"{plan.float_layers}")
    for label, row in rows.items():
        print(f"  {label:<34} acc {row['accuracy']:.4f}  drop {row['drop_points']:+.2f} pts")
    return {"fp32_test_accuracy": trained.test_accuracy, "plan_float_layers": plan.float_layers, "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    import torch

    from edgeship.config import DataParams, ModelParams
    from edgeship.tasks.data import export_digits, prepare

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-tflite-") as tmp:
        root = Path(tmp)
        export_digits(root / "raw")
        data = prepare(root / "raw", root / "prepared", DataParams(input_size=16, calibration_size=128))
        models = {"digits reference (MobileNetV2 0.5)": ModelParams(kwargs={"width_mult": 0.5, "stages": 4,
                                                                              "stem_stride": 1}),
                  "user model (SiLU, hard-swish, SE, residual)": ModelParams(factory="test_pruning:user_net",
                                                                             kwargs={"width": 16})}
        for index, (name, model_params) in enumerate(models.items()):
            results[name] = run_model(name, model_params, data, root / f"m{index}")
    drops = {name: r["rows"]["tflite-int8 (litert-torch)"]["drop_points"] for name, r in results.items()}
    report = {"benchmark": "tflite_int8", "models": results,
              "targets": {"tflite_int8_within_1_point_of_fp32": {"limit": TARGET_POINTS, "measured": drops,
                                                                  "met": all(d <= TARGET_POINTS for d in drops.values())}}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "tflite_int8.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\ntargets:", json.dumps(report["targets"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
