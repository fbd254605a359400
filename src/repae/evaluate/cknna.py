"""CKNNA and mutual k-NN alignment (Platonic Representation Hypothesis), and SiT-vs-encoder alignment.

Definitions follow `AlignmentMetrics` in minyoungg/platonic-rep `metrics.py` (Huh et al., 2024),
re-derived here:

CKNNA(A, B; k), A: [n, d_A], B: [n, d_B] (rows = the same n samples):
- linear kernels K = A A^T, L = B B^T (no centring, no normalisation inside the metric);
- kNN masks: for each row i, the k columns with the largest K[i, j] (with `unbiased`, j = i is
  excluded by setting the diagonal to -inf before the top-k); M_K[i, j] = 1 for those j; same for L;
- the mutual mask is the elementwise product M = M_K * M_L (row-wise, *not* symmetrised);
- sim(K, L) = HSIC(M * K, M * L), with the unbiased HSIC estimator of Song et al. (2012):
      HSIC_u(K, L) = [ tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T K~ L~ 1 ] / (n(n-3))
  where K~, L~ are K, L with zero diagonals (the source writes tr(K~ L~) as sum(K~ * L~^T)),
  or, with `unbiased=False`, the biased HSIC tr(K H L H), H = I - 11^T/n;
- CKNNA = sim(K, L) / (sqrt(sim(K, K) * sim(L, L)) + 1e-6); in sim(K, K) the mask is M_K itself.
  Because the masks are row-wise, 1^T K~ L~ 1 != 1^T L~ K~ 1 in general: CKNNA(A, B) differs
  slightly from CKNNA(B, A) (the source behaves the same way); the argument order is part of
  the protocol. The 1e-6 makes the score of identical features sim / (sim + 1e-6), not exactly 1.
The source's `distance_agnostic=True` branch returns a matrix and cannot produce a score, so it
is not offered. `topk=None` means k = n-1 (the source intends this but checks `topk < 2` first).

mutual_knn(A, B; k): kNN of each row by inner product (self excluded), and the mean over rows of
|kNN_A(i) ∩ kNN_B(i)| / k.

PRH's measuring pipeline (`measure_alignment.py`) L2-normalises each row before these metrics
(and clips outliers at the 95th percentile of |x|); `prepare_features` does both here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from repae.flow import interpolate
from repae.generate import sample_noise


def _knn_mask(gram: torch.Tensor, topk: int, exclude_self: bool) -> torch.Tensor:
    """[n,n] similarities -> [n,n] 0/1 mask of each row's top-k columns."""
    if exclude_self:
        gram = gram.clone().fill_diagonal_(float("-inf"))
    idx = gram.topk(topk, dim=1).indices
    return torch.zeros_like(gram).scatter_(1, idx, 1.0)


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5). k, l: [n,n], n >= 4 -> scalar."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    kt = k.clone().fill_diagonal_(0)
    lt = l.clone().fill_diagonal_(0)
    trace_term = (kt * lt.T).sum()
    sums_term = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross_term = 2.0 * (kt @ lt).sum() / (n - 2)
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Biased HSIC tr(K H L H), H = I - 11^T/n (the original CKA numerator). [n,n] -> scalar."""
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return torch.trace(k @ h @ l @ h)


def cknna(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    topk: Optional[int] = 10,
    distance_agnostic: bool = False,
    unbiased: bool = True,
    dtype: torch.dtype = torch.float64,
) -> float:
    """CKNNA alignment of two feature sets for the same n samples. [n,d_a], [n,d_b] -> float.

    Exactly the PRH definition (see module docstring); computed in `dtype` (float64 default).
    """
    if distance_agnostic:
        raise NotImplementedError("distance_agnostic=True is not a usable score in the reference code")
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(f"expected [n,d_a] and [n,d_b], got {tuple(feats_a.shape)}, {tuple(feats_b.shape)}")
    n = feats_a.shape[0]
    topk = n - 1 if topk is None else topk
    if topk < 2:
        raise ValueError("CKNNA requires topk >= 2")
    if topk > n - int(unbiased):
        raise ValueError(f"topk={topk} is too large for n={n} samples")
    a, b = feats_a.to(dtype), feats_b.to(dtype)
    k, l = a @ a.T, b @ b.T
    hsic = hsic_unbiased if unbiased else hsic_biased
    mask_k = _knn_mask(k, topk, exclude_self=unbiased)
    mask_l = _knn_mask(l, topk, exclude_self=unbiased)
    mutual = mask_k * mask_l
    sim_kl = hsic(mutual * k, mutual * l)
    sim_kk = hsic(mask_k * k, mask_k * k)
    sim_ll = hsic(mask_l * l, mask_l * l)
    return (sim_kl / (torch.sqrt(sim_kk * sim_ll) + 1e-6)).item()


def mutual_knn(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int = 10) -> float:
    """Mean fraction of shared k nearest neighbours (inner product, self excluded). -> float in [0,1]."""
    n = feats_a.shape[0]
    if not 1 <= topk <= n - 1:
        raise ValueError(f"topk must be in [1, {n - 1}], got {topk}")
    a, b = feats_a.double(), feats_b.double()
    mask_a = _knn_mask(a @ a.T, topk, exclude_self=True)
    mask_b = _knn_mask(b @ b.T, topk, exclude_self=True)
    return ((mask_a * mask_b).sum(dim=1) / topk).mean().item()


def remove_outliers(feats: torch.Tensor, q: float = 0.95) -> torch.Tensor:
    """Clamp to +-(the q-quantile of |feats| over all entries), PRH's `exact=True` variant. [n,d]."""
    if q >= 1:
        return feats
    flat = feats.abs().flatten().sort().values
    bound = flat[min(int(q * flat.numel()), flat.numel() - 1)]
    return feats.clamp(-bound, bound)


