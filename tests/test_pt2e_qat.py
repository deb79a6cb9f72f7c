"""Why QAT stays on torch.ao's FX API for now: what torchao's PT2E QAT (prepare_qat_pt2e / convert_pt2e,
X86InductorQuantizer) gives on the same tiny MobileNetV2, against the FX path (`tasks/qat.py`).

Measured here with torch 2.13 and torchao 0.18 (each assertion is the finding; when one stops holding, PT2E
may have caught up and this test says so by failing):
1. edgeship's ONNX export (the TorchScript exporter, dynamo=False) cannot take the converted PT2E model: it
   refuses .eval() on an exported model, and after allow_exported_model_train_eval it has no ONNX symbolic for
   `quantized_decomposed::dequantize_per_channel`.
2. The dynamo exporter writes a QDQ model, but ONNX Runtime keeps its classifier a float Gemm (and more float
   convs than FX leaves): fewer integer kernels than the FX model on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from edgeship.config import QatParams
from edgeship.tasks.qat import quantization_aware_train
from edgeship.tasks.qdq_onnx import float_ops_of, integer_ops_of, optimized_op_counts
from edgeship.tasks.train import load_model
from tiny_quantization import digits, trained  # noqa: F401  (fixtures)

pt2e = pytest.importorskip("torchao.quantization.pt2e", reason="torchao (PT2E) is not installed")
torch.set_num_threads(1)
BATCH = 2  # the exported graph is specialized to its example's batch size


@pytest.fixture(scope="module")
def converted(trained):  # noqa: F811
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    model = load_model(trained).train()
    example = (torch.zeros(BATCH, *trained.input_shape),)
    captured = torch.export.export(model, example).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(captured, quantizer)
    with torch.no_grad():
        prepared(torch.randn(BATCH, *trained.input_shape))
    pt2e.move_exported_model_to_eval(prepared)
    return convert_pt2e(prepared), example


def test_the_torchscript_exporter_cannot_export_a_pt2e_model(converted, tmp_path):
    model, example = converted
    with pytest.raises(NotImplementedError, match="train\\(\\) or eval\\(\\) is not supported for exported models"):
        torch.onnx.export(model, example, str(tmp_path / "a.onnx"), dynamo=False)
    pt2e.allow_exported_model_train_eval(model)
    with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="quantized_decomposed::dequantize_per"):
        torch.onnx.export(model, example, str(tmp_path / "b.onnx"), dynamo=False)


def test_the_dynamo_export_runs_fewer_integer_kernels_than_fx_qat(converted, trained, digits, tmp_path):  # noqa: F811
    model, example = converted
    path = tmp_path / "pt2e.onnx"
    torch.onnx.export(model, example, str(path), dynamo=True)
    ops = optimized_op_counts(path)
    pt2e_int, pt2e_float = integer_ops_of(ops), float_ops_of(ops)
    fx = quantization_aware_train(trained, digits, QatParams(epochs=1, freeze_bn_after_epoch=0,
                                                             freeze_observers_after_epoch=1), tmp_path / "fx")
    assert pt2e_float.get("Gemm", 0) >= 1 and fx.float_ops.get("Gemm", 0) == 0  # the classifier stays float
    assert sum(pt2e_int.values()) < sum(fx.integer_ops.values())
    assert sum(pt2e_float.values()) > sum(fx.float_ops.values())
