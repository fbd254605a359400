"""The FID family as the ADM evaluator reports it: FID, sFID, Inception Score, precision, recall.

Definitions follow openai/guided-diffusion `evaluations/evaluator.py` (the numbers REPA, REPA-E and
most ImageNet-256 papers report), computed with our torch InceptionV3 (`repae.models.inception`,
TF1 bilinear resize, pool_3 / mixed_6/conv / unbiased logits):
- FID on pool_3 [2048] and sFID on mixed_6/conv[..., :7] flattened [2023]: Gaussian statistics
  (mean, np.cov with N-1) and the Fréchet distance (`repae.evaluate.stats`);
- IS: softmax(pool_3 @ W) over 1008 classes, consecutive splits of 5000 samples (the last split
  may be shorter), per split exp(mean_i KL(p_i || mean_j p_j)), averaged over splits;
- precision/recall: `repae.evaluate.manifold` (k=3, ADM's fp16 squared distances), on the pool
  features of *all* reference images and samples — ADM runs Inception over the reference batch's
  images even when its .npz carries precomputed statistics.

Everything streams: images arrive as batches of uint8 [B,3,H,W] from any iterable (PNG folder,
.npz, a sampler), statistics accumulate in float64, IS keeps per-split sums, and pool features
are kept (float32, or float16 to halve memory) only when precision/recall is requested.
`compute_fid_family` runs in one process; for a multi-process sampler, gather the images (or
write them to disk) and evaluate on one rank, or combine `FeatureStats.all_reduce` for FID/sFID.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from repae import dist
from repae.data.images import DEFAULT_MAX_PIXELS
from repae.evaluate.manifold import precision_recall
from repae.fileio import read_npy
from repae.evaluate.stats import FeatureStats, GaussianStats, frechet_distance, npz_keys, read_gaussian
from repae.models.inception import POOL_DIM, SPATIAL_DIM, InceptionV3

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, torch.Tensor]
REF_IMAGES_KEY = "arr_0"


# ----------------------------------------------------------------------------- Inception Score


def _xlogx(p: np.ndarray) -> np.ndarray:
    """p * log(p) with 0 log 0 = 0 (ADM's float32 softmax rarely underflows to 0; if it did, its
    plain `part * log(part)` would give NaN)."""
    return p * np.log(np.where(p > 0, p, 1.0))


def inception_score(softmax: ArrayLike, split_size: int = 5000) -> float:
    """IS of class probabilities [N,C] in consecutive splits of `split_size`, as ADM (float64)."""
    preds = torch.as_tensor(softmax).detach().double().cpu().numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        marginal = part.mean(0, keepdims=True)
        kl = _xlogx(part) - part * np.log(np.where(marginal > 0, marginal, 1.0))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


@dataclass
class InceptionScoreAccumulator:
    """Streaming IS: per split of `split_size` consecutive samples it keeps the count, the sum of
    probabilities [C] and the sum of p log p; mean KL = sum(p log p)/n - sum_c m_c log m_c."""

    split_size: int = 5000
    counts: List[int] = field(default_factory=list)
    prob_sums: List[np.ndarray] = field(default_factory=list)  # each [C] float64
    plogp_sums: List[float] = field(default_factory=list)

    def update_logits(self, logits: ArrayLike) -> None:
        """Add logits [B,C] (softmax taken here, in float64)."""
        self.update_probs(torch.softmax(torch.as_tensor(logits).detach().double(), dim=1))

    def update_probs(self, probs: ArrayLike) -> None:
        """Add class probabilities [B,C], filling the current split before opening the next."""
        p = torch.as_tensor(probs).detach().double().cpu().numpy()
        while len(p):
            if not self.counts or self.counts[-1] == self.split_size:
                self.counts.append(0)
                self.prob_sums.append(np.zeros(p.shape[1]))
                self.plogp_sums.append(0.0)
            take = p[: self.split_size - self.counts[-1]]
            self.counts[-1] += len(take)
            self.prob_sums[-1] += take.sum(0)
            self.plogp_sums[-1] += float(_xlogx(take).sum())
            p = p[len(take):]

    def score(self) -> float:
        if not self.counts:
            raise ValueError("the Inception Score needs at least one sample")
        scores = []
        for n, s, plogp in zip(self.counts, self.prob_sums, self.plogp_sums):
            marginal = s / n
            scores.append(np.exp(plogp / n - _xlogx(marginal).sum()))
        return float(np.mean(scores))


# ----------------------------------------------------------------------------- ADM .npz batches


MAX_BATCH_BYTES = 1 << 30  # of uint8 pixels read from an image batch at a time


class NpzImages:
    """Stream `arr_0` (uint8 [N,H,W,3], an ADM sample/reference batch) as uint8 [B,3,H,W] tensors,
    reading `batch_size` images at a time from the zip member (the file never loads whole)."""

    def __init__(self, path: PathLike, batch_size: int = 64, key: str = REF_IMAGES_KEY,
                 block: Optional[range] = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise FileNotFoundError(f"image batch not found: {self.path}")
        with self._member() as f:
            self.shape, self.fortran, self.dtype = self._header(f)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3:
            raise ValueError(f"{self.path}: '{key}' must be uint8 [N,H,W,3] images, "
                             f"got {self.dtype} {tuple(self.shape)}")
        # the header's sizes, bounded before a batch is sized by them (a deflated member of zeros is ~1000x
        # smaller than its images): the pixel limit of every image source, and batches of at most 1 GiB
        height, width = int(self.shape[1]), int(self.shape[2])
        if height * width > max_pixels:
            raise ValueError(f"{self.path}: '{key}' holds {height}x{width} images, over the limit of {max_pixels} "
                             f"pixels (--max-image-pixels)")
        self.batch_size = max(1, min(batch_size, MAX_BATCH_BYTES // max(1, height * width * 3)))
        self.block = block if block is not None else range(self.num_images)  # rows to stream

    def _member(self):
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path} is not an .npz archive")
        zf = zipfile.ZipFile(self.path)
        name = f"{self.key}.npy"
        if name not in zf.namelist():
            found = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            zf.close()
            raise KeyError(f"{self.path} has no '{self.key}' array (found {found})")
        return _ZipMember(zf, name)

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)

    def __len__(self) -> int:
        return -(-len(self.block) // self.batch_size)

    @property
    def num_images(self) -> int:
        return int(self.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        start, stop = self.block.start, self.block.stop
        if self.fortran:  # rare; cannot stream row blocks of a Fortran-ordered array
            arr = read_npy(self.path, self.key)[start:stop]  # size checked against the member before allocating
            for i in range(0, len(arr), self.batch_size):
                yield torch.from_numpy(np.ascontiguousarray(arr[i:i + self.batch_size])).permute(0, 3, 1, 2)
            return
        per_image = int(np.prod(self.shape[1:]))
        with self._member() as f:
            self._header(f)
            f.seek(f.tell() + start * per_image)
            for i in range(start, stop, self.batch_size):
                n = min(self.batch_size, stop - i)
                buf = f.read(n * per_image)
                if len(buf) != n * per_image:
                    raise ValueError(f"{self.path}: '{self.key}' is truncated at image {i}")
                arr = np.frombuffer(buf, dtype=np.uint8).reshape(n, *self.shape[1:])
                yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)  # [n,3,H,W]


class _ZipMember:
    """Context manager holding a zip file and one open member."""

    def __init__(self, zf: zipfile.ZipFile, name: str):
        self.zf, self.f = zf, zf.open(name)

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        self.f.close()
        self.zf.close()


# ----------------------------------------------------------------------------- feature extraction


@dataclass
class Features:
    """What one pass of Inception over a set of images leaves behind."""

    pool: FeatureStats
    spatial: FeatureStats
    inception_score: InceptionScoreAccumulator
    pool_feats: Optional[np.ndarray]  # [N,2048] when kept (precision/recall), else None
    num_images: int


@torch.no_grad()
def extract_features(images: Iterable[ArrayLike], inception: InceptionV3, *, keep_pool: bool = False,
                     pool_dtype: np.dtype = np.float32, is_split_size: int = 5000,
                     autocast: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
                     progress: bool = True, total: Optional[int] = None, desc: str = "inception") -> Features:
    """Run Inception over batches of uint8 [B,3,H,W] images and accumulate everything the FID family needs."""
    device = torch.device(device) if device is not None else next(inception.parameters()).device
    pool, spatial = FeatureStats(device=device), FeatureStats(device=device)
    is_acc = InceptionScoreAccumulator(is_split_size)
    kept: List[np.ndarray] = []
    if total is None and hasattr(images, "__len__"):
        total = len(images)  # type: ignore[arg-type]
    bar = tqdm(images, total=total, desc=desc, unit="batch", disable=not progress or not dist.is_main())
    for batch in bar:
        out = inception(torch.as_tensor(batch).to(device), autocast=autocast)
        pool.update(out.pool)
        spatial.update(out.spatial)
        is_acc.update_logits(out.logits)
        if keep_pool:
            kept.append(out.pool.cpu().numpy().astype(pool_dtype))
    feats = np.concatenate(kept) if keep_pool and kept else None
    return Features(pool, spatial, is_acc, feats, pool.count)


# ----------------------------------------------------------------------------- reference batches


@dataclass
class Reference:
    """Reference side of the comparison: statistics, and pool features if precision/recall is wanted."""

    pool: GaussianStats
    spatial: Optional[GaussianStats]
    pool_feats: Optional[np.ndarray] = None
    source: str = ""


def load_reference(path: PathLike, inception: Optional[InceptionV3] = None, *, need_features: bool = False,
                   batch_size: int = 64, **extract_kwargs) -> Reference:
    """Read an ADM reference batch (.npz): `arr_0` uint8 [N,H,W,3] and/or precomputed `mu, sigma,
    mu_s, sigma_s`. Stored statistics are used when present (as ADM does); otherwise they are
    computed from `arr_0` with `inception`. `need_features` (precision/recall) always runs
    Inception over `arr_0`, as ADM does. Extra keyword arguments go to `extract_features`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (expected an ADM reference batch)")
    # each statistic is read with its header checked against the member's real size (ArrayFileError,
    # a ValueError, otherwise): a forged header of a few hundred bytes must not allocate terabytes
    keys = npz_keys(path)
    pool = read_gaussian(path, "mu", "sigma") if {"mu", "sigma"} <= keys else None
    spatial = read_gaussian(path, "mu_s", "sigma_s") if {"mu_s", "sigma_s"} <= keys else None
    if isinstance(inception, InceptionV3):  # else the mismatch shows only after every sample is drawn
        for names, stats, dim in (("mu, sigma", pool, POOL_DIM), ("mu_s, sigma_s", spatial, SPATIAL_DIM)):
            if stats is not None and len(stats.mu) != dim:
                raise ValueError(f"{path}: {names} are {len(stats.mu)}-dimensional, but the Inception features "
                                 f"they are compared with are {dim}-dimensional (statistics of another network?)")
    has_images = REF_IMAGES_KEY in keys
    if pool is None and not has_images:
        raise KeyError(f"{path} is not a reference batch: expected '{REF_IMAGES_KEY}' (uint8 [N,H,W,3] images) "
                       f"and/or statistics mu, sigma, mu_s, sigma_s; found {sorted(keys)}")
    if need_features and not has_images:
        raise KeyError(f"precision/recall needs the reference images: {path} has no '{REF_IMAGES_KEY}' "
                       f"(found {sorted(keys)})")
    feats = None
    if need_features or pool is None or (spatial is None and has_images):
        if inception is None:
            raise ValueError(f"computing reference features from {path} needs an InceptionV3 network")
        images = NpzImages(path, batch_size)
        extracted = extract_features(images, inception, keep_pool=need_features, desc="reference", **extract_kwargs)
        pool = extracted.pool.mean_cov() if pool is None else pool
        spatial = extracted.spatial.mean_cov() if spatial is None else spatial
        feats = extracted.pool_feats
    return Reference(pool=pool, spatial=spatial, pool_feats=feats, source=str(path))


