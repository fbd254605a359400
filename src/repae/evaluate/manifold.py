"""Improved precision and recall (Kynkäänniemi et al. 2019) exactly as the ADM evaluator computes them.

ADM (openai/guided-diffusion `evaluations/evaluator.py`, `ManifoldEstimator` + `DistanceBlock`):
- distances are **squared** Euclidean, `max(|u|^2 - 2 u.v + |v|^2, 0)`, computed in **float16**
  (inputs cast to fp16); a block whose fp16 result is not finite is recomputed in float32;
- the radius of a point is the k-th nearest-neighbour squared distance within its own set, with
  the point itself counted: ADM partitions each distance row and takes index k (k=3) of the
  sorted row, whose index 0 is the point's zero distance to itself -> the 3rd nearest *other*
  point (a duplicate point counts as a neighbour at distance 0). No percentile clamping
  (`clamp_to_percentile=None`);
- a sample is "in" the reference manifold if its squared distance to some reference point i is
  `<=` radius_i; precision = fraction of samples inside the reference manifold, recall = fraction
  of reference points inside the sample manifold;
- distances are taken block by block (10000 x 10000 in ADM; the fp16/fp32 choice is per block),
  so 50K x 50K never exists at once; our radii keep a running top-(k+1) across column blocks.

`fp16=True` reproduces ADM's fp16 arithmetic by rounding each intermediate of the TF expression to
float16 (cast inputs, square, row sums, the matrix product, `2*`, the subtraction, the addition)
while the products themselves accumulate in float32, as GPU half matmuls do. `fp16=False` gives
the exact float32 distances (the definition, without ADM's rounding).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _half(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 precision (overflow -> inf) and return float32."""
    return x.half().float()


def squared_distances(u: torch.Tensor, v: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """Pairwise squared distances u [R,D], v [C,D] -> [R,C] float32, as ADM's DistanceBlock."""
    u, v = u.float(), v.float()
    if fp16:
        u16, v16 = _half(u), _half(v)
        nu = _half(_half(u16.square()).sum(1))  # tf.reduce_sum(tf.square(U)) in fp16
        nv = _half(_half(v16.square()).sum(1))
        uv2 = _half(2 * _half(u16 @ v16.t()))
        d = _half(_half(nu[:, None] - uv2) + nv[None, :]).clamp_min(0)
        if torch.isfinite(d).all():
            return d
    nu, nv = u.square().sum(1), v.square().sum(1)
    return (nu[:, None] - 2 * (u @ v.t()) + nv[None, :]).clamp_min(0)


def manifold_radii(feats: torch.Tensor, k: int = 3, row_batch: int = 10000, col_batch: int = 10000,
                   fp16: bool = True) -> torch.Tensor:
    """Squared k-NN radius of each row of feats [N,D] within feats (self included at index 0) -> [N]."""
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=feats.device)
    for r0 in range(0, n, row_batch):
        rows = feats[r0:r0 + row_batch]
        best: Optional[torch.Tensor] = None  # [r, <=k+1] smallest distances so far
        for c0 in range(0, n, col_batch):
            d = squared_distances(rows, feats[c0:c0 + col_batch], fp16)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + len(rows)] = best[:, k]
    return radii


def precision_recall(ref_feats: ArrayLike, sample_feats: ArrayLike, k: int = 3, row_batch: int = 10000,
                     col_batch: int = 10000, fp16: bool = True,
                     device: Optional[Union[str, torch.device]] = None) -> Tuple[float, float]:
    """(precision, recall) of samples [N2,D] against reference features [N1,D], as ADM with k=3."""
    ref, smp = torch.as_tensor(ref_feats).float(), torch.as_tensor(sample_feats).float()
    if device is not None:
        ref, smp = ref.to(device), smp.to(device)
    ref_r = manifold_radii(ref, k, row_batch, col_batch, fp16)
    smp_r = manifold_radii(smp, k, row_batch, col_batch, fp16)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)  # covered by the sample manifold
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=ref.device)  # covered by the reference manifold
    for r0 in range(0, len(ref), row_batch):
        for c0 in range(0, len(smp), col_batch):
            d = squared_distances(ref[r0:r0 + row_batch], smp[c0:c0 + col_batch], fp16)  # [r, c]
            ref_in[r0:r0 + len(d)] |= (d <= smp_r[None, c0:c0 + d.shape[1]]).any(dim=1)
            smp_in[c0:c0 + d.shape[1]] |= (d <= ref_r[r0:r0 + len(d), None]).any(dim=0)
    return smp_in.double().mean().item(), ref_in.double().mean().item()
