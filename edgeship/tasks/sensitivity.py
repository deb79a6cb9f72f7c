"""The `sensitivity` stage: how much each layer suffers from int8, and what keeping it float costs.

Accuracy side (PyTorch): the model is prepared for int8 once, exactly as QAT will
prepare it (`edgeship.tasks.qat_prepare.prepare_model`: fused Conv-BN-activation layers,
per-channel int8 weights, uint8 activations), its quantizers are calibrated on the
calibration split, and each layer's quantizers are then switched on and off
(`QuantSimulator`). For every layer: only that layer int8 (its weights and the
activations around it), and the converse, every layer int8 except that one. Each
is compared with fp32 on the validation split: accuracy, SQNR of the logits, and
KL divergence of the softmax outputs. Layers are ranked by accuracy drop, then SQNR.

Cost side (ONNX Runtime, the target runtime): the fp32 model and its all-int8 QDQ
version (ONNX Runtime static quantization) are profiled per node on one thread;
nodes map back to layers through the exporter's scope names. Each layer's float
cost inside the int8 model (`revert_cost_ms`: the island's float compute plus the
Q/DQ and layout changes at its borders) is measured by profiling the int8 model
with that layer reverted. Latencies are sums of per-node medians, which hold up on
a busy machine where end-to-end timings do not.

    >>> report = analyze_sensitivity(trained, data, SensitivityParams(), QatParams(), Path("build/sensitivity"))
    >>> report.ranking()[:3]
    ['features.1.conv.0', 'classifier.1', 'features.0']
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import disable_fake_quant, disable_observer, enable_fake_quant
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from edgeship.config import QatParams, SensitivityParams
from edgeship.records import LayerSensitivity, PreparedData, SensitivityReport, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.ptq import export_fp32, quantize_onnx
from edgeship.tasks.qat_plan import Layer
from edgeship.tasks.qat_prepare import calibrate, prepare_model, quantized_engine
from edgeship.tasks.qdq_onnx import layer_of_module, node_module, revert_layers
from edgeship.tasks.train import load_model, predict_logits

LayerCallback = Callable[[int, int, str], None]  # (done, total, layer)
_MAX_SQNR_DB = 100.0  # identical logits
_MAX_KL = 1e6


@dataclass(frozen=True)
class Comparison:
    """Quantized logits against fp32 ones."""

    accuracy: float
    sqnr_db: float
    kl: float


def compare_logits(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> Comparison:
    """Accuracy of `logits`, their SQNR against `reference` (dB), and mean KL(softmax(reference) || softmax(logits))."""
    reference, logits = reference.astype(np.float64), logits.astype(np.float64)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    if not np.isfinite(logits).all():  # an overflowing quantized layer: as bad as it gets, but still a number
        return Comparison(accuracy, -_MAX_SQNR_DB, _MAX_KL)
    noise = float(((logits - reference) ** 2).sum())
    signal = float((reference ** 2).sum())
    sqnr = _MAX_SQNR_DB if noise <= signal * 10 ** (-_MAX_SQNR_DB / 10) else 10 * np.log10(signal / noise)
    log_p, log_q = _log_softmax(reference), _log_softmax(logits)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean())
    return Comparison(accuracy, float(sqnr), min(max(kl, 0.0), _MAX_KL))


class QuantSimulator:
    """The model with calibrated int8 fake quantizers on every layer, switchable layer by layer.

    A layer's weight quantizer is on when the layer is int8; an activation quantizer is on
    when a layer next to it (producing or consuming it) is int8, which is where the FX
    export of a mixed plan puts Q/DQ pairs. Activation quantizers next to no layer (after
    pooling, flatten, ...) follow `others`.
    """

    def __init__(self, model: nn.Module, calibration: np.ndarray, qat_params: QatParams):
        self.backend = qat_params.backend
        example = torch.as_tensor(calibration[:2], dtype=torch.float32)
        with quantized_engine(self.backend):
            prepared = prepare_model(model, {}, qat_params, example, warn=False)
            calibrate(prepared.module, calibration)
        self.module = prepared.module.eval()
        self.module.apply(disable_observer)
        self.layers: list[Layer] = [layer for layer in prepared.layers if prepared.precisions[layer.name] == "int8"]
        self.float_only = [layer.name for layer in prepared.layers if prepared.precisions[layer.name] != "int8"]
        self.members = {member: layer.name for layer in prepared.layers for member in layer.members}
        self._weights = {layer.name: [m for m in self.module.get_submodule(layer.weighted).modules()
                                      if isinstance(m, FakeQuantizeBase)] for layer in self.layers}
        self._activations: dict[int, tuple[nn.Module, set[str]]] = {}
        modules = dict(self.module.named_modules())
        for node in self.module.graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), FakeQuantizeBase):
                continue
            neighbours = {self._layer_of(n, modules) for n in [*node.args[:1], *node.users]} - {None}
            quantizer = modules[node.target]
            self._activations.setdefault(id(quantizer), (quantizer, set()))[1].update(neighbours)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def configure(self, int8: Iterable[str], others: bool = True) -> None:
        """Switch the quantizers so exactly the layers in `int8` (of `names`) run int8."""
        int8 = set(int8)
        for name, quantizers in self._weights.items():
            for quantizer in quantizers:
                quantizer.apply(enable_fake_quant if name in int8 else disable_fake_quant)
        for quantizer, neighbours in self._activations.values():
            on = bool(neighbours & int8) if neighbours else others
            quantizer.apply(enable_fake_quant if on else disable_fake_quant)

    def logits(self, x: np.ndarray, int8: Iterable[str], others: bool = True) -> np.ndarray:
        """Logits of the model with the layers in `int8` quantized."""
        self.configure(int8, others)
        with quantized_engine(self.backend):
            return predict_logits(self.module, x)

    def _layer_of(self, node, modules) -> str | None:
        if not hasattr(node, "op") or node.op != "call_module" or isinstance(modules.get(node.target),
                                                                            FakeQuantizeBase):
            return None
        return layer_of_module(node.target, self.members)


@dataclass
class LayerCosts:
    """What each layer costs on ONNX Runtime, in milliseconds (sums of per-node medians, one thread)."""

    int8_total: float
    fp32_total: float
    int8_ms: dict[str, float] = field(default_factory=dict)
    float_ms: dict[str, float] = field(default_factory=dict)
    revert_ms: dict[str, float] = field(default_factory=dict)  # latency added by reverting only this layer


def analyze_sensitivity(trained: TrainedModel, data: PreparedData, params: SensitivityParams, qat_params: QatParams,
                        work_dir: Path, on_layer: LayerCallback | None = None) -> SensitivityReport:
    """Per-layer sensitivity (accuracy drop, SQNR, KL, converse view) and ONNX Runtime costs of `trained`.

    `work_dir` receives the fp32 and all-int8 ONNX models the costs were measured on
    (the plan stage measures candidate plans on the same int8 model).
    """
    work_dir = Path(work_dir)
    model = load_model(trained)
    x_val, y_val = validation_subset(data, params.max_samples)
    calibration, _ = load_split(data, "calibration")
    reference = predict_logits(model, x_val)
    fp32 = compare_logits(reference, reference, y_val)
    simulator = QuantSimulator(model, calibration, qat_params)
    names = simulator.names
    int8 = compare_logits(reference, simulator.logits(x_val, names), y_val)
    steps = len(names) * (2 if params.converse else 1)
    done = 0
    rows = []
    for name in names:
        alone = compare_logits(reference, simulator.logits(x_val, [name], others=False), y_val)
        done += 1
        if on_layer:
            on_layer(done, steps, name)
        converse = None
        if params.converse:
            converse = compare_logits(reference, simulator.logits(x_val, [n for n in names if n != name]), y_val)
            done += 1
            if on_layer:
                on_layer(done, steps, name)
        rows.append((name, alone, converse))
    costs = None
    if params.latency:
        costs = measure_layer_costs(trained, calibration, simulator.members, work_dir, params.latency_runs)
    kinds = {layer.name: layer.kind for layer in simulator.layers}
    order = sorted(rows, key=lambda r: (-(fp32.accuracy - r[1].accuracy), r[1].sqnr_db))
    rank = {name: index + 1 for index, (name, _, _) in enumerate(order)}
    layers = [LayerSensitivity(
        layer=name, kind=kinds[name], rank=rank[name], accuracy_drop=100 * (fp32.accuracy - alone.accuracy),
        sqnr_db=alone.sqnr_db, kl=alone.kl,
        converse_accuracy_gain=100 * (converse.accuracy - int8.accuracy) if converse else None,
        converse_sqnr_gain_db=converse.sqnr_db - int8.sqnr_db if converse else None,
        int8_ms=costs.int8_ms.get(name) if costs else None, float_ms=costs.float_ms.get(name) if costs else None,
        revert_cost_ms=costs.revert_ms.get(name) if costs else None) for name, alone, converse in rows]
    return SensitivityReport(fp32_val_accuracy=fp32.accuracy, int8_val_accuracy=int8.accuracy,
                             int8_sqnr_db=int8.sqnr_db, samples=len(y_val), layers=layers,
                             int8_latency_ms=costs.int8_total if costs else None,
                             fp32_latency_ms=costs.fp32_total if costs else None,
                             int8_onnx=work_dir / INT8_ONNX if costs else None)


INT8_ONNX = "model_int8_all.onnx"
FP32_ONNX = "model_fp32.onnx"


def validation_subset(data: PreparedData, max_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The validation split, or its first `max_samples` images (splits are shuffled, so a prefix is a fair sample)."""
    x, y = load_split(data, "val")
    return (x, y) if max_samples is None else (x[:max_samples], y[:max_samples])


