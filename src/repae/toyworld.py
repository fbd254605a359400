"""Build (once, cached) what a REPA-E run on the toy world needs, since nothing can be downloaded:

- a rendered training set of toy shapes (uint8, .npy) and a held-out set,
- the toy teacher (stand-in for DINOv2), trained to classify shapes; held-out accuracy reported,
- the toy VAE (stand-in for SD-VAE), pre-trained as an autoencoder; held-out PSNR reported,
  with its latent statistics (REPA-E starts from a trained VAE and its stats).
Everything lands in `cache_dir` with a `report.json`; a second call only loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from repae import dist
from repae.config import ToyWorldConfig
from repae.data.toy import toy_arrays
from repae.losses import kl_loss, reconstruction_loss
from repae.models.latent_norm import measure_latent_stats
from repae.models.toy_teacher import ToyTeacher
from repae.models.vae import AutoencoderKL, VAEArgs
from repae.nn_utils import autocast
from repae.pixels import from_vae_range, to_vae_range
from repae.weights import load_strict, read_file, save_latent_stats, save_model, save_weights

VERSION = "v3"  # bump when the dataset or the recipes change, so old caches are not reused


def cache_dir_for(spec: ToyWorldConfig, seed: int = 0) -> Path:
    """One directory per toy-world recipe, so a changed spec never reuses another's assets."""
    root = Path(spec.cache_dir or os.environ.get("REPAE_CACHE", Path.home() / ".cache" / "repae"))
    key = f"n{spec.train_size}-h{spec.heldout_size}-t{spec.teacher_steps}-v{spec.vae_steps}-b{spec.batch_size}-s{seed}"
    return root / f"toyworld-{VERSION}-{key}"


