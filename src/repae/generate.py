"""Batched generation: noise -> sampler -> de-normalise -> VAE decode -> uint8, PNG grids, and
ADM-style .npz files written by all ranks of a process group together.

The initial noise of sample i, and with the SDE sampler its Brownian increments, depend only on
(seed, i): a sample does not depend on the batch size or on how samples are split across
processes (up to the batch's floating-point reduction order). `generate_npz` hands out whole
batches (batch b to rank b % W), so W processes write the very samples one process writes.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import threading
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from repae import dist
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL
from repae.pixels import from_vae_range
from repae.sample import Guidance, euler_maruyama, euler_ode


def _seed_for(seed: int, index: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal [len(indices), *shape], row i drawn from a generator seeded by (seed, indices[i])."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_seed_for(seed, i))) for i in indices]
    return torch.stack(rows)


def sampler_settings(cfg, seed: Optional[int] = None, device: torch.device | str = "cpu") -> dict:
    """generate_images/generate_npz keyword arguments from a run config's sampler, flow and
    precision settings (seed: cfg.sample.seed unless given; device: where the sampler runs, which
    decides what precision 'auto' means)."""
    from repae.nn_utils import autocast_dtype

    s = cfg.sample
    return dict(mode=s.mode, num_steps=s.num_steps, heun=s.heun, heun_cfg_at=s.heun_cfg_at, cfg_scale=s.cfg_scale,
                guidance_low=s.guidance_low, guidance_high=s.guidance_high, path_type=cfg.flow.path_type,
                seed=s.seed if seed is None else seed, autocast_dtype=autocast_dtype(cfg.train.precision, device))


class NonFiniteSamples(RuntimeError):
    """A model whose samples are NaN or inf: its weights are finite but its output overflows."""


@torch.no_grad()
def generate_images(
    sit: SiT,
    vae: AutoencoderKL,
    labels: torch.Tensor,
    *,
    mode: str = "ode",
    num_steps: int = 50,
    heun: bool = False,
    heun_cfg_at: str = "t_cur",
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    seed: int = 0,
    batch_size: int = 64,
    first_index: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    desc: str = "sampling",
    refuse_nonfinite: bool = False,
) -> torch.Tensor:
    """Class-conditional samples as uint8 [N,3,H,W]. labels: [N] class ids. `desc`: the progress bar's label.
    `refuse_nonfinite`: NonFiniteSamples when a decoded batch holds NaN or inf (the uint8 conversion would
    make them black pixels); off where a diverged model's samples are the measurement (training, reproduce).

    The SiT samples in BN-normalised latent space; its `bn` running stats (from the EMA model
    when you pass the EMA) map back to VAE latents before decoding. Without `bn` the
    latents are decoded as they are.
    """
    device = next(sit.parameters()).device
    sit_was_training, vae_was_training = sit.training, vae.training
    sit.eval()
    vae.eval()
    latent_shape = (sit.args.in_channels, sit.args.input_size, sit.args.input_size)
    guidance = Guidance(cfg_scale, guidance_low, guidance_high, sit.null_class)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    out = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        y = labels[start : start + batch_size].to(device)
        idx = range(first_index + start, first_index + start + len(y))
        noise = sample_noise(idx, latent_shape, seed).to(device)
        with amp:
            if mode == "ode":
                z = euler_ode(sit.velocity, noise, y, num_steps, heun=heun, guidance=guidance,
                              heun_cfg_at=heun_cfg_at)
            elif mode == "sde":
                # one Brownian stream per sample index: results do not depend on batching or ranks
                gens = [torch.Generator().manual_seed(_seed_for(seed, i, stream=1)) for i in idx]
                z = euler_maruyama(sit.velocity, noise, y, num_steps, guidance=guidance, path_type=path_type,
                                   generator=gens)
            else:
                raise ValueError(f"unknown sampling mode {mode!r}; use ode or sde")
            z = z.float()
            if sit.bn is not None:
                z = sit.bn.denormalize(z)
            pixels = vae.decode(z)
        if refuse_nonfinite and not bool(torch.isfinite(pixels).all()):
            raise NonFiniteSamples(f"the samples from index {first_index + start} on are NaN or infinite: the "
                                   f"model's output overflows (a diverged run, or damaged weights); nothing was "
                                   f"written from them")
        out.append(from_vae_range(pixels).cpu())
    sit.train(sit_was_training)
    vae.train(vae_was_training)
    return torch.cat(out)


def sample_labels(n: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """Class labels of samples 0..n-1: `balanced` i -> i % num_classes (every class equally often,
    in order), or `uniform`: independent uniform classes, label i a function of (seed, i). int64 [n]."""
    if mode == "balanced":
        return torch.arange(n) % num_classes
    if mode == "uniform":
        return torch.tensor([_seed_for(seed, i, stream=2) % num_classes for i in range(n)], dtype=torch.long)
    raise ValueError(f"unknown label sampling {mode!r}; use balanced or uniform")


def rank_batches(n: int, batch_size: int, rank: int, world: int) -> list:
    """The (start, stop) index ranges this rank generates: batch b = [b*bs, (b+1)*bs) goes to rank b % world."""
    return [(b * batch_size, min(n, (b + 1) * batch_size)) for b in range(rank, math.ceil(n / batch_size), world)]


def _part_path(path: Path, rank: int, world: int) -> Path:
    return path.with_name(f"{path.name}.part{rank}-of-{world}.npy")


def _tmp_part_path(path: Path, rank: int, world: int) -> Path:
    """The part file while this rank still writes it (renamed to _part_path when complete)."""
    return path.with_name(f"{path.name}.part{rank}-of-{world}.tmp.npy")


class SamplingTerminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop or time limit, torchrun ending a failed job's other ranks) while
    `generate_npz` runs: raised like Ctrl-C's KeyboardInterrupt, so the same clean-up runs. Exit 143."""

    exit_code = 128 + int(signal.SIGTERM)


