"""One precision plan for every int8 target: tflite-int8 and coreml-w8a8 leave the plan's float layers float,
as onnx-int8 does. Digits at 8x8, a tiny ResNet, one QAT epoch with the stem kept float by the plan.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeship.config import DataParams, ModelParams, QatParams, TrainParams
from edgeship.errors import CompileError
from edgeship.tasks.compile import CompileInputs, get_target, plan_float_layers
from edgeship.tasks.compile.litert import converter_python

torch.set_num_threads(1)
try:
    converter_python()
    NO_CONVERTER = ""
except CompileError as error:
    NO_CONVERTER = str(error)

PLAN = {"stem.0": "float"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from edgeship.tasks.data import export_digits, prepare
    from edgeship.tasks.qat import quantization_aware_train
    from edgeship.tasks.train import train

    root = tmp_path_factory.mktemp("one-plan")
    export_digits(root / "raw")
    data = prepare(root / "raw", root / "prepared", DataParams(input_size=8, calibration_size=16))
    trained = train(data, ModelParams(factory="edgeship.models.zoo:small_resnet", kwargs={"widths": [8, 16]}),
                    TrainParams(epochs=2), root / "fp32")
    qat = quantization_aware_train(trained, data, QatParams(epochs=1, freeze_bn_after_epoch=0,
                                                            freeze_observers_after_epoch=1), root / "qat", plan=PLAN)
    return CompileInputs(trained=trained, data=data, output_dir=root / "build", quantized=qat)


def test_the_plan_float_layers_and_the_qat_weights_reach_the_compile_inputs(quantized):
    from edgeship.tasks.compile import float_model_for
    from edgeship.tasks.data import load_split
    from edgeship.tasks.train import evaluate

    assert plan_float_layers(quantized) == ["stem.0"]
    # The QAT-finetuned float weights, BatchNorms included, map back onto the float model (a float-plan layer's
    # conv+BN fusion and a ResNet block's conv1/bn1 as well), and score like the QAT model they came from.
    model, weights = float_model_for(quantized)
    assert weights == "qat-finetuned"
    x, y = load_split(quantized.data, "val")
    assert evaluate(model, x, y) >= quantized.quantized.val_accuracy - 0.05
    ptq = quantized.quantized.model_copy(update={"method": "ptq"})
    assert plan_float_layers(CompileInputs(trained=quantized.trained, data=quantized.data,
                                           output_dir=quantized.output_dir, quantized=ptq)) == []


needs_converter = pytest.mark.skipif(bool(NO_CONVERTER), reason=f"LiteRT conversion needs litert-torch's own "
                                     f"environment (.venv/litert-converter): {NO_CONVERTER[:200]}")


@pytest.fixture(scope="module")
def tflite_int8(quantized):
    return get_target("tflite-int8").compile(quantized)


@needs_converter
def test_tflite_int8_keeps_the_plan_float_layer_float(quantized, tflite_int8):
    from ai_edge_litert.interpreter import Interpreter

    from edgeship.tasks.host_check import host_check, reference_logits

    artifact = tflite_int8
    assert artifact.notes["float_layers"] == ["stem.0"] and artifact.notes["weights"] == "qat-finetuned"
    interpreter = Interpreter(str(artifact.path))
    tensors = {d["index"]: np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    kinds = [(op["op_name"], tensors[op["inputs"][1]]) for op in interpreter._get_ops_details()  # noqa: SLF001
             if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert kinds[0][1] == "float32"  # the stem: float weights
    assert all(dtype == "int8" for _, dtype in kinds[1:])  # every other conv and the classifier: int8
    check = host_check(artifact, quantized.data, reference_logits(quantized.trained, quantized.data))
    assert check.error is None and check.accuracy >= quantized.trained.test_accuracy - 0.05


def test_coreml_w8a8_leaves_the_plan_float_layer_unquantized(quantized):
    pytest.importorskip("coremltools", reason="coreml-w8a8 needs coremltools (the `coreml` extra)")
    from edgeship.tasks.compile.coreml import calibrated_linear_quantizer

    model, _ = calibrated_linear_quantizer(quantized)
    kinds = {name: type(module).__module__ for name, module in model.named_modules()}
    stem = [k for n, k in kinds.items() if n.startswith("stem.0")]
    assert stem and all("quantiz" not in k for k in stem), stem
    assert any("quantiz" in k for n, k in kinds.items() if n.startswith("layers.0.conv1")), kinds


@needs_converter
def test_litert_latency_is_the_runtimes_and_the_io_conversion_is_reported_beside_it(quantized, tflite_int8,
                                                                                    tmp_path):
    from edgeship.device.measure import measure
    from edgeship.device.runtimes import open_session
    from edgeship.records import BenchmarkRequest, BenchmarkResult

    request = BenchmarkRequest(warmup=5, iterations=30, threads=1)
    session = open_session("litert", tflite_int8.path, threads=1)
    assert session.converts_io  # the output is int8 (the input is float here: the plan keeps the stem float)
    batch = np.zeros((1, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(session.run(batch), session.finish(session.invoke(session.prepare(batch))))
    fields = measure(tflite_int8.path, "litert", request).fields
    result = BenchmarkResult(target="tflite-int8", device="here", sha256="ab" * 32, **fields)
    assert result.io_conversion_ms is not None and result.io_conversion_ms > 0
    assert any("latency is the runtime's" in note for note in result.notes)

    float_model = get_target("onnx-fp32").compile(CompileInputs(trained=quantized.trained, data=quantized.data,
                                                                output_dir=tmp_path))
    assert measure(float_model.path, "onnxruntime", request).fields["io_conversion_ms"] is None
    # an older agent's answer, without the field, still reads (a wire record's optional field has a default)
    assert BenchmarkResult.model_validate({k: v for k, v in result.model_dump().items()
                                           if k != "io_conversion_ms"}).io_conversion_ms is None
