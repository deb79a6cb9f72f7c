"""The LiteRT conversion itself, run by the Python that has litert-torch (often a separate environment).

litert-torch cannot share the pipeline's environment: every litert-converter release
pins xdsl==0.28.0, which caps typing-extensions below 4.13, while pydantic 2.14, anyio
4.16 and Prefect's stack need typing-extensions 4.16 or newer. So `litert.py` hands this
script a job and runs it with the converter's Python (see `litert.converter_python`).
This file imports only the standard library at module level, and torch, torchao,
litert_torch and ai_edge_quantizer inside `convert`; never anything from edgeship,
so it runs in an environment where edgeship is not installed.

The job (JSON, path as the only argument) names a `torch.export` program saved by the
pipeline (`program`), the `output` .tflite path, the `precision` and, for int8, a
`calibration` .npy of NCHW float32 images. The answer is one JSON line on stdout:
{"versions": {...}, "notes": {...}} or {"error": "..."} with exit status 1.

    $ .venv/litert-converter/bin/python -I edgeship/tasks/compile/litert_convert.py job.json
    {"versions": {"torch": "2.13.0+cpu", "litert-torch": "0.10.0", ...}, "notes": {...}}

Precisions:
- fp32: `litert_torch.convert` of the float program.
- fp16: the fp32 flatbuffer with float16 weights (ai-edge-quantizer FLOAT_CASTING, weight-only):
  half the size; XNNPACK computes in fp32 on CPUs without fp16 arithmetic, GPU delegates in fp16.
- int8: PT2E static quantization with litert-torch's PT2EQuantizer (symmetric, per-channel
  weights, int8 activations), observers calibrated on the calibration images one at a time
  (the program is exported with batch 1), then `litert_torch.convert(..., quant_config=...)`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import time

_DISTRIBUTIONS = ("torch", "litert-torch", "litert-converter", "ai-edge-litert", "ai-edge-quantizer", "torchao")


def convert(job: dict) -> dict:
    """Run one conversion job; return {"versions", "notes"}. Raises whatever the converter raises."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    program = torch.export.load(job["program"])
    model = program.module()
    sample = tuple(torch.zeros(tuple(arg.shape), dtype=arg.dtype) for arg in _example_inputs(program))
    precision = job["precision"]
    notes: dict = {"route": "litert-torch"}
    started = time.perf_counter()
    if precision in ("fp32", "fp16"):
        import litert_torch

        edge_model = litert_torch.convert(model, sample)
        _export(edge_model, job["output"])
        if precision == "fp16":
            notes["fp16"] = _float16_weights(job["output"])
    elif precision == "int8":
        calibration = np.load(job["calibration"]).astype(np.float32, copy=False)
        notes.update(_int8(program, sample, calibration, job["output"], job.get("float_layers") or []))
    else:
        raise ValueError(f"unknown precision '{precision}'; the LiteRT targets are fp32, fp16 and int8")
    notes["convert_s"] = round(time.perf_counter() - started, 2)
    return {"versions": _versions(), "notes": notes}


def _example_inputs(program) -> list:
    """The fake tensors of the exported program's user inputs (their shapes and dtypes)."""
    specs = program.graph_signature.input_specs
    user_inputs = [spec.arg.name for spec in specs if spec.kind.name == "USER_INPUT"]
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    return [nodes[name].meta["val"] for name in user_inputs]


def _export(edge_model, path: str) -> None:
    """Write a converted model; litert-torch prints progress to stdout, which is the answer's channel."""
    with contextlib.redirect_stdout(sys.stderr):
        edge_model.export(path)


def _float16_weights(path: str) -> dict:
    """Rewrite the fp32 .tflite in place with float16 weights; return what the quantizer changed."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    with open(path, "rb") as handle:
        float_model = handle.read()
    fp16 = quantizer.Quantizer(float_model)
    fp16.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    result = fp16.quantize()
    with open(path, "wb") as handle:
        handle.write(bytes(result.quantized_model))
    return {"method": "ai-edge-quantizer FLOAT_CASTING weight-only", "fp32_bytes": len(float_model)}


def _int8(program, sample: tuple, calibration, output: str, float_layers: list[str]) -> dict:
    """PT2E static int8: prepare, calibrate one image at a time, convert, and lower to LiteRT.

    Nodes inside the plan's `float_layers` (module names, matched on each node's nn_module_stack) get no
    annotation, so they stay float with quantize/dequantize at their edges, as in the QDQ ONNX model.
    """
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class PlanQuantizer(PT2EQuantizer):
        """litert-torch's quantizer, leaving the plan's float layers unannotated. (Its own set_module_name
        refuses None and matches names through a key format torch 2.13's export no longer writes.)"""

        def _annotate_for_static_quantization_config(self, model):
            def int8(node) -> bool:
                paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
                return not any(p == f or p.startswith(f + ".") for p in paths for f in float_layers)

            self._annotate_all_static_patterns(model, self.global_config, int8)
            return model

    quantizer = PlanQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    # prepare_pt2e wants a freshly exported graph module; re-export the loaded program's module.
    captured = torch.export.export(program.module(), sample).module()
    prepared = prepare_pt2e(captured, quantizer)
    batch = sample[0].shape[0]
    with torch.no_grad():
        for start in range(0, len(calibration) - batch + 1, batch):
            prepared(torch.from_numpy(calibration[start:start + batch]))
    quantized = convert_pt2e(prepared, fold_quantize=False)
    edge_model = litert_torch.convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    _export(edge_model, output)
    return {"method": "PT2E static, symmetric per-channel weights, int8 activations",
            "calibration_images": int(len(calibration)), "float_layers": list(float_layers)}


def _versions(distributions: tuple[str, ...] = _DISTRIBUTIONS) -> dict[str, str]:
    found = {}
    for name in distributions:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def main(argv: list[str], run=None) -> int:
    """Read the job file named on the command line, convert (with `run`, default `convert`; tf_convert.py passes
    its own), answer with one JSON line on stdout."""
    answer_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # converters print; only the answer goes to stdout
    try:
        with open(argv[1]) as handle:
            answer, status = (run or convert)(json.load(handle)), 0
    except Exception as error:  # noqa: BLE001  (the converter's own message is the news)
        answer, status = {"error": f"{type(error).__name__}: {error}"}, 1
    with answer_stream:
        answer_stream.write(json.dumps(answer) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
