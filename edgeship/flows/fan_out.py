"""Where the release's per-target fan-out runs: the flow's thread pool, or a Dask cluster (prefect-dask).

`task_runner:` in params.yaml chooses, per run, whoever started the flow (`edgeship run`, a deployment on a
worker, the Prefect UI): the flow keeps its own thread pool for everything else, and only the compile and
benchmark tasks go to `fan_out(...)`'s runner. With `kind: dask` each task runs in a Dask worker process, so
torch's graph captures (one process-wide lock, edgeship.tasks.compile.tracing) no longer take turns. What a
task takes travels pickled: records, paths, a `ReleaseRun` (run id and tracking URI), the benchmark devices.
A LocalCluster's workers are started from this process, so what they print lands in the run's log file with
the rest, and the project directory is on their import path (a project's own model factory imports there).

    >>> with fan_out(params.task_runner, len(params.targets), root) as runner:
    ...     futures = [submit(runner, compile_target, target, ...) for target in params.targets]
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from edgeship.config import TaskRunnerParams


@contextlib.contextmanager
def fan_out(settings: TaskRunnerParams, tasks: int, project: Path) -> Iterator[object | None]:
    """The started task runner for `tasks` parallel tasks; None: the flow's own (thread pool)."""
    if settings.kind == "threads":
        yield None
        return
    with dask_runner(settings, tasks, project) as runner:
        yield runner


def dask_runner(settings: TaskRunnerParams, tasks: int, project: Path):
    """prefect-dask's DaskTaskRunner on the scheduler at `settings.address`, else on a LocalCluster of processes."""
    from prefect_dask import DaskTaskRunner

    if settings.address:
        return DaskTaskRunner(address=settings.address)
    workers = settings.workers or max(1, min(tasks, os.cpu_count() or 1))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, (str(project), os.environ.get("PYTHONPATH")))),
           "PREFECT_API_URL": _api_url()}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None, "env": env})


def _api_url() -> str:
    """This flow's Prefect API, so the workers report to it (without a server: this process's ephemeral API;
    a worker left to itself would start one of its own, about 10 s each)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def submit(runner, task, *args, **kwargs):
    """`task.submit(*args, **kwargs)` on `runner` (None: the flow's own task runner)."""
    if runner is None:
        return task.submit(*args, **kwargs)
    from prefect.utilities.callables import get_call_parameters

    return runner.submit(task, get_call_parameters(task.fn, args, kwargs))


def remote(runner) -> bool:
    """Whether tasks run outside this process (their progress is reported here, when their results come)."""
    return runner is not None
