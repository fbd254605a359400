"""Small module utilities shared by losses and the training step."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, Optional

import torch

from torch import nn


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of `modules` get no gradients inside the block; the previous flags come back after.

    Restoring each flag (rather than calling requires_grad_(True)) is what keeps truly frozen
    parameters frozen: the reference code re-enabled everything and so trained its fixed pos_embed.
    """
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a `train.precision` setting: bf16 -> torch.bfloat16, fp32 -> None."""
    return torch.bfloat16 if precision == "bf16" else None


def autocast(precision: str, device: torch.device) -> ContextManager:
    """bf16 autocast on `device` for precision 'bf16'; a no-op context for 'fp32'."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def compile_regions(module: nn.Module) -> None:
    """torch.compile `module` in place, region by region: each element of a `blocks` list on its
    own (identical blocks share one compiled graph, so compiling a 28-block SiT costs one block),
    else the module whole. Parameter names, hence checkpoints, do not change (nn.Module.compile)."""
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            block.compile()
    else:
        module.compile()
