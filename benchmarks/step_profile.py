"""Where the REPA-E step's time goes, op by op and kernel by kernel: torch.profiler over a few full steps.

    python benchmarks/step_profile.py [--preset sit-xl2-f8d4] [--steps 3] [--warmup 3] [--loop [--data-dir D]]
                                      [key=value ...] [--out F]

Builds what `repae bench step` builds (random weights at the config's sizes, a random batch on the device,
`init_device`'s settings, one autocast context per step), runs `--warmup` steps, then profiles `--steps` more.
With `--loop`, the steps are those of the training loop as `repae bench loop` runs it (a packed store of random
images through the DataLoader, the host-to-device copies, the per-step checks, EMA, logging): what the device
does between steps shows too. Reports per step:

- the wall time (a device synchronisation after the last profiled step);
- on a GPU, the time the device was busy (the sum of its kernels, copies and memsets): the rest of the wall
  time the device waited for the host to launch work;
- the aten ops that took the most self time on the device (on a CPU: self CPU time), with their calls; with
  `train.compile=true` also each compiled graph (torch.compile's generated kernels: Triton on a GPU, C++ on a
  CPU, where each C++ kernel is listed too), which the aten ops alone would leave out;
- on a GPU, the kernels that took the most time;
- on a GPU, where the device waited for its host: the gaps between its kernels, by the op that launched the
  kernel after each gap, and the largest;
- on a GPU, each operation that made the host wait for the device (torch's CUDA sync debug mode: `.item()`, a
  copy to the host, a blocking copy from the host, ...), counted by the line of Python that called it.

`benchmarks/gpu_suite.sh` runs it with `--loop` as `profile_eager_b32` (SiT-XL/2 + f8d4, batch 32, eager): issue
19's eager goal at batch 32 needs the loop's time, and the part breakdown of `bench step` stops at VAE / SiT / LPIPS
and times each part alone (a part whose host work outlasts its kernels, as a SiT's many small launches may, counts
its host time there); and as `profile_compile_b32` (the same, compiled) for the goals of the compiled step.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
import traceback
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

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
# what torch's CUDA sync debug mode warns at each operation that makes the host wait for the device
SYNC_WARNING = "called a synchronizing CUDA operation"


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


REPO = Path(__file__).resolve().parents[1]


def _short(path: str) -> str:
    """A source file's path from the package root (site-packages, src/) or else from the checkout's root."""
    unix = path.replace("\\", "/")
    for root in ("site-packages/", "/src/"):
        if root in unix:
            return unix.split(root, 1)[1]
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path


def sync_site(filename: str, lineno: int, stack: list) -> str:
    """"file:line function" of the Python line that made a warned sync, then ("<") the two nearest callers
    outside torch (a sync in torch's own Python, or in backward, is named by the code that called it), from
    the stack at the time of the warning (traceback.extract_stack()); its line alone if not on it."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i].filename == filename and stack[i].lineno == lineno:
            callers = [f for f in reversed(stack[:i]) if not _short(f.filename).startswith("torch/")][:2]
            return " < ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in [stack[i], *callers])
    return f"{_short(filename)}:{lineno}"


@contextmanager
def host_syncs(device: torch.device) -> Iterator[Optional[collections.Counter]]:
    """On a CUDA device, counts the operations in the block that made the host wait for the device, by where
    they were called (sync_site); torch's sync debug mode warns at each, and those warnings are taken here
    instead of printed. Yields the Counter, filled as the block runs; elsewhere yields None."""
    if device.type != "cuda":
        yield None
        return
    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=SYNC_WARNING)  # each time, not once per line
        show = warnings.showwarning

        def take(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):
                sites[sync_site(filename, lineno, traceback.extract_stack())] += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = take
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(before)


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


def _launch_context(op, depth: int = 3) -> str:
    """The op that launched a kernel and its enclosing ops, innermost first ("aten::mm < aten::linear")."""
    names = []
    while op is not None and len(names) < depth:
        names.append(op.name)
        op = op.cpu_parent
    return " < ".join(names) if names else "(no launching op recorded)"


