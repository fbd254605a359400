"""`repae bench loop`: images/s of the training loop `repae train` runs, loop against loop.

`repae bench step` times `repae_step` on a batch already on the device. This times
`repae.train.loop.train_steps` itself, the code `repae train` runs: the data source (a packed store
of random images read through the DataLoader with `data.num_workers` workers), the host-to-device
copy, the step, the per-step weight check (one host sync), EMA, and logging at the config's
`train.log_every`. It is the counterpart of `benchmarks/reference_step.py`, which times the
reference implementation's whole loop iteration, and uses its defaults: 12 steps, the first 2 not
timed (compilation and set-up happen there), a time stamp after a device synchronisation at each
finished step, peak memory from after the untimed steps. Checkpoints and sample grids are off
(`ckpt_every`/`sample_every` = 10^9, as reference_step.py sets the reference's).

Models have random weights (no weight file needed; speed depends on neither weights nor pixels):

    repae bench loop --preset toy --steps 12 --out loop.json
    repae bench loop --preset sit-xl2-f8d4 train.global_batch_size=32 --out loop.json   # compiled on a GPU by default
    repae bench loop --preset sit-xl2-f8d4 --iters 0 --step-iters 3   # + bench step's figure, same process

`--step-iters N` also times N bare steps after the loop (`bench step`'s figure): in the same process a compiled
run reuses the loop's graphs, where a `bench step` of its own compiles again.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
import torch

from repae.bench import (_batch, _sync, count_flops, full_steps, matmul_peak, median_seconds, peak_memory_bytes,
                          random_trainables, time_parts)
from repae.config import RunConfig
from repae.nn_utils import resolve_precision
from repae.train.setup import compile_settings, conv_layouts

if TYPE_CHECKING:
    from repae.train.loop import Run

STORE_IMAGES = 256  # distinct images in the random store; the loop goes round them as epochs


class _Enough(Exception):
    """Raised from the step hook to leave the loop after the last timed step (no end-of-run work)."""


def random_image_store(root: str | Path, size: int, num_classes: int, count: int = STORE_IMAGES,
                       num_workers: int = 0) -> Path:
    """A packed store (`repae prepare-data`'s format and default codec) of `count` random size-px
    images in min(num_classes, 10) classes under `root`; reused when it is already there.
    The images are smooth random colour fields plus noise: compressible like photos are, not noise."""
    from PIL import Image

    from repae.data.packed import PackedDataError, read_manifest, write_packed

    root = Path(root)
    packed = root / f"packed-{size}px-{count}"
    try:
        read_manifest(packed)
        return packed
    except (PackedDataError, FileNotFoundError, ValueError):
        pass
    src = root / f"src-{size}px-{count}"
    rng = np.random.default_rng(0)
    classes = max(1, min(num_classes, 10))
    for i in range(count):
        folder = src / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(coarse, np.int16) + rng.integers(-6, 7, (size, size, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png", compress_level=1)
    write_packed(src, packed, image_size=size, num_workers=num_workers, progress=False)
    for f in sorted(src.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    src.rmdir()
    return packed


def bench_loop(cfg: RunConfig, device: torch.device, steps: int = 12, skip: int = 2, parts_iters: int = 5,
               parts_warmup: int = 2, data_dir: Optional[str] = None, step_iters: int = 0) -> dict:
    """Time `steps` steps of the training loop, the first `skip` left out; then, on the same
    trainables, the per-part breakdown of `repae bench step` (`parts_iters` = 0: none), FLOPs of one
    step and the measured matmul peak; and with `step_iters` > 0, `repae bench step`'s own figure, the
    median of that many full steps on a batch already on the device ("bare_step"), in this process:
    a compiled run reuses the loop's graphs where a `bench step` of its own would compile them again.
    Returns the result dict (JSON-ready)."""
    if steps <= skip or skip < 0:
        raise ValueError(f"need steps > skip >= 0 (got steps={steps}, skip={skip})")
    with loop_config(cfg, data_dir) as cfg:
        return _time_loop(cfg, device, steps, skip, parts_iters, parts_warmup, step_iters)


@contextmanager
def loop_config(cfg: RunConfig, data_dir: Optional[str] = None) -> Iterator[RunConfig]:
    """A copy of `cfg` whose training loop reads a packed store of random images (made under `data_dir`
    and kept there, else in a temporary folder removed afterwards) and writes nothing: no checkpoints or
    sample grids (`ckpt_every`/`sample_every` = 10^9, as reference_step.py sets the reference's)."""
    with tempfile.TemporaryDirectory(prefix="repae-bench-loop-") as tmp:
        store = random_image_store(data_dir or tmp, cfg.data.image_size, cfg.model.num_classes,
                                   num_workers=min(8, cfg.data.num_workers))
        cfg = copy.deepcopy(cfg)
        cfg.data.source, cfg.data.path, cfg.latents.path = "packed", str(store), None
        cfg.output_dir, cfg.exp_name = tmp, "bench-loop"
        cfg.train.ckpt_every = cfg.train.sample_every = 10**9
        yield cfg


def loop_run(cfg: RunConfig, device: torch.device) -> "Run":
    """The training loop's state (a `repae.train.loop.Run`) on random trainables and `cfg`'s data."""
    from repae.data.sources import training_batches
    from repae.train.loop import Run

    m = random_trainables(cfg, device)
    data = training_batches(cfg, pin_memory=device.type == "cuda")  # as repae train's
    return Run(cfg, device, m, data, torch.Generator(device).manual_seed(cfg.train.seed))


def run_loop_steps(run: "Run", steps: int, on_step: Callable[[int], None], on_log: Callable[[dict], None] = lambda r: None) -> None:
    """`steps` steps of the training loop `repae train` runs, `on_step(step)` after each, then out of the
    loop before its end-of-run work (the final checkpoint and sample grid), its DataLoader workers let go."""
    from repae.train.loop import train_steps

    def hook(step: int) -> None:
        on_step(step)
        if step == steps:
            raise _Enough

    try:  # one step past the budget: the hook leaves after step `steps`
        train_steps(run, steps + 1, on_log=on_log, progress=False, on_step=hook)
    except _Enough:
        pass
    finally:
        run.data._it = None  # the workers go now, not when the run is collected


def _time_loop(cfg: RunConfig, device: torch.device, steps: int, skip: int, parts_iters: int,
               parts_warmup: int, step_iters: int = 0) -> dict:
    started = time.perf_counter()
    run = loop_run(cfg, device)
    m = run.m
    log_lines: list = []
    _sync(device)
    marks = [time.perf_counter()]  # marks[k]: step k finished (k=0: the loop starts)

    def on_step(step: int) -> None:
        _sync(device)
        marks.append(time.perf_counter())
        if step == skip and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    if skip == 0 and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_loop_steps(run, steps, on_step, on_log=log_lines.append)
    peak_memory = peak_memory_bytes(device)
    step_seconds = [b - a for a, b in zip(marks[skip:], marks[skip + 1:])]
    n = cfg.train.global_batch_size
    result = {
        "benchmark": "repae bench loop (repae.train.loop.train_steps)", "preset": cfg.preset,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": resolve_precision(cfg.train.precision, device), **compile_settings(cfg, device),
        "layout": conv_layouts(cfg, device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "global_batch": n, "grad_accum_steps": cfg.train.grad_accum_steps,
        "steps": steps, "skipped_steps": skip, "timed_steps": len(step_seconds), "step_seconds": step_seconds,
        "step_seconds_median": statistics.median(step_seconds),
        "images_per_s": n / statistics.median(step_seconds),
        "images_per_s_total": n * len(step_seconds) / sum(step_seconds),
        "peak_memory_bytes": peak_memory,
        "peak_memory_kind": "cuda max_memory_allocated after the skipped steps" if device.type == "cuda"
        else "process peak RSS (whole run)",
        "data": {"format": "packed", "codec": "webp", "images": STORE_IMAGES, "image_size": cfg.data.image_size,
                 "num_workers": cfg.data.num_workers},
        "log_every": cfg.train.log_every, "log_lines_in_run": len(log_lines),
    }
    images, labels = _batch(cfg, device, n // cfg.train.grad_accum_steps)
    if parts_iters > 0:
        result["parts_seconds_per_micro_batch"] = time_parts(m, cfg, images, labels, run.gen, parts_iters,
                                                             parts_warmup)
    batches = [(images, labels)] * cfg.train.grad_accum_steps
    flops = count_flops(full_steps(m, batches, cfg, run.gen, device, first_step=run.step))
    peak = matmul_peak(device, torch.bfloat16 if result["precision"] == "bf16" else torch.float32)
    result.update(flops_per_image=flops / n, achieved_flops=flops / result["step_seconds_median"],
                  matmul_peak_flops=peak, fraction_of_peak=flops / result["step_seconds_median"] / peak)
    if step_iters > 0:
        result["bare_step"] = _time_bare_step(run, batches, step_iters, flops, peak)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _time_bare_step(run: "Run", batches: list, iters: int, flops: int, peak: float) -> dict:
    """What `repae bench step` measures, on the loop's trainables: the median seconds of `iters` full
    REPA-E steps (after one untimed) on micro-batches already on the device, each under an autocast context
    of its own, continuing the loop's step count; its FLOP rate against the matmul peak; peak memory."""
    cfg, device = run.cfg, run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(full_steps(run.m, batches, cfg, run.gen, device, first_step=run.step), device, iters,
                             warmup=1)
    n = cfg.train.global_batch_size
    return {"benchmark": "repae bench step's full step (repae_step on a batch on the device), after the loop",
            "iters": iters, "warmup": 1, "step_seconds_median": seconds, "images_per_s": n / seconds,
            "achieved_flops": flops / seconds, "fraction_of_peak": flops / seconds / peak,
            "peak_memory_bytes": peak_memory_bytes(device)}


def print_loop(r: dict) -> None:
    print(f"training loop, preset {r['preset']}, {r['device_name']} ({r['threads']} threads), {r['precision']}, "
          f"compile={r['compile']}, batch {r['global_batch']}: {r['images_per_s']:.1f} images/s median "
          f"({r['step_seconds_median'] * 1e3:.1f} ms/step), {r['images_per_s_total']:.1f} images/s over all "
          f"{r['timed_steps']} timed steps (first {r['skipped_steps']} of {r['steps']} left out); peak memory "
          f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})")
    parts = r.get("parts_seconds_per_micro_batch") or {}
    total = sum(parts.values()) or 1.0
    for name, sec in parts.items():
        print(f"  {name:24s} {sec * 1e3:9.1f} ms  ({100 * sec / total:4.1f}% of parts)")
    print(f"  FLOPs/image {r['flops_per_image'] / 1e9:.3f} GFLOP; {100 * r['fraction_of_peak']:.1f}% of the "
          f"measured {r['precision']} matmul peak ({r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
    bare = r.get("bare_step")
    if bare:
        print(f"  bare step (as `repae bench step`, batch on the device): {bare['images_per_s']:.1f} images/s "
              f"({bare['step_seconds_median'] * 1e3:.1f} ms, median of {bare['iters']}), "
              f"{100 * bare['fraction_of_peak']:.1f}% of the peak, peak memory {bare['peak_memory_bytes'] / 2**20:.0f} MiB")
