"""LPIPS (VGG16 variant, v0.1 linear heads) in plain torch, loaded from local files.

Two weight files, both strict:
- torchvision's ImageNet VGG16 (`vgg16-397923af.pth`): keys `features.N.{weight,bias}`
  (its `classifier.*` keys are accepted and ignored);
- the LPIPS linear heads (`vgg.pth` from richzhang/PerceptualSimilarity `lpips/weights/v0.1/`,
  the same file taming-transformers uses): keys `lin{0..4}.model.1.weight`, shape [1,C,1,1].

Input range: LPIPS was trained on images in [-1, 1]; `forward` takes [-1, 1] (the VAE's
range) and applies LPIPS's own scaling layer. This is the one place the range is handled
(the reference code rescaled [-1,1] inputs as if they were [0,1]).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

import torch
from torch import nn

# VGG16 `features` layout: conv widths, "M" = max-pool. Indices match torchvision.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: after these `features` indices
_TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

VGG_FILE_HINT = "vgg16-397923af.pth (torchvision's ImageNet VGG16 weights)"
LPIPS_FILE_HINT = "vgg.pth (LPIPS v0.1 linear heads, richzhang/PerceptualSimilarity lpips/weights/v0.1/vgg.pth)"


class LPIPSWeightsError(FileNotFoundError):
    pass


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features up to relu5_3 (indices 0..29)."""
    layers: List[nn.Module] = []
    in_ch = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = item
    return nn.Sequential(*layers)


class _Linear(nn.Module):
    """LPIPS NetLinLayer: (dropout,) 1x1 conv without bias; key `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS distance. forward(x, y): [B,3,H,W] in [-1,1] each -> [B] distances (fp32)."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", _Linear(c))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a fixed metric: never in train mode

    def taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Unit-normalised VGG activations at the five LPIPS layers; x in [-1,1]."""
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            if i == _TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            fx, fy = self.taps(x.float()), self.taps(y.float())
            total = 0.0
            for k, (a, b) in enumerate(zip(fx, fy)):
                head = getattr(self, f"lin{k}").model[1]
                total = total + head((a - b).pow(2)).mean(dim=[1, 2, 3])
        return total

    @classmethod
    def from_files(cls, vgg_path: Optional[Union[str, os.PathLike]],
                   lpips_path: Optional[Union[str, os.PathLike]]) -> "LPIPS":
        """Build LPIPS from the two weight files (local paths or hub ids); clear errors when absent or wrong."""
        from repae.hub import local_path
        from repae.weights import load_strict, read_file

        vgg_path, lpips_path = local_path(vgg_path, "vgg"), local_path(lpips_path, "lpips")
        for path, hint, key in ((vgg_path, VGG_FILE_HINT, "loss.vgg_path"), (lpips_path, LPIPS_FILE_HINT, "loss.lpips_path")):
            if not path or not Path(path).is_file():
                raise LPIPSWeightsError(
                    f"LPIPS needs {hint}; set {key} to a local copy"
                    + (f" (not found: {path})" if path else "")
                    + ", or set loss.lpips_weight=0 to train without LPIPS"
                )
        model = cls()
        vgg = read_file(vgg_path)
        vgg = {k: v for k, v in vgg.items() if not k.startswith("classifier.")}
        lin = read_file(lpips_path)
        load_strict(model, {**vgg, **lin}, f"{vgg_path} + {lpips_path}")
        return model.requires_grad_(False)
