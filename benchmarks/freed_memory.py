"""What glibc's default handling of freed memory costs on a CPU, and what repae.freed_memory gives back.

    python benchmarks/freed_memory.py [--rounds 2] [--out FILE.json]

Each workload runs in fresh processes, alternating: glibc's defaults (REPAE_SYSTEM_MALLOC=1) and
`reuse_freed_memory()` (what the repae CLI sets). Each process warms up, then reports the median time and the
minor page faults per iteration (getrusage). Workloads:

- toy-step: one REPA-E step of the toy preset, batch 64, bf16 autocast (the default run's step);
- inception: the FID Inception network (random weights) on a batch of 32 uint8 images at 256 px, no grad
  (what `repae evaluate fid` does per batch on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _toy_step():
    from repae.bench import _batch, in_own_autocast, random_trainables
    from repae.config import load_config
    from repae.train.step import repae_step

    cfg = load_config("toy", overrides=["train.precision=bf16"])
    m = random_trainables(cfg, torch.device("cpu"))
    images, labels = _batch(cfg, torch.device("cpu"), cfg.train.global_batch_size)
    gen, step = torch.Generator().manual_seed(0), [0]

    def run():
        in_own_autocast(lambda: repae_step(m, [(images, labels)], cfg, step[0], gen), cfg, torch.device("cpu"))()
        step[0] += 1
    return run


def _inception():
    from repae.models.inception import InceptionV3

    torch.manual_seed(0)
    net = InceptionV3().eval()
    images = torch.randint(0, 256, (32, 3, 256, 256), dtype=torch.uint8)

    def run():
        with torch.no_grad():
            net(images)
    return run


# name: (make the workload's one iteration, warm-up iterations, timed iterations)
WORKLOADS = {"toy-step": (_toy_step, 3, 15), "inception": (_inception, 2, 6)}


def worker(name: str) -> dict:
    from repae.freed_memory import reuse_freed_memory

    reused = reuse_freed_memory()
    make, warmup, iters = WORKLOADS[name]
    run = make()
    for _ in range(warmup):
        run()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {"workload": name, "reuse_freed_memory": reused, "median_seconds": statistics.median(times),
            "faults_per_iteration": faults / iters, "iterations": iters,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    results = []
    for name in args.workloads:
        for _ in range(args.rounds):
            for system in ("1", "0"):
                env = dict(os.environ, REPAE_SYSTEM_MALLOC=system)
                out = subprocess.run([sys.executable, __file__, "--worker", name], env=env, capture_output=True,
                                     text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(r)
                print(f"{name:10s} {'reused' if r['reuse_freed_memory'] else 'glibc defaults':15s} "
                      f"median {r['median_seconds'] * 1e3:8.1f} ms  {r['faults_per_iteration']:9.0f} faults/iteration  "
                      f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if args.out:
        record = {"command": "python benchmarks/freed_memory.py " + " ".join(sys.argv[1:]),
                  "threads": torch.get_num_threads(), "results": results}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
