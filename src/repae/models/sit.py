"""SiT: the latent diffusion transformer with adaLN-Zero blocks and REPA projectors.

State-dict keys equal those of the official REPA / REPA-E checkpoints
(`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`, `pos_embed`,
`blocks.N.{norm1,attn.qkv,attn.q_norm,attn.k_norm,attn.proj,mlp.fc1,mlp.fc2,adaLN_modulation.1}`,
`projectors.K.{0,2,4}`, `final_layer.{linear,adaLN_modulation.1}`, and REPA-E's `bn`).
Two deliberate differences from the reference code:
- `pos_embed` is a persistent buffer, not a parameter: same key, but no optimiser or
  `requires_grad_(True)` can ever train it (the reference's frozen embedding got trained).
  `SiTArgs.pos_embed_trainable` (compat=official) makes it a trained parameter, as the reference
  code ends up with; the key stays `pos_embed`, so weights load across both settings.
- the final layer's width is the model width for every size (the reference's SiT-S used 768).
Time convention: t=0 data, t=1 noise; `t` is the continuous time in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from repae.models.latent_norm import LatentNorm


@dataclass
class SiTOutput:
    velocity: Optional[torch.Tensor]  # [B,C,H,W]; None for an align-only pass
    projected: List[torch.Tensor]  # per encoder: [B,N,z_dim], projector(hidden)
    hidden: Optional[torch.Tensor] = None  # [B,N,D] after block `encoder_depth`


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear-SiLU-Linear-SiLU-Linear (keys .0, .2, .4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE 2-D sin-cos position embedding, [grid*grid, D] float32 (first half encodes rows' w)."""
    assert embed_dim % 4 == 0, "embed_dim must be divisible by 4"
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in MAE

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """[B,C,H,W] -> [B, (H/p)*(W/p), D] with a strided conv (key `proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of `time_scale * t` (max period 10000), then an MLP. [B] -> [B,D].

    SiT/REPA embed t in [0,1] directly (time_scale 1, needed for their checkpoints); then only the
    lowest frequencies vary over the whole range. DiT-style 1000 spreads t over all of them.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * self.time_scale)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, id = num_classes, for the CFG null label."""

    def __init__(self, num_classes: int, hidden_size: int, with_null: bool = True):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with timm's key layout (qkv, q_norm, k_norm, proj).

    impl: "sdpa" (torch's fused kernel), "math" (explicit matmuls, softmax in fp32), or
    "auto": math under CPU bf16 autocast (measured faster there, see DESIGN.md), else SDPA.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, impl: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def _use_sdpa(self, x: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "sdpa"
        return not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,N,D] -> [B,N,D]
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._use_sdpa(x):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            # autocast leaves softmax in bf16 on CPU; upcast the logits ourselves
            out = logits.float().softmax(dim=-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, impl=attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # [B,N,D], [B,D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class SiTArgs:
    """Everything needed to rebuild a SiT; saved as metadata next to its weights."""

    input_size: int = 32  # latent side
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    with_null_class: bool = True
    z_dims: Sequence[int] = field(default_factory=lambda: [768])
    projector_dim: int = 2048
    encoder_depth: int = 8
    qk_norm: bool = False
    latent_norm: bool = True  # REPA-E: the SiT owns the latent BatchNorm as `bn`
    bn_momentum: float = 0.1
    bn_eps: float = 1e-4
    bn_denorm_eps: bool = True  # False: official de-normalisation with sqrt(var) (compat=official)
    pos_embed_trainable: bool = False  # True: pos_embed is a trained parameter (compat=official)
    attention: str = "auto"
    time_scale: float = 1.0  # 1 = SiT/REPA convention (official checkpoints); 1000 = DiT-style


class SiT(nn.Module):
    """SiT velocity model v(x_t, t, y) plus REPA projections of block `encoder_depth`."""

    def __init__(self, args: SiTArgs):
        super().__init__()
        if args.input_size % args.patch_size:
            raise ValueError(f"latent size {args.input_size} is not divisible by patch size {args.patch_size}")
        if not 1 <= args.encoder_depth <= args.depth:
            raise ValueError(f"encoder_depth {args.encoder_depth} must be in [1, {args.depth}]")
        self.args = args
        self.num_classes = args.num_classes
        self.encoder_depth = args.encoder_depth
        self.patch_size = args.patch_size
        self.out_channels = args.in_channels
        grid = args.input_size // args.patch_size
        d = args.hidden_size

        self.x_embedder = PatchEmbed(args.patch_size, args.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, time_scale=args.time_scale)
        self.y_embedder = LabelEmbedder(args.num_classes, d, with_null=args.with_null_class)
        pos_embed = sincos_pos_embed_2d(d, grid).unsqueeze(0)  # [1,N,D]
        if args.pos_embed_trainable:
            self.pos_embed = nn.Parameter(pos_embed)
        else:
            self.register_buffer("pos_embed", pos_embed, persistent=True)
        self.blocks = nn.ModuleList(
            SiTBlock(d, args.num_heads, args.mlp_ratio, args.qk_norm, args.attention) for _ in range(args.depth)
        )
        self.projectors = nn.ModuleList(build_projector(d, args.projector_dim, z) for z in args.z_dims)
        self.final_layer = FinalLayer(d, args.patch_size, args.in_channels)
        self.bn = LatentNorm(args.in_channels, momentum=args.bn_momentum, eps=args.bn_eps,
                             denorm_eps=args.bn_denorm_eps) if args.latent_norm else None
        # a run-time choice, not architecture (train.activation_checkpointing): recompute each block
        # in the backward pass instead of keeping its activations, trading compute for memory
        self.activation_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """SiT/DiT initialisation: xavier linears, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:  # [B,N,p*p*C] -> [B,C,H,W]
        b, n, _ = x.shape
        p, c = self.patch_size, self.out_channels
        h = w = int(round(n**0.5))
        x = x.reshape(b, h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, align_only: bool = False,
                project: bool = True) -> SiTOutput:
        """x: [B,C,H,W] noised normalised latents; t: [B] in [0,1] (0 = data); y: [B] labels
        (num_classes = null). align_only stops after block `encoder_depth` (no velocity); project=False
        skips the REPA projectors (`projected` is then empty), which only training reads."""
        if align_only and not project:
            raise ValueError("align_only=True returns the projections: it needs project=True")
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        projected: List[torch.Tensor] = []
        hidden = None
        # only in a pass that trains the blocks: the frozen alignment pass turns requires_grad off for
        # its forward only, so a recomputation in backward would not match (torch refuses it)
        recompute = (self.activation_checkpointing and torch.is_grad_enabled()
                     and self.blocks[0].adaLN_modulation[-1].weight.requires_grad)
        for depth, block in enumerate(self.blocks, start=1):
            if recompute:
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
            if depth == self.encoder_depth:
                hidden = tokens
                if project:
                    projected = [projector(tokens) for projector in self.projectors]
                if align_only:
                    return SiTOutput(velocity=None, projected=projected, hidden=hidden)
        velocity = self.unpatchify(self.final_layer(tokens, c))
        return SiTOutput(velocity=velocity, projected=projected, hidden=hidden)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """v(x_t, t, y): [B,C,H,W] -> [B,C,H,W]; the function the samplers integrate. Without the
        projectors, whose outputs only the REPA loss reads: SiT-XL/2's 3-layer projector is 1.7% of its
        forward FLOPs, SiT-T's in the toy preset 13.2% (benchmarks/model_flops.py)."""
        return self.forward(x, t, y, project=False).velocity