def _pool(path: Path, size: int, seed: int, desc: str, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rendered images [N,3,32,32] uint8 and labels [N], cached as .npz."""
    if path.is_file():
        data = np.load(path)
        return torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])
    # rendering is numpy on one core: one process per core halves the toy world's first build
    starts = range(0, size, 500)
    with ProcessPoolExecutor(max_workers=min(len(starts), dist.usable_cores())) as pool:
        jobs = pool.map(toy_arrays, [min(500, size - s) for s in starts], [seed] * len(starts), starts)
        chunks = list(tqdm(jobs, total=len(starts), desc=desc, unit="x500 img", disable=not progress))
    images, labels = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, path)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        yield images[idx], labels[idx]


def train_teacher(images, labels, steps: int, batch: int, seed: int = 0, grid: int = 4,
                  progress: bool = True) -> ToyTeacher:
    torch.manual_seed(seed)
    teacher = ToyTeacher(grid=grid)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    bar = tqdm(_batches(images, labels, batch, steps, seed), total=steps, desc="toy teacher", disable=not progress)
    for x, y in bar:
        # flips and 90-degree turns keep every class its class: cheap augmentation
        if torch.rand(()) < 0.5:
            x = x.flip(3)
        x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(2, 3))
        with autocast("auto", torch.device("cpu")):
            loss = F.cross_entropy(teacher.logits(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def teacher_accuracy(teacher: ToyTeacher, images, labels) -> float:
    preds = torch.cat([teacher.logits(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])
    return (preds == labels).float().mean().item()


def train_toy_vae(images, steps: int, batch: int, args: VAEArgs, seed: int = 0, progress: bool = True) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(args).to(memory_format=torch.channels_last)  # as in training: ~9% faster here
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    bar = tqdm(_batches(images, images, batch, steps, seed + 1), total=steps, desc="toy VAE", disable=not progress)
    for x, _ in bar:
        x = to_vae_range(x)
        with autocast("auto", torch.device("cpu")):
            posterior, _, recon = vae(x)
        loss = reconstruction_loss(x, recon, "l1") + 1e-6 * kl_loss(posterior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: torch.Tensor, latents: Optional[torch.Tensor] = None,
         batch_size: int = 250) -> float:
    """Mean PSNR (dB) of posterior-mean reconstructions, on uint8 pixels [N,3,H,W], computed on
    the VAE's device. latents: the images' posterior means [N,C,h,w] if already encoded (then only
    decoded here)."""
    device = next(vae.parameters()).device
    values = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        z = vae.encode(to_vae_range(x)).mode() if latents is None else latents[i : i + batch_size].to(device)
        recon = from_vae_range(vae.decode(z)).float()
        mse = (recon - x.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values.append(10 * torch.log10(255.0**2 / mse))
    return torch.cat(values).mean().item()


@dataclass
class ToyWorld:
    cache_dir: Path
    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    teacher: ToyTeacher
    vae_path: Path
    latent_stats_path: Path
    report: dict
    evaluator: Optional[ToyTeacher] = None  # set by ensure_toy_evaluator


def ensure_toy_world(vae_args: VAEArgs, spec: ToyWorldConfig = ToyWorldConfig(), seed: int = 0,
                     progress: bool = True) -> ToyWorld:
    """Load the toy world from its cache directory, building whatever is missing (with progress bars).
    Under torchrun rank 0 builds first and the other ranks then only read the cache."""
    with dist.main_first():
        return _ensure_toy_world(vae_args, spec, seed, progress)


def _ensure_toy_world(vae_args: VAEArgs, spec: ToyWorldConfig, seed: int, progress: bool) -> ToyWorld:
    cache = cache_dir_for(spec, seed)
    cache.mkdir(parents=True, exist_ok=True)
    report_path = cache / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"spec": asdict(spec)}
    train_x, train_y = _pool(cache / "train.npz", spec.train_size, seed, "render toy train set", progress)
    held_x, held_y = _pool(cache / "heldout.npz", spec.heldout_size, seed + 1000, "render toy held-out set",
                           progress)

    teacher_path = cache / "teacher.safetensors"
    if teacher_path.is_file():
        teacher = load_strict(ToyTeacher(), read_file(teacher_path), str(teacher_path)).eval().requires_grad_(False)
    else:
        start = time.perf_counter()
        teacher = train_teacher(train_x, train_y, spec.teacher_steps, spec.batch_size, seed, progress=progress)
        report["teacher_heldout_accuracy"] = teacher_accuracy(teacher, held_x, held_y)
        report["teacher_train_seconds"] = round(time.perf_counter() - start, 1)
        save_weights(teacher, teacher_path)

    # one pre-trained VAE per architecture: a changed vae.* override must not load another's weights
    arch = hashlib.sha256(json.dumps(asdict(vae_args), sort_keys=True).encode()).hexdigest()[:8]
    vae_path, stats_path = cache / f"vae-{arch}.safetensors", cache / f"vae-{arch}-latent-stats.safetensors"
    if not (vae_path.is_file() and stats_path.is_file()):
        start = time.perf_counter()
        vae = train_toy_vae(train_x, spec.vae_steps, spec.batch_size, vae_args, seed, progress)
        report["vae_heldout_psnr_db"] = report[f"vae_{arch}_heldout_psnr_db"] = psnr(vae, held_x)
        report["vae_train_seconds"] = round(time.perf_counter() - start, 1)
        batches = [train_x[i : i + 500] for i in range(0, min(5000, len(train_x)), 500)]
        mean, var = measure_latent_stats(vae, batches)
        save_latent_stats(mean, var, stats_path)
        save_model(vae, vae_path)
    report_path.write_text(json.dumps(report, indent=2))
    return ToyWorld(cache, train_x, train_y, held_x, held_y, teacher, vae_path, stats_path, report)


# the evaluator is a different network from the teacher (8x8 grid, other seed): samples are then
# not judged by the very features REPA aligned them to
EVALUATOR_GRID, EVALUATOR_SEED_OFFSET = 8, 17


def ensure_toy_evaluator(world: ToyWorld, spec: ToyWorldConfig = ToyWorldConfig(), seed: int = 0,
                         progress: bool = True) -> ToyTeacher:
    """The toy world's stand-in for Inception (DESIGN.md section 4): a classifier trained on its own,
    whose mean-pooled tokens give "toy FID" and whose argmax scores class-conditional samples.
    Built on first use, cached beside the teacher; held-out accuracy in report.json."""
    with dist.main_first():
        path = world.cache_dir / "evaluator.safetensors"
        if path.is_file():
            world.evaluator = load_strict(ToyTeacher(grid=EVALUATOR_GRID), read_file(path), str(path))
            return world.evaluator.eval().requires_grad_(False)
        start = time.perf_counter()
        evaluator = train_teacher(world.train_images, world.train_labels, spec.teacher_steps, spec.batch_size,
                                  seed + EVALUATOR_SEED_OFFSET, grid=EVALUATOR_GRID, progress=progress)
        world.report["evaluator_heldout_accuracy"] = teacher_accuracy(evaluator, world.heldout_images,
                                                                      world.heldout_labels)
        world.report["evaluator_train_seconds"] = round(time.perf_counter() - start, 1)
        save_weights(evaluator, path)
        (world.cache_dir / "report.json").write_text(json.dumps(world.report, indent=2))
        world.evaluator = evaluator
        return evaluator
