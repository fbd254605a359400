"""FLOPs per image of what repae computes differently from the official code, both ways.

    python benchmarks/model_flops.py [PRESET ...]      (default: toy sit-xl2-f8d4)

- a SiT forward with and without the REPA projector (the samplers skip it: `SiT.velocity`);
- the VAE's encode + decode, forward and backward (as in the REPA-E step), with the decoder's upsamples as
  four 2x2 convs per output phase (`Upsample.forward`) and as nearest 2x then the 3x3 conv (`Upsample.reference`,
  the official form).

Counted by torch's FlopCounterMode on the meta device (no weights, no memory, seconds): matrix products and
convolutions, attention's two products included.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from repae.build import build_sit, vae_args
from repae.config import load_config
from repae.models.vae import AutoencoderKL, Upsample


def forward_flops_per_image(preset: str, project: bool, batch: int = 2) -> float:
    sit = build_sit(load_config(preset)).to("meta")
    n = sit.args.input_size
    x = torch.empty(batch, sit.out_channels, n, n, device="meta")
    t, y = torch.empty(batch, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        sit(x, t, y, project=project)
    return counter.get_total_flops() / batch


def vae_flops_per_image(preset: str, official_upsample: bool) -> float:
    """Encode, decode and the backward of both, for one image."""
    cfg = load_config(preset)
    vae = AutoencoderKL(vae_args(cfg)).to("meta")
    if official_upsample:
        for module in vae.modules():
            if isinstance(module, Upsample):
                module.forward = module.reference
    size = cfg.data.image_size
    x = torch.empty(1, 3, size, size, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        vae.decode(vae.encode(x).mode()).sum().backward()
    return counter.get_total_flops()


def main(presets: list) -> None:
    for preset in presets or ["toy", "sit-xl2-f8d4"]:
        full, velocity_only = (forward_flops_per_image(preset, project) for project in (True, False))
        print(f"{preset}: SiT forward {full / 1e9:.2f} GFLOP per image with the projector, {velocity_only / 1e9:.2f} "
              f"without ({100 * (1 - velocity_only / full):.1f}% less)")
        official, phases = (vae_flops_per_image(preset, official) for official in (True, False))
        print(f"{preset}: VAE encode + decode, forward + backward, {official / 1e9:.2f} GFLOP per image with the "
              f"official upsample, {phases / 1e9:.2f} in phases ({100 * (1 - phases / official):.1f}% less)")


if __name__ == "__main__":
    main(sys.argv[1:])
