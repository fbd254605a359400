"""Where a checkpoint's samples differ from real images, factor by factor: the toy evaluator (toy world v8) reads
each image's scene factors (shape colour, background colours and contrast, shape size, the shapes' area and
centre) off its mean token; this compares the distribution of those readings over samples with that over real
held-out images: the mean shift in units of the real images' spread, and the ratio of spreads (1: as varied as
real images). Toy FID sums such differences over all features; this names them.

    python benchmarks/sample_factors.py RUN/checkpoints/step-N [RUN2/checkpoints/step-N ...] [--samples 1000] [--guided]

Samples: class-balanced labels, the run's sampler with the reproduction's seed (sample.seed + 1), without CFG
unless --guided: the samples `repae bench reproduce` measures. Prints one JSON line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sample_confidence import reproduction_samples  # benchmarks/, on the path when run as a script

from repae.data.toy import toy_arrays
from repae.toyworld import EVALUATOR_FACTORS


@torch.no_grad()
def readings(evaluator, images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,32,32] -> the evaluator's standardised factor readings [N,F]."""
    return torch.cat([evaluator.factor_predictions(evaluator(images[i : i + 500])) for i in range(0, len(images), 500)])


def compare(samples: torch.Tensor, real: torch.Tensor) -> dict:
    """{factor: (mean shift in real stds, std ratio)} between readings [N,F] and [M,F]."""
    shift = (samples.mean(0) - real.mean(0)) / real.std(0)
    ratio = samples.std(0) / real.std(0)
    return {name: [round(a, 3), round(b, 3)] for name, a, b in zip(EVALUATOR_FACTORS, shift.tolist(), ratio.tolist())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--guided", action="store_true", help="with the run's CFG (default: without)")
    args = p.parse_args(argv)
    real = None
    for ckpt, world, evaluator, images, _ in reproduction_samples(args.checkpoints, args.samples, args.guided):
        if real is None:
            real = readings(evaluator, world.heldout_images)
            other_real = torch.from_numpy(toy_arrays(args.samples, seed=4242)[0])  # the noise floor
            print(json.dumps({"checkpoint": f"{args.samples} other real images (seed 4242)",
                              "shift_and_spread": compare(readings(evaluator, other_real), real)}))
        print(json.dumps({"checkpoint": str(ckpt), "guided": args.guided,
                          "shift_and_spread": compare(readings(evaluator, images), real)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
