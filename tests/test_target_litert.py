"""LiteRT targets: real litert-torch conversions (in the converter's own environment) run on the real LiteRT interpreter.

One tiny model (digits at 8x8, a two-stage ResNet, two epochs) is trained once for
the file; the three targets are converted in parallel, then each is host-checked
through the same runtime adapter the device agent uses.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgeship.config import DataParams, ModelParams, TrainParams
from edgeship.device.runtimes import available_runtimes, open_session, predict_classes
from edgeship.errors import CompileError
from edgeship.files import sha256_of
from edgeship.records import BenchmarkRequest
from edgeship.targets import KNOWN_TARGETS
from edgeship.tasks.compile import CompileInputs, get_target
from edgeship.tasks.compile.litert import converter_python, run_converter

TARGETS = ("tflite-fp32", "tflite-fp16", "tflite-int8")

try:
    converter_python()
    NO_CONVERTER = ""
except CompileError as error:
    NO_CONVERTER = str(error)
needs_converter = pytest.mark.skipif(bool(NO_CONVERTER), reason=f"LiteRT conversion needs litert-torch's own "
                                     f"environment (.venv/litert-converter from requirements/litert-converter.txt): "
                                     f"{NO_CONVERTER[:200]}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Digits at 8x8 and a tiny ResNet trained for two epochs, with its fp32 test logits."""
    from edgeship.tasks.data import export_digits, prepare
    from edgeship.tasks.host_check import reference_logits
    from edgeship.tasks.train import train

    root = tmp_path_factory.mktemp("litert")
    export_digits(root / "raw")
    data = prepare(root / "raw", root / "prepared", DataParams(input_size=8, calibration_size=16))
    model = train(data, ModelParams(factory="edgeship.models.zoo:small_resnet", kwargs={"widths": [8, 16]}),
                  TrainParams(epochs=2), root / "model")
    return data, model, reference_logits(model, data), root


@pytest.fixture(scope="module")
def artifacts(trained):
    """The three LiteRT targets, converted side by side (each in its own converter process)."""
    if NO_CONVERTER:
        pytest.skip(f"LiteRT conversion needs litert-torch's own environment: {NO_CONVERTER[:200]}")
    data, model, _, root = trained

    def compile_one(name):
        return get_target(name).compile(CompileInputs(trained=model, data=data, output_dir=root / "build" / name))

    with ThreadPoolExecutor(len(TARGETS)) as pool:
        return dict(zip(TARGETS, pool.map(compile_one, TARGETS)))


def test_litert_targets_are_registered_on_the_protocol():
    for name in TARGETS:
        target, row = get_target(name), KNOWN_TARGETS[name]
        assert (target.name, target.runtime, target.precision) == (row.name, row.runtime, row.precision)
        assert row.runtime == "litert" and row.hardware == "cpu"
    assert "litert" in available_runtimes()


@needs_converter
def test_fp32_matches_torch_on_the_litert_interpreter(trained, artifacts):
    from edgeship.tasks.host_check import host_check

    data, model, reference, _ = trained
    artifact = artifacts["tflite-fp32"]
    assert artifact.path.suffix == ".tflite" and artifact.sha256 == sha256_of(artifact.path)
    assert artifact.bytes == artifact.path.stat().st_size and artifact.runtime == "litert"
    assert artifact.converter["litert-torch"] and artifact.notes["weights"] == "trained-fp32"
    assert artifact.inputs[0].shape == (1, 1, 8, 8) and artifact.inputs[0].dtype == "float32"
    check = host_check(artifact, data, reference)
    assert check.error is None and check.top1_agreement == 1.0
    assert check.max_abs_logit_diff < 1e-3
    assert check.accuracy == pytest.approx(model.test_accuracy)


@needs_converter
def test_int8_is_full_integer_calibrated_and_runs_in_xnnpack(trained, artifacts):
    from edgeship.tasks.host_check import host_check

    data, model, reference, _ = trained
    artifact = artifacts["tflite-int8"]
    assert artifact.precision == "int8" and artifact.inputs[0].dtype == "int8"
    assert artifact.notes["calibration_images"] == 16 and "PT2E" in artifact.notes["method"]
    assert artifact.notes["io_quantization"]  # scale and zero point of the int8 input and output
    assert artifact.bytes < artifacts["tflite-fp32"].bytes
    check = host_check(artifact, data, reference)
    assert check.error is None
    assert check.top1_agreement >= 0.9 and check.accuracy >= model.test_accuracy - 0.05
    session = open_session("litert", artifact.path, threads=1)
    assert session.xnnpack and session.delegate_partitions >= 1
    assert session.inputs[0].dtype == "float32"  # the adapter quantizes the pipeline's float batches itself


@needs_converter
def test_fp16_stores_half_precision_weights(trained, artifacts):
    from edgeship.tasks.host_check import host_check

    data, _, reference, _ = trained
    artifact = artifacts["tflite-fp16"]
    assert artifact.bytes < artifacts["tflite-fp32"].bytes
    assert artifact.notes["ops"].get("DEQUANTIZE", 0) > 0  # fp16 weights dequantized for fp32 CPU kernels
    check = host_check(artifact, data, reference)
    assert check.error is None and check.top1_agreement >= 0.98 and check.max_abs_logit_diff < 0.1


@needs_converter
def test_adapter_takes_nchw_batches_of_any_size_and_xnnpack_can_be_off(trained, artifacts):
    data, _, _, _ = trained
    from edgeship.tasks.data import load_split

    x, y = load_split(data, "test")
    path = artifacts["tflite-int8"].path
    with_xnnpack = open_session("litert", path, threads=1)
    without = open_session("litert", path, threads=1, xnnpack=False)
    assert not without.xnnpack and without.delegate_partitions == 0
    batch = with_xnnpack.run(x[:5])
    assert batch.shape == (5, 10) and batch.dtype == np.float32
    assert np.allclose(batch, np.concatenate([with_xnnpack.run(x[i:i + 1]) for i in range(5)]))
    assert (predict_classes(without, x) == predict_classes(with_xnnpack, x)).mean() >= 0.95


@needs_converter
def test_benchmark_child_process_measures_a_tflite_model(artifacts):
    from edgeship.device.jobs import run_benchmark_job

    measured = run_benchmark_job(artifacts["tflite-int8"].path, "litert",
                                 BenchmarkRequest(runtime="litert", warmup=2, iterations=30, sensors=False),
                                 timeout_s=120)
    fields = getattr(measured, "fields", measured)
    assert fields["latency_ms"]["p50"] > 0 and fields["runtime"] == "litert"


@needs_converter
def test_a_converter_failure_is_a_compile_error_with_the_converters_words(tmp_path):
    job = {"program": str(tmp_path / "missing.pt2"), "output": str(tmp_path / "m.tflite"), "precision": "fp32"}
    with pytest.raises(CompileError, match="litert-torch failed .*missing.pt2"):
        run_converter(job, tmp_path / "job.json")


def test_a_missing_converter_environment_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESHIP_LITERT_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(CompileError, match="EDGESHIP_LITERT_PYTHON"):
        converter_python()


def test_the_converter_script_imports_nothing_from_edgeship():
    import ast

    source = Path(__file__).parents[1] / "edgeship" / "tasks" / "compile" / "litert_convert.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.startswith("edgeship") for n in names), names
