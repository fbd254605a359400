"""What every measurement of the reproduction compares against ("the judges"), on the toy world
or on a user's real data and weights.

- **toy** (data.source=toy): the toy world's held-out images; the toy evaluator (a separately
  trained classifier, stand-in for Inception) gives the FID features and the class of a sample;
  the toy teacher's tokens are the CKNNA partner.
- **real** (an image folder, ImageNet folder or packed store, with local weights): `HELDOUT_IMAGES`
  images spread evenly over `--heldout DIR` (default: the training data); the FID Inception
  network (eval.inception_path) gives the FID features — the reference is eval.ref_batch's
  statistics when given, else the held-out images' — and names a sample's class by the nearest
  class mean of the held-out images' Inception features (no network is scored by the encoder it
  aligned to); the run's first alignment encoder (e.g. DINOv2) is the CKNNA partner.

Real judges are built once by the runner (`build_real_judges`) and saved as a directory
(`save_real_judges`): every measurement process loads them instead of re-encoding the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from repae.config import ConfigError, RunConfig
from repae.dist import device_named
from repae.fileio import JsonFileError, read_json_object
from repae.evaluate.stats import GaussianStats

V7_SUFFIX = "_v7judge"  # fid_v7judge, class_accuracy_v7judge_unguided, ...: the toy world v7 evaluator's
HELDOUT_IMAGES = 1000  # for latent structure, CKNNA and PSNR (and the real FID reference)
JUDGES_FILE, JUDGES_INFO = "judges.safetensors", "judges.json"

# samples uint8 [N,3,H,W] -> (FID features float64 [N,D], predicted class [N])
Scorer = Callable[[torch.Tensor], Tuple[np.ndarray, torch.Tensor]]


@dataclass
class Judges:
    heldout_images: torch.Tensor  # uint8 [M,3,H,W]: latent structure, PSNR, CKNNA
    heldout_labels: torch.Tensor  # [M] class ids
    reference: GaussianStats  # the FID reference
    score: Scorer
    alignment_feats: torch.Tensor  # [M,N,D] or [M,D]: the CKNNA partner's features of the held-out images
    info: Dict[str, object] = field(default_factory=dict)  # what the judges are, for the report
    starting_vae: Optional[str] = None  # the file of the VAE every arm starts from
    class_means: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # real judges: ([K,D] means, [K] ids)
    # toy: v7's class-only evaluator, so that a report can show its verdicts did not hang on the judge changed
    # after them (repae.toyworld, EVALUATOR_FILE): (metric-name suffix, its scorer, its FID reference)
    second_opinion: Optional[Tuple[str, Scorer, GaussianStats]] = None


def gaussian(feats: np.ndarray) -> GaussianStats:
    from repae.evaluate.toy import gaussian as mean_cov

    return GaussianStats(*mean_cov(feats))


# --------------------------------------------------------------------------- toy


def toy_judges(cfg: RunConfig) -> Judges:
    """The toy world's judges (the world and its evaluator are built once and cached)."""
    from repae.build import vae_args
    from repae.evaluate.toy import evaluator_outputs
    from repae.toyworld import ensure_toy_evaluator, ensure_toy_world, ensure_v7_evaluator

    world = ensure_toy_world(vae_args(cfg), cfg.toy, seed=0, device=cfg.train.device)
    evaluator = ensure_toy_evaluator(world, cfg.toy, device=cfg.train.device).to(device_named(cfg.train.device))
    v7 = ensure_v7_evaluator(world, cfg.toy, device=cfg.train.device).to(device_named(cfg.train.device))

    def scorer(net) -> Scorer:
        def score(images: torch.Tensor) -> Tuple[np.ndarray, torch.Tensor]:
            feats, logits = evaluator_outputs(net, images)
            return feats, logits.argmax(dim=1)
        return score

    reference, _ = evaluator_outputs(evaluator, world.heldout_images)
    held = world.heldout_images[:HELDOUT_IMAGES]
    with torch.no_grad():
        tokens = world.teacher(held).float()
    info = {"kind": "toy", "fid_label": "toy FID", "judge": "toy evaluator", "partner": "toy teacher",
            "chance_accuracy": 1.0 / cfg.model.num_classes, "reference_images": len(world.heldout_images),
            "heldout_images": len(held), **world.report}
    second = (V7_SUFFIX, scorer(v7), gaussian(evaluator_outputs(v7, world.heldout_images)[0]))
    return Judges(held, world.heldout_labels[: len(held)], gaussian(reference), scorer(evaluator), tokens, info,
                  starting_vae=cfg.vae.path or str(world.vae_path), second_opinion=second)


# --------------------------------------------------------------------------- real data


def heldout_set(cfg: RunConfig, folder: Optional[str], n: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 [m,3,S,S], labels [m], where from): m <= n images spread evenly over `folder` (any labelled
    source repae.data.sources reads: class sub-folders, parquet/arrow (its validation split where files are
    named by split), tar shards, a prepare-data store; ADM centre crop to data.image_size) or, without
    one, over the training data."""
    from repae.data.sources import image_dataset

    where = folder or cfg.data.path
    dataset = image_dataset(cfg, folder)  # the training data's Dataset (no flips) when no folder is given
    if len(dataset) == 0:
        raise ConfigError(f"held-out images: no images in {where}")
    # evenly spaced indices over a class-sorted listing: every class in proportion
    idx = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    items = [dataset[int(i)] for i in idx]  # an unreadable file is replaced by the next readable one
    images = torch.stack([x for x, _, _ in items])
    return images, torch.tensor([y for _, y, _ in items]), str(where)


def class_means(feats: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(unit-length mean of the unit-normalised features of each class [K,D], its class ids [K])."""
    unit = F.normalize(feats.float(), dim=1)
    classes = torch.unique(labels)
    means = torch.stack([unit[labels == c].mean(0) for c in classes])
    return F.normalize(means, dim=1), classes


