"""The release's compile fan-out on a real Dask LocalCluster (prefect-dask, worker processes) produces the same
artifacts as the flow's thread pool: `task_runner: {kind: dask}` changes where targets compile, not what.

Where they compiled is observed, not assumed: Dask's task stream names the worker that ran each task, and each
of those workers is a process of its own (its pid, asked of the worker itself), not the flow's."""

from __future__ import annotations

import os
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
def compile_all(kind: str, root: str, trained, data, run_id: str, tracking_uri: str) -> tuple[dict, list]:
    """The outcomes per target, and (on Dask) each task the cluster ran with the pid of the worker that ran it."""
    params = parse_params({"targets": TARGETS, "task_runner": {"kind": kind}})
    run = ReleaseRun(run_id, tracking_uri)
    out_dir = Path(root) / kind
    cache = ProjectCache.open(Path(root) / kind, fresh=True)
    with fan_out(params.task_runner, len(TARGETS), Path(root)) as runner:
        if runner is None:
            return compile_targets(params, trained, None, data, out_dir, run, cache, runner), []
        from distributed import get_task_stream

        with get_task_stream(client=runner.client) as stream:
            outcomes = compile_targets(params, trained, None, data, out_dir, run, cache, runner)
        pids = runner.client.run(os.getpid)  # worker address -> its process id, as the worker reports it
        return outcomes, [(str(task["key"]), pids[task["worker"]]) for task in stream.data]


def _content(artifact) -> dict[str, bytes]:
    """The artifact's model: the file itself; for a zipped .mlpackage, its entries but the manifest (which names
    each entry by a fresh UUID)."""
    if not str(artifact.path).endswith(".mlpackage.zip"):
        return {"file": Path(artifact.path).read_bytes()}
    with zipfile.ZipFile(artifact.path) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("Manifest.json")}


def test_dask_workers_compile_the_same_artifacts_as_threads(trained, digits, tmp_path):  # noqa: F811
    run = ReleaseRun.start(RegistryParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path, "fan-out")
    threads, _ = compile_all("threads", str(tmp_path), trained, digits, run.run_id, run.tracking_uri)
    dask_run = ReleaseRun.start(RegistryParams(tracking_uri=run.tracking_uri), tmp_path, "fan-out-dask")
    dask, ran = compile_all("dask", str(tmp_path), trained, digits, dask_run.run_id, run.tracking_uri)

    compiled_on = {pid for key, pid in ran if "compile" in key}
    assert len([key for key, _ in ran if "compile" in key]) == len(TARGETS), ran  # every target went to Dask
    assert compiled_on and os.getpid() not in compiled_on, ran  # ... and ran in worker processes, not here

    for target in TARGETS:
        by_threads, by_dask = threads[target].artifact, dask[target].artifact
        assert by_threads and by_dask, (threads[target].error, dask[target].error)
        assert Path(by_dask.path).is_relative_to(tmp_path / "dask") and Path(by_dask.path).is_file()
        assert _content(by_dask) == _content(by_threads), f"{target} compiled differently on Dask"
    assert "onnx-fp32/bytes" in dask_run.client.get_run(dask_run.run_id).data.metrics, \
        "the Dask worker logged into the release's MLflow run"


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
