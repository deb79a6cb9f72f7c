"""Where the OTA repository's files live: a local directory or an S3 bucket.

The repository is a set of static files (signed metadata and hash-named model
files) that devices fetch over plain HTTP, so storage needs only a few calls:
`put`, `get` and `exists`, on slash-separated paths relative to the repository
root ("metadata/timestamp.json", "targets/models/..."), plus the conditional
writes the writer lock takes (edgeship.ota.lock): create only if absent, replace
or delete only if unchanged since read. An S3 endpoint that ignores conditional
requests (`rclone serve s3`) says so (`conditional_writes()`), and the lock then
refuses to rely on it.

    >>> storage = open_storage("s3://ota-bucket/edgeship", s3_endpoint_url="http://127.0.0.1:9000")
    >>> storage.put("metadata/timestamp.json", data)
    >>> storage.get("metadata/timestamp.json")

A local directory is served by any static web server (`python -m http.server`);
an S3 bucket by S3 itself (public read or a CDN in front). The updater then
fetches `<url>/metadata/...` and `<url>/targets/...`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import uuid
from pathlib import Path
from typing import Protocol

from edgeship.errors import EdgeshipError
from edgeship.files import write_atomic


class StorageError(EdgeshipError):
    """The OTA repository's storage cannot be read or written (no bucket, endpoint down, no access)."""


class Storage(Protocol):
    """A flat store of files addressed by relative, slash-separated paths."""

    def put(self, path: str, data: bytes) -> None:
        """Write a file, replacing any file at that path."""

    def get(self, path: str) -> bytes | None:
        """Read a file; None when there is none."""

    def exists(self, path: str) -> bool:
        """Whether a file exists at that path."""

    def create(self, path: str, data: bytes) -> str | None:
        """Write a file only if none exists at that path, atomically: its tag (see read_tagged), or None when one
        exists (a lock's step)."""

    def delete(self, path: str) -> None:
        """Remove a file; no error when there is none."""

    def list(self, prefix: str) -> list[str]:
        """Paths of the files under a directory prefix ("metadata/")."""

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        """A file and a tag that changes whenever the file is rewritten (S3's ETag); None when there is none."""

    def replace_if(self, path: str, data: bytes, tag: str) -> str | None:
        """Rewrite a file only if it still has `tag` (compare-and-swap): its new tag, or None when it changed or
        is gone."""

    def delete_if(self, path: str, tag: str) -> bool:
        """Remove a file only if it still has `tag` (compare-and-delete); False when it changed or is gone."""

    def conditional_writes(self) -> str | None:
        """None when `create`, `replace_if` and `delete_if` are atomic here; otherwise why they are not."""


def _check(path: str) -> str:
    """Refuse paths that would leave the repository root."""
    normal = posixpath.normpath(path)
    if path.startswith("/") or normal.startswith("..") or normal != path:
        raise ValueError(f"storage path '{path}' must be relative and normalised (no '..', '//' or leading '/')")
    return path