def measure_layer_costs(trained: TrainedModel, calibration: np.ndarray, members: dict[str, str], work_dir: Path,
                        runs: int = 40) -> LayerCosts:
    """Profile the fp32 and all-int8 models per node, and the int8 model with each layer reverted to float."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = export_fp32(trained, work_dir / FP32_ONNX)
    int8_path = quantize_onnx(fp32_path, calibration, work_dir / INT8_ONNX)
    sample = calibration[:1].astype(np.float32)
    fp32_nodes, int8_nodes = profile_nodes(fp32_path, sample, runs), profile_nodes(int8_path, sample, runs)
    costs = LayerCosts(int8_total=sum(int8_nodes.values()), fp32_total=sum(fp32_nodes.values()))
    for nodes, into in ((fp32_nodes, costs.float_ms), (int8_nodes, costs.int8_ms)):
        for node, ms in nodes.items():
            layer = layer_of_module(node_module(node), members)
            if layer is not None:
                into[layer] = into.get(layer, 0.0) + ms
    probe = LatencyProbe(int8_path, sample, runs)
    with tempfile.TemporaryDirectory(prefix="edgeship-revert-") as tmp:
        # A layer whose nodes the exporter's names do not lead to cannot be reverted here: no cost, rather than 0.
        for layer in sorted(set(members.values()) & set(costs.int8_ms)):
            reverted = revert_layers(int8_path, [layer], members, Path(tmp) / "reverted.onnx")
            costs.revert_ms[layer] = probe.compare(reverted)[1]
    return costs


class LatencyProbe:
    """Latency of a model against a baseline model, timed in alternation (one thread).

    Each run of the candidate is paired with a run of the baseline right before it, and the
    median of the differences is the candidate's cost: load on a busy machine hits both halves
    of a pair alike, so it cancels.
    """

    def __init__(self, baseline: Path, sample: np.ndarray, runs: int = 40, threads: int = 1,
                 min_seconds: float = 0.25):
        self.sample, self.runs, self.threads, self.min_seconds = sample, runs, threads, min_seconds
        self._baseline = _session(baseline, threads)

    def compare(self, candidate: Path) -> tuple[float, float]:
        """(candidate's median latency in ms, median of candidate minus baseline in ms)."""
        other = _session(candidate, self.threads)
        name = self._baseline.get_inputs()[0].name
        feed = {name: self.sample}
        for _ in range(max(3, self.runs // 8)):
            self._baseline.run(None, feed)
            other.run(None, feed)
        own, deltas, started = [], [], time.perf_counter()
        while len(deltas) < self.runs or (time.perf_counter() - started < self.min_seconds and len(deltas) < 2000):
            begin = time.perf_counter()
            self._baseline.run(None, feed)
            middle = time.perf_counter()
            other.run(None, feed)
            end = time.perf_counter()
            own.append(end - middle)
            deltas.append((end - middle) - (middle - begin))
        return 1000 * float(np.median(own)), 1000 * float(np.median(deltas))


def plan_latency(probe: LatencyProbe, int8_onnx: Path, float_layers: Iterable[str], members: dict[str, str]
                 ) -> tuple[float, float]:
    """(median latency ms, ms over the all-int8 model) of the int8 model with `float_layers` reverted to float."""
    with tempfile.TemporaryDirectory(prefix="edgeship-plan-") as tmp:
        path = revert_layers(int8_onnx, list(float_layers), members, Path(tmp) / "plan.onnx")
        return probe.compare(path)


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_nodes(onnx_path: Path, sample: np.ndarray, runs: int = 40, threads: int = 1) -> dict[str, float]:
    """Median kernel time (ms) of every node ONNX Runtime runs, over `runs` runs after a short warm-up."""
    import onnxruntime as ort

    warmup = max(3, runs // 8)
    with tempfile.TemporaryDirectory(prefix="edgeship-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(warmup + runs):
            session.run(None, {name: sample})
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            times.setdefault(event["name"].removesuffix("_kernel_time"), []).append(event["dur"] / 1000.0)
    return {node: float(np.median(samples[warmup:] or samples)) for node, samples in times.items()}


def sensitivity_rows(report: SensitivityReport) -> list[dict]:
    """One row per layer, most sensitive first (for a Prefect table artifact and the CLI)."""
    rows = []
    for s in sorted(report.layers, key=lambda s: s.rank):
        rows.append({"rank": s.rank, "layer": s.layer, "kind": s.kind, "acc_drop_pts": round(s.accuracy_drop, 3),
                     "sqnr_db": round(s.sqnr_db, 2), "kl": float(f"{s.kl:.3g}"),
                     "converse_gain_pts": _rounded(s.converse_accuracy_gain, 3),
                     "int8_ms": _rounded(s.int8_ms, 4), "float_ms": _rounded(s.float_ms, 4),
                     "revert_cost_ms": _rounded(s.revert_cost_ms, 4)})
    return rows


def sensitivity_figure(report: SensitivityReport):
    """Bars per layer in model order: accuracy drop (only it int8), SQNR, and its latency in int8 vs float."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.layer for s in report.layers]
    timed = report.fp32_latency_ms is not None
    figure, axes = plt.subplots(3 if timed else 2, 1, figsize=(max(8, 0.28 * len(names)), 9 if timed else 6.5),
                                dpi=110, sharex=True)
    positions = np.arange(len(names))
    colours = ["tab:red" if s.rank <= 3 else "tab:blue" for s in report.layers]
    axes[0].bar(positions, [s.accuracy_drop for s in report.layers], color=colours)
    axes[0].set_ylabel("val accuracy drop\n(points, only it int8)")
    axes[0].set_title(f"Per-layer int8 sensitivity (fp32 val {100 * report.fp32_val_accuracy:.2f}%, "
                      f"all int8 {100 * report.int8_val_accuracy:.2f}%, {report.samples} images; red: top 3)")
    axes[1].bar(positions, [s.sqnr_db for s in report.layers], color=colours)
    axes[1].set_ylabel("logits SQNR (dB)\n(higher: less error)")
    if timed:
        width = 0.4
        axes[2].bar(positions - width / 2, [s.float_ms or 0 for s in report.layers], width, label="float (fp32 model)")
        axes[2].bar(positions + width / 2, [s.int8_ms or 0 for s in report.layers], width, label="int8 (int8 model)")
        axes[2].plot(positions, [s.revert_cost_ms or 0 for s in report.layers], "k.", label="cost of reverting")
        axes[2].axhline(0, color="grey", linewidth=0.5)
        axes[2].set_ylabel("ONNX Runtime ms\n(1 thread)")
        axes[2].legend(fontsize=7)
    axes[-1].set_xticks(positions, names, rotation=90, fontsize=7)
    for axis in axes:
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
