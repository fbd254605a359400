"""Process-group helpers: rank, world size, barrier, sum all-reduce. No-ops in a single process
(torch.distributed unavailable or not initialised), so library code can call them unconditionally."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as torch_dist


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (what taskset, cgroups and schedulers
    allow), not every core of the host as os.cpu_count() reports."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def runnable_elsewhere(loadavg: str = "/proc/loadavg") -> Optional[int]:
    """Threads other processes have runnable right now (Linux: /proc/loadavg's "running/total",
    less the one reading it), or None where that cannot be read."""
    try:
        running = int(open(loadavg).read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1)


def oversubscription_note(threads: int, others: Optional[int] = None) -> Optional[str]:
    """One line when this process's `threads` plus the threads other processes have runnable exceed
    the usable cores. Measured on 2 cores: the toy run fell from ~2.2 to 0.13-0.2 steps/s beside one
    other 2-thread process (OpenMP threads spin-wait for each other, so sharing a core costs far more
    than its share)."""
    others = runnable_elsewhere() if others is None else others
    cores = usable_cores()
    if others is None or others + threads <= cores:
        return None
    return (f"note: {others} other runnable thread(s) and this process's {threads} share {cores} core(s); "
            f"expect a large slowdown. Set train.num_threads (or OMP_NUM_THREADS) so the total fits.")


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it. Unchanged in a single process."""
    if is_distributed() and world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def device_named(name: str = "auto") -> torch.device:
    """The device `name` names, for work in this process alone (no process group): auto is the
    current GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # named, not checked: a run's saved config may say cuda where it is only read (layout, evaluation on
    # a CPU machine); init_from_env checks the device a process is about to work on
    return torch.device(name)


def check_cuda_device(name: str, setting: str = "train.device") -> None:
    """ConfigError when `name` is cuda[:N] and this torch sees no such GPU: found here, before any work,
    rather than as torch's AttributeError from a CPU-only build's missing CUDA bindings mid-run.
    `setting`: what the user set (train.device, --device), as the message names it."""
    if not name.startswith("cuda"):
        return
    from repae.config import ConfigError  # late: config is a higher layer than this module

    index = torch.device(name).index or 0
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        seen = "no CUDA device (a CPU-only build of torch, or no GPU)" if count == 0 else f"{count} CUDA device(s)"
        raise ConfigError(f"{setting}={name}: this torch sees {seen}; use {setting}=cpu or auto")


def init_from_env(device_name: str = "auto") -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and pick this rank's device.

    NCCL for CUDA tensors, gloo for CPU tensors. In a single process nothing is initialised and the
    device is `device_name` (auto: cuda if available)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        check_cuda_device(device_name)  # with torchrun, each rank's GPU is its local rank's (checked by torch)
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        # CUDA runs still all-reduce a few CPU tensors (log means, counts of bad images): gloo
        # carries those, NCCL the CUDA ones (NCCL alone rejects CPU tensors)
        torch_dist.init_process_group(backend="cpu:gloo,cuda:nccl" if want_cuda else "gloo")
    if want_cuda:
        named = torch.device(device_name) if device_name.startswith("cuda") else torch.device("cuda")
        device = torch.device("cuda", local_rank() if is_distributed() else (named.index or 0))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu" if device_name == "auto" else device_name)


class main_first:
    """Context manager: rank 0 runs the block first (e.g. builds a cache), the others after it."""

    def __enter__(self):
        if not is_main():
            barrier()

    def __exit__(self, *exc):
        if is_main():
            barrier()
        return False
