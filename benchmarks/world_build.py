"""Build the toy world from nothing cached and say where and how fast each part trained: issue 21 asks that
on a machine with a GPU the world build (teacher, VAE, evaluator) trains on the GPU, and that it takes at
most 5 minutes on the 2-core CPU.

    python benchmarks/world_build.py --cache EMPTY_DIR [--device auto] [--out FILE] [key=value ...]

The overrides are the toy preset's (e.g. toy.vae_steps=...); the world is built into --cache, which must
not hold a world already (a cached world is only read, and its build would not be measured). Prints and
writes one JSON object: the device each part trained on, each part's training seconds and the wall time of
the whole build (rendering the images included), with the held-out figures the world's report.json keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPORTED = ("teacher_build_device", "teacher_train_seconds", "teacher_heldout_accuracy", "vae_build_device",
            "vae_train_seconds", "vae_heldout_psnr_db", "evaluator_build_device", "evaluator_train_seconds",
            "evaluator_heldout_accuracy", "evaluator_heldout_factor_r2")


def build(cache: Path, device: str = "auto", overrides=()) -> dict:
    """Build the toy world and its evaluator in the empty directory `cache` on `device`; the JSON record."""
    import torch

    from repae.build import vae_args
    from repae.config import load_config
    from repae.dist import device_named
    from repae.toyworld import ensure_toy_evaluator, ensure_toy_world

    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"{cache} is not empty: a world already there would only be read, not built")
    cfg = load_config("toy", [], [*overrides, f"toy.cache_dir={cache}"])
    start = time.perf_counter()
    world = ensure_toy_world(vae_args(cfg), cfg.toy, seed=0, progress=False, device=device)
    ensure_toy_evaluator(world, cfg.toy, progress=False, device=device)
    wall = time.perf_counter() - start
    resolved = device_named(device)
    return {"device_asked": device, "device": str(resolved),
            "device_name": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu",
            "world_build_seconds": round(wall, 1), "toy_spec": {k: v for k, v in vars(cfg.toy).items()
                                                                   if k != "cache_dir"},
            **{k: world.report[k] for k in REPORTED if k in world.report}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True, help="an empty (or absent) directory to build the world in")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda[:N]")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="toy preset overrides, e.g. toy.vae_steps=600")
    args = p.parse_args(argv)
    result = build(args.cache, args.device, args.overrides)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