def device_gaps(events, steps: int, top: int = 10) -> Optional[dict]:
    """Where the device waited for its host, from a profile's events (FunctionEvents; times in us): the gaps
    on the device's timeline between one kernel (or copy, memset) ending and the next starting, grouped by
    the op that launched the kernel after the gap, and the largest single gaps. None without device events.
    A gap before a kernel says the host had not launched it yet: the host was busy, or waiting (a sync)."""
    device_type = torch.autograd.DeviceType.CUDA
    kernels = sorted((e for e in events if e.device_type == device_type), key=lambda e: e.time_range.start)
    if not kernels:
        return None
    # the op that launched a kernel: the CPU op whose correlation id the kernel links to (a field of torch's
    # FunctionEvent in the torch this was written for; without it the gaps are found all the same, unnamed)
    link = lambda e: getattr(e, "linked_correlation_id", None)  # noqa: E731
    launchers = {e.id: e for e in events
                 if e.device_type != device_type and not e.is_async and link(e) == 0 and e.id > 0}
    groups: collections.defaultdict = collections.defaultdict(lambda: [0.0, 0])
    gaps = []
    busy_until, previous = kernels[0].time_range.end, kernels[0]
    for k in kernels[1:]:
        if k.time_range.start > busy_until:
            gap = (k.time_range.start - busy_until) / 1e6
            where = _launch_context(launchers.get(link(k)))
            groups[where][0] += gap
            groups[where][1] += 1
            gaps.append({"seconds": gap, "at_seconds": (busy_until - kernels[0].time_range.start) / 1e6,
                         "after_kernel": previous.name[:120], "before_kernel": k.name[:120], "launched_by": where})
        if k.time_range.end > busy_until:
            busy_until, previous = k.time_range.end, k
    total = sum(g["seconds"] for g in gaps)
    return {
        "gap_seconds_per_step": total / steps, "gaps_per_step": len(gaps) / steps,
        "span_seconds_per_step": (busy_until - kernels[0].time_range.start) / 1e6 / steps,
        "by_launching_op": [{"launched_by": w, "seconds_per_step": t / steps, "gaps_per_step": n / steps}
                            for w, (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]],
        "largest": sorted(gaps, key=lambda g: -g["seconds"])[:top],
    }


def profile_step(cfg, device: torch.device, steps: int = 3, warmup: int = 3, loop: bool = False,
                 data_dir: Optional[str] = None, top: int = 30) -> dict:
    """The profile of `steps` steps after `warmup`: of `repae bench step`'s step, or with `loop` of the training
    loop's (repae.bench_loop, its random image store made under `data_dir`, else in a temporary folder)."""
    import torch._inductor.config as inductor

    # On a CPU, each C++ kernel that inductor generates under its own name (it compiles in the first steps).
    # Not elsewhere: the setting is part of inductor's cache key, and on a GPU profile_compile_b32 reuses the
    # graphs loop_compile_b32 compiled (its kernels are Triton's, named in the profile anyway).
    with inductor.patch({"cpp.enable_kernel_profile": device.type == "cpu"}):
        if loop:
            return _profile_loop(cfg, device, steps, warmup, data_dir, top)
        return _profile_step(cfg, device, steps, warmup, top)