def prepare_features(feats: torch.Tensor, outlier_q: Optional[float] = None, normalize: bool = True) -> torch.Tensor:
    """Pool tokens if needed ([n,N,d] -> mean over N), optionally clip outliers, L2-normalise rows."""
    feats = feats.float()
    if feats.dim() == 3:
        feats = feats.mean(dim=1)
    if feats.dim() != 2:
        raise ValueError(f"expected features [n,d] or [n,N,d], got {tuple(feats.shape)}")
    if outlier_q is not None:
        feats = remove_outliers(feats, outlier_q)
    return F.normalize(feats, dim=-1) if normalize else feats


@torch.no_grad()
def sit_hidden_at_depth(sit, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
    """SiT token states after block `depth` (1-based), any depth in [1, sit depth].

    x: [B,C,H,W] noised normalised latents; t: [B] in [0,1] (t=0 data, t=1 noise); y: [B] labels.
    Returns [B,N,D]. Mirrors SiT.forward's embedding and block loop without touching sit.py.
    """
    if not 1 <= depth <= len(sit.blocks):
        raise ValueError(f"depth {depth} must be in [1, {len(sit.blocks)}]")
    tokens = sit.x_embedder(x) + sit.pos_embed
    c = sit.t_embedder(t) + sit.y_embedder(y)
    for block in sit.blocks[:depth]:
        tokens = block(tokens, c)
    return tokens


@torch.no_grad()
def sit_encoder_alignment(
    sit,
    vae_latents_normalised: torch.Tensor,
    labels: torch.Tensor,
    encoder_feats: torch.Tensor,
    t: float,
    depth: int,
    topk: int = 10,
    path_type: str = "linear",
    seed: int = 0,
    batch_size: int = 256,
    outlier_q: Optional[float] = None,
    progress: bool = False,
) -> float:
    """CKNNA between mean-pooled SiT hidden states and encoder features of the same images.

    vae_latents_normalised: [n,C,H,W] clean latents already through the latent BatchNorm.
    labels: [n] class ids (pass the null class id for an unconditional measurement).
    encoder_feats: [n,D_e] (e.g. a CLS token) or [n,N_e,D_e] patch tokens (mean-pooled here).
    t: noise level (0 = clean data, 1 = pure noise); latents are noised as x_t = alpha_t z +
       sigma_t eps, eps of sample i seeded by (seed, i) so the answer does not depend on
       batch_size; then SiT blocks 1..depth (the SiT in eval mode, no gradients).
    Both sides: token mean-pooling, optional outlier clipping, row L2-normalisation, then
    `cknna(sit_feats, encoder_feats, topk, unbiased=True)` — the PRH pipeline's defaults.
    progress: a bar of the SiT batches, on the main process.

    Protocol note: neither REPA's (sihyun-yu/REPA) nor REPA-E's public code contains its CKNNA
    script. Token mean-pooling is needed anyway (SiT has no class token); a public reproduction
    of REPA's Fig. 2b does the same (SiT tokens averaged, DINOv2 CLS token, L2-normalised rows,
    PRH cknna with topk=10, unbiased). The noise level and depth are therefore explicit
    arguments, to be reported with the score.
    """
    from repae.evaluate.pipeline import progress_bar

    sit_was_training = sit.training
    sit.eval()
    device = next(sit.parameters()).device
    pooled = []
    try:
        for start in progress_bar(range(0, vae_latents_normalised.shape[0], batch_size), "cknna: SiT", progress):
            z = vae_latents_normalised[start : start + batch_size].float()
            eps = sample_noise(range(start, start + z.shape[0]), z.shape[1:], seed)  # per-sample seeds
            tt = torch.full((z.shape[0],), float(t))
            x_t = interpolate(z, eps, tt, path_type).to(device)
            y = labels[start : start + batch_size].to(device)
            hidden = sit_hidden_at_depth(sit, x_t, tt.to(device), y, depth)  # [b,N,D]
            pooled.append(hidden.float().mean(dim=1).cpu())
    finally:
        sit.train(sit_was_training)
    sit_feats = prepare_features(torch.cat(pooled), outlier_q)
    enc = prepare_features(encoder_feats.cpu(), outlier_q)
    return cknna(sit_feats, enc, topk=topk, unbiased=True)
