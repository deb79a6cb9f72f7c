"""Uploads a device's field samples to the bucket's field prefix over S3 (boto3), through outages.

A thread: every `upload_every_s` it writes what the sampler queued (edgeship.device.field_samples) and puts
each waiting file, oldest first, at

    s3://<bucket>/<prefix>/<channel>/<target>/<device id>/<sample id>.npz   (and <sample id>.label.json)

deleting the local copy once the bucket has it. An unreachable or refusing bucket stops the round and the
next one waits longer (doubling up to 5 minutes); nothing is lost that fits the budget, and every wait is
bounded (2 s to connect, 10 s to read, one attempt per round). Credentials come from the device's own
environment, as boto3 reads them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role):
give a device a key that may only `s3:PutObject` under the field prefix (docs/fleet-loop.md).

    >>> uploader = FieldUploader(sampler).start()
    >>> uploader.stop()

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edgeship.device.field_samples import FieldSampler
from edgeship.records.field import FieldSampling

MAX_BACKOFF_S = 300.0
logger = logging.getLogger(__name__)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(f"field samples upload to s3://bucket/prefix, not {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


class FieldUploader:
    """The sampler's writer and uploader thread (see the module's docstring)."""

    def __init__(self, sampler: FieldSampler):
        self.sampler = sampler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._client_for: tuple | None = None
        self.failures_in_a_row = 0

    def start(self) -> FieldUploader:
        self._thread = threading.Thread(target=self._loop, name="edgeship-field-upload", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            settings = self.sampler.settings
            wait = settings.upload_every_s if settings else 5.0
            try:
                self.run_once()
            except Exception:  # a round that fails in a way not foreseen must not end the thread
                logger.exception("field sample upload round failed")
                self.failures_in_a_row += 1
            if self.failures_in_a_row:
                wait = min(MAX_BACKOFF_S, wait * 2 ** min(self.failures_in_a_row, 10))
            self._stop.wait(wait)

    def run_once(self) -> int:
        """Write what is queued, then upload what waits until the first failure; returns the files uploaded."""
        sampler = self.sampler
        sampler.write_queued()
        settings = sampler.settings
        if settings is None:
            return 0
        client, bucket, prefix = self._s3(settings)
        identity = sampler.identity
        where = "/".join(p for p in (prefix, identity.channel, identity.target or "any", identity.device_id) if p)
        uploaded = 0
        for path in sampler.pending():
            if self._stop.is_set():
                break
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                kind = "application/json" if path.suffix == ".json" else "application/octet-stream"
                client.put_object(Bucket=bucket, Key=f"{where}/{path.name}", Body=data, ContentType=kind)
            except Exception as error:  # endpoint down, refused, timed out: keep it, try again later
                logger.info("field samples wait: %s", error)
                sampler.count("upload_failures")
                self.failures_in_a_row += 1
                return uploaded
            _remove(path)
            uploaded += 1
            if path.suffix == ".npz":
                sampler.count("uploaded")
                sampler.count("uploaded_bytes", len(data))
        self.failures_in_a_row = 0
        return uploaded

    def _s3(self, settings: FieldSampling):
        bucket, prefix = split_url(settings.upload_url)
        wanted = (settings.endpoint_url,)
        if self._client is None or self._client_for != wanted:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 1})
            self._client = boto3.client("s3", endpoint_url=settings.endpoint_url, config=config)
            self._client_for = wanted
        return self._client, bucket, prefix


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
