"""Two publisher processes forced to contend for the OTA writer lock, on any storage and lock.

A barrier releases both once they are ready (imports done, repository read); the one that takes the lock holds
it until the other has found it held (and, when they have little patience, until the other has given up), so
they contend every time, whatever the machine's speed. With a lock that lets both in, neither finds it held and
the holders fail after two minutes saying so.

    >>> results = contend({"location": "ota-repo"}, keys, builds, wait_s=300)   # {"2": ("published", ""), ...}
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

MODEL = "tiny"
CONTENDERS = (("2", "onnx-int8"), ("3", "tflite-int8"))


def open_repository(where: dict, keys: Path):
    """`where`: location (a directory or s3://...), endpoint (S3) and lock (a SQL URL), as params.yaml's ota:."""
    from edgeship.ota.keys import Keystore
    from edgeship.ota.repository import OtaRepository
    from edgeship.ota.storage import open_storage

    return OtaRepository(open_storage(where["location"], where.get("endpoint")), Keystore(keys),
                         lock=where.get("lock"))


def publisher(where: dict, env: dict, keys: str, builds: str, version: str, target: str, wait_s: float,
              barrier, contended, gave_up, outcomes) -> None:
    """One publisher process: ready, then the barrier, then the writer lock (see the module's docstring)."""
    os.environ.update(env)
    from edgeship.errors import RepositoryBusy
    from edgeship.ota.publish import publish_release
    from ota_world import make_artifact

    repository = open_repository(where, Path(keys))
    artifact = make_artifact(Path(builds), version, target=target)
    barrier.wait(timeout=300)
    try:
        with repository.writing(f"publish v{version}", wait_s=wait_s, on_busy=lambda holder: contended.set()):
            if not contended.wait(120):
                raise AssertionError("the other publisher never found the writer lock held: both held it")
            if wait_s < 60 and not gave_up.wait(120):
                raise AssertionError("the other publisher did not give up")
            publish_release(repository, MODEL, version, [artifact])
        outcomes.put((version, "published", ""))
    except RepositoryBusy as error:
        gave_up.set()
        outcomes.put((version, "busy", str(error)))
    except BaseException as error:  # noqa: BLE001 - reported to the test, which fails naming it
        outcomes.put((version, "error", f"{type(error).__name__}: {error}"))


def contend(where: dict, keys: Path, builds: Path, wait_s: float, env: dict | None = None
            ) -> dict[str, tuple[str, str]]:
    """Run both CONTENDERS at once; per version (status "published" | "busy" | "error", detail)."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as two publishers on two machines
    barrier, contended, gave_up, outcomes = context.Barrier(2), context.Event(), context.Event(), context.Queue()
    processes = [context.Process(target=publisher, args=(
        where, env or {}, str(keys), str(builds), version, target, wait_s, barrier, contended, gave_up, outcomes))
        for version, target in CONTENDERS]
    for process in processes:
        process.start()
    try:
        results = {}
        for _ in processes:
            version, status, detail = outcomes.get(timeout=600)
            results[version] = (status, detail)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return results
