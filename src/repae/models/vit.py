"""One Vision Transformer for the alignment encoders (DINOv2 first; other families follow).

Key layout = the DINOv2 hub checkpoints (`dinov2_vit{s,b,l,g}14[_reg]`): `cls_token`,
`pos_embed`, `mask_token`, optional `register_tokens`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2.gamma}`, `norm`.
`forward` returns LayerNorm-ed patch tokens [B,N,D] without CLS/registers, like DINOv2's
`x_norm_patchtokens`. Position embeddings are resampled once, at load time, to the grid
the SiT needs (`resample_pos_embed`), so the forward pass never interpolates.
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
    layer_scale: bool = True
    swiglu: bool = False
    eps: float = 1e-6


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


class _Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


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
        self.mlp = SwiGLU(a.embed_dim, a.mlp_ratio) if a.swiglu else _Mlp(a.embed_dim, a.mlp_ratio)
        self.ls2 = LayerScale(a.embed_dim) if a.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Preprocessed images [B,3,g*p,g*p] -> normalised patch tokens [B,g*g,D]."""

    def __init__(self, a: ViTArgs):
        super().__init__()
        self.args = a
        self.embed_dim = a.embed_dim
        self.patch_embed = PatchEmbed(a.patch_size, a.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + a.grid * a.grid, a.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, a.embed_dim))  # unused here; kept for strict loading
        self.register_tokens = nn.Parameter(torch.zeros(1, a.num_registers, a.embed_dim)) if a.num_registers else None
        self.blocks = nn.ModuleList(_Block(a) for _ in range(a.depth))
        self.norm = nn.LayerNorm(a.embed_dim, eps=a.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        b, n, _ = tokens.shape
        if n != self.pos_embed.shape[1] - 1:
            raise ValueError(f"input gives {n} patches but the position embedding holds "
                             f"{self.pos_embed.shape[1] - 1}; resample it with resample_pos_embed")
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self.pos_embed
        if self.register_tokens is not None:  # registers go after CLS and carry no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.args.num_registers:]


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """[1, prefix + G*G, D] -> [1, prefix + grid*grid, D]: bicubic (align_corners=False, no
    antialias) on the patch part, prefix tokens kept, as timm's resample_abs_pos_embed does."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(round(patches.shape[1] ** 0.5))
    if old == grid:
        return pos_embed
    d = patches.shape[-1]
    img = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
