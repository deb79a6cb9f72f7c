"""Promotion webhook: a reviewer sets the `production` alias in MLflow, and that version gets published.

MLflow (server with a SQL backend) POSTs a signed delivery for every
`model_version_alias.created` event. This receiver refuses bodies over
`max_body_bytes`, checks the HMAC signature and the timestamp (replays older
than five minutes are refused), ignores aliases and models it does not watch,
and publishes the event's version (not whatever the alias points to later):
in this process, or as a run of the Prefect deployment `publish/publish`.

A release can be neither lost nor repeated: each accepted delivery is written to
a SQLite file (`DeliveryStore`) before the answer, a worker publishes it, and it
counts as done only once the publish succeeded; a failed publish is retried with
backoff, and deliveries still pending when the receiver stops are taken up when
it starts again. The same file remembers delivery ids across restarts, so a
redelivered event is ignored, and which version each watched alias last named: deliveries
for the version it names already (MLflow retries, an alias set twice, concurrent deliveries
with different ids) publish it once. An alias moved back to an older version publishes that
version again.

    >>> app = create_app(WatchedAlias("digits-classifier", "production", secret),
    ...                  publish_in_process(".", "params.yaml"), store=DeliveryStore(".edgeship/webhook.sqlite"))
    >>> register_webhook("http://127.0.0.1:5000", "http://127.0.0.1:8787/webhooks/mlflow", secret)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request

from edgeship.errors import GateFailed, RegistryError, SignatureError

logger = logging.getLogger(__name__)

MAX_AGE_S = 300
MAX_BODY_BYTES = 64 * 1024  # an alias event is a few hundred bytes
Promotion = Callable[[str, str], None]  # (model name, version) -> None; raises when the publish failed


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


class DeliveryStore:
    """Accepted deliveries and their state (pending -> done), in SQLite so that they survive restarts."""

    def __init__(self, path: str | Path = ":memory:"):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, model TEXT, version TEXT, "
                         "state TEXT, attempts INTEGER DEFAULT 0, next_at REAL DEFAULT 0, error TEXT, "
                         "received_at REAL, done_at REAL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS aliases (model TEXT, alias TEXT, version TEXT, delivery_id TEXT, "
                         "PRIMARY KEY (model, alias))")

    def accept(self, delivery_id: str, model: str, version: str, alias: str = "") -> bool:
        """Record a new delivery as pending; False when this id was seen before, or the alias names this version
        already (one transaction: of concurrent deliveries for one version, exactly one is accepted)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # also serialises receivers in other processes sharing the file
            try:
                named = self._db.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?",
                                         (model, alias)).fetchone()
                if named is not None and named[0] == version:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("INSERT INTO deliveries (id, model, version, state, received_at) "
                                 "VALUES (?, ?, ?, 'pending', ?)", (delivery_id, model, version, time.time()))
                self._db.execute("INSERT OR REPLACE INTO aliases (model, alias, version, delivery_id) "
                                 "VALUES (?, ?, ?, ?)", (model, alias, version, delivery_id))
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return False
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def due(self) -> list[tuple[str, str, str, int]]:
        """Pending deliveries whose next attempt is due: (id, model, version, attempts)."""
        with self._lock:
            return self._db.execute("SELECT id, model, version, attempts FROM deliveries WHERE state = 'pending' "
                                    "AND next_at <= ? ORDER BY received_at", (time.time(),)).fetchall()

    def done(self, delivery_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE deliveries SET state = 'done', done_at = ?, error = NULL WHERE id = ?",
                             (time.time(), delivery_id))

    def refused(self, delivery_id: str, error: str) -> None:
        """The version may not be published (a failed gate): done, with the reason kept."""
        with self._lock:
            self._db.execute("UPDATE deliveries SET state = 'refused', done_at = ?, error = ? WHERE id = ?",
                             (time.time(), error[:2000], delivery_id))

    def failed(self, delivery_id: str, error: str, retry_in_s: float) -> None:
        with self._lock:
            self._db.execute("UPDATE deliveries SET attempts = attempts + 1, next_at = ?, error = ? WHERE id = ?",
                             (time.time() + retry_in_s, error[:2000], delivery_id))

    def state(self, delivery_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT state, attempts, error FROM deliveries WHERE id = ?",
                                   (delivery_id,)).fetchone()
        return None if row is None else {"state": row[0], "attempts": row[1], "error": row[2]}


