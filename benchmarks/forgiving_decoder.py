"""Is it the SiT or the decoder? A run's unguided samples decoded twice: by the run's own VAE decoder, and by a
copy of that decoder fine-tuned briefly to forgive off-manifold latents (its training latents, normalised as the
SiT sees them, plus sigma * N(0, 1) noise with sigma ~ U(0, --sigma-max), L1 to the image). The same SiT latents
both times, so a change in toy FID is the decoder's alone.

    python benchmarks/forgiving_decoder.py RUN/checkpoints/step-N [RUN2/checkpoints/step-N ...] \
        [--samples 1000] [--steps 400] [--sigma-max 0.5]

`benchmarks/decoder_robustness.py` shows REPA-E's E2E decoder is far less forgiving of noisy latents than the
starting VAE's. If the same fine-tuning closes REPA-E's toy-FID gap to REPA (each run's decoder fine-tuned by the
same recipe), REPA-E's SiT draws latents as good as REPA's, and its FID deficit is its decoder's. A diagnostic,
not a recipe: no arm of the reproduction uses a fine-tuned decoder. A third decoding, by the run's own decoder
but de-normalised with the VAE's current latent statistics instead of the EMA SiT's lagging BatchNorm
statistics, tests whether that lag costs anything.

Samples: class-balanced labels, the run's sampler with the reproduction's seed (sample.seed + 1), without CFG
(the samples `repae bench reproduce` measures). Prints one JSON line per checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from decoder_robustness import perturbed_decodes, psnr, world_and_judge

from repae.evaluate.latents import posterior_means, vae_batch
from repae.evaluate.stats import frechet_distance_to_features
from repae.evaluate.toy import evaluator_outputs
from repae.generate import generate_images, sampler_settings
from repae.pixels import from_vae_range, to_vae_range
from repae.reproduce.measure import sit_normalizer
from repae.train.checkpoint import load_for_sampling


class KeepLatents(torch.nn.Module):
    """A VAE that records the latents it is asked to decode (what the sampler produced, de-normalised)."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.latents = vae, []

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.latents.append(z.detach().float().cpu())
        return self.vae.decode(z)


def forgiving_copy(vae, norm, images: torch.Tensor, steps: int, sigma_max: float, batch: int = 64,
                   lr: float = 1e-4, seed: int = 0):
    """A copy of `vae` whose decoder is fine-tuned on (normalised posterior means of `images` + noise) for `steps`;
    the encoder is not trained."""
    vae = copy.deepcopy(vae).train()
    params = [p for name, p in vae.named_parameters() if not name.startswith(("encoder.", "quant_conv."))]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = to_vae_range(images[idx])
        with torch.no_grad():
            zn = norm.normalize(vae.encode(x).mode().float())
            sigma = torch.rand(batch, 1, 1, 1, generator=gen) * sigma_max
            z = norm.denormalize(zn + sigma * torch.randn(zn.shape, generator=gen))
        loss = (vae.decode(z).float() - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return vae.eval()


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor):
    """Per-channel mean and std [1,C,1,1] of the posterior means of uint8 images [N,3,H,W]."""
    z = posterior_means(vae, images)
    return z.mean(dim=(0, 2, 3), keepdim=True), z.std(dim=(0, 2, 3), keepdim=True)


@torch.no_grad()
def decode_all(vae, latents: torch.Tensor, step: int) -> torch.Tensor:
    """uint8 images decoded from latents [N,C,h,w], `step` at a time."""
    return torch.cat([from_vae_range(vae.decode(latents[i : i + step])) for i in range(0, len(latents), step)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=400, help="fine-tuning steps of the decoder copy")
    p.add_argument("--sigma-max", type=float, default=0.5)
    args = p.parse_args(argv)
    world = evaluator = reference = None
    for ckpt in args.checkpoints:
        cfg, sit, vae = load_for_sampling(ckpt)
        if world is None:  # the first run's world and evaluator (pass runs of one world)
            world, evaluator, reference = world_and_judge(cfg)
        norm = sit_normalizer(sit).eval()
        settings = sampler_settings(cfg, seed=cfg.sample.seed + 1)
        settings["cfg_scale"] = 1.0
        labels = torch.arange(args.samples) % cfg.model.num_classes
        keeper = KeepLatents(vae)
        samples = generate_images(sit, keeper, labels, batch_size=125, progress=False, **settings)
        latents = torch.cat(keeper.latents)
        forgiving = forgiving_copy(vae, norm, world.train_images, args.steps, args.sigma_max)
        row = {"checkpoint": str(ckpt), "samples": args.samples, "steps": args.steps, "sigma_max": args.sigma_max}
        # the run's normaliser is its EMA SiT's latent BatchNorm (an EMA of running statistics, as the official
        # code keeps it): where the VAE's latent scale is still growing it lags. The same latents de-normalised
        # with the statistics of the VAE's latents of 5000 training images instead:
        data_mean, data_std = latent_statistics(vae, world.train_images[:5000])
        rescaled = norm.normalize(latents) * data_std + data_mean
        step = vae_batch(samples)
        for name, images in (("own_decoder", samples), ("forgiving_decoder", decode_all(forgiving, latents, step)),
                             ("own_decoder_data_statistics", decode_all(vae, rescaled, step))):
            feats, logits = evaluator_outputs(evaluator, images)
            row[name] = {"toy_fid_unguided": frechet_distance_to_features(feats, *reference),
                         "class_accuracy_unguided": (logits.argmax(1) == labels).float().mean().item()}
        held = world.heldout_images[:1000]
        zero = torch.zeros((len(held), *latents.shape[1:]))
        row["heldout_recon_psnr_db"] = {"own_decoder": psnr(perturbed_decodes(vae, norm, held, 0.0, zero), held),
                                        "forgiving_decoder": psnr(perturbed_decodes(forgiving, norm, held, 0.0, zero),
                                                                  held)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
