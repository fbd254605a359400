"""Toy FID split into "which classes the samples are" and "how well each class is drawn".

    python benchmarks/class_mix_fid.py RUN/checkpoints/step-N [RUN2/checkpoints/step-N ...] [--samples 2000] [--guided | --cfg S]

Toy FID compares the samples' features with real held-out images of a uniform class mixture. A model can draw
every class better than another and still score worse if the classes its samples end up as (what the toy
evaluator reads them as, whatever was asked) are further from uniform. Per checkpoint this prints:

- toy_fid: the reproduction's number (reference: all held-out images);
- toy_fid_own_class_mix: the same samples against a reference with the samples' own class mixture: the
  Gaussian of the mixture of the held-out classes' Gaussians, weighted by the evaluator's class counts of the
  samples (exact, no resampling); what toy FID would be if the mixture were right and nothing else changed;
- mean_within_class_fid: per class the evaluator reads at least --min-per-class samples as, the FID between
  those samples and that class's held-out images, averaged over the classes (biased upwards by the few samples
  per class, alike for every run with as many samples);
- class_mix_deviation: sum over classes of |read count - asked count| / samples (0: the asked mixture);
- class_accuracy, and accuracy_per_asked_class: the share of each asked class's samples read as that class.

Samples: class-balanced labels, the run's sampler with the reproduction's seed (sample.seed + 1), without CFG
unless --guided: the samples `repae bench reproduce` measures (the default 2000 is its count at the last step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sample_confidence import reproduction_samples  # benchmarks/, on the path when run as a script

from repae.evaluate.stats import frechet_distance_to_features
from repae.evaluate.toy import evaluator_outputs, gaussian


def mixture_gaussian(means: np.ndarray, covs: np.ndarray, weights: np.ndarray):
    """The mean and covariance of a mixture: means [K,D], covs [K,D,D], weights [K] summing to 1."""
    mean = weights @ means
    second = np.einsum("k,kij->ij", weights, covs + np.einsum("ki,kj->kij", means, means))
    return mean, second - np.outer(mean, mean)


def split_fid(feats: np.ndarray, read: np.ndarray, real_feats: np.ndarray, real_labels: np.ndarray,
              num_classes: int, min_per_class: int = 20) -> dict:
    """feats [N,D] and read classes [N] of samples; features [M,D] and labels [M] of real images."""
    per_class = [gaussian(real_feats[real_labels == k]) for k in range(num_classes)]
    counts = np.bincount(read, minlength=num_classes)
    mix = mixture_gaussian(np.stack([m for m, _ in per_class]), np.stack([c for _, c in per_class]),
                           counts / counts.sum())
    within = [frechet_distance_to_features(feats[read == k], *per_class[k])
              for k in range(num_classes) if counts[k] >= min_per_class]
    return {"toy_fid": frechet_distance_to_features(feats, *gaussian(real_feats)),
            "toy_fid_own_class_mix": frechet_distance_to_features(feats, *mix),
            "mean_within_class_fid": float(np.mean(within)), "classes_in_within_mean": len(within),
            "read_per_class": counts.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--guided", action="store_true", help="with the run's CFG (default: without)")
    p.add_argument("--cfg", type=float, help="with this CFG scale instead of the run's (implies --guided)")
    p.add_argument("--min-per-class", type=int, default=20)
    args = p.parse_args(argv)
    real = None
    guided = args.guided or args.cfg is not None
    for ckpt, world, evaluator, images, labels in reproduction_samples(args.checkpoints, args.samples, guided,
                                                                       args.cfg):
        if real is None:
            real = evaluator_outputs(evaluator, world.heldout_images)[0], world.heldout_labels.numpy()
        feats, logits = evaluator_outputs(evaluator, images)
        read, k = logits.argmax(1).numpy(), logits.shape[1]
        row = split_fid(feats, read, *real, k, args.min_per_class)
        asked = np.bincount(labels.numpy(), minlength=k)
        row["class_mix_deviation"] = float(np.abs(np.asarray(row["read_per_class"]) - asked).sum() / len(labels))
        right = read == labels.numpy()
        row["class_accuracy"] = float(right.mean())
        row["accuracy_per_asked_class"] = [round(float(right[labels.numpy() == c].mean()), 3) for c in range(k)]
        print(json.dumps({"checkpoint": str(ckpt), "guided": guided, "cfg_scale": args.cfg, "samples": args.samples,
                          **row}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
