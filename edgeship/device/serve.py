"""`edgeship-device serve`: the on-device runtime as a local inference service, with shadow mode and telemetry.

`FieldRuntime` is what an application embeds when it wants the whole field loop: the runtime
(active model, fallback, probation, reload between requests), the shadow runner and the telemetry
reporter. `create_app` puts it behind HTTP on loopback or a Unix socket for applications written in
other languages:

    POST /predict   body: a .npy array (Content-Type application/x-npy) or JSON {"inputs": [[...]]}
                    -> {"outputs": [[...]], "slot": "active", "version": "7", "latency_ms": 0.41}
    GET  /health    -> versions per slot, the runtime's slot now, telemetry counters

Requests are answered one at a time (the runtime is not re-entrant); a model the updater installed
is picked up between two requests, never in the middle of one (the hand-over).

    $ edgeship-device serve --state-dir /var/lib/edgeship --uds /run/edgeship.sock \\
          --broker 127.0.0.1:1883 --fleet lab --device-class pi4 --window-s 60

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np

from edgeship.device.shadow import ShadowRunner
from edgeship.device.telemetry import DeviceIdentity, DriftReference, WindowAggregator, sensor_reader
from edgeship.device.telemetry_mqtt import MqttSettings, TelemetryReporter
from edgeship.device.telemetry_spool import Spool

from edgeship.device.shadow_install import DRIFT_REFERENCE_FILE  # the active release's reference


def telemetry_identity(state_dir: Path, device_class: str) -> DeviceIdentity:
    """Who this device is, from the provisioned device.json and its active model."""
    from edgeship.device.state import active_model, device_identity

    identity = device_identity(state_dir)
    active = active_model(state_dir)
    return DeviceIdentity(device_id=identity.device_id, channel=identity.channel, target=identity.target or "",
                          model_name=active.model.model_name if active else "", device_class=device_class)


def _reference(state_dir: Path) -> DriftReference | None:
    path = state_dir / DRIFT_REFERENCE_FILE
    try:
        return DriftReference.model_validate_json(path.read_bytes()) if path.is_file() else None
    except ValueError:
        return None


class FieldRuntime:
    """The runtime with shadow mode and telemetry: `predict` answers, everything else happens beside it.

    Args:
        state_dir: the updater's state directory.
        telemetry: where to publish; None keeps the aggregator (and spool) but sends nothing.
        device_class: the operator's name for this kind of device ("pi4", "orin-nano"), reported per record.
        window_s: telemetry window.
        shadow_sample_rate: share of answers the shadow model (when one is installed) also runs on.
    """

    def __init__(self, state_dir: str | Path, telemetry: MqttSettings | None = None, device_class: str = "default",
                 window_s: float = 60.0, shadow_sample_rate: float = 0.1, threads: int = 1, sensors=None,
                 spool_max_records: int = 10_000):
        from edgeship.device.runtime import DeviceRuntime

        self.state_dir = Path(state_dir)
        telemetry_dir = self.state_dir / "telemetry"
        self.aggregator = WindowAggregator(telemetry_identity(self.state_dir, device_class), state_dir=self.state_dir,
                                           reference=_reference(self.state_dir), progress_dir=telemetry_dir,
                                           sensors=sensor_reader(sensors) if sensors else None)
        self.runtime = DeviceRuntime(self.state_dir, threads=threads, observers=[self.aggregator.on_inference])
        self.shadow = ShadowRunner(self.state_dir, self.aggregator.on_shadow, sample_rate=shadow_sample_rate,
                                   threads=threads)
        self.reporter = None
        if telemetry is not None:
            self.reporter = TelemetryReporter(self.aggregator, Spool(telemetry_dir, max_records=spool_max_records),
                                              telemetry, window_s=window_s)
            self.reporter.__enter__()
        self._lock = threading.Lock()
        self.answered = 0

    def predict(self, batch: np.ndarray):
        """The active model's (or the fallback's) answer; the shadow sees a sample of it afterwards."""
        with self._lock:
            prediction = self.runtime.predict(batch)
            self.answered += 1
        self.shadow.offer(batch, prediction)
        return prediction

    def close(self) -> None:
        self.shadow.stop()
        if self.reporter is not None:
            self.reporter.__exit__(None, None, None)

    def __enter__(self) -> FieldRuntime:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def health(self) -> dict:
        from edgeship.device.telemetry import slot_versions

        return {"versions": slot_versions(self.state_dir).model_dump(), "slot": self.runtime.slot,
                "reason": self.runtime.reason, "answered": self.answered,
                "telemetry_records": self.reporter.records if self.reporter else 0,
                "spooled": len(self.reporter.spool) if self.reporter else 0,
                "spool_dropped": self.reporter.spool.dropped if self.reporter else 0}


def create_app(field: FieldRuntime):
    """The FastAPI app of the local inference service."""
    from fastapi import FastAPI, HTTPException, Request, Response

    app = FastAPI(title="edgeship-device serve")

    @app.get("/health")
    def health() -> dict:
        return field.health()

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.body()
        try:
            if request.headers.get("content-type", "").startswith("application/x-npy"):
                batch = np.load(io.BytesIO(body), allow_pickle=False)
            else:
                batch = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as error:
            raise HTTPException(400, f"send a .npy array (Content-Type application/x-npy) or JSON "
                                     f'{{"inputs": [...]}}: {error}') from None
        prediction = field.predict(batch.astype(np.float32, copy=False))
        if request.headers.get("accept", "").startswith("application/x-npy"):
            out = io.BytesIO()
            np.save(out, prediction.outputs)
            return Response(out.getvalue(), media_type="application/x-npy",
                            headers={"x-slot": prediction.slot, "x-version": str(prediction.version),
                                     "x-latency-ms": f"{prediction.latency_ms:.4f}"})
        return {"outputs": prediction.outputs.tolist(), "slot": prediction.slot, "version": prediction.version,
                "latency_ms": prediction.latency_ms}

    return app


def serve(field: FieldRuntime, host: str = "127.0.0.1", port: int = 8766, uds: str | None = None) -> None:
    """Run the service until stopped (uvicorn, one worker)."""
    import uvicorn

    try:
        if uds:
            uvicorn.run(create_app(field), uds=uds, log_level="warning")
        else:
            uvicorn.run(create_app(field), host=host, port=port, log_level="warning")
    finally:
        field.close()
