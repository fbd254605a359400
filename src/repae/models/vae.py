"""LDM AutoencoderKL with a diagonal Gaussian posterior.

Key names equal the official REPA-E `.pt` files (which follow CompVis latent-diffusion):
`encoder.conv_in`, `encoder.down.L.block.J.{norm1,conv1,norm2,conv2,nin_shortcut}`,
`encoder.down.L.attn.J.{norm,q,k,v,proj_out}`, `encoder.down.L.downsample.conv`,
`encoder.mid.{block_1,attn_1,block_2}`, `encoder.{norm_out,conv_out}`, `quant_conv`,
`post_quant_conv`, and the mirror image under `decoder.` with `up.L.upsample.conv`.
Images are in [-1,1] (see repae.pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAEArgs:
    ch: int = 128
    ch_mult: Sequence[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 4
    attn_resolutions: Sequence[int] = field(default_factory=lambda: [16])
    resolution: int = 256  # LDM convention: places attention blocks, not the image size
    norm_groups: int = 32
    in_channels: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def attn_levels(self) -> List[bool]:
        """Whether each resolution level has attention blocks (same rule in encoder and decoder)."""
        return [self.resolution // 2**i in self.attn_resolutions for i in range(len(self.ch_mult))]


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents; moments [B,2C,H,W] split on channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise, [B,C,H,W]; noise drawn from `generator` unless given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0,I)) summed over C,H,W, in fp32: [B]."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])


class GroupNorm(nn.GroupNorm):
    """GroupNorm that keeps its input's dtype under autocast.

    On a GPU, autocast runs group_norm in fp32: it saves an fp32 copy of the bf16 conv output for backward
    and hands the following SiLU an fp32 tensor to save too, 10 bytes per element for each
    norm-SiLU-conv with the conv's bf16 input, against 6 this way. The VAE's activations are the
    largest memory of the REPA-E step (f8d4 at 256 px: ~1.25 GB per image even all in bf16), and
    PyTorch's bf16 group_norm kernels accumulate the statistics in fp32 anyway. There the affine
    weights go in bf16 too (a deliberate difference from the official code's fp32 output).

    On a CPU, autocast leaves group_norm alone, so the official code's nn.GroupNorm takes the bf16 input
    with its fp32 affine weights and returns bf16; this does the same. For a channels-last input (the
    CPU's default layout) PyTorch's kernel for that took 2.6-5.4x the time of converting to fp32 and back
    (forward + backward, toy VAE shapes, 2 threads; it made GroupNorm 30% of the toy REPA-E step), so that
    input is normalised in fp32 and rounded: the same numbers, up to one bf16 ulp on a few elements where
    the two kernels sum the statistics in another order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            if x.device.type != "cpu":
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
            if x.is_contiguous():
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,H,W]
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).reshape(b, c, h * w) for conv in (self.q, self.k, self.v))  # [B,C,HW]
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # the official code's products, softmax in the dtype autocast leaves it (bf16 on a CPU): its
            # numbers, and fwd+bwd 4x faster than SDPA's CPU kernel at the toy VAE's 64 tokens (2.9x at
            # 1024 tokens of 512 channels; 2 threads, AVX-512 bf16)
            weights = torch.bmm(q.transpose(1, 2), k) * c**-0.5  # [B,HW(q),HW(k)]
            out = torch.bmm(v, weights.softmax(dim=2).transpose(1, 2))  # [B,C,HW]
        else:
            q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # [B,1,HW,C]
            out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)  # scale c^-0.5, as in LDM
        return x + self.proj_out(out.reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding


# Output phases (row parity a, column parity c) of a 2x upsample, in the order of _phase_kernels' blocks.
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _fold_taps(w: torch.Tensor, dim: int) -> List[torch.Tensor]:
    """Along `dim`, a 3-tap kernel after a nearest 2x upsample as the 2-tap kernels of its even and odd outputs."""
    w0, w1, w2 = w.unbind(dim)
    return [torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)]


def _phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernel of a conv that follows a nearest 2x upsample, [O,I,3,3], as one 2x2 kernel per output
    phase, [4*O,I,2,2] (blocks in _PHASES order). An even output row 2i sees upsampled rows 2i-1, 2i, 2i+1,
    which are input rows i-1, i, i: taps (w0, w1 + w2) on input rows (i-1, i). An odd row 2i+1 sees input rows
    i, i, i+1: taps (w0 + w1, w2) on (i, i+1). Columns likewise. Sums in the weights' dtype (fp32)."""
    return torch.cat([k for rows in _fold_taps(w, 2) for k in _fold_taps(rows, 3)])


def _phase_views(y: torch.Tensor):
    """The four phases' outputs [B,O,H,W] inside the 2x2 conv's output y [B,4*O,H+1,W+1]: phase (a, c) is block
    k's window from row a, column c, as an odd phase's taps start one input row (column) later than an even one's."""
    o, h, w = y.shape[1] // 4, y.shape[2] - 1, y.shape[3] - 1
    return [y[:, k * o:(k + 1) * o, a:a + h, c:c + w] for k, (a, c) in enumerate(_PHASES)]


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC tensor (one that is not also plain contiguous), else contiguous_format."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


