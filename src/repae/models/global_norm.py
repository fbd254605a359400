"""Batch statistics of the global batch: what one process with the whole batch would compute.

Under torchrun each rank holds a slice of the global batch. A BatchNorm in train mode that
normalised with its slice's statistics would make the result depend on the world size; these
helpers all-reduce the per-channel sums (autograd-aware, float64) so every rank normalises with
the statistics of all ranks. torch's SyncBatchNorm refuses CPU tensors, and the equivalence of
W processes x B with 1 process x W*B must hold on CPU too. In a single process nothing here is
called: the modules run BatchNorm2d's own forward, bit for bit.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from repae import dist


def all_reduce_sum_autograd(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (the backward sums the upstream gradients over ranks)."""
    import torch.distributed as torch_dist
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", torch_dist.group.WORLD))


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of x over every rank's batch (ranks hold equal shares), differentiable; x.mean() in one process."""
    if dist.world_size() <= 1:
        return x.mean()
    return all_reduce_sum_autograd(x.mean().reshape(1)).reshape(()) / dist.world_size()


def global_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (mean [C], biased var [C], count []) of x [B,C,...] over every rank's batch, float64."""
    c = x.shape[1]
    xd = x.double()
    dims = (0, *range(2, x.dim()))
    count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
    local = torch.cat([xd.sum(dim=dims), xd.pow(2).sum(dim=dims), count])
    stats = all_reduce_sum_autograd(local)
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean.pow(2)).clamp_min(0)  # biased, as BatchNorm normalises with
    return mean, var, n


@torch.no_grad()
def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         n: torch.Tensor) -> None:
    """BatchNorm's running update from global moments: the unbiased variance, momentum `bn.momentum`."""
    bn.running_mean.lerp_(mean.float(), bn.momentum)
    bn.running_var.lerp_((var * n / (n - 1)).float(), bn.momentum)
    bn.num_batches_tracked += 1


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode batch norm of x [B,C,...] with the global batch's statistics (SyncBatchNorm's
    semantics), updating `bn`'s running stats; affine when `bn` is. Returns x's dtype."""
    mean, var, n = global_moments(x)
    if bn.track_running_stats:
        update_running_stats(bn, mean, var, n)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x.double() - mean.view(shape)) / (var.view(shape) + bn.eps).sqrt()
    if bn.affine:
        y = y * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    return y.to(x.dtype)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same arguments, same state-dict keys) whose train-mode statistics are the
    global batch's when several processes train together; in one process exactly BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,H,W]
        if self.training and dist.world_size() > 1:
            return global_batch_norm(self, x)
        return super().forward(x)
