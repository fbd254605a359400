"""One training process per run directory, and a run directory that can be written.

`RUN/lock` is created with O_CREAT|O_EXCL and names its holder (PID, host, process start time).
A second `repae train` on the same directory is refused with one line naming the holder. A lock
left by a process that is gone (same host, PID not running, or running but started at another
time: a reused PID) is taken over, with a message; the take-over is serialised by an flock on
`RUN/lock.takeover`, and re-reads the lock under it, so two processes cannot both take it. A lock
held from another host is never taken over automatically (its PID means nothing here).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from repae.config import ConfigError

LOCK = "lock"


class RunLockedError(ConfigError):
    """Another live process holds the run directory."""


def check_writable(run_dir: Path) -> None:
    """ConfigError (one line) unless the run directory and the parts of it a run writes can be written."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for sub in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
            if sub.exists() or sub.is_symlink():
                tempfile.TemporaryFile(dir=sub).close()  # a probe file, gone on close
        for name in ("metrics.jsonl", "config.yaml", "summary.json"):
            if (run_dir / name).is_file():
                open(run_dir / name, "a").close()
    except OSError as err:
        where = err.filename or run_dir
        raise ConfigError(f"output directory not writable: {where} ({err.strerror or err}); "
                          "fix its permissions or choose another output_dir") from None


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    started = holder.get("start_time")
    return started is None or _start_time(pid) in (None, started)


def _read(path: Path) -> Optional[dict]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return {}  # empty or torn: a holder that died between creating and writing it


class RunLock:
    """Context manager holding RUN/lock for this process."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())
        self.held = True
        return True

    def acquire(self) -> None:
        for _ in range(50):
            if self._create():
                return
            holder = _read(self.path)
            if holder is None:  # released meanwhile
                continue
            if not holder and time.time() - self._mtime() < 5:  # being written by its creator right now
                time.sleep(0.1)
                continue
            same_host = holder.get("host") == socket.gethostname()
            if holder and (not same_host or _alive(holder)):
                raise RunLockedError(f"{self.path.parent} is in use by PID {holder.get('pid')} on host "
                                     f"{holder.get('host')} (since {holder.get('since')}); if that process is "
                                     f"gone, delete {self.path}")
            self._take_over(holder)
            if self.held:
                return
        raise RunLockedError(f"could not lock {self.path}: it keeps changing hands")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _take_over(self, stale: dict) -> None:
        with open(self.path.with_name(LOCK + ".takeover"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel even if this process dies
            if _read(self.path) != stale:  # someone else took it over first: look again
                return
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            if self._create():
                print(f"{self.path}: took over a stale lock of PID {stale.get('pid')} on {stale.get('host')} "
                      "(no longer running)", file=sys.stderr)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
