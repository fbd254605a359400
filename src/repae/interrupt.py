"""Stopping a long job cleanly on SIGINT (Ctrl-C) or SIGTERM (schedulers, `kill`).

`StopSignals` records the first such signal instead of letting it kill the process, so the
training loop can finish the step it is in, save a checkpoint and exit (`Interrupted`). A second
signal acts as if nothing had been caught: SIGINT raises KeyboardInterrupt at once, SIGTERM
terminates the process. Checkpoints are written atomically, so neither leaves a damaged one.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class Interrupted(Exception):
    """A job stopped at a consistent point after a stop signal. `saved`: the checkpoint written
    there (None on ranks other than 0, which write nothing)."""

    def __init__(self, signum: int, step: int, saved: Optional[Path]):
        self.signum, self.step, self.saved = signum, step, saved
        where = f"saved {saved}" if saved is not None else "rank 0 saved the checkpoint"
        super().__init__(f"interrupted at step {step}: {where}; run the same command to resume")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopSignals:
    """Context manager: while inside, the first SIGINT/SIGTERM only sets `signum` (poll it at a safe
    point); a second one is handled as the handlers before it would have (KeyboardInterrupt for
    SIGINT, termination for SIGTERM). Outside the main thread it installs nothing (`signum` stays None)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self._restore()  # the user insists: stop now, as if we had never caught anything
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT/SIGTERM, which a terminal's Ctrl-C or a
    scheduler sends to the whole process group. The main process decides when to stop and shuts
    its workers down; a worker killed first would turn a clean stop into a DataLoader error."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
