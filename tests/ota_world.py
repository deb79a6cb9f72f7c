"""One object that plays every party of an OTA release on loopback, for many tests (after python-tuf's
RepositorySimulator): a keystore and signed repository, an HTTP server in front of it that can misbehave
on purpose, released model versions per target, and devices (in-process updaters or real
`edgeship-device` processes).

    >>> world = OtaWorld(tmp_path)
    >>> world.publish("1", targets=("onnx-int8", "tflite-int8"))
    >>> world.device("dev-1").update().installed_version
    >>> world.faults["models/"] = "drop"          # the server cuts model downloads in half
    >>> world.faults["timestamp.json"] = "drip"   # ...or sends them a byte every DRIP_S seconds
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edgeship.device.probation import ProbationPolicy
from edgeship.device.runtimes import open_session
from edgeship.device.state import installed_model
from edgeship.device.updater import DeviceUpdater, UpdaterConfig
from edgeship.files import sha256_of
from edgeship.ota.golden import write_golden
from edgeship.ota.keys import Keystore
from edgeship.ota.publish import publish_release
from edgeship.ota.repository import OtaRepository
from edgeship.ota.storage import open_storage
from edgeship.records import CompiledArtifact, TensorSpec
from onnx_models import tiny_classifier
from timing import scaled

MODEL = "tiny"
TARGET = "onnx-int8"
ROOT_DIR = Path(__file__).parent.parent


def make_artifact(directory: Path, version: str, content: bytes | None = None, target: str = TARGET,
                  seed: int | None = None, outputs: tuple[int, ...] | None = None) -> CompiledArtifact:
    """A compiled-artifact record for a tiny classifier whose weights differ per version; its declared outputs are
    the file's own unless `outputs` says otherwise (a record that lies)."""
    import onnx

    path = directory / f"build-{version}-{target}" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if content is not None
                     else tiny_classifier(seed=int(seed if seed is not None else version)).SerializeToString())
    if outputs is None:
        try:
            dims = onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim
            outputs = tuple(d.dim_value or 1 for d in dims)
        except Exception:  # not a model at all (a test of what the updater refuses)
            outputs = (1, 10)
    return CompiledArtifact(target=target, path=path, sha256=sha256_of(path), bytes=path.stat().st_size,
                            precision="fp32", runtime="onnxruntime",
                            inputs=[TensorSpec(name="input", shape=(1, 1, 8, 8))],
                            outputs=[TensorSpec(name="logits", shape=outputs)])


def golden_inputs(count: int = 4) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((count, 1, 8, 8)).astype(np.float32)


def predict(path: Path) -> np.ndarray:
    batch = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    return open_session("onnxruntime", path, threads=1).run(batch)


