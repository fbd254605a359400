"""Small module utilities shared by losses and the training step."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
