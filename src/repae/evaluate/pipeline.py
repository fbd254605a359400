"""Evaluation passes over an image source, in one process or several (torchrun).

Across processes: each rank reads its contiguous block of whole batches of the indices
(`sources.shard_range`); Gaussian statistics (FID, sFID, rFID) and metric sums are all-reduced;
what needs every sample on one rank — Inception logits for the IS (whose splits are
consecutive samples, so the global order matters) and pool features for precision/recall — is
gathered to rank 0 in rank order, which is the global order. Only rank 0 returns results.
In one process the numbers equal `repae.evaluate.fid.compute_fid_family`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, TypeVar, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from repae import dist
from repae.evaluate.fid import InceptionScoreAccumulator, Reference
from repae.evaluate.manifold import precision_recall
from repae.evaluate.errors import NO_IMAGES
from repae.evaluate.sources import EvaluationError
from repae.evaluate.stats import FeatureStats, GaussianStats, frechet_distance

T = TypeVar("T")
Device = Union[str, torch.device, None]


def _images_of(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def progress_bar(items=None, desc: str = "", progress: bool = True, unit: str = "batch",
                 total: Optional[int] = None) -> tqdm:
    """The evaluations' progress bar (tqdm, on stderr): over `items`, or updated by hand without them;
    shown only with `progress` and on the main process (rank 0 under torchrun)."""
    if total is None and items is not None and hasattr(items, "__len__"):
        total = len(items)
    return tqdm(items, total=total, desc=desc, unit=unit, disable=not progress or not dist.is_main())


# ----------------------------------------------------------------------------- across processes


def on_main(fn: Callable[[], T]) -> Optional[T]:
    """Run `fn` on rank 0 only; if it raises, every rank raises (no rank is left waiting)."""
    result, error = None, None
    if dist.is_main():
        try:
            result = fn()
        except Exception as err:  # shared below, then re-raised on rank 0
            error = err
    if dist.is_distributed() and dist.world_size() > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise EvaluationError(f"rank 0 failed: {box[0]}")
    if error is not None:
        raise error
    return result


def gather_rows(rows: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Concatenate every rank's rows [n_r, ...] on rank 0, in rank order; None on other ranks."""
    if not dist.is_distributed() or dist.world_size() == 1:
        return rows
    parts: Optional[List] = [None] * dist.world_size() if dist.is_main() else None
    torch.distributed.gather_object(rows, parts, dst=0)
    if not dist.is_main():
        return None
    kept = [p for p in parts if p is not None and len(p)]
    return np.concatenate(kept) if kept else None


def _collective_device() -> torch.device:
    """Where a tensor must live for a collective: the current GPU under NCCL, else the CPU."""
    if dist.is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: Dict[str, float]) -> Dict[str, float]:
    """Sum each value over all processes (float64)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    return dict(zip(keys, dist.all_reduce_sum(t).tolist()))


def all_reduce_stats(*stats: FeatureStats) -> None:
    """Sum FeatureStats over processes; a rank that saw no images takes the others' dimension."""
    if not dist.is_distributed() or dist.world_size() == 1:
        return
    dims = torch.tensor([s.dim or 0 for s in stats], dtype=torch.long, device=_collective_device())
    torch.distributed.all_reduce(dims, op=torch.distributed.ReduceOp.MAX)
    for s, d in zip(stats, dims.tolist()):
        if s.sum is None:
            s._init(d)
        s.all_reduce()


# ----------------------------------------------------------------------------- Inception pass


@dataclass
class LocalFeatures:
    """What one process's Inception pass keeps: summed statistics and, on request, per-image rows."""

    pool: FeatureStats
    spatial: FeatureStats
    logits: Optional[np.ndarray]  # [n,1008] float32
    pool_feats: Optional[np.ndarray]  # [n,2048]
    images: Optional[np.ndarray]  # [n,H,W,3] uint8


@torch.no_grad()
def inception_pass(batches: Iterable, inception, *, keep_logits: bool = True, keep_pool: bool = False,
                   keep_images: bool = False, device: Device = None, autocast: Optional[torch.dtype] = None,
                   progress: bool = True, desc: str = "inception") -> LocalFeatures:
    """Run Inception over uint8 [B,3,H,W] batches (or (images, labels) tuples) of this process."""
    device = torch.device(device) if device is not None else next(inception.parameters()).device
    pool, spatial = FeatureStats(device=device), FeatureStats(device=device)
    logits: List[np.ndarray] = []
    feats: List[np.ndarray] = []
    images: List[np.ndarray] = []
    for batch in progress_bar(batches, desc, progress):
        x = _images_of(batch)
        out = inception(x.to(device), autocast=autocast)
        pool.update(out.pool)
        spatial.update(out.spatial)
        if keep_logits:
            logits.append(out.logits.float().cpu().numpy())
        if keep_pool:
            feats.append(out.pool.float().cpu().numpy())
        if keep_images:
            images.append(x.permute(0, 2, 3, 1).cpu().numpy())

    def cat(rows: List[np.ndarray], keep: bool) -> Optional[np.ndarray]:
        return (np.concatenate(rows) if rows else None) if keep else None

    if keep_images and len({im.shape[1:] for im in images}) > 1:
        raise EvaluationError("--with-images needs images of one size: pass --image-size S to crop them to S")
    return LocalFeatures(pool, spatial, cat(logits, keep_logits), cat(feats, keep_pool), cat(images, keep_images))


