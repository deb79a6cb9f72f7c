"""Where ONNX Runtime's int8 loses time on MobileNetV2-1.0 224 (1 thread): variants of one model, side by side.

The zoo's MobileNetV2-1.0 at 224x224x3 (untrained: latency depends on the graph, not the weights), exported
to fp32 ONNX, pre-processed (quant_pre_process) and quantized by ONNX Runtime's static QDQ quantizer (calibrated on 8 random images) in
variants: U8S8 per-channel (uint8 activations, int8 weights: edgeship's PTQ default), S8S8 (int8
activations), per-tensor weights, the depthwise convs left float, the 3-channel stem left float, and the
default with ONNX Runtime's NHWC transformer turned off (`optimization.disable_specified_optimizers`).
All sessions are timed in the same interleaved rounds (one thread, batch 1); each variant's speedup is
the median over rounds of fp32's round median over its own.

Goal (from the issue): ORT int8 >= 2.5x fp32. Whatever variant measures fastest is the one to keep.

    .venv/bin/python benchmarks/int8_gap.py     # about 5 minutes here

Writes benchmarks/results/int8_gap.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import environment, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 2.5


def variants(fp32: Path, work: Path, calibration: np.ndarray) -> dict[str, tuple[Path, dict]]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter([{"input": image[None]} for image in calibration])

        def get_next(self):
            return next(self._items, None)

    source = work / "preprocessed.onnx"  # shape inference and BatchNorm folding, as edgeship's PTQ does
    quant_pre_process(str(fp32), str(source))
    graph = onnx.load(str(source)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    stem = [convs[0].name]

    def quantize(name: str, **kwargs) -> Path:
        out = work / f"{name}.onnx"
        options = {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "per_channel": True,
                   "quant_format": QuantFormat.QDQ, **kwargs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(source), str(out), Reader(), **options)
        return out

    default = quantize("u8s8_per_channel")
    return {"fp32": (fp32, {}), "U8S8 per-channel (default)": (default, {}),
            "S8S8 per-channel": (quantize("s8s8", activation_type=QuantType.QInt8), {}),
            "U8S8 per-tensor": (quantize("per_tensor", per_channel=False), {}),
            "depthwise float": (quantize("dw_float", nodes_to_exclude=depthwise), {}),
            "stem float": (quantize("stem_float", nodes_to_exclude=stem), {}),
            "default, NHWC transformer off": (default, {"optimization.disable_specified_optimizers": "NhwcTransformer"})}


def session(path: Path, config: dict):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    import torch

    from edgeship.models.zoo import mobilenet_v2
    from edgeship.tasks.compile.onnx import export_onnx

    started = time.perf_counter()
    torch.manual_seed(0)
    calibration = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    rounds, per_round = 12, 5
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-int8gap-") as tmp:
        fp32 = export_onnx(mobilenet_v2(1000, 3, width_mult=1.0).eval(), (3, 224, 224), Path(tmp) / "fp32.onnx")
        models = variants(fp32, Path(tmp), calibration)
        sessions = {name: session(path, config) for name, (path, config) in models.items()}
        feed = {"input": calibration[:1]}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feed)
        medians = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                times = []
                for _ in range(per_round):
                    begin = time.perf_counter()
                    s.run(None, feed)
                    times.append(1000 * (time.perf_counter() - begin))
                medians[name].append(float(np.median(times)))
    reference = np.array(medians["fp32"])
    rows = [{"variant": name, "p50_ms": round(float(np.median(m)), 3),
             "speedup": round(float(np.median(reference / np.array(m))), 3),
             "speedup_p25": round(float(np.percentile(reference / np.array(m), 25)), 3)} for name, m in medians.items()]
    print(f"{'variant':<32} {'p50 ms':>8} {'x fp32':>7} {'(p25)':>7}")
    for row in rows:
        print(f"{row['variant']:<32} {row['p50_ms']:>8.2f} {row['speedup']:>7.2f} {row['speedup_p25']:>7.2f}")
    best = max(rows[1:], key=lambda r: r["speedup"])
    report = {"benchmark": "int8_gap", "environment": environment(), "rounds": rounds, "per_round": per_round,
              "rows": rows, "targets": {"ort_int8_2.5x_fp32_mnv2_224_1_thread": {
                  "limit": GOAL, "measured": {"variant": best["variant"], "speedup": best["speedup"],
                                              "speedup_p25": best["speedup_p25"]},
                  "met": best["speedup_p25"] >= GOAL}},
              "total_seconds": round(time.perf_counter() - started, 1)}
    write_report(report, RESULTS / "int8_gap.json")


if __name__ == "__main__":
    main()
