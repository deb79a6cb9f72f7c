"""File helpers shared by the pipeline and the device side."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write a file so readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these files are meant to be served and shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keep_json(path: str | Path, value) -> None:
    """Keep `value` as JSON at `path` (rewritten only when it changed); None removes the file."""
    import json

    path = Path(path)
    if value is None:
        path.unlink(missing_ok=True)
        return
    data = json.dumps(value, sort_keys=True).encode()
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)