@contextmanager
def _sigterm_raises():
    """Within: SIGTERM raises SamplingTerminated in the main thread instead of ending the process on the spot,
    which would skip every clean-up. Elsewhere than the main thread nothing is installed (Python forbids it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SamplingTerminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _remove_unfinished(path: Path, rank: int, world: int) -> None:
    """What a failed or interrupted `generate_npz` leaves of `path` on this rank: its temporary and finished
    part files and, on rank 0, every rank's parts and the assembly's work files. Nothing of it can be resumed
    (the parts record no settings nor which batches are complete), and at 50k 256px samples it is ~10 GB."""
    work = path.with_name(path.name + ".assemble")
    doomed = [_tmp_part_path(path, rank, world), _part_path(path, rank, world)]
    if rank == 0:
        doomed += [_part_path(path, r, world) for r in range(world)]
        doomed += [path.with_name(path.name + ".tmp"), work / "arr_0.npy", work / "labels.npy"]
    for f in doomed:
        try:
            f.unlink(missing_ok=True)
        except OSError:  # best effort: the error being reported matters more than the debris
            pass
    if rank == 0:
        try:
            work.rmdir()
        except OSError:
            pass


def generate_npz(sit: SiT, vae: AutoencoderKL, labels: torch.Tensor, path: str | Path, *, batch_size: int = 64,
                 keep: int = 0, progress: bool = True, **sampler) -> Optional[torch.Tensor]:
    """Generate len(labels) samples across the ranks of the process group (one process: all of them)
    and write the ADM-style `path` (.npz: arr_0 uint8 [N,H,W,3] in index order, labels int64 [N]).

    Call it on every rank with the same arguments. Each rank writes its batches to a part file,
    rank 0 assembles them after a barrier and removes them. `sampler`: generate_images' keyword
    arguments (mode, num_steps, cfg_scale, seed, ...). Returns the first `keep` samples as uint8
    [keep,3,H,W] on rank 0 (None elsewhere).

    All or nothing: an error, Ctrl-C (KeyboardInterrupt) or SIGTERM (SamplingTerminated) before `path`
    is complete removes every temporary file of it and re-raises; nothing partial is kept to resume from.
    """
    path = Path(path)
    rank, world = dist.rank(), dist.world_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    # every rank checks (the same path, so the same verdict): a check on rank 0 alone would leave the others
    # sampling towards a barrier rank 0 never reaches
    _check_free_space(path, len(labels), sit.args.input_size * vae.downsample_factor)
    try:
        with _sigterm_raises():
            return _generate_npz(sit, vae, labels, path, batch_size, keep, progress, sampler)
    except BaseException:
        _remove_unfinished(path, rank, world)
        raise


def _check_free_space(path: Path, n: int, size: int) -> None:
    """OSError(ENOSPC) before any sampling when the disk cannot hold what writing the .npz takes at its peak:
    the parts, the assembled array and the .npz itself, each n x size x size x 3 bytes."""
    need, free = 3 * n * size * size * 3, shutil.disk_usage(path.parent).free
    if need > free:
        raise OSError(errno.ENOSPC, f"No space left on device: {n} samples of {size} px need ~{need / 1e9:.3g} GB "
                                    f"there while the .npz is written (parts, assembled array, .npz), "
                                    f"{free / 1e9:.3g} GB are free", str(path))


def _reserved_memmap(path: Path, shape: Tuple[int, ...]) -> np.memmap:
    """np.lib.format.open_memmap(path, 'w+', uint8) with its disk blocks allocated now. A sparse mapping written on
    a disk that fills up kills the process with SIGBUS, which nothing can catch or clean up after; reserved, a
    full disk is an OSError here, before the work, and the caller's clean-up runs."""
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError as err:
            del rows
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it: as before
                raise OSError(err.errno, err.strerror, str(path)) from None
            rows = np.lib.format.open_memmap(path, mode="r+")
    return rows


