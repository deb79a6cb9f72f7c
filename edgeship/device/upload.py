"""A job's multipart upload, streamed to disk: size-capped, each file hashed on the way, checked against its sha256.

The agent reads a job's form (`POST /jobs/...`) with `receive_upload` only once the job's
turn has come: file parts (`artifact`, `batch`) go to files in the job's private directory,
named after the part, never by the client; the other fields stay in memory. `check_hashes`
compares each file with the sha256 the form declares for it.
No torch, TensorFlow, MLflow or Prefect here: this runs on the device.

    >>> upload = await receive_upload(request, job_dir, max_upload_mb=256, files=("artifact",))
    >>> check_fields(upload, "request"); check_hashes(upload)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

_FIELD_LIMIT = 64 * 1024  # bytes of one non-file form field (sha256, target, request JSON)
_FORM_SLACK = 1 << 20  # bytes of form framing and fields allowed on top of the artifact
_HASH_FIELDS = {"artifact": "sha256", "batch": "batch_sha256"}  # file part -> the field holding its sha256


@dataclass
class Upload:
    """A job form as received: its files on disk (with sha256 and size) and its other fields."""

    paths: dict[str, Path]  # file part name -> where it was written
    sha256: dict[str, str]
    bytes: dict[str, int]
    fields: dict[str, str]


class _UploadTooLarge(Exception):
    pass


class _BadForm(Exception):
    pass


def too_large(max_upload_mb: int) -> HTTPException:
    """The 413 for an upload over the agent's limit."""
    return HTTPException(413, detail=f"the upload is larger than this agent accepts ({max_upload_mb} MB); "
                                     "restart the agent with a larger --max-upload-mb")


def check_headers(request: Request, max_upload_mb: int) -> None:
    """What the headers alone settle: a declared size over the limit (413), a body that is not a form (415)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > (max_upload_mb << 20) + _FORM_SLACK:
        raise too_large(max_upload_mb)
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise HTTPException(415, detail="send the job as multipart/form-data with the file 'artifact' "
                                        "and the fields 'sha256', 'target' and 'request' (or 'options')")


async def receive_upload(request: Request, job_dir: Path, max_upload_mb: int,
                         files: tuple[str, ...], optional: tuple[str, ...] = ("artifact",)) -> Upload:
    """Stream a multipart form into `job_dir`: the parts named in `files` to files (hashed as they arrive),
    the rest to memory. Files are named after the part (`artifact`, `batch`), never by the client.

    A part in `optional` may be missing (an `artifact` a job names by `engine_sha256` instead).
    """
    limit = max_upload_mb << 20
    _, options = parse_options_header(request.headers.get("content-type"))
    received = 0
    form = _FormReader(options[b"boundary"], {name: job_dir / name for name in files}, limit, optional)
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + _FORM_SLACK:  # Content-Length can be absent (chunked) or wrong
                raise _UploadTooLarge
            form.feed(chunk)
        form.finish()
    except ClientDisconnect:
        raise HTTPException(400, detail="the client went away before its upload was complete") from None
    except _UploadTooLarge:
        raise too_large(max_upload_mb) from None
    except _BadForm as error:
        raise HTTPException(422, detail=f"the job form is malformed: {error}") from None
    finally:
        form.close()
    arrived = set(form.received)
    return Upload(paths={n: p for n, p in form.paths.items() if n in arrived},
                   sha256={n: d.hexdigest() for n, d in form.digests.items() if n in arrived},
                   bytes={n: size for n, size in form.sizes.items() if n in arrived}, fields=form.fields)


class _FormReader:
    """Feeds a multipart/form-data body through python-multipart's streaming parser."""

    def __init__(self, boundary: bytes, paths: dict[str, Path], limit: int, optional: tuple[str, ...] = ()):
        self.fields: dict[str, str] = {}
        self._optional = optional
        self.paths = paths
        self.digests = {name: hashlib.sha256() for name in paths}
        self.sizes = {name: 0 for name in paths}
        self._files: dict[str, BinaryIO] = {}
        self._limit = limit
        self._header_name, self._header_value = bytearray(), bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None
        self._value = bytearray()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as error:
            raise _BadForm(str(error)) from None

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except MultipartParseError as error:
            raise _BadForm(str(error)) from None
        missing = [name for name in self.paths if name not in self._files and name not in self._optional]
        if missing:
            raise _BadForm(f"it has no file part named {' or '.join(repr(m) for m in missing)}")

    @property
    def received(self) -> list[str]:
        """The file parts that arrived."""
        return list(self._files)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def _part_begin(self) -> None:
        self._headers, self._part, self._value = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode(errors="replace")
        if not name:
            raise _BadForm("a part has no name in its Content-Disposition header")
        if name in self.fields or name in self._files:
            raise _BadForm(f"the field '{name}' is sent twice")
        self._part = name
        if name in self.paths:
            self._files[name] = open(self.paths[name], "xb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part in self._files:
            self.sizes[self._part] += end - start
            if sum(self.sizes.values()) > self._limit:
                raise _UploadTooLarge
            self._files[self._part].write(data[start:end])
            self.digests[self._part].update(data[start:end])
        else:
            self._value.extend(data[start:end])
            if len(self._value) > _FIELD_LIMIT:
                raise _BadForm(f"the field '{self._part}' is longer than {_FIELD_LIMIT} bytes")

    def _part_end(self) -> None:
        if self._part in self._files:
            self._files[self._part].flush()
        elif self._part:
            self.fields[self._part] = self._value.decode(errors="replace")


def check_fields(upload: Upload, job_field: str) -> None:
    """422 unless the form has `target`, `job_field` and the sha256 field of each file it sent."""
    required = ["target", job_field, *(_HASH_FIELDS[name] for name in upload.paths)]
    missing = [name for name in required if name not in upload.fields]
    if missing:
        raise HTTPException(422, detail=f"the job form lacks the field(s) {missing}")


def check_hashes(upload: Upload) -> None:
    """400 unless every file received hashes to the sha256 its form field declares."""
    for name in upload.paths:
        expected = upload.fields[_HASH_FIELDS[name]].strip().lower()
        if expected != upload.sha256[name]:
            raise HTTPException(400, detail=f"sha256 mismatch for '{name}': expected {expected} (the "
                                            f"'{_HASH_FIELDS[name]}' field), got {upload.sha256[name]} from the "
                                            f"{upload.bytes[name]} bytes received; the upload was cut or the "
                                            "wrong file was sent; send it again")