class _Window:
    """The profiled steps: torch.profiler and the count of host syncs from a device synchronisation before them
    to one after; `wall` seconds between the two (the final synchronisation's wait included, not counted)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._profiling, self._counting = ExitStack(), ExitStack()

    def __enter__(self) -> "_Window":
        _sync(self.device)
        self.prof = self._profiling.enter_context(profile(activities=self.activities))
        self.syncs = self._counting.enter_context(host_syncs(self.device))
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._counting.close()
        _sync(self.device)
        self.wall = time.perf_counter() - self._start
        self._profiling.close()


def _profile_step(cfg, device: torch.device, steps: int, warmup: int, top: int = 30) -> dict:
    _, _, _, step = step_setup(cfg, device)
    for _ in range(warmup):
        step()
    with _Window(device) as window:
        for _ in range(steps):
            step()
    return _record(cfg, device, window, steps, False, top)


def _profile_loop(cfg, device: torch.device, steps: int, warmup: int, data_dir: Optional[str], top: int) -> dict:
    from repae.bench_loop import loop_config, loop_run, run_loop_steps

    with loop_config(cfg, data_dir) as loop_cfg, ExitStack() as stack:
        run = loop_run(loop_cfg, device)
        window = _Window(device)

        def on_step(step: int) -> None:  # after each finished step
            if step == warmup:
                stack.enter_context(window)
            elif step == warmup + steps:
                stack.close()

        if warmup == 0:
            stack.enter_context(window)
        run_loop_steps(run, warmup + steps, on_step)  # the window closes after the last step
    return _record(cfg, device, window, steps, True, top)


def _device_gaps_or_why(prof, steps: int):
    try:  # an addition to the profile: a profiler whose events lack a field must not cost the rest
        return device_gaps(prof.events(), steps)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def _record(cfg, device: torch.device, window: _Window, steps: int, loop: bool, top: int) -> dict:
    syncs = None if window.syncs is None else sorted(window.syncs.items(), key=lambda kv: -kv[1])
    return {"preset": cfg.preset, "device": str(device), "precision": resolve_precision(cfg.train.precision, device),
            "loop": loop, "global_batch": cfg.train.global_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
            **compile_settings(cfg, device), **summarise(window.prof, steps, window.wall, device.type == "cuda", top),
            "device_gaps": _device_gaps_or_why(window.prof, steps) if device.type == "cuda" else None,
            "host_syncs_per_step": None if syncs is None else sum(n for _, n in syncs) / steps,
            "host_sync_sites": None if syncs is None else [{"site": k, "per_step": n / steps} for k, n in syncs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--steps", type=int, default=3, help="steps profiled")
    p.add_argument("--warmup", type=int, default=3, help="steps run before (cuDNN autotuning, compile, lazy state)")
    p.add_argument("--loop", action="store_true",
                   help="profile the training loop's steps (data, copies, checks, EMA, logging), not bench step's")
    p.add_argument("--data-dir", help="with --loop: make and keep the random image store here (default: a temporary one)")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.data_dir and not args.loop:
        p.error("--data-dir is for --loop")
    cfg = load_config(args.preset, overrides=args.overrides)
    device = init_device(cfg)
    r = profile_step(cfg, device, args.steps, args.warmup, args.loop, args.data_dir)
    print(f"preset {r['preset']}, {r['device']}, {r['precision']}, batch {r['global_batch']}: "
          f"{r['step_seconds'] * 1e3:.1f} ms a {'loop ' if r['loop'] else ''}step (profiled, {r['steps_profiled']} steps)")
    if r["device_busy_seconds_per_step"] is not None:
        print(f"  device busy {r['device_busy_seconds_per_step'] * 1e3:.1f} ms a step, idle "
              f"{100 * r['device_idle_share']:.1f}% of the step")
    print("  ops by self time a step:")
    for o in r["top_ops"][:15]:
        print(f"    {o['op'][:60]:60s} {o['seconds_per_step'] * 1e3:8.2f} ms {100 * o['share_of_step']:5.1f}%  "
              f"{o['calls_per_step']:6.0f} calls")
    for k in r["top_kernels"][:10]:
        print(f"    {k['seconds_per_step'] * 1e3:8.2f} ms {k['calls_per_step']:5.0f}x  {k['kernel'][:90]}")
    gaps = r["device_gaps"]
    if gaps and "error" not in gaps:
        print(f"  device waiting between kernels: {gaps['gap_seconds_per_step'] * 1e3:.1f} ms a step "
              f"({gaps['gaps_per_step']:.0f} gaps); before kernels launched by:")
        for g in gaps["by_launching_op"][:8]:
            print(f"    {g['seconds_per_step'] * 1e3:8.2f} ms {g['gaps_per_step']:5.0f}x  {g['launched_by'][:100]}")
    elif gaps:
        print(f"  device gaps not read: {gaps['error']}")
    if r["host_syncs_per_step"] is not None:
        print(f"  host syncs: {r['host_syncs_per_step']:g} a step")
        for site in r["host_sync_sites"][:10]:
            print(f"    {site['per_step']:5g}x  {site['site'][:140]}")
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
