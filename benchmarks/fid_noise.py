"""How far one checkpoint's toy FID moves between sampler seeds, against the bootstrap estimate
(`fid_noise`) that every reproduction measurement records: the noise floor of the report's verdicts.

    python benchmarks/fid_noise.py RUN/checkpoints/step-0001200 [--samples 500] [--draws 5] [--guided]

The first draw uses the reproduction's own sampler seed (sample.seed + 1), so its FID is the one the
run's reproduce-metrics.json holds; the others use sample.seed + 100, + 107, ... (each + 1 inside, as the
reproduction's). Prints one line per draw and the std over the draws, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from repae.dist import device_named
from repae.reproduce.measure import judges_for, sample_metrics
from repae.train.checkpoint import load_for_sampling


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--samples", type=int, default=500, help="class-balanced samples per draw")
    p.add_argument("--draws", type=int, default=5, help="sampler seeds")
    p.add_argument("--guided", action="store_true", help="the run's sampler with its CFG (default: without CFG)")
    args = p.parse_args(argv)
    cfg, sit, vae = load_for_sampling(args.checkpoint)  # loaded once: a draw changes only the sampler seed
    judges = judges_for(cfg)
    device = device_named(cfg.train.device)
    sit, vae = sit.to(device), vae.to(device)
    suffix = "" if args.guided else "_unguided"
    run_seed, draws = cfg.sample.seed, []
    for i in range(args.draws):
        # sample_metrics samples with sample.seed + 1: draw 0 is the reproduction's own measurement
        cfg.sample.seed = run_seed if i == 0 else run_seed + 100 + 7 * (i - 1)
        m = sample_metrics(cfg, sit, vae, judges, args.samples, device, guided=args.guided)
        draws.append(m)
        print(json.dumps({"draw": i, **m}), flush=True)
    fids = [m["fid" + suffix] for m in draws]
    print(json.dumps({"samples": args.samples, "guided": args.guided, "fids": fids,
                      "std_over_draws": statistics.stdev(fids) if len(fids) > 1 else None,
                      "bootstrap_noise_first_draw": draws[0]["fid_noise" + suffix]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
