"""DataLoader worker processes that never outlive the program.

Our workers ignore SIGINT and SIGTERM (repae.interrupt.ignore_stop_signals: a Ctrl-C or a
scheduler's SIGTERM goes to the whole process group, and only the main process decides when to
stop). The price: at interpreter exit, `multiprocessing` stops daemonic children it still knows
of with SIGTERM and then joins them, so a persistent worker that is still alive then (its loader
kept by a reference cycle, or by an object that is never freed) is never stopped and the program
never exits. It happened: CI printed "538 passed" and then hung until it was killed.

`worker_iter` is `iter(loader)` that also records the iterator; at exit, before `multiprocessing`'s
own exit hook runs, every recorded iterator that is still alive shuts its workers down the way
the DataLoader does it itself (an end-of-work message on each worker's queue, then join).
"""

from __future__ import annotations

import atexit
import weakref
from typing import Iterator

# Imported first on purpose: torch.utils.data imports multiprocessing, which registers its exit hook
# at import; hooks run last-registered-first, so the one registered below runs before it.
from torch.utils.data import DataLoader

_LIVE: "weakref.WeakSet" = weakref.WeakSet()


def worker_iter(loader: DataLoader) -> Iterator:
    """iter(loader); if it has worker processes, they are shut down at exit at the latest."""
    it = iter(loader)
    if loader.num_workers > 0:
        _LIVE.add(it)
    return it


def shut_down_workers() -> int:
    """Stop the workers of every live iterator made by `worker_iter`; returns how many iterators."""
    live = list(_LIVE)
    for it in live:
        it._shutdown_workers()  # the DataLoader's own clean shutdown (idempotent)
        _LIVE.discard(it)
    return len(live)


atexit.register(shut_down_workers)