class _InterleavePhases(torch.autograd.Function):
    """[B,4*O,H+1,W+1] -> [B,O,2H,2W], out[..., 2i+a, 2j+c] = phase (a, c) at (i, j); in y's memory layout.
    Written out because autograd's own backward of four slices would build four zero-filled y-sized gradients
    and add them; this one writes each phase's share of the gradient into one."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        b, o, h, w = y.shape[0], y.shape[1] // 4, y.shape[2] - 1, y.shape[3] - 1
        ctx.layout = _layout(y)
        out = torch.empty(b, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=ctx.layout)
        grid = out.view(b, o, h, 2, w, 2)
        for (a, c), phase in zip(_PHASES, _phase_views(y)):
            grid[:, :, :, a, :, c].copy_(phase)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        b, o, h, w = grad.shape[0], grad.shape[1], grad.shape[2] // 2, grad.shape[3] // 2
        grad_y = torch.empty(b, 4 * o, h + 1, w + 1, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        grad_y.zero_()  # each phase's window leaves one row and one column of its block untouched
        grid = grad.contiguous(memory_format=_layout(grad)).view(b, o, h, 2, w, 2)
        for (a, c), phase in zip(_PHASES, _phase_views(grad_y)):
            phase.copy_(grid[:, :, :, a, :, c])
        return grad_y


def _interleave_phases(y: torch.Tensor) -> torch.Tensor:
    """_InterleavePhases; inside torch.compile the same as plain tensor ops, which inductor can fuse."""
    if not torch.compiler.is_compiling():
        return _InterleavePhases.apply(y)
    p00, p01, p10, p11 = _phase_views(y)
    b, o, h, w = p00.shape
    rows = [torch.stack([p00, p01], dim=-1), torch.stack([p10, p11], dim=-1)]  # [B,O,H,W,2] each
    return torch.stack(rows, dim=3).reshape(b, o, 2 * h, 2 * w)


class Upsample(nn.Module):
    """LDM's nearest 2x upsample then 3x3 conv, computed as four 2x2 convs on the input, one per output phase
    (sub-pixel form), interleaved. The same function: 16 multiply-adds per input pixel and channel pair instead
    of 36, and no upsampled tensor. In exact arithmetic equal to `reference` (float64 tests agree to 1e-12);
    under bf16 the summed taps round once instead of each (a difference from the official code, in the
    README). The parameters are the official `conv.weight` [C,C,3,3] and `conv.bias`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,2H,2W]
        bias = self.conv.bias.repeat(4) if self.conv.bias is not None else None
        return _interleave_phases(F.conv2d(x, _phase_kernels(self.conv.weight), bias, padding=1))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official formulation: upsample, then the 3x3 conv."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, `attn` blocks, optional resampler."""

    def __init__(self, blocks: List[nn.Module], attns: List[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """[B,3,H,W] -> moments [B, 2*z, H/f, W/f] (before quant_conv)."""

    def __init__(self, a: VAEArgs):
        super().__init__()
        g, attn = a.norm_groups, a.attn_levels()
        self.conv_in = nn.Conv2d(a.in_channels, a.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = a.ch
        for level, mult in enumerate(a.ch_mult):
            block_out = a.ch * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(a.num_res_blocks)]
            attns = [AttnBlock(block_out, g) for _ in range(a.num_res_blocks)] if attn[level] else []
            stage = _Level(blocks, attns)
            if level != len(a.ch_mult) - 1:
                stage.downsample = Downsample(block_out)
            self.down.append(stage)
            block_in = block_out
        self.mid = _Mid(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * a.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B,z,h,w] (after post_quant_conv) -> [B,3,h*f,w*f]."""

    def __init__(self, a: VAEArgs):
        super().__init__()
        g, attn = a.norm_groups, a.attn_levels()
        block_in = a.ch * a.ch_mult[-1]
        self.conv_in = nn.Conv2d(a.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g)
        levels: List[_Level] = []
        for level in reversed(range(len(a.ch_mult))):
            block_out = a.ch * a.ch_mult[level]
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(a.num_res_blocks + 1)]
            attns = [AttnBlock(block_out, g) for _ in range(a.num_res_blocks + 1)] if attn[level] else []
            stage = _Level(blocks, attns)
            if level != 0:
                stage.upsample = Upsample(block_out)
            levels.insert(0, stage)  # up[0] is the finest level, as in LDM
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage.run(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """x [-1,1] -> posterior over z -> reconstruction; z is *unnormalised* (raw VAE latent)."""

    def __init__(self, args: VAEArgs):
        super().__init__()
        self.args = args
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        self.quant_conv = nn.Conv2d(2 * args.z_channels, 2 * args.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(args.z_channels, args.z_channels, 1)

    @property
    def z_channels(self) -> int:
        return self.args.z_channels

    @property
    def downsample_factor(self) -> int:
        return self.args.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # [B,3,H,W] -> posterior over [B,z,H/f,W/f]
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # [B,z,h,w] -> [B,3,h*f,w*f]
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                decode: bool = True):
        """Returns (posterior, z sample, reconstruction or None). One call, so DDP sees the whole pass."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise)
        return posterior, z, self.decode(z) if decode else None
