"""Is the toy evaluator a fair stand-in for Inception? Two checks of toy world v8's evaluator (class + scene
factors) beside v7's (class only), on the cached toy world:

1. What its FID features know: ridge probes from the mean-pooled tokens of 2000 training images to each generative
   factor (repae.data.toy.SCENE_FACTORS, the shapes' area and centre) and to the class, scored (R^2, accuracy) on
   the 2000 held-out images. Inception's pool features hold colour, size and place as well as the class.
2. Heusel et al. (2017)'s test of FID: real images disturbed more and more (Gaussian noise, Gaussian blur, black
   rectangles, salt and pepper, contamination with another class; and two the toy world needs: desaturation, loss
   of diversity) should give a FID that rises with the disturbance. Each row: FID of 2000 freshly rendered real
   images, disturbed, against the held-out pool; level 0 is the undisturbed real-vs-real FID.

    REPAE_CACHE=... python benchmarks/evaluator_sensitivity.py [--out docs/benchmarks/evaluator_sensitivity.json]

v7's evaluator is read from the world's evaluator.safetensors (a v7 build's, or `ensure_v7_evaluator`'s: the v7
recipe, class loss only, same seed and budget).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repae.build import vae_args
from repae.config import preset
from repae.data.toy import scene_factors, toy_arrays
from repae.evaluate.toy import evaluator_outputs, toy_fid
from repae.toyworld import (EVALUATOR_FACTORS, HELDOUT_SEED_OFFSET, _read_pool, ensure_toy_evaluator, ensure_toy_world,
                            ensure_v7_evaluator, evaluator_targets)

FRESH_SEED = 4242  # the disturbed real images: neither the training pool (seed 0) nor the held-out one (1000)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=3)


def disturbed(images: torch.Tensor, labels: torch.Tensor, kind: str, level: float, seed: int = 0) -> torch.Tensor:
    """uint8 [N,3,H,W] -> the same images disturbed by `kind` at strength `level` (0: untouched)."""
    g = torch.Generator().manual_seed(seed)
    x = images.float()
    n, _, h, w = x.shape
    if level == 0:
        return images
    if kind == "gaussian noise (std, of 255)":
        x = x + level * torch.randn(x.shape, generator=g)
    elif kind == "gaussian blur (sigma, px)":
        x = _blur(x, level)
    elif kind == "black rectangles (8x8, per image)":
        for i in range(n):
            for _ in range(int(level)):
                y0, x0 = torch.randint(0, h - 8, (2,), generator=g).tolist()
                x[i, :, y0 : y0 + 8, x0 : x0 + 8] = 0
    elif kind == "salt and pepper (share of pixels)":
        hit = torch.rand(n, 1, h, w, generator=g) < level
        salt = (torch.rand(n, 1, h, w, generator=g) < 0.5).float() * 255
        x = torch.where(hit, salt.expand_as(x), x)
    elif kind == "desaturation (blend to grey)":
        grey = x.mean(dim=1, keepdim=True)
        x = grey + (1 - level) * (x - grey)
    elif kind == "contamination (share replaced by class 0)":
        zero = torch.nonzero(labels == 0).flatten()
        swap = torch.nonzero(torch.rand(n, generator=g) < level).flatten()
        x[swap] = x[zero[torch.randint(0, len(zero), (len(swap),), generator=g)]]
    elif kind == "lost diversity (share replaced by 50 images)":
        keep = torch.randperm(n, generator=g)[:50]
        swap = torch.nonzero(torch.rand(n, generator=g) < level).flatten()
        x[swap] = x[keep[torch.randint(0, 50, (len(swap),), generator=g)]]
    else:
        raise ValueError(kind)
    return (x.clamp(0, 255) + 0.5).to(torch.uint8) if x.dtype != torch.uint8 else x


DISTURBANCES = {
    "gaussian noise (std, of 255)": (0, 4, 8, 16, 32),
    "gaussian blur (sigma, px)": (0, 0.5, 0.75, 1.0, 1.5),
    "black rectangles (8x8, per image)": (0, 1, 2, 3, 4),
    "salt and pepper (share of pixels)": (0, 0.01, 0.02, 0.05, 0.1),
    "desaturation (blend to grey)": (0, 0.1, 0.25, 0.5, 0.75),
    "contamination (share replaced by class 0)": (0, 0.05, 0.1, 0.25, 0.5),
    "lost diversity (share replaced by 50 images)": (0, 0.1, 0.25, 0.5, 0.75),
}


def probes(net, train_x, train_t, train_y, held_x, held_t, held_y, ridge: float = 1e-3) -> dict:
    """Ridge read-outs of each factor (R^2) and of the class (accuracy, one-hot least squares) from the mean
    tokens: fitted on the training images, scored on the held-out ones."""
    (f_train, _), (f_held, _) = evaluator_outputs(net, train_x), evaluator_outputs(net, held_x)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-8
    a, b = (np.c_[(f - mu) / sd, np.ones(len(f))] for f in (f_train, f_held))
    onehot = np.eye(int(train_y.max()) + 1)[train_y]
    w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ np.c_[train_t, onehot])
    pred = b @ w
    k = train_t.shape[1]
    r2 = 1 - ((held_t - pred[:, :k]) ** 2).sum(0) / ((held_t - held_t.mean(0)) ** 2).sum(0)
    return {"factor_r2": dict(zip(EVALUATOR_FACTORS, np.round(r2, 3).tolist())), "mean_factor_r2": round(float(r2.mean()), 3),
            "class_probe_accuracy": round(float((pred[:, k:].argmax(1) == held_y).mean()), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    cfg = preset("toy")
    world = ensure_toy_world(vae_args(cfg), cfg.toy, seed=0, progress=False)
    with torch.enable_grad():
        judges = {"v7 (class only)": ensure_v7_evaluator(world, cfg.toy),
                  "v8 (class + scene)": ensure_toy_evaluator(world, cfg.toy, progress=False)}
    n = 2000
    train_x = world.train_images[:n]
    train_t = evaluator_targets(torch.from_numpy(scene_factors(n, 0)), _read_pool(world.cache_dir / "train.npz",
                                len(world.train_images))[2][:n]).numpy()
    held_cov = _read_pool(world.cache_dir / "heldout.npz", len(world.heldout_images))[2]
    held_t = evaluator_targets(torch.from_numpy(scene_factors(len(held_cov), HELDOUT_SEED_OFFSET)), held_cov).numpy()
    fresh_x, fresh_y = (torch.from_numpy(a) for a in toy_arrays(n, FRESH_SEED))
    result = {"images": n, "reference": f"the {len(world.heldout_images)} held-out images", "judges": {}}
    for name, net in judges.items():
        row = probes(net, train_x, train_t, world.train_labels[:n].numpy(), world.heldout_images, held_t,
                     world.heldout_labels.numpy())
        reference, _ = evaluator_outputs(net, world.heldout_images)
        row["fid"] = {}
        for kind, levels in DISTURBANCES.items():
            fids = [round(toy_fid(evaluator_outputs(net, disturbed(fresh_x, fresh_y, kind, lv))[0], reference), 3)
                    for lv in levels]
            row["fid"][kind] = {"levels": list(levels), "fid": fids,
                                "rises_with_level": all(b > a for a, b in zip(fids, fids[1:]))}
        result["judges"][name] = row
        print(json.dumps({name: row}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
