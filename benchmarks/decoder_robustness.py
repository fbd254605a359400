"""How gracefully a run's VAE decodes latents that are slightly off: the images its decoder makes from
encoded real images plus Gaussian noise in the SiT's (normalised) latent units, judged as the reproduction
judges samples (toy FID against the held-out images, class accuracy).

    python benchmarks/decoder_robustness.py RUN/checkpoints/step-N [RUN2/checkpoints/step-N ...] \
        [--images 1000] [--sigmas 0 0.1 0.2 0.3 0.5]

A SiT's samples are never exactly on its VAE's latent manifold; its errors are made in the normalised units it
is trained in. Two VAEs whose SiTs err alike can still give images of different quality if one decoder
amplifies those errors. Toy world v7 and v8: a new REPA SiT trained on REPA-E's frozen E2E-VAE (stage 2) draws
unguided samples with a higher toy FID than REPA on the starting VAE, at the same steps, although it names the
class more often; this measures whether the E2E decoder is less forgiving of off-manifold latents.

Images: the toy world's first `--images` training images (not the held-out reference), encoded to their
posterior means, normalised by the run's own normaliser (its latent BatchNorm's running statistics, or the
fixed statistics of a frozen-VAE run), perturbed by sigma * N(0, 1) (one noise draw, the same for every run),
de-normalised and decoded. Prints one JSON line per checkpoint and sigma; PSNR is the mean of per-image
PSNRs, as `repae evaluate vae` reports it (`repae.evaluate.recon.psnr`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from repae.build import vae_args
from repae.evaluate.latents import posterior_means, vae_batch
from repae.evaluate.recon import psnr
from repae.evaluate.stats import frechet_distance_to_features
from repae.evaluate.toy import evaluator_outputs, gaussian
from repae.pixels import from_vae_range
from repae.reproduce.measure import sit_normalizer
from repae.toyworld import ensure_toy_evaluator, ensure_toy_world
from repae.train.checkpoint import load_for_sampling


def world_and_judge(cfg):
    """The run's toy world, its evaluator, and the evaluator's FID reference (mean, cov) of the held-out images."""
    world = ensure_toy_world(vae_args(cfg), cfg.toy, seed=0, progress=False, device="cpu")
    evaluator = ensure_toy_evaluator(world, cfg.toy, device="cpu")
    return world, evaluator, gaussian(evaluator_outputs(evaluator, world.heldout_images)[0])


@torch.no_grad()
def perturbed_decodes(vae, norm, images: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> uint8 images decoded from (normalised posterior means + sigma * noise [N,C,h,w])."""
    z = norm.denormalize(norm.normalize(posterior_means(vae, images)) + sigma * noise)
    step = vae_batch(images)
    return torch.cat([from_vae_range(vae.decode(z[i : i + step])) for i in range(0, len(z), step)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    args = p.parse_args(argv)
    world = evaluator = reference = noise = None
    for ckpt in args.checkpoints:
        cfg, sit, vae = load_for_sampling(ckpt)
        if world is None:  # the first run's world and evaluator (pass runs of one world)
            world, evaluator, reference = world_and_judge(cfg)
        images, labels = world.train_images[: args.images], world.train_labels[: args.images]
        vae, norm = vae.eval(), sit_normalizer(sit).eval()
        if noise is None:
            shape = posterior_means(vae, images[:1]).shape[1:]
            noise = torch.randn((len(images), *shape), generator=torch.Generator().manual_seed(0))
        for sigma in args.sigmas:
            decoded = perturbed_decodes(vae, norm, images, sigma, noise)
            feats, logits = evaluator_outputs(evaluator, decoded)
            print(json.dumps({"checkpoint": str(ckpt), "sigma": sigma,
                              "toy_fid": frechet_distance_to_features(feats, *reference),
                              "class_accuracy": (logits.argmax(1) == labels).float().mean().item(),
                              "psnr_db": psnr(decoded, images).mean().item()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