class LocalDirectory:
    """Files in a local directory; writes are atomic, so a web server serving it never shows a torn file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put(self, path: str, data: bytes) -> None:
        try:
            write_atomic(self.root / _check(path), data)
        except OSError as error:
            raise StorageError(f"cannot write {self.root / path}: {error.strerror or error}; "
                               f"check that ota.repository points at a writable directory") from None

    def get(self, path: str) -> bytes | None:
        try:
            return (self.root / _check(path)).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return (self.root / _check(path)).is_file()

    def create(self, path: str, data: bytes) -> str | None:
        target = self.root / _check(path)
        staged = target.parent / f".{target.name}.{uuid.uuid4().hex}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.write_bytes(data)
            os.link(staged, target)  # the filesystem decides which of two writers creates it, whole, never torn
        except FileExistsError:
            return None
        except OSError as error:
            raise StorageError(f"cannot create {target}: {error.strerror or error}; "
                               f"check that ota.repository points at a writable directory") from None
        finally:
            staged.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        data = self.get(path)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def replace_if(self, path: str, data: bytes, tag: str) -> str | None:
        with self._guard(path):
            current = self.read_tagged(path)
            if current is None or current[1] != tag:
                return None
            write_atomic(self.root / path, data)
            return hashlib.sha256(data).hexdigest()

    def delete_if(self, path: str, tag: str) -> bool:
        with self._guard(path):
            current = self.read_tagged(path)
            if current is None or current[1] != tag:
                return False
            (self.root / path).unlink()
            return True

    def conditional_writes(self) -> str | None:
        return None  # link() and an flock-guarded compare on one machine's filesystem

    @contextlib.contextmanager
    def _guard(self, path: str):
        """An exclusive flock beside the file: compare-then-write is one step for every process on this host."""
        target = self.root / _check(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.guard", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def delete(self, path: str) -> None:
        (self.root / _check(path)).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        directory = self.root / _check(prefix.rstrip("/"))
        if not directory.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in directory.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def __str__(self) -> str:
        return str(self.root)


# Files that are rewritten in place; everything else is written once under a
# new (versioned or hash-prefixed) name, so caches may keep it forever.
_MUTABLE = ("metadata/timestamp.json", "metadata/root.json")


class S3Storage:
    """Objects in an S3 bucket under a prefix, through boto3.

    Args:
        bucket: An existing bucket; it is not created here.
        prefix: Key prefix of the repository inside the bucket ("" for the bucket root).
        endpoint_url: An S3-compatible endpoint (MinIO, moto, rclone); None for AWS.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        import boto3  # pipeline side only; devices never write the repository
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        # Standard retries (3 attempts, jittered backoff): a blip is retried, a dead endpoint fails in seconds.
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=60)
        # A session of its own: boto3's default session keeps the credentials it resolved first for the life of
        # the process, so a process that opens storages under changing credentials (a worker, a test session)
        # would sign with stale ones.
        self._client = boto3.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self._conditional: tuple[str | None] | None = None  # the probe's answer, once asked

    def _key(self, path: str) -> str:
        _check(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def put(self, path: str, data: bytes) -> None:
        extra = {"ContentType": "application/json" if path.endswith(".json") else "application/octet-stream"}
        if path in _MUTABLE:
            extra["CacheControl"] = "no-cache"
        self._call("write", path, self._client.put_object, Bucket=self.bucket, Key=self._key(path), Body=data, **extra)

    def get(self, path: str) -> bytes | None:
        response = self._call("read", path, self._client.get_object, Bucket=self.bucket, Key=self._key(path))
        return None if response is None else response["Body"].read()

    def exists(self, path: str) -> bool:
        return self._call("check", path, self._client.head_object, Bucket=self.bucket, Key=self._key(path)) is not None

    def create(self, path: str, data: bytes) -> str | None:
        # S3 conditional write: exactly one of two concurrent creators succeeds
        response = self._conditional_call("create", path, self._client.put_object, Body=data, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        response = self._call("read", path, self._client.get_object, Bucket=self.bucket, Key=self._key(path))
        return None if response is None else (response["Body"].read(), response["ETag"])

    def replace_if(self, path: str, data: bytes, tag: str) -> str | None:
        response = self._conditional_call("replace", path, self._client.put_object, Body=data, IfMatch=tag)
        return None if response is None else response["ETag"]

    def delete_if(self, path: str, tag: str) -> bool:
        return self._conditional_call("delete", path, self._client.delete_object, IfMatch=tag) is not None

    def conditional_writes(self) -> str | None:
        """Asks the endpoint once: create twice, replace and delete with a wrong ETag, on a probe object.

        AWS S3 and moto honour all three; `rclone serve s3` (the local stack's) ignores them.
        """
        if self._conditional is None:
            probe = f"locks/.probe-{uuid.uuid4().hex}"
            try:
                wrong = '"00000000000000000000000000000000"'
                if not self.create(probe, b"1"):
                    reason = "it refused to create a new object"
                elif self.create(probe, b"2"):
                    reason = "it overwrote an object despite If-None-Match: *"
                elif self.replace_if(probe, b"3", wrong):
                    reason = "it overwrote an object whose ETag did not match If-Match"
                elif self.delete_if(probe, wrong) or not self.exists(probe):
                    reason = "it deleted an object whose ETag did not match If-Match"
                else:
                    reason = None
            finally:
                self.delete(probe)
            self._conditional = (reason,)
        return self._conditional[0]

    def _conditional_call(self, verb: str, path: str, method, **kwargs) -> dict | None:
        """A conditional request: its response when it took effect, None when its precondition failed."""
        from botocore.exceptions import ClientError

        try:
            return method(Bucket=self.bucket, Key=self._key(path), **kwargs)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict",
                                                                "NoSuchKey", "404"):
                return None
            self._call(verb, path, self._raise, error=error)
            return None

    def delete(self, path: str) -> None:
        self._call("delete", path, self._client.delete_object, Bucket=self.bucket, Key=self._key(path))

    def list(self, prefix: str) -> list[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        start = self._key(prefix.rstrip("/")) + "/"
        pages = self._call("list", prefix.rstrip("/"), lambda **kw: list(paginator.paginate(**kw)), Bucket=self.bucket,
                           Prefix=start) or []
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(item["Key"][cut:] for page in pages for item in page.get("Contents", []))

    @staticmethod
    def _raise(error: Exception):
        raise error

    def _call(self, verb: str, path: str, method, **kwargs):
        """Run one S3 call; None for a missing key, StorageError for anything that needs a person."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket}/{self._key(path)}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        try:
            return method(**kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code == "NoSuchBucket":
                raise StorageError(f"bucket '{self.bucket}' does not exist at {self.endpoint_url or 'AWS'}; "
                                   f"create it (aws s3 mb s3://{self.bucket}) or fix ota.repository") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"access denied to {where} ({code}); check the AWS credentials "
                                   f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None
            raise StorageError(f"cannot {verb} {where}: {error}") from None
        except EndpointConnectionError:
            raise StorageError(f"cannot reach the S3 endpoint {self.endpoint_url or 'of AWS'} to {verb} "
                               f"s3://{self.bucket}/{self._key(path)}; "
                               f"start it or fix ota.s3_endpoint_url") from None
        except NoCredentialsError:
            raise StorageError(f"no AWS credentials to {verb} {where}; set AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY (any values for a local endpoint) or AWS_PROFILE") from None
        except BotoCoreError as error:
            raise StorageError(f"cannot {verb} {where}: {error}") from None

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def public_read_policy(bucket: str, prefix: str = "") -> dict:
    """A bucket policy that lets anyone GET the repository's objects (devices fetch them without credentials).

    Everything a device fetches is signed or hash-checked, so public read is safe;
    writing stays with the pipeline's credentials. Apply it once, when creating the bucket:

        >>> boto3.client("s3").put_bucket_policy(Bucket="ota", Policy=json.dumps(public_read_policy("ota", "fleet")))
    """
    resource = f"arn:aws:s3:::{bucket}/{prefix.strip('/')}/*" if prefix.strip("/") else f"arn:aws:s3:::{bucket}/*"
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "EdgeshipOtaPublicRead", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
         "Resource": resource}]}


def open_storage(uri: str, s3_endpoint_url: str | None = None) -> Storage:
    """The storage named by `ota.repository`: "s3://bucket/prefix" or a local directory path."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"'{uri}' names no bucket; write it as s3://bucket/prefix")
        return S3Storage(bucket, prefix, endpoint_url=s3_endpoint_url)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"'{uri}' is neither a local path nor s3://bucket/prefix; "
                           f"other stores are not supported")
    return LocalDirectory(Path(uri.removeprefix("file://")))
