"""What structured pruning buys: ratios 0 / 0.2 / 0.3 / 0.4 / 0.5 x importance L1 and Taylor, in one run.

Two halves, side by side in each row:

(a) accuracy: the reference digits model (params.yaml: 16x16 grayscale, MobileNetV2 width 0.5, 4 stages,
    stem stride 1; 10 epochs) is pruned by edgeship's own stage (`tasks/prune.py`, per-layer ratio, channel
    counts rounded to multiples of 4) and fine-tuned (`pruning.fine_tune_epochs`, distilled from the unpruned
    model); the drop is in test-split points against the unpruned model (~270 images: 1 image = 0.37 points);
    params, MACs and fp32 ONNX bytes of that model.
(b) speed: the zoo's MobileNetV2-1.0 at 224x224x3, 1000 classes (untrained: latency depends on the
    architecture only), pruned the same way; fp32 ONNX and its ONNX Runtime static QDQ int8 (calibrated on
    random images: accuracy is not measured here) timed at 1 thread, batch 1, every model in the same
    interleaved rounds (benchmarks/quantization.py's timer, the device agent's runtime adapter).
    With a per-layer ratio, L1 and Taylor remove the same *number* of channels from every layer, so the
    pruned architectures, and therefore the latencies, are the same; they are timed once per ratio.

Targets: at a 30-40% ratio, at least 1.4x fp32 speedup with at most 1 point accuracy drop (for one
importance at one ratio); and whether Taylor beats L1 at equal ratio (reported, whatever it shows).

    .venv/bin/python benchmarks/pruning.py            # about 15 minutes here
    .venv/bin/python benchmarks/pruning.py --quick    # fewer epochs and rounds

Writes benchmarks/results/pruning.json (`rows`, `targets`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import environment, interleaved_latency, write_report  # noqa: E402  (the sibling benchmark's)

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.0, 0.2, 0.3, 0.4, 0.5)
IMPORTANCES = ("l1", "taylor")
SPEEDUP_TARGET, DROP_TARGET = 1.4, 1.0


def digits_rows(work: Path, epochs: int, fine_tune_epochs: int) -> tuple[dict, list[dict]]:
    """Train the reference model once; prune and fine-tune it at every (importance, ratio)."""
    import torch

    from edgeship.config import DataParams, ModelParams, PruningParams, TrainParams
    from edgeship.tasks.data import export_digits, prepare
    from edgeship.tasks.prune import count_macs_params, prune_model
    from edgeship.tasks.compile.onnx import export_onnx
    from edgeship.tasks.prune_search import fine_tune, taylor_batches
    from edgeship.tasks.train import load_model, train

    torch.set_num_threads(1)
    export_digits(work / "raw")
    data = prepare(work / "raw", work / "prepared", DataParams(input_size=16, calibration_size=128))
    trained = train(data, ModelParams(kwargs={"width_mult": 0.5, "stages": 4, "stem_stride": 1}),
                    TrainParams(epochs=epochs), work / "fp32")
    original = load_model(trained)
    example = torch.zeros(1, *trained.input_shape)
    rows = []
    for importance in IMPORTANCES:
        for ratio in RATIOS:
            params = PruningParams(importance=importance, fine_tune_epochs=fine_tune_epochs)
            started = time.perf_counter()
            if ratio == 0:
                model, tuned = original, trained
            else:
                pruned = prune_model(load_model(trained), example, params, ratio, taylor_batches(data, params))
                tuned = fine_tune(pruned, original, trained, data, params, TrainParams(),
                                  work / f"{importance}-{ratio}")
                model = load_model(tuned)
            macs, n_params = count_macs_params(model, example)
            path = export_onnx(model, trained.input_shape, work / f"{importance}-{ratio}.onnx")
            rows.append({"importance": importance, "ratio": ratio, "params": n_params, "macs": macs,
                         "bytes": path.stat().st_size, "test_accuracy": round(tuned.test_accuracy, 4),
                         "accuracy_drop_points": round(100 * (trained.test_accuracy - tuned.test_accuracy), 2),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"  digits {importance} {ratio}: test {tuned.test_accuracy:.4f} "
                  f"({rows[-1]['accuracy_drop_points']:+.2f} pts), MACs {macs}", flush=True)
    info = {"test_images": data.counts["test"], "unpruned_test_accuracy": trained.test_accuracy,
            "epochs": epochs, "fine_tune_epochs": fine_tune_epochs}
    return info, rows


def mnv2_latency(work: Path, rounds: int, per_round: int) -> dict[float, dict]:
    """fp32 and int8 ONNX Runtime p50/p99 of MobileNetV2-1.0 224 at every ratio, all timed in the same rounds."""
    import torch

    from edgeship.config import PruningParams
    from edgeship.models.zoo import mobilenet_v2
    from edgeship.tasks.compile.onnx import export_onnx
    from edgeship.tasks.prune import count_macs_params, prune_model
    from edgeship.tasks.ptq import quantize_onnx

    torch.manual_seed(0)
    example = torch.zeros(1, 3, 224, 224)
    calibration = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    models, shapes = {}, {}
    for ratio in RATIOS:
        model = mobilenet_v2(1000, 3, width_mult=1.0).eval()
        if ratio:
            model = prune_model(model, example, PruningParams(), ratio)
        shapes[ratio] = count_macs_params(model, example)
        fp32 = export_onnx(model, (3, 224, 224), work / f"mnv2-{ratio}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = quantize_onnx(fp32, calibration, work / f"mnv2-{ratio}-int8.onnx")
        models[f"fp32@{ratio}"], models[f"int8@{ratio}"] = fp32, int8
        print(f"  mnv2-224 ratio {ratio}: MACs {shapes[ratio][0] / 1e6:.0f} M", flush=True)
    models["fp32"] = models["fp32@0.0"]  # the timer's reference
    timed = interleaved_latency(models, calibration[:1], 1, rounds, per_round)
    out = {}
    for ratio in RATIOS:
        fp32, int8 = timed[f"fp32@{ratio}"], timed[f"int8@{ratio}"]
        out[ratio] = {"macs": shapes[ratio][0], "params": shapes[ratio][1],
                      "fp32_p50_ms": round(fp32["p50"], 3), "fp32_p99_ms": round(fp32["p99"], 3),
                      "int8_p50_ms": round(int8["p50"], 3), "int8_p99_ms": round(int8["p99"], 3),
                      "fp32_speedup": round(fp32["speedup"], 3), "fp32_speedup_p25": round(fp32["speedup_p25"], 3),
                      "int8_speedup": round(timed["int8@0.0"]["p50"] / int8["p50"], 3),
                      "int8_vs_fp32": round(fp32["p50"] / int8["p50"], 3)}
    # Two sessions of the same unpruned fp32 model, timed in the same rounds: how far apart identical models land.
    out["control"] = {"same_model_ratio": round(timed["fp32@0.0"]["speedup"], 3)}
    return out


def targets(rows: list[dict]) -> dict:
    window = [r for r in rows if 0.3 <= r["ratio"] <= 0.4]
    both = [r for r in window if r["fp32_speedup"] >= SPEEDUP_TARGET and r["accuracy_drop_points"] <= DROP_TARGET]
    best = max(window, key=lambda r: (r["accuracy_drop_points"] <= DROP_TARGET, r["fp32_speedup"]))
    pairs = [(l1, tay) for l1 in rows if l1["importance"] == "l1" and l1["ratio"] > 0
             for tay in rows if tay["importance"] == "taylor" and tay["ratio"] == l1["ratio"]]
    taylor_better = sum(tay["test_accuracy"] > l1["test_accuracy"] for l1, tay in pairs)
    mean_gain = float(np.mean([100 * (tay["test_accuracy"] - l1["test_accuracy"]) for l1, tay in pairs]))
    return {
        "speedup_at_30_40_percent": {"limit": f">= {SPEEDUP_TARGET}x fp32 with <= {DROP_TARGET} point drop",
                                     "measured": {"importance": best["importance"], "ratio": best["ratio"],
                                                  "fp32_speedup": best["fp32_speedup"],
                                                  "fp32_speedup_lower_quartile": best["fp32_speedup_p25"],
                                                  "accuracy_drop_points": best["accuracy_drop_points"]},
                                     "met": bool(both) and any(r["fp32_speedup_p25"] >= SPEEDUP_TARGET for r in both)},
        "taylor_vs_l1": {"limit": "reported, not a pass/fail target",
                         "measured": {"ratios_where_taylor_is_more_accurate": f"{taylor_better} of {len(pairs)}",
                                      "mean_taylor_minus_l1_points": round(mean_gain, 2)},
                         "met": None},
    }


def print_table(rows: list[dict]) -> None:
    header = (f"{'importance':<10} {'ratio':>5} {'params':>8} {'MACs':>9} {'KB':>7} {'drop pts':>8} "
              f"{'fp32 p50':>9} {'p99':>7} {'x fp32':>6} {'int8 p50':>9} {'p99':>7} {'x int8':>6} {'int8/fp32':>9}")
    print(header)
    for r in rows:
        print(f"{r['importance']:<10} {r['ratio']:>5.1f} {r['params']:>8} {r['macs']:>9} {r['bytes'] / 1e3:>7.0f} "
              f"{r['accuracy_drop_points']:>8.2f} {r['fp32_p50_ms']:>9.2f} {r['fp32_p99_ms']:>7.2f} "
              f"{r['fp32_speedup']:>6.2f} {r['int8_p50_ms']:>9.2f} {r['int8_p99_ms']:>7.2f} {r['int8_speedup']:>6.2f} "
              f"{r['int8_vs_fp32']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing rounds")
    parser.add_argument("--rounds", type=int, help="timing rounds (each visits every model)")
    parser.add_argument("--per-round", type=int, default=5, help="timed runs per model per round")
    parser.add_argument("--out", type=Path, default=RESULTS / "pruning.json")
    args = parser.parse_args()
    rounds = args.rounds or (8 if args.quick else 20)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-prune-") as tmp:
        print("digits: prune and fine-tune the reference model", flush=True)
        info, accuracy = digits_rows(Path(tmp) / "digits", 4 if args.quick else 10, 2 if args.quick else 5)
        print("mnv2-224: prune and time on ONNX Runtime, 1 thread", flush=True)
        speed = mnv2_latency(Path(tmp) / "mnv2", rounds, args.per_round)
    control = speed.pop("control")
    rows = [{**{k: r[k] for k in ("importance", "ratio", "params", "macs", "bytes", "accuracy_drop_points")},
             "fp32_speedup": speed[r["ratio"]]["fp32_speedup"], "int8_speedup": speed[r["ratio"]]["int8_speedup"],
             **{k: v for k, v in speed[r["ratio"]].items() if k not in ("macs", "params")},
             "test_accuracy": r["test_accuracy"], "mnv2_macs": speed[r["ratio"]]["macs"],
             "mnv2_params": speed[r["ratio"]]["params"]} for r in accuracy]
    report = {"benchmark": "pruning", "quick": args.quick, "environment": environment(),
              "digits": info, "timing": {"rounds": rounds, "per_round": args.per_round, "threads": 1, "batch": 1,
                                         "control_same_model_ratio": control["same_model_ratio"]},
              "columns": {"params/macs/bytes/accuracy_drop_points": "digits reference model (fp32 ONNX bytes)",
                          "fp32_speedup": "MobileNetV2-1.0 224: unpruned fp32 p50 over this ratio's fp32 p50",
                          "int8_speedup": "MobileNetV2-1.0 224: unpruned int8 p50 over this ratio's int8 p50",
                          "int8_vs_fp32": "this ratio's fp32 p50 over its int8 p50"},
              "rows": rows, "targets": targets(rows), "total_seconds": round(time.perf_counter() - started, 1)}
    print_table(rows)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
