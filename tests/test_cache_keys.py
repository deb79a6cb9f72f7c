"""The release cache's keys (edgeship/flows/caching.py): each stage's key changes with what can change its result,
and with nothing else (not the MLflow run, the run's output directory, a loopback agent's port).

Plain calls of the key functions on real records and files; no Prefect run needed.
"""

from __future__ import annotations

import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from edgeship.config import parse_params
from edgeship.flows import caching
from edgeship.flows.release_tasks import benchmark_on_device, compile_target, train_model
from edgeship.records import DeviceInfo, PreparedData, TrainedModel
from edgeship.tasks.benchmark import BenchmarkDevices, DeviceEndpoint
from ota_world import make_artifact


def context(task) -> SimpleNamespace:
    """What Prefect hands a key function: the task being run (its function's module is part of every key)."""
    return SimpleNamespace(task=task)


@pytest.fixture
def project(tmp_path) -> SimpleNamespace:
    data_dir = tmp_path / "prepared"
    data_dir.mkdir()
    np.savez(data_dir / "test.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int64))
    data = PreparedData(directory=data_dir, classes=["0", "1"], input_shape=(1, 8, 8), counts={"test": 2},
                        dvc_hash="md5-a")
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights-1")
    trained = TrainedModel(checkpoint=checkpoint, factory="edgeship.models.zoo:mobilenet_v2", num_classes=2,
                           input_shape=(1, 8, 8), val_accuracy=0.9, test_accuracy=0.9)
    return SimpleNamespace(tmp=tmp_path, data=data, trained=trained, params=parse_params({}))


def train_inputs(project, **changes) -> dict:
    return {"params": project.params, "data": project.data, "out_dir": project.tmp / "run-1", "run": "run-1",
            **changes}


def test_the_train_key_follows_data_model_and_training_and_nothing_else(project):
    key = lambda **changes: caching.train_key(context(train_model), train_inputs(project, **changes))  # noqa: E731
    base = key()
    assert key(out_dir=project.tmp / "run-2", run="run-2") == base  # another run, another directory: same model
    assert key(data=project.data.model_copy(update={"dvc_hash": "md5-b"})) != base
    assert key(params=parse_params({"train": {"epochs": 7}})) != base
    assert key(params=parse_params({"model": {"factory": "edgeship.models.zoo:resnet"}})) != base
    assert key(params=parse_params({"gate": {"onnx-fp32": {"p99_latency_ms": 1}}})) == base  # a gate limit: no


def test_compile_and_host_check_keys_follow_the_files_they_read(project):
    compile_inputs = {"target": "onnx-fp32", "trained": project.trained, "quantized": None, "data": project.data,
                      "out_dir": project.tmp / "run-1", "run": "run-1", "options": None}
    key = lambda **changes: caching.compile_key(context(compile_target), {**compile_inputs, **changes})  # noqa: E731
    base = key()
    assert key(out_dir=project.tmp / "run-2", run="run-2") == base
    assert key(target="onnx-int8") != base
    assert key(options={"opset": 18}) != base
    project.trained.checkpoint.write_bytes(b"weights-2")  # retrained: same path, other bytes
    assert key() != base

    artifact = make_artifact(project.tmp / "builds", "1")
    reference = project.tmp / "reference.npy"
    np.save(reference, np.zeros((2, 10), np.float32))
    check = lambda **changes: caching.host_check_key(context(compile_target), {  # noqa: E731
        "artifact": artifact, "data": project.data, "reference": reference, "golden_count": 8, **changes})
    first = check()
    assert check(artifact=make_artifact(project.tmp / "builds", "2")) != first
    assert check(golden_count=4) != first
    np.save(reference, np.ones((2, 10), np.float32))
    assert check() != first


def test_the_benchmark_key_follows_the_device_as_it_reports_itself_not_its_port(project):
    artifact = make_artifact(project.tmp / "builds", "1")
    info = DeviceInfo(name="local", hostname="lab-1", os="Linux", platform="Linux-6", machine="x86_64",
                      cpu_model="EPYC", cpu_count=2, memory_total_mb=1000, runtimes={"onnxruntime": "1.31.1"},
                      python_version="3.11", agent_version="0.1.0")

    def key(url="http://127.0.0.1:40001", device_info=info, tags=("cpu",), params=None, batch=None) -> str:
        pool = BenchmarkDevices([DeviceEndpoint("local", url, "token", tags)], (params or project.params).benchmark)
        pool.info["local"] = device_info
        return caching.benchmark_key(context(benchmark_on_device), {
            "artifact": artifact, "device": "local", "pool": pool, "params": params or project.params,
            "run": "run-1", "batch": batch})

    base = key()
    assert key(url="http://127.0.0.1:40002") == base  # the loopback agent of the next run listens elsewhere
    assert key(device_info=info.model_copy(update={"memory_total_mb": 2000})) == base  # not what latency depends on
    assert key(device_info=info.model_copy(update={"runtimes": {"onnxruntime": "1.32.0"}})) != base  # upgraded
    assert key(device_info=info.model_copy(update={"cpu_model": "Cortex-A76"})) != base  # another device
    assert key(tags=("cpu", "pi5")) != base
    assert key(params=parse_params({"benchmark": {"iterations": 500}})) != base
    batch = project.tmp / "batch.npz"
    np.savez(batch, x=np.zeros((2, 1, 8, 8), np.float32))
    with_batch = key(batch=SimpleNamespace(path=batch))
    np.savez(batch, x=np.zeros((2, 1, 8, 8), np.float32))  # rewritten, same content: the file's bytes differ
    assert key(batch=SimpleNamespace(path=batch)) == with_batch != base
    np.savez(batch, x=np.ones((2, 1, 8, 8), np.float32))
    assert key(batch=SimpleNamespace(path=batch)) != with_batch


def test_a_stage_key_follows_its_source_read_from_the_file_without_importing_it(tmp_path, monkeypatch):
    module = tmp_path / "my_factory_under_test.py"
    module.write_text("import this_module_does_not_exist_anywhere\n")  # importing it would fail
    monkeypatch.syspath_prepend(str(tmp_path))
    first = caching.source_hash("my_factory_under_test:build")
    assert not first.startswith("unreadable") and "my_factory_under_test" not in sys.modules
    caching._SOURCES.clear()  # a new process: what `edgeship run` is after an edit
    module.write_text(textwrap.dedent("""
        import this_module_does_not_exist_anywhere  # the factory changed
    """))
    assert caching.source_hash("my_factory_under_test:build") != first
    caching._SOURCES.clear()
    assert caching.source_hash("no_such_module_anywhere") == caching.source_hash("no_such_module_anywhere")
    assert caching._SOURCES["no_such_module_anywhere"] == "unreadable:no_such_module_anywhere"


def test_every_stage_the_release_caches_has_a_key_function():
    from edgeship.flows import quantization_tasks as q
    from edgeship.flows import release_tasks as r

    cached = [r.train_model, q.distill_model, q.analyze_sensitivity, q.plan_precision, q.quantize_on_plan,
              q.ptq_baseline, r.compile_target, r.reference_logits, r.check_on_host, r.benchmark_on_device]
    assert {t.name for t in cached} == set(caching.KEYS)