# ----------------------------------------------------------------------------- the whole family


def compute_fid_family(images: Iterable[ArrayLike], inception: InceptionV3, ref: Union[Reference, PathLike], *,
                       with_precision_recall: bool = True, k: int = 3, is_split_size: int = 5000,
                       pool_dtype: np.dtype = np.float32, autocast: Optional[torch.dtype] = None,
                       device: Optional[Union[str, torch.device]] = None, progress: bool = True,
                       total: Optional[int] = None, pr_batch: int = 10000, pr_fp16: bool = True) -> Dict[str, Optional[float]]:
    """Evaluate a stream of uint8 [B,3,H,W] sample batches against a reference batch.

    Returns {fid, sfid, inception_score, precision, recall, num_images}; sfid is None when the
    reference has no spatial statistics, precision/recall None unless requested."""
    opts = dict(pool_dtype=pool_dtype, is_split_size=is_split_size, autocast=autocast, device=device, progress=progress)
    if not isinstance(ref, Reference):
        ref = load_reference(ref, inception, need_features=with_precision_recall, **opts)
    if with_precision_recall and ref.pool_feats is None:
        raise ValueError("precision/recall needs the reference pool features: load the reference with need_features=True")
    got = extract_features(images, inception, keep_pool=with_precision_recall, total=total, desc="samples", **opts)
    sample_pool = got.pool.mean_cov()
    result: Dict[str, Optional[float]] = {
        "fid": frechet_distance(sample_pool.mu, sample_pool.sigma, ref.pool.mu, ref.pool.sigma),
        "sfid": None,
        "inception_score": got.inception_score.score(),
        "precision": None,
        "recall": None,
        "num_images": got.num_images,
    }
    if ref.spatial is not None:
        s = got.spatial.mean_cov()
        result["sfid"] = frechet_distance(s.mu, s.sigma, ref.spatial.mu, ref.spatial.sigma)
    if with_precision_recall:
        result["precision"], result["recall"] = precision_recall(
            ref.pool_feats, got.pool_feats, k=k, row_batch=pr_batch, col_batch=pr_batch, fp16=pr_fp16, device=device)
    return result
