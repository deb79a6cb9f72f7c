"""The HTTP face of `edgeship-device serve` (FastAPI + uvicorn, on loopback or a Unix socket).

    POST /predict   body: a .npy array (Content-Type application/x-npy) or JSON {"inputs": [[...]]};
                    a detector's answer adds "detections": per image [{"box", "score", "class"}, ...];
                    400 with the reason for a request that does not fit the model, 413 for a body over the limit
    POST /feedback  JSON {"request_id": "<from /predict>", "label": 3}: the application's true label, at any
                    delay (edgeship.device.feedback); 404 unknown or forgotten id, 409 already labelled
    GET  /health    versions per slot, the runtime's slot now, telemetry counters
    GET  /metrics   Prometheus text: requests, inference latency, fallbacks, probation, versions, spool
                    (edgeship.device.metrics)

`field` is an edgeship.device.serve.FieldRuntime.
"""

from __future__ import annotations

import asyncio
import io
import signal

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edgeship.device.http_server import ServerLimits, run_server
from edgeship.device.metrics import install_serve_metrics
from edgeship.device.request_checks import InputRefused, RequestLimits, decode_batch
from edgeship.device.service import supervise


FEEDBACK_BODY_BYTES = 64 << 10  # a request id and a label (or a detector's boxes) fit many times over


def create_app(field, limits: RequestLimits = RequestLimits(), body_timeout_s: float = 30.0):
    """The FastAPI app of the local inference service; bodies over `limits.max_body_bytes` are refused (413) as
    they stream in, and a body must arrive within `body_timeout_s` (408)."""
    app = FastAPI(title="edgeship-device serve")
    install_serve_metrics(app, field)
    supervise(app)  # READY=1 and watchdog pings under systemd

    @app.get("/health")
    def health() -> dict:
        return field.health()

    @app.post("/predict")
    async def predict(request: Request):
        body = await read_body(request, limits.max_body_bytes, body_timeout_s)
        accept_npy = request.headers.get("accept", "").startswith("application/x-npy")
        try:  # decoding, inference and encoding off the event loop: /health answers while the runtime computes
            return await run_in_threadpool(_answer, field, body, request.headers.get("content-type", ""),
                                           accept_npy, limits)
        except InputRefused as refused:  # the client's error: never counted against the model
            raise HTTPException(refused.status, str(refused)) from None

    @app.post("/feedback")
    async def feedback(request: Request):
        from edgeship.device.feedback import feedback_answer

        status, answer = feedback_answer(field, await read_body(request, FEEDBACK_BODY_BYTES, body_timeout_s))
        return JSONResponse(answer, status_code=status)

    return app


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, streamed: 413 as soon as it passes `max_bytes` (or declares more), 408 past `timeout_s`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"the body of {declared} bytes is over the {max_bytes} byte limit; send smaller "
                                 f"batches (or start serve with a higher --max-body-mb)")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(413, f"the body is over the {max_bytes} byte limit; send smaller batches")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(408, f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


def _answer(field, body: bytes, content_type: str, accept_npy: bool, limits: RequestLimits):
    """Decode a request, run it and encode the answer (in a worker thread)."""
    prediction = field.predict(decode_batch(body, content_type, limits))
    if accept_npy:
        out = io.BytesIO()
        np.save(out, prediction.outputs)
        return Response(out.getvalue(), media_type="application/x-npy",
                        headers={"x-slot": prediction.slot, "x-version": str(prediction.version),
                                 "x-request-id": prediction.request_id or "",
                                 "x-latency-ms": f"{prediction.latency_ms:.4f}"})
    answer = {"outputs": prediction.outputs.tolist(), "slot": prediction.slot, "version": prediction.version,
              "latency_ms": prediction.latency_ms, "request_id": prediction.request_id}
    if prediction.detections is not None:  # a detector: per image its objects
        answer["detections"] = prediction.detections
    return JSONResponse(answer)


def serve(field, host: str = "127.0.0.1", port: int = 8766, uds: str | None = None,
          limits: RequestLimits = RequestLimits(), server: ServerLimits = ServerLimits()) -> None:
    """Run the service until SIGTERM or Ctrl-C (uvicorn, one worker); then flush the last telemetry window."""
    def stop(*_) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler that was there before:
    # this one, so the process leaves through `finally` instead of dying with the last window unsent.
    signal.signal(signal.SIGTERM, stop)
    try:
        where = {"uds": uds} if uds else {"host": host, "port": port}
        run_server(create_app(field, limits, body_timeout_s=server.header_timeout_s * 3), server, **where)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        field.close()
