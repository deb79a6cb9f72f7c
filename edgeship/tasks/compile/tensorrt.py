"""TensorRT targets: `tensorrt-fp16` and `tensorrt-int8`, as checked ONNX that the NVIDIA device builds.

A TensorRT engine is tied to the GPU and the TensorRT version that built it, so the
pipeline does not build it: it prepares the ONNX the device will build from and
checks it as far as a CPU machine can, and the device's agent builds the engine
(`edgeship.device.tensorrt_build`: builder flags, a timing cache per device) and
benchmarks it. The artifact is that ONNX file; the engine's sha256 and build log
come back from the device.

- tensorrt-fp16: the trained float model exported to ONNX (the builder runs it in fp16).
- tensorrt-int8: the QAT stage's QDQ ONNX (explicit quantization: TensorRT takes the
  scales from the Q/DQ nodes, no calibration on the device).

Both are made static (batch 1: engines are built for fixed shapes unless given
optimization profiles) and checked here:
1. `onnx.checker.check_model(full_check=True)` (with shape inference), static shapes, opset,
2. `polygraphy check lint` (Polygraphy with ONNX-GraphSurgeon; ONNX Runtime underneath):
   any lint exception fails the target, warnings are kept in the notes,
3. Polygraphy's ONNX Runtime runner against the fp32 torch model on the test split
   (top-1 agreement, max abs logit difference), plus, for int8, the Q/DQ node count.
Where `tensorrt` imports and a CUDA GPU exists, the host check builds and runs the engine
through the "tensorrt" runtime adapter; elsewhere the target is "not measured".

    >>> artifact = TensorrtInt8().compile(CompileInputs(trained=trained, data=data, quantized=quantized,
    ...                                                 output_dir=Path("build")))
    >>> artifact.notes["onnxrt_vs_torch"]["top1_agreement"], artifact.notes["lint"]["warnings"]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeship.errors import CompileError
from edgeship.files import sha256_of
from edgeship.records import CompiledArtifact, DetectionOutputs
from edgeship.tasks.compile import CompileInputs
from edgeship.tasks.compile.tracing import TORCH_CAPTURE
from edgeship.tasks.compile.onnx import INPUT_NAME, OUTPUT_NAME, _specs, export_onnx

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
MAX_OPSET = 20  # what TensorRT 10's ONNX parser documents
BUILD_BATCH = 1


class _Tensorrt:
    """A TensorRT target; subclasses provide the ONNX it starts from."""

    name: str
    precision: str
    runtime = "tensorrt"
    needs_quantized: bool

    def compile(self, inputs: CompileInputs) -> CompiledArtifact:
        """Write `output_dir/model_<precision>_static.onnx` for the device's engine build, and check it."""
        import onnx

        output_dir = Path(inputs.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"model_{self.precision}_static.onnx"
        postprocess = None
        if inputs.trained.detection is not None:  # decode in the graph, EfficientNMS_TRT after it
            notes, postprocess = tensorrt_detector(inputs, path)
        else:
            notes = self._source(inputs, path)
            make_static(path, inputs.trained.input_shape, inputs.trained.num_classes)
            notes["constant_folding"] = fold_constants(path)
            notes.update(check_onnx(path, int8=self.precision == "int8"))
            notes["lint"] = polygraphy_lint(path)
            notes["onnxrt_vs_torch"] = compare_with_torch(path, inputs)
        notes["engine"] = ("built on the NVIDIA device by its agent (edgeship.device.tensorrt_build), "
                           f"flags: {'INT8+FP16 (explicit Q/DQ)' if self.precision == 'int8' else 'FP16'}")
        from edgeship.device.runtimes import unavailable_reason

        reason = unavailable_reason(self.runtime)
        if reason:
            notes["measured_here"] = f"not measured: {reason}"
        graph = onnx.load(str(path), load_external_data=False).graph
        import polygraphy
        import torch

        return CompiledArtifact(target=self.name, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                                precision=self.precision, runtime=self.runtime, inputs=_specs(graph.input, graph),
                                outputs=_specs(graph.output, graph),
                                converter={"torch": torch.__version__, "onnx": onnx.__version__,
                                           "polygraphy": polygraphy.__version__}, notes=notes, postprocess=postprocess)

    def _source(self, inputs: CompileInputs, path: Path) -> dict:
        raise NotImplementedError


class TensorrtFp16(_Tensorrt):
    """The float model as static ONNX; the device builds it with FP16 kernels allowed."""

    name = "tensorrt-fp16"
    precision = "fp16"
    needs_quantized = False

    def _source(self, inputs: CompileInputs, path: Path) -> dict:
        from edgeship.tasks.train import load_model

        try:
            with TORCH_CAPTURE:
                export_onnx(load_model(inputs.trained), inputs.trained.input_shape, path)
        except Exception as error:  # noqa: BLE001  (the exporter raises many types)
            raise CompileError(f"torch.onnx.export failed for '{inputs.trained.factory}': "
                               f"{type(error).__name__}: {error}") from error
        return {"source": "trained fp32 model, torch.onnx.export"}


class TensorrtInt8(_Tensorrt):
    """The QAT model's QDQ ONNX as static ONNX; the device builds it with explicit int8 quantization."""

    name = "tensorrt-int8"
    precision = "int8"
    needs_quantized = True

    def _source(self, inputs: CompileInputs, path: Path) -> dict:
        if inputs.quantized is None:
            raise CompileError("tensorrt-int8 needs the quantization-aware-trained model (its QDQ ONNX); "
                               "run the qat stage first")
        source = Path(inputs.quantized.onnx_path)
        if not source.is_file():
            raise CompileError(f"{source} not found; run the qat stage again")
        shutil.copyfile(source, path)
        return {"source": f"QAT QDQ ONNX ({source.name})", "float_layers": list(inputs.quantized.float_layers)}


def make_static(path: Path, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Fix the batch axis of the input and output to BUILD_BATCH, and re-infer the shapes in between."""
    import onnx
    from onnx.tools import update_model_dims

    model = onnx.load(str(path))
    inputs = [i.name for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    if inputs != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise CompileError(f"{path.name} must have one input '{INPUT_NAME}' and one output '{OUTPUT_NAME}', "
                           f"it has {inputs} -> {[o.name for o in model.graph.output]}")
    del model.graph.value_info[:]
    model = update_model_dims.update_inputs_outputs_dims(
        model, {INPUT_NAME: [BUILD_BATCH, *input_shape]}, {OUTPUT_NAME: [BUILD_BATCH, num_classes]})
    onnx.save(onnx.shape_inference.infer_shapes(model, strict_mode=True), str(path))


def fold_constants(path: Path) -> dict:
    """Fold constant subgraphs with ONNX-GraphSurgeon (ONNX Runtime evaluates them), so Q/DQ scales are initializers.

    TensorRT needs every Q/DQ scale and zero point to be a build-time constant; the QAT
    export computes some zero points through Cast/ConstantOfShape, which this folds away.
    """
    import onnx
    import onnx_graphsurgeon as gs

    model = onnx.load(str(path))
    before = len(model.graph.node)
    try:
        graph = gs.import_onnx(model)
        graph.fold_constants().cleanup().toposort()
        folded = gs.export_onnx(graph)
    except Exception as error:  # noqa: BLE001  (graphsurgeon and ONNX Runtime raise many types)
        raise CompileError(f"constant folding of {path.name} failed: {type(error).__name__}: {error}") from error
    folded.ir_version = model.ir_version  # keep an IR version the runtimes read
    onnx.save(onnx.shape_inference.infer_shapes(folded, strict_mode=True), str(path))
    return {"nodes_before": before, "nodes_after": len(folded.graph.node), "tool": "onnx-graphsurgeon fold_constants"}


def check_onnx(path: Path, int8: bool) -> dict:
    """onnx.checker (full), static shapes, opset range, and for int8 the Q/DQ nodes; CompileError when one fails."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # noqa: BLE001  (ValidationError, InferenceError)
        raise CompileError(f"{path.name} fails the ONNX checker: {type(error).__name__}: {error}") from error
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise CompileError(f"{path.name} uses opset {opset}; the TensorRT targets need opset {MIN_OPSET}..{MAX_OPSET}")
    dynamic = [f"{v.name}[{i}]" for v in list(model.graph.input) + list(model.graph.output)
               for i, d in enumerate(v.type.tensor_type.shape.dim) if not (d.HasField("dim_value") and d.dim_value > 0)]
    if dynamic:
        raise CompileError(f"{path.name} still has dynamic dimensions {dynamic}; TensorRT engines here are static")
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    qdq = {"QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0)}
    if int8 and not (qdq["QuantizeLinear"] and qdq["DequantizeLinear"]):
        raise CompileError(f"{path.name} has no Q/DQ nodes {qdq}; explicit int8 in TensorRT needs the QDQ ONNX "
                           f"from quantization-aware training")
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    computed = sorted({name for node in model.graph.node if node.op_type in qdq
                       for name in node.input[1:] if name and name not in constants})
    if computed:
        raise CompileError(f"{path.name} computes Q/DQ scales or zero points at run time ({computed[:5]}); TensorRT "
                           f"needs them constant")
    return {"opset": opset, "static_input_shape": [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim],
            "onnx_checker": "passed (full_check)", "ops": dict(sorted(ops.items())), "qdq_nodes": qdq}


def polygraphy_lint(path: Path) -> dict:
    """`polygraphy check lint` on the file: CompileError on any lint exception, the warnings returned."""
    with tempfile.TemporaryDirectory(prefix="edgeship-lint-") as tmp:
        report_path = Path(tmp) / "lint.json"
        script = Path(sys.executable).with_name("polygraphy")  # the console script beside this interpreter
        polygraphy = str(script) if script.is_file() else shutil.which("polygraphy")
        if polygraphy is None:
            raise CompileError("polygraphy is not installed; pip install 'edgeship[targets]' (polygraphy and "
                               "onnx-graphsurgeon, which its lint needs)")
        command = [polygraphy, "check", "lint", str(path), "-o", str(report_path)]
        try:
            process = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise CompileError(f"polygraphy check lint could not run: {error}") from None
        if not report_path.is_file():
            raise CompileError(f"polygraphy check lint wrote no report (exit {process.returncode}): "
                               f"{(process.stderr or process.stdout)[-2000:]}")
        report = json.loads(report_path.read_text())
    entries = report.get("lint_entries", [])
    failing = [e for e in entries if e.get("level") == "exception"]
    if failing or report.get("summary", {}).get("failing"):
        messages = "; ".join(f"{e.get('source')}: {e.get('message')}" for e in failing)[:4000]
        raise CompileError(f"polygraphy check lint fails {path.name}: {messages or report['summary']['failing']}")
    return {"passing_nodes": len(report.get("summary", {}).get("passing", [])),
            "warnings": [f"{e.get('source')}: {e.get('message')}" for e in entries if e.get("level") == "warning"]}


def compare_with_torch(path: Path, inputs: CompileInputs, limit: int | None = None) -> dict:
    """Run the ONNX with Polygraphy's ONNX Runtime runner on the test split; compare with the fp32 torch model."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from edgeship.tasks.data import load_split
    from edgeship.tasks.train import load_model, predict_logits

    x, y = load_split(inputs.data, "test")
    x, y = (x[:limit], y[:limit]) if limit else (x, y)
    with TORCH_CAPTURE:  # a forward pass while another thread FX-traces fails (see tracing.py)
        reference = predict_logits(load_model(inputs.trained), x)
    with OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"])) as runner:
        logits = np.concatenate([runner.infer({INPUT_NAME: x[i:i + BUILD_BATCH]})[OUTPUT_NAME]
                                 for i in range(0, len(x), BUILD_BATCH)])
    predictions = logits.argmax(axis=1)
    return {"runner": "polygraphy OnnxrtRunner (ONNX Runtime CPU)", "images": int(len(x)),
            "accuracy": float((predictions == y).mean()),
            "top1_agreement": float((predictions == reference.argmax(axis=1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits.astype(np.float64) - reference).max())}


def tensorrt_detector(inputs: CompileInputs, path: Path) -> tuple[dict, DetectionOutputs]:
    """The tensorrt-fp16 detector: the decoded float graph made static (batch 1), folded, checked, linted and run
    on ONNX Runtime against the torch reference (decode + numpy NMS on both sides), then EfficientNMS_TRT appended
    and checked as far as a machine without TensorRT can."""
    import onnx
    from onnx.tools import update_model_dims

    from edgeship.tasks.compile import exportable_model
    from edgeship.tasks.compile.detection import BOXES, SCORES, add_efficient_nms, check_efficient_nms

    head, shape = inputs.trained.detection, inputs.trained.input_shape
    try:
        with TORCH_CAPTURE:
            export_onnx(exportable_model(inputs), shape, path, output_names=(BOXES, SCORES))
    except Exception as error:  # noqa: BLE001  (the exporter raises many types)
        raise CompileError(f"torch.onnx.export failed for '{inputs.trained.factory}': "
                           f"{type(error).__name__}: {error}") from error
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    model = update_model_dims.update_inputs_outputs_dims(
        model, {INPUT_NAME: [BUILD_BATCH, *shape]},
        {BOXES: [BUILD_BATCH, head.points, 4], SCORES: [BUILD_BATCH, head.points, head.num_classes]})
    onnx.save(onnx.shape_inference.infer_shapes(model, strict_mode=True), str(path))
    notes = {"source": "trained fp32 detector with its decode, torch.onnx.export", "constant_folding":
             fold_constants(path)}
    notes.update(check_onnx(path, int8=False))
    notes["lint"] = polygraphy_lint(path)
    notes["onnxrt_vs_torch"] = _decoded_vs_torch(path, inputs)
    postprocess = add_efficient_nms(path, head)
    notes["nms"] = check_efficient_nms(path, head)
    return notes, postprocess


def _decoded_vs_torch(path: Path, inputs: CompileInputs) -> dict:
    """The decoded graph on ONNX Runtime, then the one numpy NMS, against the fp32 torch reference on the test split."""
    from edgeship.device.detections import agreement, nms
    from edgeship.device.runtimes import OnnxRuntimeSession
    from edgeship.tasks.compile.detection import BOXES, SCORES
    from edgeship.tasks.data import load_split
    from edgeship.tasks.kinds import task_of

    task, head = task_of(inputs.trained), inputs.trained.detection

    images, _ = load_split(inputs.data, "test")
    session = OnnxRuntimeSession(path, threads=1)
    packed = np.concatenate([nms(*(session.run_all(images[i:i + 1])[n] for n in (BOXES, SCORES)), head.nms)
                             for i in range(len(images))])
    with TORCH_CAPTURE:
        reference = task.reference(inputs.trained, inputs.data)
    matched, score_diff = agreement(packed, reference)
    return {"runner": "ONNX Runtime CPU, then numpy NMS in place of EfficientNMS_TRT", "images": int(len(images)),
            **task.score(packed, inputs.data), "matched_fraction": matched, "score_diff": score_diff}
