"""Data-parallel training: each rank's share of the global batch, and DDP wrappers.

Every random draw of a step (posterior noise, t, diffusion noise, label dropout) is made for
the whole global micro-batch from the same generator on every rank, and each rank keeps its
slice; batch statistics (the latent BatchNorm, the discriminator's BatchNorms, LeCam's means)
are all-reduced over the global batch (repae.models.global_norm). So W processes x B images
compute what 1 process x W*B images does: the same draws per sample, and weights that differ
only by floating-point summation order (tests/test_distributed.py measures it). Per-rank random
streams are not needed.

DDP wraps only the passes that train a module: the SiT's diffusion pass, the VAE's
encode-sample-decode, and the discriminator's own update. The frozen passes (the SiT
alignment pass of the VAE loss, the discriminator inside the GAN generator term) call the
plain modules, so DDP never sees a forward whose parameters get no gradient.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import ContextManager, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from repae import dist
from repae.data.sampler import rank_slice


@dataclass(frozen=True)
class Shard:
    """This process's contiguous share of every global batch."""

    rank: int = 0
    world: int = 1

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[world*B, ...] drawn for the global batch -> this rank's [B, ...] (the slice the data
        sources give this rank, `repae.data.sampler.rank_slice`)."""
        return rank_slice(x, self.rank, self.world)

    def global_size(self, local: int) -> int:
        return local * self.world


def current_shard() -> Shard:
    return Shard(dist.rank(), dist.world_size())


def wrap(module: nn.Module, device: torch.device, find_unused: bool = False,
         broadcast_buffers: bool = False) -> nn.Module:
    """DDP(module) in a process group of several ranks; the module itself otherwise.

    Buffers are not broadcast by default: the SiT's BatchNorm stats are synchronised by the
    norm itself and the VAE has none; the discriminator's BatchNorm asks for broadcasting."""
    if dist.world_size() <= 1:
        return module
    import inspect

    # newer torch renames broadcast_buffers; both sync at construction, which is what we want
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(module, device_ids=[device] if device.type == "cuda" else None,
               find_unused_parameters=find_unused, **{name: broadcast_buffers})


def no_sync(modules: List[Optional[nn.Module]], skip_sync: bool) -> ContextManager:
    """Accumulate gradients locally (no all-reduce) for the DDP modules while `skip_sync`."""
    if not skip_sync:
        return nullcontext()
    stack = ExitStack()
    for module in modules:
        if isinstance(module, DDP):
            stack.enter_context(module.no_sync())
    return stack
