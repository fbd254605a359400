"""How much the Heun corrector's CFG rule changes samples: the official sampler decides whether CFG is on
for the corrector at t_cur (`sample.heun_cfg_at=t_cur`, repae's default), the alternative at t_next, where
the corrector's velocity is taken. They differ only on a step whose [t_next, t_cur] holds a guidance-interval
boundary; this samples the same noise both ways and prints how far the images move.

    python benchmarks/heun_cfg_rule.py RUN/checkpoints/step-N [--samples 100] [--cfg 4] [--high 0.75 0.7 1.0]

ODE with Heun, the run's step count, class-balanced labels, sampler seed 1; guidance on for t in [0, high].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from repae.generate import generate_images
from repae.train.checkpoint import load_for_sampling


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--cfg", type=float, default=4.0, help="CFG scale")
    p.add_argument("--high", type=float, nargs="+", default=[0.75, 0.7, 1.0], help="guidance_high values")
    args = p.parse_args(argv)
    cfg, sit, vae = load_for_sampling(args.checkpoint)
    labels = torch.arange(args.samples) % cfg.model.num_classes
    for high in args.high:
        images = {rule: generate_images(sit, vae, labels, mode="ode", num_steps=cfg.sample.num_steps, heun=True,
                                        heun_cfg_at=rule, cfg_scale=args.cfg, guidance_high=high, seed=1,
                                        batch_size=100, progress=False).float()
                  for rule in ("t_cur", "t_next")}
        diff = (images["t_cur"] - images["t_next"]).abs()  # [N,3,H,W], in 0-255 levels
        print(json.dumps({"guidance_high": high, "num_steps": cfg.sample.num_steps, "samples": args.samples,
                          "images_changed": int((diff.flatten(1).amax(1) > 0).sum()),
                          "mean_abs_levels": round(float(diff.mean()), 4), "max_abs_levels": int(diff.max())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
