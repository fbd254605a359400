"""Learning-rate schedule: constant, then an optional linear decay to zero at the end of the budget.

The paper trains at a constant lr (400K steps, far from converged). A short run on a small model gets
more out of its last steps when the lr falls to zero: the final weights then average the noise of the
late updates, as an EMA would, without an EMA's lag (`optim_*.decay_fraction`)."""

from __future__ import annotations

import torch

from repae.config import OptimConfig


def lr_factor(step: int, max_steps: int, decay_fraction: float) -> float:
    """Multiplier of the base lr for the update made at 0-based `step` of a `max_steps` budget.

    1 until the last round(decay_fraction * max_steps) updates, which fall linearly to
    1/decay_steps (the last update still moves the weights); 0 past the budget."""
    if decay_fraction <= 0:
        return 1.0
    decay_steps = max(1, round(decay_fraction * max_steps))
    return min(1.0, max(0.0, (max_steps - step) / decay_steps))


def set_lr(opt: torch.optim.Optimizer | None, cfg: OptimConfig, step: int, max_steps: int) -> None:
    """Set every parameter group of `opt` to the scheduled lr for the update made at `step`."""
    if opt is None:
        return
    lr = cfg.lr * lr_factor(step, max_steps, cfg.decay_fraction)
    for group in opt.param_groups:
        group["lr"] = lr
