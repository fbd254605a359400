"""The effect of LPIPS's input range: repae feeds LPIPS images in [-1, 1], the range LPIPS was trained
on; the official REPA-E code feeds the same [-1, 1] images through `2x - 1` (as if they were in [0, 1]),
so VGG sees [-3, 1]. This measures, on real images and common distortions, how much that changes the
perceptual term (its value) and what it pushes the reconstruction towards (its gradient).

    python benchmarks/lpips_range.py --vgg vgg16-397923af.pth --lpips vgg.pth IMAGE [IMAGE ...] [--size 256]

Each image gets the ADM centre crop at --size (as training data does); each distortion is applied in [-1, 1]
with a fixed seed. Per pair: LPIPS both ways, the ratio official / repae of the value and of the
gradient's norm with respect to the distorted image, and the cosine between the two gradients.
Prints a table and a JSON summary (medians over all pairs; --out writes it).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from repae.data.images import adm_center_crop
from repae.models.lpips import LPIPS


def load_image(path: Path, size: int) -> torch.Tensor:
    """[1,3,size,size] in [-1,1]: the ADM centre crop the training data gets."""
    with Image.open(path) as img:
        arr = adm_center_crop(img, size)
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    arr = ((x[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def distortions(seed: int = 0) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> distortion of a [1,3,H,W] image in [-1,1]. The first few stand in for an autoencoder's
    reconstruction errors (detail lost, blocking), the rest for other perceptual differences."""
    g = torch.Generator().manual_seed(seed)
    return {
        "down-up x4": lambda x: F.interpolate(F.interpolate(x, scale_factor=0.25, mode="area"),
                                              scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1),
        "blur sigma 1.5": lambda x: _blur(x, 1.5),
        "jpeg q20": lambda x: _jpeg(x, 20),
        "noise 0.1": lambda x: (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1),
        "brighter 0.1": lambda x: (x + 0.1).clamp(-1, 1),
    }


def measure_pair(lpips: LPIPS, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """LPIPS(x, y) as repae computes it and as the official code does, with d/dy of each."""
    out = {}
    grads = {}
    for name, (a, b) in (("repae", (x, y)), ("official", (2 * x - 1, 2 * y - 1))):
        yy = y.clone().requires_grad_(True)
        bb = 2 * yy - 1 if name == "official" else yy
        d = lpips(a, bb).sum()
        (g,) = torch.autograd.grad(d, yy)
        out[name] = float(d)
        grads[name] = g.flatten()
    out["value_ratio"] = out["official"] / out["repae"]
    out["grad_ratio"] = float(grads["official"].norm() / grads["repae"].norm())
    out["grad_cosine"] = float(F.cosine_similarity(grads["official"], grads["repae"], dim=0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--vgg", required=True, help="torchvision's ImageNet VGG16 weights (features.* keys)")
    p.add_argument("--lpips", required=True, help="LPIPS v0.1 linear heads (vgg.pth)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lpips = LPIPS.from_files(args.vgg, args.lpips)
    rows: List[Dict[str, object]] = []
    print(f"{'image':24s} {'distortion':16s} {'repae':>7s} {'official':>8s} {'value x':>7s} {'grad x':>7s} {'cos':>6s}")
    for path in args.images:
        x = load_image(path, args.size)
        for dname, distort in distortions().items():
            r = measure_pair(lpips, x, distort(x))
            rows.append({"image": path.name, "distortion": dname, **r})
            print(f"{path.name[:24]:24s} {dname:16s} {r['repae']:7.4f} {r['official']:8.4f} "
                  f"{r['value_ratio']:7.2f} {r['grad_ratio']:7.2f} {r['grad_cosine']:6.3f}")
    summary = {k: statistics.median(float(r[k]) for r in rows) for k in ("value_ratio", "grad_ratio", "grad_cosine")}
    by_distortion = {d: {k: statistics.median(float(r[k]) for r in rows if r["distortion"] == d)
                         for k in ("repae", "official", "value_ratio", "grad_ratio", "grad_cosine")}
                     for d in distortions()}
    result = {"pairs": len(rows), "size": args.size, "median": summary, "by_distortion": by_distortion,
              "rows": rows}
    print(json.dumps({"pairs": len(rows), "median": summary, "by_distortion": by_distortion}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