def inception_score_of(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's IS of logits [N,C] in global order (softmax in float64, consecutive splits)."""
    acc = InceptionScoreAccumulator(split_size)
    for i in range(0, len(logits), split_size):
        acc.update_logits(torch.from_numpy(logits[i:i + split_size]))
    return acc.score()


def fid_family(batches: Iterable, inception, reference: Optional[Reference], *, with_precision_recall: bool = True,
               k: int = 3, is_split_size: int = 5000, pr_fp16: bool = True, pr_batch: int = 10000,
               device: Device = None, autocast: Optional[torch.dtype] = None,
               progress: bool = True, desc: str = "samples: inception") -> Optional[Dict[str, Optional[float]]]:
    """FID, sFID, IS, precision, recall of this process's sample batches against `reference`
    (needed on rank 0 only). Returns the metrics on rank 0, None elsewhere; same keys and, in one
    process, the same numbers as `compute_fid_family`."""
    got = inception_pass(batches, inception, keep_pool=with_precision_recall, device=device, autocast=autocast,
                         progress=progress, desc=desc)
    all_reduce_stats(got.pool, got.spatial)
    logits = gather_rows(got.logits)
    feats = gather_rows(got.pool_feats) if with_precision_recall else None
    if not dist.is_main():
        return None
    if got.pool.count < 2:
        raise EvaluationError(f"FID needs at least 2 images, got {got.pool.count}")
    sample = got.pool.mean_cov()
    result: Dict[str, Optional[float]] = {
        "fid": frechet_distance(sample.mu, sample.sigma, reference.pool.mu, reference.pool.sigma),
        "sfid": None,
        "inception_score": inception_score_of(logits, is_split_size),
        "precision": None,
        "recall": None,
        "num_images": got.pool.count,
    }
    if reference.spatial is not None:
        s = got.spatial.mean_cov()
        result["sfid"] = frechet_distance(s.mu, s.sigma, reference.spatial.mu, reference.spatial.sigma)
    if with_precision_recall:
        if reference.pool_feats is None:
            raise EvaluationError("precision/recall needs the reference images' pool features")
        result["precision"], result["recall"] = precision_recall(
            reference.pool_feats, feats, k=k, row_batch=pr_batch, col_batch=pr_batch, fp16=pr_fp16, device=device)
    return result


def reference_statistics(batches: Iterable, inception, *, keep_images: bool = False, device: Device = None,
                         autocast: Optional[torch.dtype] = None, progress: bool = True
                         ) -> Optional[Tuple[GaussianStats, GaussianStats, Optional[np.ndarray], int]]:
    """(pool stats, spatial stats, images [N,H,W,3] or None, N) of a reference set, on rank 0."""
    got = inception_pass(batches, inception, keep_logits=False, keep_images=keep_images, device=device,
                         autocast=autocast, progress=progress, desc="reference: inception")
    all_reduce_stats(got.pool, got.spatial)
    images = gather_rows(got.images) if keep_images else None
    if not dist.is_main():
        return None
    if got.pool.count < 2:
        raise EvaluationError(f"reference statistics need at least 2 images, got {got.pool.count}")
    if keep_images and images is not None and images.dtype != np.uint8:
        raise EvaluationError("reference images must be uint8")
    return got.pool.mean_cov(), got.spatial.mean_cov(), images, got.pool.count


# ----------------------------------------------------------------------------- reconstructions


def vae_metrics(vae, batches: Iterable, *, inception=None, lpips=None, use_mean: bool = True,
                amp_dtype: Optional[torch.dtype] = None, inception_autocast: Optional[torch.dtype] = None,
                progress: bool = True) -> Optional[Dict[str, Optional[float]]]:
    """PSNR, SSIM, LPIPS (with `lpips`) and rFID (with `inception`) of the VAE's reconstructions
    of this process's batches, in one pass; sums and statistics are combined over processes.

    rFID = Fréchet distance between the Inception pool statistics of the reconstructions and of
    the originals of the same images. Returns the metrics on rank 0, None elsewhere."""
    from repae.evaluate.recon import reconstruction_metrics

    real, fake = FeatureStats(), FeatureStats()
    if inception is not None:
        dev = next(inception.parameters()).device
        real, fake = FeatureStats(device=dev), FeatureStats(device=dev)

    seen = {"batches": 0}

    def feed_inception(originals: torch.Tensor, recons: torch.Tensor) -> None:
        seen["batches"] += 1
        if inception is not None:
            out = inception(torch.cat([originals, recons]).to(dev), autocast=inception_autocast)
            real.update(out.pool[: len(originals)])
            fake.update(out.pool[len(originals):])

    keys = ["psnr", "ssim"] + (["lpips"] if lpips is not None else [])
    means: Dict[str, float] = {key: 0.0 for key in keys}
    means["num_images"] = 0
    try:
        means = reconstruction_metrics(vae, batches, lpips=lpips, use_mean=use_mean, on_batch=feed_inception,
                                       amp_dtype=amp_dtype, progress=progress and dist.is_main())
    except ValueError:
        if seen["batches"] or dist.world_size() == 1:
            raise
        # this rank's block was empty (or all unreadable): it adds nothing, the others go on
    if dist.world_size() > 1:  # per-image sums over all ranks, then means
        n_local = means["num_images"]
        totals = sum_over_ranks({**{key: means[key] * n_local for key in keys}, "num_images": n_local})
        means = {key: totals[key] / max(totals["num_images"], 1) for key in keys}
        means["num_images"] = int(round(totals["num_images"]))
    if inception is not None:
        all_reduce_stats(real, fake)
    if not dist.is_main():
        return None
    n = int(means["num_images"])
    if n == 0:
        raise EvaluationError(NO_IMAGES)
    out: Dict[str, Optional[float]] = {key: means[key] for key in keys}
    out["lpips"] = out.get("lpips")
    out["rfid"] = None
    if inception is not None:
        r, f = real.mean_cov(), fake.mean_cov()
        out["rfid"] = frechet_distance(f.mu, f.sigma, r.mu, r.sigma)
    out["num_images"] = n
    return out
