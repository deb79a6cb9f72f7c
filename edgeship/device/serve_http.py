"""The HTTP face of `edgeship-device serve` (FastAPI + uvicorn, on loopback or a Unix socket).

    POST /predict   body: a .npy array (Content-Type application/x-npy) or JSON {"inputs": [[...]]};
                    a detector's answer adds "detections": per image [{"box", "score", "class"}, ...]
    GET  /health    versions per slot, the runtime's slot now, telemetry counters
    GET  /metrics   Prometheus text: requests, inference latency, fallbacks, probation, versions, spool
                    (edgeship.device.metrics)

`field` is an edgeship.device.serve.FieldRuntime.
"""

from __future__ import annotations

import io
import json
import signal

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response

from edgeship.device.metrics import install_serve_metrics
from edgeship.device.service import supervise


def create_app(field):
    """The FastAPI app of the local inference service."""
    app = FastAPI(title="edgeship-device serve")
    install_serve_metrics(app, field)
    supervise(app)  # READY=1 and watchdog pings under systemd

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
        answer = {"outputs": prediction.outputs.tolist(), "slot": prediction.slot, "version": prediction.version,
                  "latency_ms": prediction.latency_ms}
        if prediction.detections is not None:  # a detector: per image its objects
            answer["detections"] = prediction.detections
        return answer

    return app


def serve(field, host: str = "127.0.0.1", port: int = 8766, uds: str | None = None) -> None:
    """Run the service until SIGTERM or Ctrl-C (uvicorn, one worker); then flush the last telemetry window."""
    def stop(*_) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler that was there before:
    # this one, so the process leaves through `finally` instead of dying with the last window unsent.
    signal.signal(signal.SIGTERM, stop)
    try:
        if uds:
            uvicorn.run(create_app(field), uds=uds, log_level="warning", log_config=None)
        else:
            uvicorn.run(create_app(field), host=host, port=port, log_level="warning", log_config=None)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        field.close()
