"""What `edgeship run` starts while it imports the pipeline: Prefect's ephemeral API.

Without a Prefect server, the first flow run in a process starts a local API in a subprocess and
waits for it: 5-8 s here, most of it the subprocess importing Prefect's server. Left to Prefect,
that starts only once this process has imported Prefect itself (another 2-5 s). So the CLI launches
the same server command (`uvicorn prefect.server.api.server:create_app`, as Prefect's
SubprocessASGIServer runs it) first thing, imports the pipeline and opens what every release uses
meanwhile (MLflow and its tracking store, matplotlib, the model flavors registration logs with),
then hands the running server to Prefect's SubprocessASGIServer, where the flow's client finds it.
When Prefect turns out to have a server configured (an API URL in a profile or prefect.toml), or
the early server does not come up, it is stopped and Prefect does what it always does.

    >>> api = PrefectApiInBackground()   # inside library_output_to: the server's output goes to the log
    >>> from edgeship.flows.release import release
    >>> preload(settings, workdir)
    >>> api.ready()
    >>> release(...)
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)


class PrefectApiInBackground:
    """Launch Prefect's ephemeral API server now; `ready()` waits until Prefect's client will use it."""

    def __init__(self):
        self.error: Exception | None = None
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        if not os.environ.get("PREFECT_API_URL"):
            self._process = self._launch()
            atexit.register(self._drop)  # never left running: a no-op once Prefect has it (and stops it itself)
        self._thread = threading.Thread(target=self._hand_over, name="edgeship-prefect-api", daemon=True)
        self._thread.start()

    def ready(self) -> None:
        """Wait until the server answers and Prefect has it (or it was dropped: Prefect then starts its own)."""
        self._thread.join()

    def _launch(self) -> subprocess.Popen | None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            return None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        app_dir = Path(list(spec.submodule_search_locations)[0]).parent
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], stdin=subprocess.DEVNULL,
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"})

    def _hand_over(self) -> None:
        try:
            from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                          PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)

            if self._process is None or PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                return self._drop()  # a server is configured (or no early start): Prefect's own way
            self._wait_healthy(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()  # the instance Prefect's get_client() starts, or finds running
            if server.running or not all(hasattr(server, a) for a in ("port", "server_process")):
                return self._drop()
            server.port, server.server_process, server.running = self.port, self._process, True
            atexit.register(server.stop)
            self._process = None  # Prefect's now
        except Exception as error:  # noqa: BLE001 - Prefect starts its own server and reports what fails
            self.error = error
            self._drop()

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the early Prefect API server exited with status {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the early Prefect API server did not answer within {timeout_s:g} s")

    def _drop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def preload(settings, workdir: Path) -> None:
    """Import and open what every release needs, stages cached or not: MLflow and the project's tracking store
    (its tables created on a first run), matplotlib, the ONNX and pyfunc flavors. Failures are left to the
    flow, which reports them where they happen."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
        import mlflow.onnx  # noqa: F401
        import mlflow.pyfunc  # noqa: F401
        from mlflow import MlflowClient

        from edgeship.registry.tracking import tracking_uri_for

        uri = tracking_uri_for(settings.registry, Path(workdir).resolve())
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_experiment_by_name(settings.registry.experiment)
        # Logging a model first maps every installed distribution to its modules (to check the model's
        # requirements against this environment): about a second, computed once per process. Now, not then.
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()
    except Exception as error:  # noqa: BLE001 - see the docstring
        logger.debug("preloading the pipeline failed: %s", error)
