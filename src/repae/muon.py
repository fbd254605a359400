"""Muon for convolution filters: the toy world's VAE pre-trains with it (repae.toyworld).

Muon (Keller Jordan, 2024) replaces a weight matrix's momentum update by its nearest semi-orthogonal
matrix (five Newton-Schulz steps), so every direction of the update moves at the same rate. It is
torch.optim.Muon's rule exactly (Nesterov momentum, the quintic coefficients, decoupled weight decay,
"match_rms_adamw" step size 0.2·sqrt(max(rows, cols))), with two differences: a filter [out, in, k, k]
is orthogonalised as the matrix [out, in·k·k] (torch's Muon only takes 2-D parameters), and the
Newton-Schulz steps run in `ns_dtype`, float32 by default (torch's run in bf16, which is slow on CPUs
without native bf16 arithmetic). The matrix is read in the filter's logical order, so its memory
layout (channels_last or not) does not change the update.
"""

from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (and Keller Jordan's) quintic


def orthogonalise(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximately U·V^T of matrix = U·S·V^T [m,n] -> [m,n] (singular values pushed into ~[0.7, 1.2])."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for parameters with at least 2 dims (matrices, conv filters); give the others (biases,
    norms) and the first and last layers to AdamW, as Muon's authors do."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                                      ns_dtype=ns_dtype))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices and filters, not a {p.ndim}-d parameter {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                rows, cols = _matrix_shape(p.shape)
                direction = orthogonalise(update.reshape(rows, cols), group["ns_steps"], group["ns_dtype"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction.view(p.shape), alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)))
        return loss


def _matrix_shape(shape: torch.Size) -> Tuple[int, int]:
    """[out, in, *kernel] -> (out, in·prod(kernel))."""
    return shape[0], math.prod(shape[1:])
