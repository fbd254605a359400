"""The JSON record of an evaluation: the numbers and everything needed to reproduce them.

A record holds `metrics`, `settings` (sample count, sampler, labels, image size, ...), `files`
(sha256 of every weight / reference / data file read), and `environment` (package, torch and
Python versions, device, world size, date, command line). It is written atomically: a temporary
file in the same directory, then a rename, so a reader never sees half a result.

A record under its default name (`RUN/eval/<command>-stepN.json`, `eval-<command>.json`) never
replaces one of another measurement (`record_path`): an evaluation of the same checkpoint with other
settings or other files (another sampler, CFG scale, sample count, data, reference, ...) goes beside
it as `<command>-stepN-<8 hex digits of its settings>.json`; the same settings again reuse their name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from repae.fileio import JsonFileError, read_json_object, sha256_file, write_atomic

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



# ----------------------------------------------------------------------------- where a record goes

MAX_RECORD_BYTES = 64 << 20  # a record is a few KB (a spectrum's bands: tens of KB); larger is not ours
TAG_LENGTHS = (8, 16, 64)  # hex digits of the settings hash in a record's name: longer only on a collision


def _content(described: Any) -> Any:
    """What a file description says about the content: its sha256 (a directory's: per file), not its path."""
    if isinstance(described, Mapping):
        return described.get("sha256")
    return described


def measurement(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of a record that decides its numbers: the evaluation, its settings, and the content of
    every file read. Not where the files were, nor when, how, or on how many processes it ran. A checkpoint
    to sample from is identified by its files' sha256 (and its step in the record's name), so
    `RUN`, `RUN/` and `RUN/checkpoints/step-N` are one measurement."""
    settings = dict(record.get("settings") or {})
    source = settings.get("source")
    if isinstance(source, Mapping) and source.get("kind") == "checkpoint":
        settings["source"] = {k: v for k, v in source.items() if k != "path"}
    files = record.get("files") or {}
    return {"evaluation": record.get("evaluation"), "settings": settings,
            "files": {role: _content(d) for role, d in files.items()} if isinstance(files, Mapping) else files}


def measurement_key(record: Mapping[str, Any]) -> str:
    """Hex sha256 of `measurement(record)` in canonical JSON (the same for a record and its file)."""
    text = json.dumps(_plain(measurement(record)), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_record(path: PathLike) -> Optional[dict]:
    """The evaluation record in `path`, or None when it is not one (unreadable, too large, not JSON,
    not a record): such a file is never replaced by `record_path`, only kept."""
    try:
        record = read_json_object(path, max_bytes=MAX_RECORD_BYTES)
    except JsonFileError:
        return None
    return record if "evaluation" in record and "settings" in record else None


def _flat(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def measurement_difference(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> List[str]:
    """'key: old -> new' for the first `limit` settings / files in which two records differ."""
    a = _flat({k: v for k, v in measurement(old).items() if k != "evaluation"})
    b = _flat({k: v for k, v in measurement(new).items() if k != "evaluation"})
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "(none)") != b.get(k, "(none)"))

    def short(v: Any) -> str:
        text = "(none)" if v is None else str(v)
        return text if len(text) <= 24 else text[:12] + "..."

    said = [f"{k}: {short(a.get(k))} -> {short(b.get(k))}" for k in keys[:limit]]
    return said + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def record_path(default: PathLike, record: Mapping[str, Any]) -> Tuple[Path, Optional[str]]:
    """Where `record` goes when its name was not chosen (--out): `default` unless that file holds
    another measurement (`measurement`), then `STEM-<hash of this one's measurement>.json` beside it,
    so records of different settings never replace each other and the same settings reuse their file.
    Returns (path, why it is not `default`, or None when that needs no saying)."""
    default = Path(default)
    key = measurement_key(record)
    names = [default] + [default.with_name(f"{default.stem}-{key[:n]}{default.suffix}") for n in TAG_LENGTHS]
    taken = [p.exists() or p.is_symlink() for p in names]
    held = [read_record(p) if t else None for p, t in zip(names, taken)]
    found = next((p for p, old in zip(names, held) if old is not None and measurement_key(old) == key), None)
    path = found or next((p for p, t in zip(names, taken) if not t), None)
    if path is None:
        from repae.evaluate.errors import EvaluationError

        raise EvaluationError(f"{default} and every name for these settings beside it hold other files; "
                              "pass --out PATH")
    if path == default or not taken[0]:
        return path, None
    if held[0] is None:
        return path, f"{default} is not a record of this evaluation; kept it"
    return path, (f"{default} holds a record of other settings or files "
                  f"({'; '.join(measurement_difference(held[0], record))}); kept it")
