"""How close to the matmul peak can the REPA-E step's own matrices run? The ceiling of `repae bench step`'s
"fraction of peak" on this machine, measured op by op.

    python benchmarks/step_ceiling.py [--preset toy] [--small-batch 2] [key=value ...] [--out FILE.json]

`repae bench step` divides the step's FLOPs by its wall time and by the machine's matmul peak (a square
2048x2048 product on a CPU). A step made of smaller products cannot reach that peak however little else it
does. This records every matrix product and convolution (forward and backward) of one full step under the
run's autocast, runs each alone on fresh tensors of the same shapes, dtypes and strides, and reports

- ceiling: the step's matmul/conv FLOPs over the sum of those ops' times alone, as a fraction of the peak:
  what the step would reach if it did nothing but these ops, each at its own best speed;
- the same per op kind, and the ops that take the most time alone.

If the ceiling is below a goal on the fraction of peak, no change outside those matrices' shapes reaches it.

It also replays every other op of the step the same way (elementwise ops, norms, dtype casts, optimiser and EMA
kernels: all that the dispatcher runs), each less the time of calling a trivial op from Python:

- eager floor: the sum of every op's time alone. The step cannot run faster with these kernels: alone, an op
  runs on inputs that are hot in cache, with no autograd engine or Python between it and the next. The step's
  FLOPs over that time bound the fraction of peak any eager schedule of the same ops reaches; only other ops
  (fused or compiled kernels, other shapes) go past it. Ops whose replay fails on fresh tensors are left out
  (named in the output), which only lowers the floor.
- eager bound: the floor plus what the step costs outside its ops, measured as the step's time less its floor
  at `--small-batch` (2), where the ops are small: Python, module calls, the autograd engine and autocast's
  dispatch, which do not grow with the batch. About the best an eager step of these ops reaches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from repae.bench import matmul_peak, median_seconds, step_setup
from repae.config import load_config
from repae.nn_utils import resolve_precision

# the ops FlopCounterMode counts that do the step's arithmetic (its other ops do no matmul work)
_COUNTED = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}


def _signature(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), str(x.dtype), x.requires_grad)
    if isinstance(x, (list, tuple)):
        return tuple(_signature(v) for v in x)
    return repr(x)


class RecordOps(TorchDispatchMode):
    """The counted ops (every op with `every_op`) of the code run under it: {signature: [func, spec, count]}."""

    def __init__(self, every_op: bool = False):
        super().__init__()
        self.ops: dict = {}
        self.every_op = every_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.every_op or func.overloadpacket.__name__ in _COUNTED:
            key = (str(func), _signature(args), _signature(kwargs))
            if key not in self.ops:  # keep shapes only: fresh tensors are made for the replay
                spec = tree_map(lambda v: ("T", v.shape, v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v,
                                (args, kwargs))
                self.ops[key] = [func, spec, 0]
            self.ops[key][2] += 1
        return func(*args, **kwargs)


def _is_tensor_spec(v) -> bool:
    """A tensor as RecordOps keeps it: ("T", shape, stride, dtype)."""
    return isinstance(v, tuple) and len(v) == 4 and v[0] == "T"


def _fresh(spec, gen: torch.Generator):
    def make(v):
        if _is_tensor_spec(v):
            _, shape, stride, dtype = v
            # filled through a flat buffer: a broadcast (stride-0) input cannot be written through its own view
            size = 0 if 0 in shape else 1 + sum((n - 1) * st for n, st in zip(shape, stride))
            flat = torch.empty(size, dtype=dtype)
            flat = flat.normal_(generator=gen) if dtype.is_floating_point else flat.zero_()
            return flat.as_strided(shape, stride)
        return v
    return tree_map(make, spec, is_leaf=_is_tensor_spec)


def _kind(op: str) -> str:
    return op.split(".")[1]  # "aten.mm.default" -> "mm"


def eager_floor(rows: list, call_seconds: float) -> dict:
    """The sum of every op's time alone, each call less `call_seconds` (what calling any op from Python costs,
    which the step's autograd engine does not pay from Python), never below 0; and the same per op kind.
    rows: {"op", "count", "seconds_each"} per recorded signature."""
    kinds = defaultdict(lambda: {"calls": 0, "seconds_alone": 0.0})
    for r in rows:
        kind = kinds[_kind(r["op"])]
        kind["calls"] += r["count"]
        kind["seconds_alone"] += r["count"] * max(r["seconds_each"] - call_seconds, 0.0)
    return {"seconds_alone": sum(k["seconds_alone"] for k in kinds.values()),
            "calls": sum(k["calls"] for k in kinds.values()),
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["seconds_alone"]))}


def ceiling(cfg, iters: int = 5) -> dict:
    device = torch.device("cpu")
    n = cfg.train.global_batch_size
    *_, step = step_setup(cfg, device)  # the step `repae bench step` times
    recorder = RecordOps(every_op=True)
    step()  # warm-up: lazy buffers, optimiser state
    step_seconds = median_seconds(step, device, iters, 1)
    with recorder:
        step()
    precision = resolve_precision(cfg.train.precision, device)
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    rows, every, failed, tgen = [], [], defaultdict(int), torch.Generator().manual_seed(0)
    for (name, _, _), (func, spec, count) in recorder.ops.items():
        args, kwargs = _fresh(spec, tgen)
        counted = func.overloadpacket.__name__ in _COUNTED
        try:
            with FlopCounterMode(display=False) if counted else contextlib.nullcontext() as counter:
                func(*args, **kwargs)
            seconds = median_seconds(lambda: func(*args, **kwargs), device, iters, 1)
        except Exception:  # an op that cannot run on fresh tensors is left out of the floor (and named)
            if counted:
                raise  # the ceiling needs every counted op
            failed[name] += count
            continue
        every.append({"op": name, "count": count, "seconds_each": seconds})
        if not counted:
            continue
        tensors = [a for a in spec[0] if _is_tensor_spec(a)]
        shapes = [list(a[1]) for a in tensors]
        dtypes = sorted({str(a[3]).replace("torch.", "") for a in tensors})
        rows.append({"op": name, "shapes": shapes, "dtypes": dtypes, "count": count,
                     "flops": counter.get_total_flops() * count, "seconds_alone": seconds * count})
    trivial = torch.zeros(1)
    call_seconds = median_seconds(lambda: torch.ops.aten.alias.default(trivial), device, 101, 10)
    floor = eager_floor(every, call_seconds)
    flops = sum(r["flops"] for r in rows)
    alone = sum(r["seconds_alone"] for r in rows)
    kinds = defaultdict(lambda: {"flops": 0, "seconds_alone": 0.0})
    for r in rows:
        kinds[_kind(r["op"])]["flops"] += r["flops"]
        kinds[_kind(r["op"])]["seconds_alone"] += r["seconds_alone"]
    rows.sort(key=lambda r: -r["seconds_alone"])
    return {
        "preset": cfg.preset, "precision": precision, "threads": torch.get_num_threads(), "global_batch": n,
        "matmul_peak_flops": peak, "step_seconds": step_seconds,
        "step_fraction_of_peak": flops / step_seconds / peak,
        "matmul_conv_flops": flops, "matmul_conv_seconds_alone": alone,
        "ceiling_fraction_of_peak": flops / alone / peak,
        "share_of_step_in_these_ops_alone": alone / step_seconds,
        "by_kind": {k: {**v, "fraction_of_peak": v["flops"] / v["seconds_alone"] / peak}
                    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]["seconds_alone"])},
        "slowest_ops": [{**r, "fraction_of_peak": r["flops"] / r["seconds_alone"] / peak} for r in rows[:12]],
        "every_op": {
            "calls": floor["calls"], "call_seconds": call_seconds,
            "floor_seconds": floor["seconds_alone"],
            "floor_fraction_of_peak": flops / floor["seconds_alone"] / peak,
            "step_seconds_over_floor": step_seconds - floor["seconds_alone"],
            "by_kind": dict(list(floor["by_kind"].items())[:20]),
            "left_out": [{"op": op, "count": c} for op, c in sorted(failed.items())],
        },
    }


def eager_bound(r: dict, small: dict) -> dict:
    """r's floor plus what the same step pays outside its ops at a small batch (`small`, another `ceiling`
    result): Python, module calls, the autograd engine, autocast's dispatch, costs that do not grow with the
    batch. An estimate of the best an eager step of r's ops reaches, as time and as a fraction of r's peak."""
    outside = max(small["step_seconds"] - small["every_op"]["floor_seconds"], 0.0)
    seconds = r["every_op"]["floor_seconds"] + outside
    return {"small_batch": small["global_batch"], "small_batch_step_seconds": small["step_seconds"],
            "small_batch_floor_seconds": small["every_op"]["floor_seconds"], "outside_ops_seconds": outside,
            "seconds": seconds, "fraction_of_peak": r["matmul_conv_flops"] / seconds / r["matmul_peak_flops"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions of each op (median)")
    p.add_argument("--small-batch", type=int, default=2,
                   help="also run the step at this global batch to measure its cost outside the ops (0: no)")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    r = ceiling(load_config(args.preset, overrides=args.overrides), args.iters)
    print(f"preset {r['preset']}, {r['precision']}, {r['threads']} threads, batch {r['global_batch']}: "
          f"matmul peak {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s")
    print(f"  the step: {r['step_seconds'] * 1e3:.1f} ms, {100 * r['step_fraction_of_peak']:.1f}% of peak")
    print(f"  its matmuls and convolutions alone: {r['matmul_conv_seconds_alone'] * 1e3:.1f} ms "
          f"({100 * r['share_of_step_in_these_ops_alone']:.0f}% of the step), ceiling "
          f"{100 * r['ceiling_fraction_of_peak']:.1f}% of peak")
    for kind, v in r["by_kind"].items():
        print(f"    {kind:45s} {v['seconds_alone'] * 1e3:8.1f} ms  {100 * v['fraction_of_peak']:5.1f}% of peak")
    e = r["every_op"]
    print(f"  every op of the step alone ({e['calls']} calls, each less {e['call_seconds'] * 1e6:.2f} us for calling "
          f"an op from Python): {e['floor_seconds'] * 1e3:.1f} ms, so no eager schedule of these ops passes "
          f"{100 * e['floor_fraction_of_peak']:.1f}% of peak; the step takes "
          f"{e['step_seconds_over_floor'] * 1e3:.1f} ms more")
    for kind, v in list(e["by_kind"].items())[:12]:
        print(f"    {kind:45s} {v['seconds_alone'] * 1e3:8.1f} ms  {v['calls']:5d} calls")
    if e["left_out"]:
        print("  left out (their replay failed on fresh tensors): "
              + ", ".join(f"{x['op']} x{x['count']}" for x in e["left_out"]))
    if args.small_batch:
        small = ceiling(load_config(args.preset, overrides=[*args.overrides,
                                                            f"train.global_batch_size={args.small_batch}"]),
                        args.iters)
        b = r["eager_bound"] = eager_bound(r, small)
        print(f"  at batch {b['small_batch']} the step takes {b['small_batch_step_seconds'] * 1e3:.1f} ms, "
              f"{b['outside_ops_seconds'] * 1e3:.1f} ms more than its ops alone; with that added, the floor above "
              f"is {b['seconds'] * 1e3:.1f} ms, {100 * b['fraction_of_peak']:.1f}% of peak: about the best an "
              f"eager step of these ops reaches")
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
