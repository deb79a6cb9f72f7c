"""Test session set-up: every test runs against its own state, never the developer's.

Prefect runs in its ephemeral mode with a throw-away PREFECT_HOME, MLflow never
falls back to a server named in the environment, and threads are capped so the
suite behaves the same on a 2-core CI machine.
"""

import functools
import http.server
import os
import shutil
import tempfile
import threading
import uuid

import pytest

_HOME = tempfile.mkdtemp(prefix="edgeship-test-home-")
os.environ["PREFECT_HOME"] = os.path.join(_HOME, "prefect")
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
for variable in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "EDGESHIP_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EDGESHIP_AGENT_TOKEN"):
    os.environ.pop(variable, None)
os.environ.setdefault("OMP_NUM_THREADS", "2")


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