def nearest_class(feats: torch.Tensor, means: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The class whose mean is nearest in cosine similarity, per row of feats [N,D]."""
    return classes[(F.normalize(feats.float(), dim=1) @ means.t()).argmax(dim=1)]


@torch.no_grad()
def inception_pool(inception, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Inception pool_3 features [N,2048] fp32 on the CPU of uint8 images [N,3,H,W]."""
    device = next(inception.parameters()).device
    return torch.cat([inception(images[i : i + batch_size].to(device)).pool.cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def encoder_feats(encoder, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Mean-pooled encoder tokens [N,D] fp32 on the CPU (mean-pooled as CKNNA takes them)."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        f = encoder(images[i : i + batch_size].to(device)).float()
        out.append((f.mean(dim=1) if f.dim() == 3 else f).cpu())
    return torch.cat(out)


def _inception(cfg: RunConfig, device):
    from repae.evaluate.errors import EvaluationError
    from repae.evaluate.loading import inception_path, load_inception

    path = inception_path(None, cfg)
    try:
        return load_inception(path, device).eval(), path
    except EvaluationError as err:
        raise ConfigError(str(err)) from None


def _alignment_encoder(cfg: RunConfig, device):
    from repae.models.encoders import load_encoder

    names = [n for n in cfg.encoder.names if n != "toy-teacher"]
    if not names:
        raise ConfigError("the reproduction's CKNNA needs an alignment encoder with local weights "
                          "(encoder.names and encoder.paths)")
    i = cfg.encoder.names.index(names[0])
    path = cfg.encoder.paths[i] if cfg.encoder.paths else None
    return load_encoder(names[0], path, cfg.data.image_size).to(device).eval(), names[0], path


def build_real_judges(cfg: RunConfig, heldout: Optional[str] = None, n: int = HELDOUT_IMAGES) -> Judges:
    """Judges on real data: every file they need is read here, so a missing one fails before training."""
    from repae.evaluate.fid import load_reference

    if not cfg.vae.path:
        raise ConfigError("the reproduction starts every arm from one pretrained VAE: set vae.path")
    device = device_named(cfg.train.device)
    inception, inception_file = _inception(cfg, device)
    encoder, encoder_name, encoder_file = _alignment_encoder(cfg, device)
    images, labels, where = heldout_set(cfg, heldout, n)
    pool = inception_pool(inception, images)
    if cfg.eval.ref_batch:
        try:
            reference = load_reference(cfg.eval.ref_batch, inception, progress=False).pool
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise ConfigError(f"eval.ref_batch: {err}") from None
    else:
        reference = gaussian(pool.double().numpy())
    means, classes = class_means(pool, labels)
    info = {"kind": "real", "fid_label": "FID", "judge": "Inception", "partner": encoder_name,
            "data": where, "heldout_images": len(images), "classes_in_heldout": len(classes),
            "chance_accuracy": 1.0 / len(classes), "inception": inception_file, "encoder_file": encoder_file,
            "reference": cfg.eval.ref_batch or f"the {len(images)} held-out images",
            "reference_images": None if cfg.eval.ref_batch else len(images), "starting_vae": cfg.vae.path}
    return Judges(images, labels, reference, _real_scorer(inception, means, classes), encoder_feats(encoder, images),
                  info, starting_vae=cfg.vae.path, class_means=(means, classes))


def _real_scorer(inception, means: torch.Tensor, classes: torch.Tensor) -> Scorer:
    def score(images: torch.Tensor) -> Tuple[np.ndarray, torch.Tensor]:
        pool = inception_pool(inception, images)
        return pool.double().numpy(), nearest_class(pool, means, classes)

    return score


def save_real_judges(judges: Judges, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    means, classes = judges.class_means
    save_file({"heldout_images": judges.heldout_images.contiguous(), "heldout_labels": judges.heldout_labels,
               "reference_mu": torch.from_numpy(judges.reference.mu), "reference_sigma": torch.from_numpy(judges.reference.sigma),
               "class_means": means.contiguous(), "classes": classes, "alignment_feats": judges.alignment_feats.contiguous()},
              str(directory / JUDGES_FILE))
    (directory / JUDGES_INFO).write_text(json.dumps(judges.info, indent=1))
    return directory


def load_real_judges(directory: Path, device: str = "auto") -> Judges:
    """Judges saved by `save_real_judges`; the Inception network is loaded again from its file."""
    from repae.models.inception import InceptionV3
    from repae.weights import CheckpointError, read_file

    remedy = f"delete {directory} to measure the held-out images again"
    try:
        info = read_json_object(directory / JUDGES_INFO)
        t = read_file(directory / JUDGES_FILE)
    except (JsonFileError, CheckpointError) as err:
        raise ConfigError(f"{err}; {remedy}") from None
    missing = [k for k in ("inception", "starting_vae") if not isinstance(info.get(k), str)] + [
        k for k in ("heldout_images", "heldout_labels", "reference_mu", "reference_sigma", "class_means", "classes",
                    "alignment_feats") if k not in t]
    if missing:
        raise ConfigError(f"saved judges in {directory} lack {', '.join(missing)}; {remedy}")
    inception = InceptionV3.from_file(info["inception"]).to(device_named(device)).eval()
    reference = GaussianStats(t["reference_mu"].double().numpy(), t["reference_sigma"].double().numpy())
    return Judges(t["heldout_images"], t["heldout_labels"], reference,
                  _real_scorer(inception, t["class_means"], t["classes"]), t["alignment_feats"], info,
                  starting_vae=info["starting_vae"], class_means=(t["class_means"], t["classes"]))
