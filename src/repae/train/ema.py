"""Exponential moving average of a model: parameters and floating-point buffers.

Buffers matter here: the SiT's latent BatchNorm running stats live in buffers, and the EMA
model's stats are the ones used to de-normalise samples and exported with the E2E-VAE.
Integer buffers (num_batches_tracked) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """warmup: use min(decay, (1 + step) / (10 + step)) so that early EMA weights are not held at
    the random initialisation for ~1/(1-decay) steps (short runs); off = the paper's constant decay."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """ema = d * ema + (1 - d) * model for parameters and float buffers; d = decay_at(step)."""
        weight = 1 - self.decay_at(step)
        ema_params = dict(self.model.named_parameters())
        params = [(ema_params[name], p) for name, p in model.named_parameters()]
        if params:
            torch._foreach_lerp_([e for e, _ in params], [p.detach() for _, p in params], weight)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            target = ema_buffers[name]
            if b.dtype.is_floating_point:
                target.lerp_(b, weight)
            else:
                target.copy_(b)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
