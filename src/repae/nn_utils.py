"""Small module utilities shared by losses and the training step."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, Optional

import torch

from torch import nn


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of `modules` get no gradients inside the block; the previous flags come back after.

    Restoring each flag (rather than calling requires_grad_(True)) is what keeps truly frozen
    parameters frozen: the reference code re-enabled everything and so trained its fixed pos_embed.
    """
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# bf16 is chosen only when it beats fp32 by this factor: it costs precision, and a near tie is noise
BF16_MARGIN = 1.2


def _matmul_seconds(a: torch.Tensor, reps: int = 3) -> float:
    """Seconds for `reps` products a @ a (after one untimed call, which selects the kernel)."""
    a @ a
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_fast(trials: int = 5) -> bool:
    """Whether bf16 matmuls beat fp32 ones clearly (by BF16_MARGIN) on this CPU, measured once per process
    (~0.05 s).

    With AVX-512 BF16 (or AMX) bf16 autocast made matmuls ~4x and convolutions ~2x faster than fp32
    (DESIGN.md); on an AVX2-only CPU (an AMD EPYC measured here, 2 threads) bf16 ran at 0.3 GFLOP/s
    against 149 for fp32 matmuls, and a toy VAE step took 10.9 s instead of 0.85 s; and on a 2-core Xeon
    that lists avx512_bf16, fp32 matmuls ran at 274 GFLOP/s and bf16 at 146 (toy step 577 vs 860 ms).
    The instruction set alone does not say which kernel oneDNN picks, so time both. The two are timed
    in turn, `trials` times, and each keeps its fastest: a single ~1 ms timing of each, as before,
    picked bf16 on that Xeon when another process was busy during the fp32 one, and the default toy
    run then trained at 74 images/s instead of 110."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    x = {dtype: a.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in x}
    for _ in range(trials):
        for dtype in x:  # interleaved: a burst of load from another process slows both alike
            best[dtype] = min(best[dtype], _matmul_seconds(x[dtype]))
    return best[torch.bfloat16] * BF16_MARGIN < best[torch.float32]


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """'bf16' or 'fp32' for a `train.precision` setting on `device`: 'auto' is bf16 where bf16 is
    fast (a CUDA GPU with bf16 support; a CPU where measured bf16 matmuls beat fp32), else fp32."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_is_fast() else "fp32"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device | str = "cpu") -> Optional[torch.dtype]:
    """The autocast dtype of a `train.precision` setting on `device`: torch.bfloat16 or None (fp32)."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


def autocast(precision: str, device: torch.device) -> ContextManager:
    """bf16 autocast on `device` where the setting resolves to bf16; a no-op context for fp32."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def compile_regions(module: nn.Module, **compile_kwargs) -> None:
    """torch.compile `module` in place, region by region: each element of a `blocks` list on its
    own (identical blocks share one compiled graph, so compiling a 28-block SiT costs one block),
    else the module whole. Parameter names, hence checkpoints, do not change (nn.Module.compile).
    `compile_kwargs` go to torch.compile (e.g. dynamic=False)."""
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            block.compile(**compile_kwargs)
    else:
        module.compile(**compile_kwargs)


def use_fast_gpu_kernels(device: torch.device, tf32: bool = True, cudnn_benchmark: bool = True) -> None:
    """On a CUDA device: TF32 for float32 matmuls and convolutions (`tf32`), and cuDNN's benchmark
    mode (`cudnn_benchmark`: it times the convolution algorithms once per input shape and keeps the
    fastest). Process-wide switches, so set both ways: a later run in the same process with the other
    setting gets it. Nothing on other devices."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def init_device(cfg) -> torch.device:
    """This process's device for cfg.train.device (joining the torchrun process group when WORLD_SIZE > 1),
    with cfg.train's GPU kernel switches applied and freed CPU memory kept for reuse (repae.freed_memory; the
    CLI has done that already, a program using the library directly gets it here): what train, sample and bench
    start with."""
    from repae import dist
    from repae.freed_memory import reuse_freed_memory

    device = dist.init_from_env(cfg.train.device)
    use_fast_gpu_kernels(device, cfg.train.tf32, cfg.train.cudnn_benchmark)
    reuse_freed_memory()
    return device


def compile_for_sampling(sit: nn.Module, vae: nn.Module, mode: str = "default") -> None:
    """sample.compile: the SiT blocks and the VAE decoder compiled with static shapes (sampling sees
    two batch shapes, guided and unguided, and a last partial batch: one graph each, no dynamic kernels),
    in torch.compile's `mode` (sample.compile_mode)."""
    compile_regions(sit, dynamic=False, mode=mode)
    compile_regions(getattr(vae, "decoder", vae), dynamic=False, mode=mode)
