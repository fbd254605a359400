"""The JSON record of an evaluation: the numbers and everything needed to reproduce them.

A record holds `metrics`, `settings` (sample count, sampler, labels, image size, ...), `files`
(sha256 of every weight / reference / data file read), and `environment` (package, torch and
Python versions, device, world size, date, command line). It is written atomically: a temporary
file in the same directory, then a rename, so a reader never sees half a result.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from repae.fileio import sha256_file, write_atomic

PathLike = Union[str, os.PathLike]
WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".json", ".yaml", ".tar"}


def describe_file(path: Optional[PathLike], role: str = "file") -> Optional[Dict[str, Any]]:
    """{'path', 'sha256', 'bytes'} of a file; for a directory (a diffusers VAE, a checkpoint), the
    sha256 of each weight/config file in it by relative path. None for no path. A hub id is
    described by the file it resolves to (as the loader for `role` resolved it), plus {'id': ...}."""
    from repae import hub

    if path is None:
        return None
    if hub.is_hub_id(path):
        local = hub.resolve(path, role if role in hub.KINDS else "file")
        return {"id": path, **(describe_file(local) or {})}
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in WEIGHT_SUFFIXES)
        return {"path": str(p.resolve()), "sha256": {q.relative_to(p).as_posix(): sha256_file(q) for q in files}}
    return {"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def describe_files(paths: Mapping[str, Optional[PathLike]]) -> Dict[str, Any]:
    """{role: describe_file(path)} for the roles that have a path (role: inception, vae, ...)."""
    return {role: describe_file(p, role) for role, p in paths.items() if p is not None}


def environment(argv: Optional[Sequence[str]] = None, device: Optional[str] = None,
                world_size: int = 1) -> Dict[str, Any]:
    """Versions, device, process count, UTC date and the command line of this evaluation."""
    import numpy
    import torch

    from repae import __version__

    argv = list(sys.argv if argv is None else argv)
    return {
        "repae_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "world_size": world_size,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": " ".join(shlex.quote(a) for a in argv),
    }


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, non-finite floats to None (strict JSON has no NaN/inf)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def make_record(kind: str, metrics: Mapping[str, Any], settings: Mapping[str, Any],
                files: Mapping[str, Any], env: Mapping[str, Any], notes: Optional[Mapping[str, str]] = None) -> dict:
    """One evaluation result, JSON-ready."""
    record = {"evaluation": kind, "metrics": dict(metrics), "settings": dict(settings), "files": dict(files),
              "environment": dict(env)}
    if notes:
        record["notes"] = dict(notes)
    return _plain(record)


def write_json_atomic(path: PathLike, record: Mapping[str, Any]) -> Path:
    """Write `record` as indented JSON atomically (NaN/inf become null first)."""
    return write_atomic(path, (json.dumps(_plain(record), indent=2, allow_nan=False) + "\n").encode())