def _generate_npz(sit: SiT, vae: AutoencoderKL, labels: torch.Tensor, path: Path, batch_size: int, keep: int,
                  progress: bool, sampler: dict) -> Optional[torch.Tensor]:
    rank, world, n = dist.rank(), dist.world_size(), len(labels)
    size = sit.args.input_size * vae.downsample_factor
    mine = rank_batches(n, batch_size, rank, world)
    part, tmp = _part_path(path, rank, world), _tmp_part_path(path, rank, world)
    rows = _reserved_memmap(tmp, (sum(b - a for a, b in mine), size, size, 3))
    try:
        at = 0
        for a, b in tqdm(mine, desc="sampling", unit="batch", disable=not progress or rank != 0):
            images = generate_images(sit, vae, labels[a:b], batch_size=batch_size, first_index=a, progress=False,
                                     **sampler)
            rows[at:at + b - a] = images.permute(0, 2, 3, 1).numpy()
            at += b - a
        rows.flush()
    finally:
        del rows  # unmapped before the rename, or before a failure's clean-up removes the file
    os.replace(tmp, part)
    dist.barrier()
    first = None
    if dist.is_main():
        first = _assemble(path, labels, size, batch_size, world, keep)
    dist.barrier()  # every rank returns once the .npz is complete
    return first


def _assemble(path: Path, labels: torch.Tensor, size: int, batch_size: int, world: int, keep: int) -> torch.Tensor:
    """Rank 0: parts -> arr_0.npy (on disk, index order) -> the .npz (stored, zip64); parts removed."""
    n = len(labels)
    work = path.with_name(path.name + ".assemble")
    work.mkdir(exist_ok=True)
    arr = _reserved_memmap(work / "arr_0.npy", (n, size, size, 3))
    for r in range(world):
        part = _part_path(path, r, world)
        if not part.is_file():
            raise RuntimeError(f"sample part {part} is missing: did rank {r} fail?")
        rows, at = np.load(part, mmap_mode="r"), 0
        for a, b in rank_batches(n, batch_size, r, world):
            arr[a:b] = rows[at:at + b - a]
            at += b - a
        if at != len(rows):
            raise RuntimeError(f"sample part {part} holds {len(rows)} samples, expected {at}")
    first = torch.from_numpy(np.array(arr[:keep])).permute(0, 3, 1, 2)
    arr.flush()
    del arr
    np.save(work / "labels.npy", labels.numpy().astype(np.int64))
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:  # np.savez's layout
        zf.write(work / "arr_0.npy", "arr_0.npy")
        zf.write(work / "labels.npy", "labels.npy")
    os.replace(tmp, path)
    for r in range(world):
        _part_path(path, r, world).unlink()
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return first


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 [N,3,H,W] -> uint8 [H', W', 3] grid with `nrow` images per row (default ~sqrt(N))."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: Optional[int] = None, upscale: int = 1) -> Path:
    """Write a PNG grid of uint8 [N,3,H,W] images; `upscale` enlarges tiny images (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
    return path
