"""How far repae's bf16 roundings are from the official code's, per element, on a CPU.

    python benchmarks/bf16_roundings.py

README "Differences from the official code", row "roundings under bf16 autocast":
- the VAE's swish: `F.silu` (one rounding) against the official `x * torch.sigmoid(x)` (two in bf16);
- the SiT's attention under CPU bf16 autocast: explicit products with the softmax in fp32 (`impl="math"`, what
  `model.attention=auto` picks there) against SDPA (the official code's timm attention);
- the VAE decoder's upsample: four 2x2 convs, one per output phase, with summed taps (`Upsample.forward`)
  against nearest 2x then the 3x3 conv (`Upsample.reference`, the official form), both also against float64.
Prints the share of bf16 outputs that differ and by how many units in the last place (ulp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repae.models.sit import Attention
from repae.models.vae import Upsample


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the bf16 spacing at the larger of |a|, |b| (8 significant bits)."""
    a, b = a.float(), b.float()
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-126)
    return (a - b).abs() / torch.exp2(torch.floor(torch.log2(scale)) - 7)


def main() -> None:
    torch.manual_seed(0)
    x = (torch.randn(1 << 20) * 3).bfloat16()
    u = bf16_ulps(F.silu(x), x * torch.sigmoid(x))
    print(f"swish, F.silu against x * sigmoid(x), bf16, N(0, 9) inputs: {(u > 0).float().mean() * 100:.1f}% of "
          f"outputs differ, at most {u.max():.0f} ulp")
    ours, official = Attention(192, 3, impl="math"), Attention(192, 3, impl="sdpa")
    official.load_state_dict(ours.state_dict())
    tokens = torch.randn(64, 16, 192)  # the toy SiT-T/2's width and token count, batch 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(tokens), official(tokens)
    u = bf16_ulps(a, b)
    print(f"SiT attention block under CPU bf16 autocast, fp32-softmax products against SDPA: "
          f"{(u > 0).float().mean() * 100:.1f}% of outputs differ, median {u[u > 0].median():.0f} ulp among those, "
          f"max |difference| {(a.float() - b.float()).abs().max():.3g} (outputs' std {b.float().std():.3g})")
    up = Upsample(64)  # the toy decoder's 8 -> 16 px level: 64 channels, batch 64
    z = torch.randn(64, 64, 8, 8)
    exact = up.double().reference(z.double())
    up.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = up(z), up.reference(z)
    u = bf16_ulps(a, b)
    errors = [(t.double() - exact).abs().mean().item() for t in (a, b)]
    print(f"VAE upsample under CPU bf16 autocast, per-phase 2x2 convs against upsample then 3x3: "
          f"{(u > 0).float().mean() * 100:.1f}% of outputs differ, median {u[u > 0].median():.0f} ulp among those; "
          f"mean |error| against float64 {errors[0]:.4g} against {errors[1]:.4g} (outputs' std {b.float().std():.3g})")


if __name__ == "__main__":
    main()
