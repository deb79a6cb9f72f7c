"""Promotion webhook: a reviewer sets the `production` alias in MLflow, and the release gets published.

MLflow (server with a SQL backend) POSTs a signed delivery for every
`model_version_alias.created` event. This receiver checks the HMAC signature
and the timestamp (replays older than five minutes are refused), ignores
aliases and models it does not watch, and starts the publish flow: in this
process, or as a run of the Prefect deployment `publish/publish` when one is named.

    >>> app = create_app(WatchedAlias("digits-classifier", "production", secret), publish_in_process(".", "params.yaml"))
    >>> register_webhook("http://127.0.0.1:5000", "http://127.0.0.1:8787/webhooks/mlflow", secret)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request

from edgeship.errors import SignatureError

logger = logging.getLogger(__name__)

MAX_AGE_S = 300
Promotion = Callable[[str, str], None]  # (model name, version) -> None


@dataclass(frozen=True)
class WatchedAlias:
    """The alias whose creation publishes a release, and the secret MLflow signs deliveries with."""

    model_name: str
    alias: str
    secret: str


def verify_delivery(secret: str, headers, body: bytes, now: float | None = None) -> dict:
    """Check an MLflow webhook delivery's signature and age; return its JSON payload.

    MLflow signs `"{delivery_id}.{timestamp}.{body}"` with HMAC-SHA256 and sends
    `X-MLflow-Signature: v1,<base64>`. Raises SignatureError with the reason.
    """
    delivery_id = headers.get("x-mlflow-delivery-id")
    timestamp = headers.get("x-mlflow-timestamp")
    signature = headers.get("x-mlflow-signature", "")
    if not delivery_id or not timestamp or not signature.startswith("v1,"):
        raise SignatureError("delivery is not signed (missing X-MLflow-Delivery-Id, -Timestamp or -Signature v1); "
                             "create the webhook with a secret")
    expected = base64.b64encode(hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, signature.removeprefix("v1,")):
        raise SignatureError("signature does not match; the receiver and the MLflow webhook use different secrets")
    try:
        age = (now or time.time()) - int(timestamp)
    except ValueError:
        raise SignatureError(f"timestamp '{timestamp}' is not a Unix time") from None
    if abs(age) > MAX_AGE_S:
        raise SignatureError(f"delivery is {age:.0f} s old (limit {MAX_AGE_S} s): refused as a possible replay")
    return json.loads(body)


def create_app(watched: WatchedAlias, on_promotion: Promotion) -> FastAPI:
    """The receiver: POST /webhooks/mlflow; GET /health."""
    app = FastAPI(title="edgeship promotion webhook")
    seen: OrderedDict[str, None] = OrderedDict()  # delivery ids already handled (MLflow retries)
    lock = threading.Lock()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "watching": f"{watched.model_name}@{watched.alias}"}

    @app.post("/webhooks/mlflow", status_code=200)
    async def delivery(request: Request) -> dict:
        body = await request.body()
        try:
            payload = verify_delivery(watched.secret, request.headers, body)
        except SignatureError as error:
            raise HTTPException(status_code=401, detail=str(error)) from None
        data = payload.get("data", {})
        event = f"{payload.get('entity')}.{payload.get('action')}"
        if event != "model_version_alias.created":
            return {"ignored": f"event {event}"}
        if data.get("name") != watched.model_name or data.get("alias") != watched.alias:
            return {"ignored": f"{data.get('name')}@{data.get('alias')} is not {watched.model_name}@{watched.alias}"}
        with lock:
            if request.headers["x-mlflow-delivery-id"] in seen:
                return {"ignored": "delivery already handled"}
            seen[request.headers["x-mlflow-delivery-id"]] = None
            while len(seen) > 1000:
                seen.popitem(last=False)
        version = str(data.get("version"))
        # Publishing takes seconds to minutes; MLflow's delivery times out long before. Answer now.
        threading.Thread(target=_promote, args=(on_promotion, watched.model_name, version), daemon=True).start()
        return {"publishing": {"model": watched.model_name, "version": version}}

    return app


def _promote(on_promotion: Promotion, model_name: str, version: str) -> None:
    try:
        on_promotion(model_name, version)
    except Exception:  # a failed publish must not take the receiver down; the flow run records why
        logger.exception("publishing %s v%s failed", model_name, version)


def publish_in_process(workdir: str | Path, params_path: str, alias: str = "production") -> Promotion:
    """A promotion handler that runs the publish flow here."""
    def promote(model_name: str, version: str) -> None:
        from edgeship.flows.publish import publish

        descriptor = publish(alias=alias, params_path=params_path, workdir=str(workdir))
        logger.info("published %s: %s", model_name, {t: e.version for t, e in descriptor.targets.items()})

    return promote


def publish_via_deployment(deployment: str, alias: str = "production") -> Promotion:
    """A promotion handler that starts a run of the Prefect deployment (e.g. 'publish/publish')."""
    def promote(model_name: str, version: str) -> None:
        from prefect.deployments import run_deployment

        run_deployment(deployment, parameters={"alias": alias}, timeout=0,
                       tags=["edgeship", f"model:{model_name}", f"version:{version}"])

    return promote


def register_webhook(tracking_uri: str, url: str, secret: str, name: str = "edgeship-publish-on-promotion") -> str:
    """Create the MLflow webhook that calls this receiver on alias creation; return its id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    webhook = client.create_webhook(name=name, url=url, events=["model_version_alias.created"], secret=secret,
                                    description="edgeship: publish the release when its production alias is set")
    return webhook.webhook_id
