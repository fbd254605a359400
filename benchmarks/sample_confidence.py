"""How sure the toy evaluator is of a checkpoint's samples, beside its class accuracy: the share of samples it
gives p > 0.9 (a clear shape of some class), how many of those are the asked class, and the share it is unsure
of (p < 0.6), against the same for real held-out images. Toy FID compares marginal feature distributions, so it
weighs little how often a model draws a clear shape of the class it was asked for; this shows it.

    python benchmarks/sample_confidence.py RUN/checkpoints/step-N [RUN2/checkpoints/step-N ...] [--samples 500] [--guided]

Samples: class-balanced labels, the run's sampler with the reproduction's seed (sample.seed + 1), without CFG
unless --guided: the samples `repae bench reproduce` measures. Prints one JSON line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from repae.build import vae_args
from repae.evaluate.toy import evaluator_outputs
from repae.generate import generate_images, sampler_settings
from repae.toyworld import ensure_toy_evaluator, ensure_toy_world
from repae.train.checkpoint import load_for_sampling


def confidence(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """logits [N,K], labels [N] -> the shares described above (predicted-class histogram included)."""
    p, predicted = logits.float().softmax(1).max(1)
    right, sure = predicted == labels, p > 0.9
    return {"class_accuracy": right.float().mean().item(), "sure": sure.float().mean().item(),
            "right_when_sure": right[sure].float().mean().item() if sure.any() else float("nan"),
            "unsure": (p < 0.6).float().mean().item(),
            "predicted_per_class": torch.bincount(predicted, minlength=logits.shape[1]).tolist()}


def reproduction_samples(checkpoints, num: int, guided: bool, cfg_scale: Optional[float] = None):
    """For each checkpoint: (path, world, evaluator, uint8 samples [num,3,32,32], labels [num]), the samples
    `repae bench reproduce` measures (class-balanced labels, the run's sampler with seed sample.seed + 1, without
    CFG unless `guided`; `cfg_scale` replaces the run's CFG scale when guided). The world and evaluator are the
    first run's (pass runs of one world)."""
    world = evaluator = None
    for ckpt in checkpoints:
        cfg, sit, vae = load_for_sampling(ckpt)
        if evaluator is None:
            world = ensure_toy_world(vae_args(cfg), cfg.toy, seed=0, progress=False, device="cpu")
            evaluator = ensure_toy_evaluator(world, cfg.toy, device="cpu")
        settings = sampler_settings(cfg, seed=cfg.sample.seed + 1)
        if not guided:
            settings["cfg_scale"] = 1.0
        elif cfg_scale is not None:
            settings["cfg_scale"] = cfg_scale
        labels = torch.arange(num) % cfg.model.num_classes
        yield ckpt, world, evaluator, generate_images(sit, vae, labels, batch_size=125, progress=False,
                                                      **settings), labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--guided", action="store_true", help="with the run's CFG (default: without)")
    args = p.parse_args(argv)
    for k, (ckpt, world, evaluator, images, labels) in enumerate(reproduction_samples(args.checkpoints, args.samples,
                                                                                         args.guided)):
        if k == 0:  # real images, judged alike
            _, logits = evaluator_outputs(evaluator, world.heldout_images[: args.samples])
            print(json.dumps({"checkpoint": "real held-out images",
                              **confidence(torch.as_tensor(logits), world.heldout_labels[: args.samples])}))
        _, logits = evaluator_outputs(evaluator, images)
        print(json.dumps({"checkpoint": str(ckpt), "guided": args.guided,
                          **confidence(torch.as_tensor(logits), labels)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
