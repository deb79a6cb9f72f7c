"""moto's S3 server over HTTP on a fixed loopback port, with a bucket of the test's own (`bucket`): a test may
stop it and start it again, a bucket outage (while stopped, every request is refused a connection). moto's
backend lives in the test's process, so what the bucket held survives the restart, and another test's bucket
is another name.

    >>> s3 = MotoS3(monkeypatch).start()
    >>> s3.stop(); s3.start()
    >>> s3.keys("field/")
"""

from __future__ import annotations

import logging
import os
import socket
import uuid


class MotoS3:
    """moto's S3 server on a fixed loopback port, which a test may stop and start again (an outage)."""

    def __init__(self, monkeypatch=None):
        """Credentials moto accepts go into the environment (through pytest's `monkeypatch`, else for good)."""
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            if monkeypatch is not None:
                monkeypatch.setenv(name, value)
            else:
                os.environ[name] = value
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.bucket = f"ota-{uuid.uuid4().hex[:10]}"
        self.url = f"s3://{self.bucket}/field"

    def start(self) -> MotoS3:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # else every request is a line on stderr
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def keys(self, prefix: str = "field/") -> list[str]:
        import boto3

        pages = boto3.client("s3", endpoint_url=self.endpoint).get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint).get_object(Bucket=self.bucket, Key=key)["Body"].read()
