"""The toy world's stand-in for DINOv2: a small conv net + attention block trained to classify toy shapes
and, token by token, to see where the shape lies in the token's patch.

Its LayerNorm-ed patch tokens (a 4x4 grid of 128-d for 32px images: patch 8, matching
SiT-T/2 on the f4 toy VAE's 8x8 latents) are the REPA alignment targets, exactly where DINOv2's `x_norm_patchtokens` would be used. A conv stem
learns shapes in a few hundred CPU steps where a plain ViT needs thousands; one
self-attention block then gives every token image-wide context, as a ViT's tokens have.

Why the per-token layout head (`coverage_logits`, toy world v7): DINOv2's patch tokens are spatial, their
linear projections segment the object and its parts, and that is what REPA hands a SiT. A teacher trained
only to classify from its mean token learned one class vector broadcast over the grid (toy world v6: mean
cosine 0.90 between an image's tokens; a linear probe of a token predicted its patch's shape coverage with
R^2 0.53, worse than class x position alone, 0.61), which a class-conditional SiT already gets from its
label. With the layout head as well (same budget): cosine 0.65, R^2 0.97, held-out accuracy 99.6%.
"""

from __future__ import annotations

import torch
from torch import nn

from repae.models.sit import Mlp, sincos_pos_embed_2d

IMAGE_SIZE = 32


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())


class ToyTeacher(nn.Module):
    """uint8 [B,3,32,32] -> patch tokens [B,16,128]; `logits` adds a linear class head on their mean."""

    def __init__(self, dim: int = 128, heads: int = 4, num_classes: int = 10, grid: int = 4, layout: bool = False,
                 factors: int = 0):
        super().__init__()
        if grid not in (4, 8):
            raise ValueError(f"the toy teacher has an 8x8 or a 4x4 token grid on 32px images, not {grid}x{grid}")
        stem = [_conv(3, 32, 1), _conv(32, 64, 2), _conv(64, 64, 1), _conv(64, dim, 2), _conv(dim, dim, 1)]  # 32 -> 8
        if grid == 4:  # 4x fewer SiT tokens than 8x8 made the SiT pass 3x cheaper (121 vs 378 ms per 64 images)
            stem.append(_conv(dim, dim, 2))
        self.stem = nn.Sequential(*stem)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid).unsqueeze(0))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.patch = IMAGE_SIZE // grid
        # the teacher has one (layout=True); the evaluator, a classifier as Inception is, has none
        self.coverage_head = nn.Linear(dim, self.patch**2) if layout else None
        # the evaluator (toy world v8) also reads each image's generative factors off its mean token: see
        # repae.toyworld.ensure_toy_evaluator for why
        self.factor_head = nn.Linear(dim, factors) if factors else None
        self.embed_dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # uint8 [B,3,H,W] -> [B,N,D]
        x = images.float() / 127.5 - 1.0  # the teacher owns its preprocessing
        tokens = self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.norm(tokens)

    def logits(self, images: torch.Tensor) -> torch.Tensor:  # [B,num_classes]
        return self.head(self.forward(images).mean(dim=1))

    def coverage_logits(self, tokens: torch.Tensor) -> torch.Tensor:  # [B,N,D] -> [B,N,patch*patch]
        """Per token, the logits of how much of each pixel of its patch the shape covers (raster order,
        as `patch_coverage` lays the targets out)."""
        if self.coverage_head is None:
            raise ValueError("this toy network has no layout head (ToyTeacher(layout=True) has one)")
        return self.coverage_head(tokens)

    def factor_predictions(self, tokens: torch.Tensor) -> torch.Tensor:  # [B,N,D] -> [B,factors], standardised
        if self.factor_head is None:
            raise ValueError("this toy network has no factor head (ToyTeacher(factors=F) has one)")
        return self.factor_head(tokens.mean(dim=1))


def patch_coverage(coverage: torch.Tensor, grid: int) -> torch.Tensor:
    """Pixel coverage [B,H,W] -> per-token targets [B,grid*grid,p*p] (p = H // grid): token n = row * grid + col
    of the patch grid (the order of the teacher's and the SiT's tokens), its pixels in raster order."""
    b, h, w = coverage.shape
    p = h // grid
    return coverage.reshape(b, grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(b, grid * grid, p * p)
