"""Where the REPA-E step's time goes, op by op and kernel by kernel: torch.profiler over a few full steps.

    python benchmarks/step_profile.py [--preset sit-xl2-f8d4] [--steps 3] [--warmup 3] [key=value ...] [--out F]

Builds what `repae bench step` builds (random weights at the config's sizes, a random batch on the device,
`init_device`'s settings, one autocast context per step), runs `--warmup` steps, then profiles `--steps` more,
and reports per step:

- the wall time (a device synchronisation after the last profiled step);
- on a GPU, the time the device was busy (the sum of its kernels, copies and memsets): the rest of the wall
  time the device waited for the host to launch work;
- the aten ops that took the most self time on the device (on a CPU: self CPU time), with their calls; with
  `train.compile=true` also each compiled graph (torch.compile's generated kernels: Triton on a GPU, C++ on a
  CPU, where each C++ kernel is listed too), which the aten ops alone would leave out;
- on a GPU, the kernels that took the most time.

`benchmarks/gpu_suite.sh` runs it as `profile_eager_b32` (SiT-XL/2 + f8d4, batch 32, eager): issue 19's eager goal
at batch 32 needs the step's time, and the part breakdown of `bench step` stops at VAE / SiT / LPIPS; and as
`profile_compile_b32` (the same, compiled) for the goals of the compiled step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from repae.bench import _sync, step_setup
from repae.config import load_config
from repae.nn_utils import init_device, resolve_precision
from repae.train.setup import compile_settings

# torch.compile's record functions: one around each call of a compiled graph, and on a CPU (with inductor's
# cpp.enable_kernel_profile) one around each generated C++ kernel
_COMPILED_GRAPH = re.compile(r"## Call CompiledFxGraph (\w+) ##")
_CPP_KERNEL = re.compile(r"graph_\d+_cpp_fused_\w+")


def _device_seconds(avg) -> float:
    # FunctionEventAvg keeps microseconds; the field was self_cuda_time_total before torch 2.4
    us = getattr(avg, "self_device_time_total", None)
    return (us if us is not None else getattr(avg, "self_cuda_time_total", 0.0)) / 1e6


def op_row(key: str) -> Optional[str]:
    """The name an event has in the ops table, None for an event that is not an op: an aten op by its name, a
    compiled graph's call as "compiled graph <first 9 of its hash>" (its self time is its generated kernels'),
    an inductor C++ kernel by its name."""
    if key.startswith("aten::") or _CPP_KERNEL.fullmatch(key):
        return key
    graph = _COMPILED_GRAPH.fullmatch(key)
    return f"compiled graph {graph.group(1)[:9]}" if graph else None


def summarise(prof, steps: int, wall_seconds: float, on_device: bool, top: int = 30) -> dict:
    """Per-step figures from a finished torch.profiler profile of `steps` steps that took `wall_seconds`.
    on_device: attribute ops by their kernels' device time (a GPU) instead of their self CPU time."""
    ops, kernels = [], []
    for avg in prof.key_averages():
        if on_device and avg.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append({"kernel": avg.key[:160], "calls_per_step": avg.count / steps,
                            "seconds_per_step": _device_seconds(avg) / steps})
        elif row := op_row(avg.key):
            seconds = _device_seconds(avg) if on_device else avg.self_cpu_time_total / 1e6
            if seconds > 0:
                ops.append({"op": row, "calls_per_step": avg.count / steps,
                            "seconds_per_step": seconds / steps})
    ops.sort(key=lambda r: -r["seconds_per_step"])
    kernels.sort(key=lambda r: -r["seconds_per_step"])
    busy = sum(k["seconds_per_step"] for k in kernels) if on_device else None
    step_seconds = wall_seconds / steps
    ops_seconds = sum(r["seconds_per_step"] for r in ops)
    for r in ops:
        r["share_of_step"] = r["seconds_per_step"] / step_seconds
    return {
        "steps_profiled": steps, "step_seconds": step_seconds,
        "device_busy_seconds_per_step": busy,
        "device_idle_share": None if busy is None else max(1 - busy / step_seconds, 0.0),
        "ops_self_seconds_per_step": ops_seconds,
        "top_ops": ops[:top], "top_kernels": kernels[:top],
    }


def profile_step(cfg, device: torch.device, steps: int = 3, warmup: int = 3) -> dict:
    import torch._inductor.config as inductor

    # On a CPU, each C++ kernel that inductor generates under its own name (it compiles in the first steps).
    # Not elsewhere: the setting is part of inductor's cache key, and on a GPU profile_compile_b32 reuses the
    # graphs loop_compile_b32 compiled (its kernels are Triton's, named in the profile anyway).
    with inductor.patch({"cpp.enable_kernel_profile": device.type == "cpu"}):
        return _profile_step(cfg, device, steps, warmup)


def _profile_step(cfg, device: torch.device, steps: int, warmup: int) -> dict:
    _, _, _, step = step_setup(cfg, device)
    for _ in range(warmup):
        step()
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - start
    return {"preset": cfg.preset, "device": str(device), "precision": resolve_precision(cfg.train.precision, device),
            "global_batch": cfg.train.global_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
            **compile_settings(cfg, device), **summarise(prof, steps, wall, on_device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--steps", type=int, default=3, help="steps profiled")
    p.add_argument("--warmup", type=int, default=3, help="steps run before (cuDNN autotuning, compile, lazy state)")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    cfg = load_config(args.preset, overrides=args.overrides)
    device = init_device(cfg)
    r = profile_step(cfg, device, args.steps, args.warmup)
    print(f"preset {r['preset']}, {r['device']}, {r['precision']}, batch {r['global_batch']}: "
          f"{r['step_seconds'] * 1e3:.1f} ms a step (profiled, {r['steps_profiled']} steps)")
    if r["device_busy_seconds_per_step"] is not None:
        print(f"  device busy {r['device_busy_seconds_per_step'] * 1e3:.1f} ms a step, idle "
              f"{100 * r['device_idle_share']:.1f}% of the step")
    print("  ops by self time a step:")
    for o in r["top_ops"][:15]:
        print(f"    {o['op'][:60]:60s} {o['seconds_per_step'] * 1e3:8.2f} ms {100 * o['share_of_step']:5.1f}%  "
              f"{o['calls_per_step']:6.0f} calls")
    for k in r["top_kernels"][:10]:
        print(f"    {k['seconds_per_step'] * 1e3:8.2f} ms {k['calls_per_step']:5.0f}x  {k['kernel'][:90]}")
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
