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
`ordered_batches` is the one way a resumable source (image folders, cached latents) builds its
worker-backed loader, so a fix to how workers live and die lands in every source at once.
"""

from __future__ import annotations

import atexit
import itertools
import weakref
from typing import Callable, Iterator

# Imported first on purpose: torch.utils.data imports multiprocessing, which registers its exit hook
# at import; hooks run last-registered-first, so the one registered below runs before it.
from torch.utils.data import DataLoader, Dataset

from repae.data.sampler import ResumableOrder, rank_slice
from repae.interrupt import ignore_stop_signals

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


def ordered_batches(dataset: Dataset, order: ResumableOrder, batch_size: int, rank: int, world: int,
                    num_workers: int, collate_fn: Callable, batched: bool = False,
                    pin_memory: bool = False) -> Iterator:
    """This rank's slice of every global batch of `batch_size` that `order` deals from where it stands
    now, loaded by `num_workers` persistent workers (0: in this process) that ignore stop signals and
    are shut down at exit. `order` itself is not moved: the caller advances it per batch it consumes,
    so a checkpoint records only what was used while the workers read ahead.
    batched: `dataset[list of indices]` returns the whole batch (else one item per index, collated).
    pin_memory: the DataLoader copies each batch's tensors into page-locked memory (in a thread of its own
    when there are workers), so that a copy to the GPU with non_blocking=True is a DMA the host only
    queues, where from pageable memory the main thread first stages the batch through the driver."""
    ahead = ResumableOrder(order.n, order.seed)
    ahead.load_state_dict(order.state_dict())
    # made of locals only: a generator that held the caller's object would make a reference cycle
    # that keeps the persistent workers alive until the cycle collector runs (at exit, too late)
    batches = (rank_slice(ahead.take(batch_size), rank, world).tolist() for _ in itertools.count())
    sampling = dict(sampler=batches, batch_size=None) if batched else dict(batch_sampler=batches)
    return worker_iter(DataLoader(dataset, num_workers=num_workers, collate_fn=collate_fn,
                                  persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
                                  pin_memory=pin_memory, **sampling))
