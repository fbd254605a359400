"""One Vision Transformer for every alignment-encoder family (DINOv2, DINOv1, MoCo v3, MAE,
I-JEPA, CLIP ViT), switched by `ViTArgs`.

Key layout = the DINOv2 hub checkpoints (`dinov2_vit{s,b,l,g}14[_reg]`): `cls_token`,
`pos_embed`, `mask_token`, optional `register_tokens`, `patch_embed.proj`, optional `norm_pre`,
`blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2.gamma}`,
`norm`. Other families' files are renamed into this layout by `repae.models.encoder_weights`.

`forward` returns patch tokens [B,N,D] without CLS/registers: LayerNorm-ed (DINOv2's
`x_norm_patchtokens`, DINOv1, MoCo v3, I-JEPA) or the raw last block output where the
reference takes it so (MAE's `forward_features`, CLIP's transformer output before `ln_post`).
Position embeddings are resampled once, at load time, to the grid the SiT needs
(`resample_pos_embed`), so the forward pass never interpolates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ViTArgs:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    grid: int = 16  # patch grid the position embedding holds (after resampling)
    mlp_ratio: float = 4.0
    num_registers: int = 0
    layer_scale: bool = True  # DINOv2's ls1/ls2
    swiglu: bool = False  # DINOv2-g's fused SwiGLU FFN
    eps: float = 1e-6  # LayerNorm eps (CLIP: 1e-5)
    class_token: bool = True  # I-JEPA has none
    mask_token: bool = True  # DINOv2 keeps one in its checkpoints (unused here)
    patch_bias: bool = True  # CLIP's conv1 has no bias
    norm_pre: bool = False  # CLIP's ln_pre after the embeddings
    final_norm: bool = True  # apply `norm` to the output (MAE's and CLIP's features skip it)
    act: str = "gelu"  # gelu (erf) | quick_gelu (CLIP)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU FFN: w12 -> (a, b), silu(a) * b -> w3. Hidden rounded up to a multiple of 8."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x); its weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


class _Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, a: ViTArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(a.embed_dim, eps=a.eps)
        self.attn = _Attention(a.embed_dim, a.num_heads)
        self.ls1 = LayerScale(a.embed_dim) if a.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(a.embed_dim, eps=a.eps)
        self.mlp = SwiGLU(a.embed_dim, a.mlp_ratio) if a.swiglu else _Mlp(a.embed_dim, a.mlp_ratio, a.act)
        self.ls2 = LayerScale(a.embed_dim) if a.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,N,D]
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Preprocessed images [B,3,g*p,g*p] -> patch tokens [B,g*g,D]."""

    def __init__(self, a: ViTArgs):
        super().__init__()
        self.args = a
        self.embed_dim = a.embed_dim
        self.num_prefix = int(a.class_token)  # tokens in pos_embed before the patches
        self.patch_embed = PatchEmbed(a.patch_size, a.embed_dim, a.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.embed_dim)) if a.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + a.grid * a.grid, a.embed_dim))
        # unused here; kept so DINOv2 checkpoints load strictly
        self.mask_token = nn.Parameter(torch.zeros(1, a.embed_dim)) if a.mask_token else None
        self.register_tokens = nn.Parameter(torch.zeros(1, a.num_registers, a.embed_dim)) if a.num_registers else None
        self.norm_pre = nn.LayerNorm(a.embed_dim, eps=a.eps) if a.norm_pre else nn.Identity()
        self.blocks = nn.ModuleList(_Block(a) for _ in range(a.depth))
        self.norm = nn.LayerNorm(a.embed_dim, eps=a.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        b, n, _ = tokens.shape
        if n != self.pos_embed.shape[1] - self.num_prefix:
            raise ValueError(f"input gives {n} patches but the position embedding holds "
                             f"{self.pos_embed.shape[1] - self.num_prefix}; resample it with resample_pos_embed")
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        x = tokens + self.pos_embed
        if self.register_tokens is not None:  # registers go after CLS and carry no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.args.final_norm:
            x = self.norm(x)
        return x[:, self.num_prefix + self.args.num_registers:]


# Bounds on the position embedding a weight file may bring: resampling costs grid^2 x width, and a
# stride-0 tensor can claim any grid in a few bytes. Published encoders hold at most 37x37 (DINOv2
# at 518 px) x 1536 (ViT-g), 2.1M entries.
MAX_POS_EMBED_GRID = 128
MAX_POS_EMBED_ENTRIES = 1 << 25


def pos_embed_grid(pos_embed: torch.Tensor, num_prefix: int = 1) -> int:
    """Side G of the patch grid of a [1, prefix + G*G, D] position embedding; ValueError saying
    what is wrong when it is not one, or is larger than MAX_POS_EMBED_GRID / MAX_POS_EMBED_ENTRIES."""
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
        raise ValueError(f"position embedding must be a [1, tokens, width] tensor, found {shape}")
    patches, width = pos_embed.shape[1] - num_prefix, pos_embed.shape[2]
    side = int(round(max(patches, 0) ** 0.5))
    if patches < 1 or side * side != patches:
        raise ValueError(f"position embedding has {patches} patch entries (after {num_prefix} prefix tokens), "
                         f"not a square grid")
    if side > MAX_POS_EMBED_GRID or patches * width > MAX_POS_EMBED_ENTRIES:
        raise ValueError(f"position embedding claims a {side}x{side} grid of width {width}; at most "
                         f"{MAX_POS_EMBED_GRID}x{MAX_POS_EMBED_GRID} and {MAX_POS_EMBED_ENTRIES} entries are accepted")
    return side


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """[1, prefix + G*G, D] -> [1, prefix + grid*grid, D], prefix tokens kept.

    Bicubic, align_corners=False, antialias=True, in fp32: the defaults of timm's
    `resample_abs_pos_embed`, which REPA / REPA-E call once at load time (DINOv2's 37x37
    grid -> 16x16 at 256 px). Antialiasing matters when shrinking, as DINOv2's grid is."""
    old = pos_embed_grid(pos_embed, num_prefix)
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if old == grid:
        return pos_embed
    d = patches.shape[-1]
    img = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
