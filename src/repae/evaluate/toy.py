"""Toy-world sample metrics, with the toy evaluator standing in for Inception (DESIGN.md section 4):
"toy FID" is the Fréchet distance between Gaussians fitted to the evaluator's mean-pooled tokens
(128-d) of generated and of held-out real images; class accuracy is the evaluator's argmax
against the label each sample was generated for.

Numbers are comparable only within the toy world and at equal sample counts (FID is biased
upwards at small N).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from repae.evaluate.stats import frechet_distance


@torch.no_grad()
def evaluator_outputs(evaluator, images: torch.Tensor, batch_size: int = 500) -> Tuple[np.ndarray, torch.Tensor]:
    """uint8 [N,3,32,32] -> (float64 features [N,D], logits [N,num_classes])."""
    device = next(evaluator.parameters()).device
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        tokens = evaluator(images[start : start + batch_size].to(device)).float()  # [b,N,D]
        pooled = tokens.mean(dim=1)
        feats.append(pooled.cpu())
        logits.append(evaluator.head(pooled).cpu())
    return torch.cat(feats).double().numpy(), torch.cat(logits)


def gaussian(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D,D]) of features [N,D], N >= 2."""
    if len(feats) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def toy_fid(generated: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between evaluator features of generated [N,D] and reference [M,D] images."""
    return frechet_distance(*gaussian(generated), *gaussian(reference))


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples the evaluator assigns to the class they were generated for."""
    return (logits.argmax(dim=1) == labels.cpu()).float().mean().item()


TOY_JUDGE = "toy evaluator (stand-in for Inception)"
INCEPTION_JUDGE = "Inception"


def score_samples(evaluator, images: torch.Tensor, labels: torch.Tensor, heldout_images: torch.Tensor) -> dict:
    """The toy judge's verdict on class-conditional samples: uint8 images [N,3,32,32] generated for
    `labels` [N], against the toy world's held-out images [M,3,32,32]. One function for the end of
    training (`repae.train.loop.toy_summary`) and `repae evaluate samples` on a toy run."""
    feats, logits = evaluator_outputs(evaluator, images)
    reference, _ = evaluator_outputs(evaluator, heldout_images)
    return {"sample_class_accuracy": round(class_accuracy(logits, labels), 4),
            "sample_toy_fid": round(toy_fid(feats, reference), 3),
            "samples_scored": len(labels)}
