"""A SiT forward's FLOPs per image, with and without the REPA projector (the samplers skip it).

    python benchmarks/sit_flops.py [PRESET ...]      (default: toy sit-xl2-f8d4)

Counted by torch's FlopCounterMode on the meta device (no weights, no memory, a second or so): matrix
products and convolutions, attention's two products included.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from repae.build import build_sit
from repae.config import load_config


def forward_flops_per_image(preset: str, project: bool, batch: int = 2) -> float:
    sit = build_sit(load_config(preset)).to("meta")
    n = sit.args.input_size
    x = torch.empty(batch, sit.out_channels, n, n, device="meta")
    t, y = torch.empty(batch, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        sit(x, t, y, project=project)
    return counter.get_total_flops() / batch


def main(presets: list) -> None:
    for preset in presets or ["toy", "sit-xl2-f8d4"]:
        full, velocity_only = (forward_flops_per_image(preset, project) for project in (True, False))
        print(f"{preset}: {full / 1e9:.2f} GFLOP per image with the projector, {velocity_only / 1e9:.2f} without "
              f"({100 * (1 - velocity_only / full):.1f}% less)")


if __name__ == "__main__":
    main(sys.argv[1:])