class _Publisher:
    """The worker: publishes due deliveries one at a time, marks them done only after success."""

    def __init__(self, store: DeliveryStore, on_promotion: Promotion, retry_s: float, max_retry_s: float):
        self.store, self.on_promotion = store, on_promotion
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="edgeship-webhook-publisher", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for delivery_id, model, version, attempts in self.store.due():
                if self.stop.is_set():
                    return
                try:
                    self.on_promotion(model, version)
                except (GateFailed, RegistryError) as error:  # refused for good: retrying cannot change the answer
                    logger.error("not publishing %s v%s: %s", model, version, error)
                    self.store.refused(delivery_id, f"{type(error).__name__}: {error}")
                except Exception as error:  # the publish failed: keep the delivery, retry later
                    backoff = min(self.max_retry_s, self.retry_s * 2 ** attempts)
                    logger.exception("publishing %s v%s failed (attempt %d); retrying in %.0f s", model, version,
                                     attempts + 1, backoff)
                    self.store.failed(delivery_id, f"{type(error).__name__}: {error}", backoff)
                else:
                    self.store.done(delivery_id)
                    logger.info("delivery %s done: %s v%s published", delivery_id, model, version)
            self.wake.wait(timeout=min(1.0, self.retry_s))
            self.wake.clear()


def create_app(watched: WatchedAlias, on_promotion: Promotion, store: DeliveryStore | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, retry_s: float = 5.0, max_retry_s: float = 600.0) -> FastAPI:
    """The receiver: POST /webhooks/mlflow; GET /health; GET /deliveries/{id}."""
    store = store or DeliveryStore()
    publisher = _Publisher(store, on_promotion, retry_s, max_retry_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        publisher.thread.start()  # also takes up deliveries left pending by a previous run
        yield
        publisher.stop.set()
        publisher.wake.set()
        publisher.thread.join(timeout=30)

    app = FastAPI(title="edgeship promotion webhook", lifespan=lifespan)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "watching": f"{watched.model_name}@{watched.alias}"}

    @app.get("/deliveries/{delivery_id}")
    def delivery_state(delivery_id: str) -> dict:
        found = store.state(delivery_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no delivery {delivery_id}")
        return found

    @app.post("/webhooks/mlflow", status_code=200)
    async def delivery(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise HTTPException(status_code=413, detail=f"body of {declared} bytes is over the {max_body_bytes} limit")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise HTTPException(status_code=413, detail=f"body is over the {max_body_bytes} byte limit")
        try:
            payload = verify_delivery(watched.secret, request.headers, body)
        except SignatureError as error:
            raise HTTPException(status_code=401, detail=str(error)) from None
        except ValueError as error:  # signed, but not JSON
            raise HTTPException(status_code=400, detail=f"the delivery's body is not JSON: {error}") from None
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict):
            raise HTTPException(status_code=400, detail='the delivery is not an MLflow event (a JSON object with '
                                                        '"entity", "action" and "data")')
        event = f"{payload.get('entity')}.{payload.get('action')}"
        if event != "model_version_alias.created":
            return {"ignored": f"event {event}"}
        if data.get("name") != watched.model_name or data.get("alias") != watched.alias:
            return {"ignored": f"{data.get('name')}@{data.get('alias')} is not {watched.model_name}@{watched.alias}"}
        version = str(data.get("version"))
        if not store.accept(request.headers["x-mlflow-delivery-id"], watched.model_name, version, watched.alias):
            return {"ignored": f"delivery already handled, or {watched.alias} names version {version} already"}
        # Publishing takes seconds to minutes; MLflow's delivery times out long before. Answer now, durably queued.
        publisher.wake.set()
        return {"publishing": {"model": watched.model_name, "version": version}}

    return app


def publish_in_process(workdir: str | Path, params_path: str, rollout_fraction: float = 1.0) -> Promotion:
    """A promotion handler that runs the publish flow here, for the event's version."""
    def promote(model_name: str, version: str) -> None:
        from edgeship.flows.publish import publish

        descriptor = publish(version=version, params_path=params_path, workdir=str(workdir),
                             rollout_fraction=rollout_fraction)
        logger.info("published %s v%s: %s", model_name, version, descriptor.source)

    return promote


def publish_via_deployment(deployment: str, rollout_fraction: float = 1.0) -> Promotion:
    """A promotion handler that runs the Prefect deployment (e.g. 'publish/publish') and waits for its result."""
    def promote(model_name: str, version: str) -> None:
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters={"version": version, "alias": None,
                                                     "rollout_fraction": rollout_fraction},
                             timeout=None, tags=["edgeship", f"model:{model_name}", f"version:{version}"])
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(f"flow run {run.name} of {deployment} ended {run.state.name if run.state else '?'}")

    return promote


def register_webhook(tracking_uri: str, url: str, secret: str, name: str = "edgeship-publish-on-promotion") -> str:
    """Create the MLflow webhook that calls this receiver on alias creation; return its id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    webhook = client.create_webhook(name=name, url=url, events=["model_version_alias.created"], secret=secret,
                                    description="edgeship: publish the release when its production alias is set")
    return webhook.webhook_id
