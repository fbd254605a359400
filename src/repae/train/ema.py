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
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * model, for parameters and float buffers."""
        ema_params = dict(self.model.named_parameters())
        params = [(ema_params[name], p) for name, p in model.named_parameters()]
        if params:
            torch._foreach_lerp_([e for e, _ in params], [p.detach() for _, p in params], 1 - self.decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            target = ema_buffers[name]
            if b.dtype.is_floating_point:
                target.lerp_(b, 1 - self.decay)
            else:
                target.copy_(b)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
