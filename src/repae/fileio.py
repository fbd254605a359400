"""Small file helpers shared by everything that writes results: atomic writes and hashes.

A crash never leaves a half-written file under the final name: data goes to `name.tmp`,
is flushed to disk, then renamed over the target (rename is atomic on POSIX)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: PathLike, data: bytes) -> Path:
    """Write bytes to `path` via a flushed temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: PathLike, obj, indent: int = 1) -> Path:
    return write_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())