DRIP_S = 0.5  # a "drip" fault sends one byte this often


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, except where the world's `faults` say to misbehave."""

    faults: dict[str, str] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        fault = next((kind for part, kind in self.faults.items() if part in self.path), None)
        if fault == "drop":  # promise the whole file, send half, hang up
            path = Path(self.translate_path(self.path))
            data = path.read_bytes() if path.is_file() else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "drip":  # promise the whole file, then send it a byte at a time for as long as anyone waits
            path = Path(self.translate_path(self.path))
            data = path.read_bytes() if path.is_file() else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for index in range(len(data)):
                try:
                    self.wfile.write(data[index:index + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                time.sleep(DRIP_S)
            return
        super().do_GET()


class OtaWorld:
    """A publisher, a served repository and devices around it."""

    def __init__(self, tmp_path: Path, **repository_options):
        self.tmp_path = tmp_path
        self.directory = tmp_path / "ota-repo"
        self.directory.mkdir(exist_ok=True)
        self.keystore = Keystore(tmp_path / "keys")
        self.repository = OtaRepository(open_storage(str(self.directory)), self.keystore, **repository_options)
        self.root = tmp_path / "provisioned-root.json"
        self.root.write_bytes(self.repository.trusted_root())
        self.artifacts: dict[tuple[str, str], CompiledArtifact] = {}
        self.faults: dict[str, str] = {}
        handler = type("Handler", (_Handler,), {"faults": self.faults})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(handler, directory=str(self.directory)))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.processes: list[subprocess.Popen] = []

    def write_params(self, **sections) -> Path:
        """params.yaml of a project around this world (its repository and keys, MLflow on SQLite, a fleet store),
        with `sections` added (e.g. rollout=...), for the CLI and the flows to read."""
        import yaml

        path = self.tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({
            "project": {"name": MODEL}, "ota": {"repository": "ota-repo", "keystore": "keys"},
            "registry": {"tracking_uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts"},
            "fleet": {"store": "sqlite:///fleet.db"}, **sections}))
        return path

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    # --- the publisher ----------------------------------------------------------------

    def publish(self, version: str, content: bytes | None = None, targets: tuple[str, ...] = (TARGET,),
                golden: bool = False, golden_from: str | None = None, budget_ms: float | None = None,
                fallback: str | None = None, outputs: tuple[int, ...] | None = None, **kwargs):
        """Publish a version for some targets; golden vectors computed from `golden_from`'s file (default: itself);
        `outputs`: the output shape its records declare (default: the file's)."""
        artifacts = []
        for target in targets:
            artifact = make_artifact(self.tmp_path, version, content, target, outputs=outputs)
            self.artifacts[(version, target)] = artifact
            artifacts.append(artifact)
        vectors = {}
        if golden:
            for artifact in artifacts:
                source = self.artifacts[(golden_from, artifact.target)] if golden_from else artifact
                vectors[artifact.target] = write_golden(source, golden_inputs(),
                                                        self.tmp_path / f"golden-{version}-{artifact.target}.npz")
        fallbacks = {}
        if fallback:
            for target in targets:
                fallbacks[target] = ("tiny-fallback", fallback, make_artifact(self.tmp_path / "fallback", fallback,
                                                                              target=target, seed=100))
        budgets = {t: budget_ms for t in targets} if budget_ms is not None else None
        return publish_release(self.repository, MODEL, version, artifacts, golden=vectors, fallbacks=fallbacks,
                               latency_budgets=budgets, **kwargs)

    def served_model(self, version: str, target: str = TARGET) -> Path:
        artifact = self.artifacts[(version, target)]
        return self.directory / "targets/models" / MODEL / version / target / f"{artifact.sha256}.model.onnx"

    # --- devices ----------------------------------------------------------------------

    def device(self, name: str = "device-1", target: str = TARGET, **options) -> DeviceUpdater:
        return DeviceUpdater(UpdaterConfig(repository_url=self.url, trusted_root=self.root,
                                           state_dir=self.tmp_path / name, channel="stable", target=target,
                                           device_id=name, **options))

    def device_process(self, name: str, target: str = TARGET, env: dict | None = None, *extra: str,
                       preexec_fn=None) -> subprocess.Popen:
        """`edgeship-device update` as a real process (stdout: one JSON report)."""
        command = [sys.executable, "-m", "edgeship.device.cli", "update", "--repo-url", self.url, "--root",
                   str(self.root), "--state-dir", str(self.tmp_path / name), "--target", target, "--device-id", name,
                   *extra]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT_DIR), **(env or {})}, cwd=ROOT_DIR,
                                   preexec_fn=preexec_fn)
        self.processes.append(process)
        return process

    def run_device(self, name: str, target: str = TARGET, *extra: str) -> dict:
        process = self.device_process(name, target, None, *extra)
        out, err = process.communicate(timeout=120)
        assert out.strip(), err
        return json.loads(out.strip().splitlines()[-1])

    def assert_runs(self, name: str, version: str, target: str = TARGET) -> None:
        """The device's active model is `version`, intact, and computes what that release computes."""
        path = installed_model(self.tmp_path / name)
        assert path is not None and path.parent.name == version, path
        np.testing.assert_array_equal(predict(path), predict(self.artifacts[(version, target)].path))


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + scaled(timeout_s)
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before {path.name}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.05)


QUICK_PROBATION = ProbationPolicy(required=5, max_failures=1, deadline_s=60)
