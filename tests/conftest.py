"""Test session set-up: every test runs against its own state, never the developer's.

Prefect runs in its ephemeral mode with a throw-away PREFECT_HOME, MLflow never
falls back to a server named in the environment, and threads are capped so the
suite behaves the same on a 2-core CI machine. Timing thresholds scale with
$EDGESHIP_TEST_TIME_SCALE for slow or emulated machines (tests/timing.py).
"""

import functools
import http.server
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

import timing  # EDGESHIP_TEST_TIME_SCALE, read (and refused when it is not a factor >= 1) before any test runs

_HOME = tempfile.mkdtemp(prefix="edgeship-test-home-")
os.environ["PREFECT_HOME"] = os.path.join(_HOME, "prefect")
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
for variable in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "EDGESHIP_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EDGESHIP_AGENT_TOKEN"):
    os.environ.pop(variable, None)
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_report_header(config):
    return f"timing thresholds scaled by {timing.TIME_SCALE:g} (${timing.VARIABLE}; tests/timing.py)"


def pytest_unconfigure(config):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture
def http_server():
    """Serve a request handler class over real HTTP on 127.0.0.1 (port 0); every server stopped after the test."""
    servers = []

    def serve(handler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def static_server(http_server):
    """Serve directories over real HTTP on 127.0.0.1 (like a CDN in front of the OTA bucket); stopped after."""

    def serve(directory) -> str:
        return http_server(functools.partial(_QuietHandler, directory=str(directory)))

    return serve


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API server for the whole session (it takes ~14 s to start): its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fleet store URL: a SQLite file, and a PostgreSQL database of its own on 127.0.0.1:5432 (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fleet.db"
        return
    import psycopg  # the PostgreSQL driver installed with edgeship (psycopg[binary], psycopg 3)

    name = f"edgeship_fleet_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3",
                                autocommit=True)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres): {error}")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


PG = "postgresql://postgres@127.0.0.1:5432"


def psql(sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", f"{PG}/postgres", "-qtAc", sql], capture_output=True, text=True, timeout=60)


def _shell_env(path: Path) -> dict[str, str]:
    """The environment `env -0` wrote: what the user's shell holds after a block (bash's own variables left out)."""
    pairs = (entry.partition("=") for entry in path.read_text().split("\0") if entry)
    return {key: value for key, _, value in pairs if key not in ("PWD", "OLDPWD", "SHLVL", "_")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """`infra/local-stack.sh start` on free ports and a unique database prefix, once for the session (each test on
    it uses names of its own), as docs/real-services.md types it; stopped and its databases dropped after.

    Yields the shell's environment after `source .edgeship/stack.env`, and the stack's root directory."""
    from doc_blocks import doc_block, run_shell

    if psql("SELECT 1").returncode != 0:
        pytest.skip(f"PostgreSQL is not reachable at {PG} (trust auth, user postgres): the stack stores MLflow, "
                    f"Prefect and the OTA writer lock there")
    root = tmp_path_factory.mktemp("stack")
    db = f"edgeship_test_{uuid.uuid4().hex[:10]}"
    ports = {name: str(_free_port()) for name in ("S3", "OTA_HTTP", "MLFLOW", "PREFECT")}
    env = {**os.environ, "EDGESHIP_STACK_DIR": str(root / "stack"), "EDGESHIP_STACK_DB": db,
           "PREFECT_HOME": str(root / "prefect-home"), **{f"EDGESHIP_{k}_PORT": v for k, v in ports.items()}}
    repo = Path(__file__).resolve().parents[1]
    try:  # docs/real-services.md's `infra/local-stack.sh start && source .edgeship/stack.env`, then the shell's env
        start = doc_block("docs/real-services.md", "stack-start", replace={".edgeship/stack.env": str(root / "stack.env")})
        run_shell(f"{start}\nenv -0 > {shlex.quote(str(root / 'shell.env'))}", cwd=repo, env=env, timeout_s=300)
        yield _shell_env(root / "shell.env"), root
    finally:
        subprocess.run(["bash", str(repo / "infra" / "local-stack.sh"), "stop"], env=env, capture_output=True,
                       timeout=120)
        for suffix in ("mlflow", "prefect", "ota"):
            psql(f'DROP DATABASE IF EXISTS "{db}_{suffix}" WITH (FORCE)')
