"""The metrics of one training checkpoint on the toy world, and of the VAE a run starts from.

Per checkpoint (EMA SiT, the checkpoint's VAE):
- toy FID and class accuracy of `num_samples` class-balanced samples (the run's sampler
  settings), both from the toy evaluator (`repae.evaluate.toy`) against the held-out set;
- latent spatial variance and total variation of the VAE's posterior means on held-out images
  (raw latents, as the paper's Table 1; definitions in `repae.evaluate.latents`);
- CKNNA between the SiT's tokens after block `encoder_depth` at t=0.5 and the toy teacher's
  tokens of the same held-out images (`repae.evaluate.cknna.sit_encoder_alignment`);
- VAE PSNR on held-out images.

Run as a module in its own process (the runner runs several at once):
    python -m repae.reproduce.measure RUN_DIR --samples 250
It measures each checkpoint of RUN_DIR not yet in RUN_DIR/reproduce-metrics.json and writes
that file after each one, so a crash loses at most the checkpoint being measured.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from repae.dist import device_named
from repae.evaluate.cknna import sit_encoder_alignment
from repae.evaluate.latents import latent_structure
from repae.evaluate.loading import checkpoint_step
from repae.evaluate.toy import class_accuracy, evaluator_outputs, toy_fid
from repae.fileio import write_json_atomic
from repae.generate import generate_images, sampler_settings, save_image_grid
from repae.pixels import to_vae_range

METRICS_FILE = "reproduce-metrics.json"
HELDOUT_IMAGES = 1000  # for latent structure, CKNNA and PSNR
CKNNA_T = 0.5


@dataclass
class Judges:
    """What every measurement compares against: the toy world's held-out images, the evaluator
    and its features of those images, the teacher's tokens of them."""

    world: object  # repae.toyworld.ToyWorld
    evaluator: torch.nn.Module
    reference_features: np.ndarray  # [M,D] evaluator features of all held-out images
    teacher_tokens: torch.Tensor  # [HELDOUT_IMAGES,N,D]


def judges_for(cfg) -> Judges:
    from repae.build import vae_args
    from repae.toyworld import ensure_toy_evaluator, ensure_toy_world

    world = ensure_toy_world(vae_args(cfg), cfg.toy, seed=0)
    evaluator = ensure_toy_evaluator(world, cfg.toy).to(device_named(cfg.train.device))
    reference, _ = evaluator_outputs(evaluator, world.heldout_images)
    with torch.no_grad():
        tokens = world.teacher(world.heldout_images[:HELDOUT_IMAGES]).float()
    return Judges(world, evaluator, reference, tokens)


@torch.no_grad()
def heldout_latents(vae, judges: Judges) -> torch.Tensor:
    """Posterior means of the first HELDOUT_IMAGES held-out images: [N,C,h,w] fp32 on the CPU,
    encoded once (on the VAE's device) for the latent structure, the PSNR and CKNNA."""
    vae.eval()
    device = next(vae.parameters()).device
    held = judges.world.heldout_images[:HELDOUT_IMAGES]
    return torch.cat([vae.encode(to_vae_range(held[i : i + 250].to(device))).mode().float().cpu()
                      for i in range(0, len(held), 250)])


@torch.no_grad()
def vae_metrics(vae, judges: Judges, z: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Latent structure and PSNR of a VAE on the held-out images (z: their latents, if already encoded)."""
    from repae.toyworld import psnr

    z = heldout_latents(vae, judges) if z is None else z
    structure = latent_structure(z)
    return {"latent_spatial_variance": structure["raw/spatial_variance"],
            "latent_total_variation": structure["raw/total_variation"],
            "vae_psnr_db": psnr(vae, judges.world.heldout_images[: len(z)], z)}


@torch.no_grad()
def checkpoint_metrics(ckpt: Path, judges: Judges, num_samples: int, grid_path: Optional[Path] = None) -> dict:
    from repae.train.checkpoint import load_for_sampling

    cfg, sit, vae = load_for_sampling(ckpt)
    device = device_named(cfg.train.device)  # as the run trained: sampling is most of a measurement
    sit, vae = sit.to(device), vae.to(device)
    labels = torch.arange(num_samples) % cfg.model.num_classes
    images = generate_images(sit, vae, labels, batch_size=125, progress=False,
                             **sampler_settings(cfg, seed=cfg.sample.seed + 1))
    if grid_path is not None:
        save_image_grid(images[: 4 * cfg.model.num_classes], grid_path, nrow=cfg.model.num_classes, upscale=2)
    feats, logits = evaluator_outputs(judges.evaluator, images)
    z = heldout_latents(vae, judges)
    z_norm = sit.bn.normalize(z.to(device)).cpu() if sit.bn is not None else z
    alignment = sit_encoder_alignment(sit, z_norm, judges.world.heldout_labels[: len(z)], judges.teacher_tokens,
                                      t=CKNNA_T, depth=cfg.model.encoder_depth, path_type=cfg.flow.path_type)
    return {"toy_fid": toy_fid(feats, judges.reference_features), "class_accuracy": class_accuracy(logits, labels),
            "cknna": alignment, **vae_metrics(vae, judges, z), "num_samples": num_samples}


def measure_run(run_dir: Path, num_samples: int, judges: Optional[Judges] = None) -> Dict[str, dict]:
    """{step: metrics} for every checkpoint of a run, reusing what RUN/reproduce-metrics.json holds."""
    from repae.config import load_config
    from repae.train.checkpoint import checkpoint_dir

    out = run_dir / METRICS_FILE
    done: Dict[str, dict] = json.loads(out.read_text()) if out.is_file() else {}
    ckpts = sorted(p for p in checkpoint_dir(run_dir).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for ckpt in ckpts:
        step = str(checkpoint_step(ckpt))
        if step in done and done[step].get("num_samples") == num_samples:
            continue
        if judges is None:
            judges = judges_for(load_config(None, [ckpt / "config.yaml"], world_size=1))
        try:
            done[step] = checkpoint_metrics(ckpt, judges, num_samples, run_dir / "reproduce-grids" / f"step-{step}.png")
        except Exception as err:  # e.g. a Frechet distance that cannot be computed on collapsed samples:
            done[step] = {"error": f"{type(err).__name__}: {err}"}  # recorded, retried on the next run
        write_json_atomic(out, dict(sorted(done.items(), key=lambda kv: int(kv[0]))))
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repae.reproduce.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=int, default=250, help="class-balanced samples per checkpoint")
    args = p.parse_args(argv)
    measure_run(args.run_dir, args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
