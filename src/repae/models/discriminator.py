"""PatchGAN discriminator (pix2pix / taming-transformers NLayerDiscriminator).

Keys `main.N.*` equal the official `*-discriminator-ckpt.pt` files: for ndf=64, 3 layers,
convs at main.0 (bias), main.2/5/8 (no bias, each followed by BatchNorm at 3/6/9) and the
1-channel head at main.11. The BatchNorms take the statistics of the global batch under
torchrun (repae.models.global_norm), so W processes x B images equal 1 process x W*B.
Input: images in [-1,1]; output: patch logits [B,1,h,w].
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from repae.models.global_norm import GlobalBatchNorm2d


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), GlobalBatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """pix2pix init: conv weights N(0, 0.02), BN weights N(1, 0.02), BN bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02)
                m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,1,h,w]
        return self.main(x)
