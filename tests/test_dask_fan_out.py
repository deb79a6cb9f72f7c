"""The release's compile fan-out on a real Dask LocalCluster (prefect-dask, worker processes) produces the same
artifacts as the flow's thread pool: `task_runner: {kind: dask}` changes where targets compile, not what."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from prefect import flow

from edgeship.config import RegistryParams, TaskRunnerParams, parse_params
from edgeship.errors import ConfigError
from edgeship.flows.caching import ProjectCache
from edgeship.flows.fan_out import fan_out
from edgeship.flows.release_tasks import compile_targets
from edgeship.registry.tracking import ReleaseRun
from edgeship.tasks.benchmark import BenchmarkDevices, DeviceEndpoint
from tiny_quantization import digits, trained  # noqa: F401  (fixtures)

torch.set_num_threads(1)
TARGETS = ["onnx-fp32", "tensorrt-fp16"]  # both capture the model with torch in-process (the lock threads share)


@flow(name="compile-fan-out")
def compile_all(kind: str, root: str, trained, data, run_id: str, tracking_uri: str) -> dict:
    params = parse_params({"targets": TARGETS, "task_runner": {"kind": kind}})
    run = ReleaseRun(run_id, tracking_uri)
    out_dir = Path(root) / kind
    with fan_out(params.task_runner, len(TARGETS), Path(root)) as runner:
        return compile_targets(params, trained, None, data, out_dir, run, ProjectCache.open(Path(root) / kind,
                                                                                          fresh=True), runner)


def _content(artifact) -> dict[str, bytes]:
    """The artifact's model: the file itself; for a zipped .mlpackage, its entries but the manifest (which names
    each entry by a fresh UUID)."""
    if not str(artifact.path).endswith(".mlpackage.zip"):
        return {"file": Path(artifact.path).read_bytes()}
    with zipfile.ZipFile(artifact.path) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("Manifest.json")}


def test_dask_workers_compile_the_same_artifacts_as_threads(trained, digits, tmp_path):  # noqa: F811
    run = ReleaseRun.start(RegistryParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path, "fan-out")
    threads = compile_all("threads", str(tmp_path), trained, digits, run.run_id, run.tracking_uri)
    dask = compile_all("dask", str(tmp_path), trained, digits, run.run_id, run.tracking_uri)

    for target in TARGETS:
        by_threads, by_dask = threads[target].artifact, dask[target].artifact
        assert by_threads and by_dask, (threads[target].error, dask[target].error)
        assert Path(by_dask.path).is_relative_to(tmp_path / "dask") and Path(by_dask.path).is_file()
        assert _content(by_dask) == _content(by_threads), f"{target} compiled differently on Dask"
    logged = {f.path for f in run.client.list_artifacts(run.run_id, "compiled/onnx-fp32")}
    assert logged, "the Dask worker logged its artifact into the release's MLflow run"


def test_what_a_remote_task_takes_pickles(tmp_path):
    run = ReleaseRun.start(RegistryParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path, "pickle")
    copy = pickle.loads(pickle.dumps(run))
    assert (copy.run_id, copy.tracking_uri) == (run.run_id, run.tracking_uri)
    pool = BenchmarkDevices([DeviceEndpoint("local", "http://127.0.0.1:1", None, ("cpu",))],
                            parse_params({}).benchmark)
    pool.lost["local"] = "gone"
    moved = pickle.loads(pickle.dumps(pool))
    assert moved.lost == {"local": "gone"} and set(moved._locks) == {"local"}


def test_task_runner_options_name_what_they_need():
    assert TaskRunnerParams().kind == "threads"
    assert parse_params({"task_runner": {"kind": "dask", "address": "tcp://10.0.0.5:8786"}}).task_runner.address
    with pytest.raises(ConfigError, match="set kind: dask"):
        parse_params({"task_runner": {"address": "tcp://10.0.0.5:8786"}})
    with pytest.raises(ConfigError, match="remove one"):
        parse_params({"task_runner": {"kind": "dask", "address": "tcp://h:8786", "workers": 2}})
