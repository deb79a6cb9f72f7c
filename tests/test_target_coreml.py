"""Core ML targets: real coremltools conversions, spec and census checks, and the torch-side proxy.

Prediction needs Core ML, i.e. macOS: those tests run on a Mac and are skipped elsewhere.
One tiny model (digits at 8x8, a two-stage ResNet, two epochs) is trained once for the file.
"""

from __future__ import annotations

import sys
import zipfile

import pytest

from edgeship.config import DataParams, ModelParams, TrainParams
from edgeship.device.runtimes import available_runtimes, open_session, unavailable_reason
from edgeship.errors import CompileError, ModelLoadError
from edgeship.files import sha256_of
from edgeship.targets import KNOWN_TARGETS
from edgeship.tasks.compile import CompileInputs, get_target
from edgeship.tasks.compile.coreml import CoremlW8A8, census, zip_package
from edgeship.tasks.host_check import proxy_or_not_measured

on_macos = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from edgeship.tasks.data import export_digits, prepare
    from edgeship.tasks.host_check import reference_logits
    from edgeship.tasks.train import train

    root = tmp_path_factory.mktemp("coreml")
    export_digits(root / "raw")
    data = prepare(root / "raw", root / "prepared", DataParams(input_size=8, calibration_size=32))
    model = train(data, ModelParams(factory="edgeship.models.zoo:small_resnet", kwargs={"widths": [8, 16]}),
                  TrainParams(epochs=2), root / "model")
    artifacts = {name: get_target(name).compile(CompileInputs(trained=model, data=data, output_dir=root / name))
                 for name in ("coreml-fp16", "coreml-w8a8")}
    return data, model, reference_logits(model, data), artifacts, root


def _spec(artifact, tmp_path):
    import coremltools as ct

    with zipfile.ZipFile(artifact.path) as archive:
        archive.extractall(tmp_path)
    package = next(tmp_path.glob("*.mlpackage"))
    return package, ct.models.MLModel(str(package), skip_model_load=True).get_spec()


def test_coreml_targets_are_registered_for_apple_hardware():
    for name in ("coreml-fp16", "coreml-w8a8"):
        target, row = get_target(name), KNOWN_TARGETS[name]
        assert (target.name, target.runtime, target.precision, row.hardware) == (name, "coreml", row.precision, "apple")


def test_fp16_is_an_fp16_ml_program_with_float32_io(compiled, tmp_path):
    _, model, _, artifacts, _ = compiled
    artifact = artifacts["coreml-fp16"]
    assert artifact.path.name.endswith(".mlpackage.zip") and artifact.sha256 == sha256_of(artifact.path)
    _, spec = _spec(artifact, tmp_path)
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 8  # iOS 17
    assert [(s.name, s.shape, s.dtype) for s in artifact.inputs] == [("input", (1, 1, 8, 8), "float32")]
    assert artifact.outputs[0].dtype == "float32"
    assert census(spec) == artifact.notes["census"]
    assert artifact.notes["census"]["fp32_compute_ops"] == {}  # only the input/output casts are fp32
    assert artifact.notes["census"]["ops"]["conv"] >= 1 and artifact.converter["coremltools"] == "9.0"


def test_w8a8_quantizes_activations_and_weights(compiled):
    artifacts = compiled[3]
    ops = artifacts["coreml-w8a8"].notes["census"]["ops"]
    assert ops["quantize"] > 0 and ops["dequantize"] > 0  # int8 activations
    assert ops["constexpr_affine_dequantize"] >= ops["conv"]  # int8 weights, every conv
    assert artifacts["coreml-w8a8"].bytes < artifacts["coreml-fp16"].bytes


def test_accuracy_here_is_a_labelled_proxy(compiled):
    _, model, _, artifacts, _ = compiled
    for name, min_agreement in (("coreml-fp16", 0.99), ("coreml-w8a8", 0.9)):
        check = proxy_or_not_measured(artifacts[name], "Core ML prediction needs macOS")
        assert check.proxy and "proxy" in check.note and "macOS" in check.note
        assert check.top1_agreement >= min_agreement
        assert check.accuracy >= model.test_accuracy - 0.05


def test_the_zipped_package_is_reproducible(compiled, tmp_path):
    artifact = compiled[3]["coreml-w8a8"]
    package, _ = _spec(artifact, tmp_path)
    assert sha256_of(zip_package(package, tmp_path / "again.zip")) == artifact.sha256


def test_a_w8a8_program_without_activation_quantization_fails_its_check():
    with pytest.raises(CompileError, match="no activation quantization"):
        CoremlW8A8()._check({"ops": {"conv": 3, "constexpr_affine_dequantize": 3}})


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the behaviour off macOS")
def test_off_macos_coreml_is_not_a_runtime_here(compiled):
    assert "coreml" not in available_runtimes()
    assert unavailable_reason("coreml") == "Core ML prediction needs macOS"
    with pytest.raises(ModelLoadError, match="needs macOS"):
        open_session("coreml", compiled[3]["coreml-fp16"].path)


@on_macos
@pytest.mark.parametrize("compute_units", ["CPU_ONLY", "ALL"])
def test_core_ml_runs_both_targets_on_macos(compiled, compute_units):
    from edgeship.tasks.data import load_split
    from edgeship.tasks.host_check import host_check

    data, model, reference, artifacts, _ = compiled
    for name in ("coreml-fp16", "coreml-w8a8"):
        session = open_session("coreml", artifacts[name].path, compute_units=compute_units)
        assert session.run(load_split(data, "test")[0][:3]).shape == (3, 10)
        check = host_check(artifacts[name], data, reference)
        assert check.error is None and check.top1_agreement >= 0.9
