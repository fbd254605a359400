"""Samplers that integrate a velocity model from noise (t=1) to data (t=0).

- Euler / Heun ODE on `linspace(1, 0, n+1)`.
- Euler-Maruyama SDE on `linspace(1, 0.04, n)` then one deterministic Euler step to 0,
  with diffusion w(t) = 2t and drift v - w/2 * score (the REPA/REPA-E sampler).
- Classifier-free guidance on all channels, only where guidance_low <= t <= guidance_high,
  computed with the conditional and null batches in one forward. Heun's corrector decides at
  t_cur by default, as the official sampler does (`heun_cfg_at`).
The sampler state is float64 (cheap next to the model; keeps long SDE chains exact); the
model sees its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from repae.flow import score_from_velocity

# v(x [B,C,H,W], t [B], y [B]) -> [B,C,H,W]
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Guidance:
    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0
    null_class: int = 1000

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.low <= t <= self.high


def guided_velocity(model: VelocityFn, x: torch.Tensor, t: float, y: torch.Tensor, guidance: Optional[Guidance],
                    model_dtype: torch.dtype = torch.float32, guide_at: Optional[float] = None) -> torch.Tensor:
    """v at scalar time t, with CFG v_u + s (v_c - v_u) where guidance is active at `guide_at`
    (default: t). float64 out."""
    if guidance is not None and guidance.active(t if guide_at is None else guide_at):
        x_in = torch.cat([x, x]).to(model_dtype)
        y_in = torch.cat([y, torch.full_like(y, guidance.null_class)])
    else:
        x_in, y_in = x.to(model_dtype), y
    t_in = torch.full((x_in.shape[0],), float(t), device=x.device, dtype=model_dtype)
    v = model(x_in, t_in, y_in).double()
    if x_in.shape[0] == x.shape[0]:
        return v
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance.scale * (v_cond - v_uncond)


def ode_time_grid(num_steps: int) -> torch.Tensor:
    """[n+1] float64 times from 1 (noise) to 0 (data)."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def sde_time_grid(num_steps: int, t_last: float = 0.04) -> torch.Tensor:
    """[n+1] float64: linspace(1, t_last, n) then 0."""
    return torch.cat([torch.linspace(1.0, t_last, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def euler_ode(model: VelocityFn, noise: torch.Tensor, y: torch.Tensor, num_steps: int = 50, heun: bool = False,
              guidance: Optional[Guidance] = None, time_grid: Optional[torch.Tensor] = None,
              model_dtype: torch.dtype = torch.float32, heun_cfg_at: str = "t_cur") -> torch.Tensor:
    """Integrate dx/dt = v(x,t,y) from t=1 to t=0. noise: [B,C,H,W] -> samples (float64).

    heun_cfg_at: whether CFG is on for Heun's corrector (evaluated at t_next) is decided at "t_cur",
    as the official sampler does, or at "t_next"."""
    if heun_cfg_at not in ("t_cur", "t_next"):
        raise ValueError(f"heun_cfg_at={heun_cfg_at!r} must be 't_cur' or 't_next'")
    grid = ode_time_grid(num_steps) if time_grid is None else time_grid
    x = noise.double()
    for i in range(len(grid) - 1):
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        d_cur = guided_velocity(model, x, t_cur, y, guidance, model_dtype)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < len(grid) - 2:  # Heun's corrector, skipped on the last step (t_next = 0)
            guide_at = t_cur if heun_cfg_at == "t_cur" else t_next
            d_next = guided_velocity(model, x_next, t_next, y, guidance, model_dtype, guide_at=guide_at)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


def sde_diffusion(t: float) -> float:
    """w(t) = 2t, the REPA/SiT default diffusion coefficient."""
    return 2.0 * t


@torch.no_grad()
def euler_maruyama(model: VelocityFn, noise: torch.Tensor, y: torch.Tensor, num_steps: int = 250,
                   guidance: Optional[Guidance] = None, path_type: str = "linear",
                   diffusion: Callable[[float], float] = sde_diffusion,
                   generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                   model_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reverse SDE dx = [v - w/2 s] dt + sqrt(w) dW from t=1 to 0.04, then one mean step to 0.

    generator: one for the batch, or one per sample (row i's Brownian increments then depend on
    its own generator only, so a sample does not change with the batch it is generated in)."""
    grid = sde_time_grid(num_steps)
    x = noise.double()
    for i in range(len(grid) - 1):
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        dt = t_next - t_cur
        v = guided_velocity(model, x, t_cur, y, guidance, model_dtype)
        w = diffusion(t_cur)
        t_vec = torch.full((x.shape[0],), t_cur, dtype=torch.float64, device=x.device)
        drift = v - 0.5 * w * score_from_velocity(v, x, t_vec, path_type) if w != 0 else v
        x = x + drift * dt
        last = i == len(grid) - 2
        if not last and w != 0:  # the final step to t=0 is deterministic (returns the mean)
            eps = _brownian(x, generator)
            x = x + (w * abs(dt)) ** 0.5 * eps
    return x


def _brownian(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal like x (float64), from one generator or one generator per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64, device=g.device)
                        for g in generator]).to(x.device)
