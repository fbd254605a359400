"""The metrics of one training checkpoint, and of the VAE a run starts from, against the
reproduction's judges (`repae.reproduce.judges`: the toy world's, or real data and weights).

Per checkpoint (EMA SiT, the checkpoint's VAE):
- FID and class accuracy of `num_samples` class-balanced samples (the run's sampler settings):
  the toy evaluator's features and class on the toy world; on real data Inception's pool_3
  features and the nearest held-out class mean in that space; and the same without CFG
  (`*_unguided`), the protocol of the papers' training-speed tables (REPA-E's Table 2, REPA's); and, at the
  last step and with --cfg-scales, at each CFG scale of a guidance sweep (`*_cfg2.5`, ...: `scale_metrics`);
- latent spatial variance and total variation of the VAE's posterior means on held-out images,
  on the raw latents (the paper's Table 1 measured these: 17.06 is the scale of raw SD-VAE
  latents) and on the latents the SiT sees, normalised by the run's latent normaliser with its
  running statistics (`*_normalized`; definitions in `repae.evaluate.latents`);
- CKNNA between the SiT's tokens after block `encoder_depth` at t=0.5 and the judges' partner
  encoder (toy teacher, or the run's alignment encoder) on the same held-out images
  (`repae.evaluate.cknna.sit_encoder_alignment`);
- VAE PSNR on held-out images;
- blockwise DCT energy spectra of the same held-out latents, raw and normalised
  (`latent_band_fractions[_normalized]`, band u+v = 0..2(block-1), and
  `latent_high_frequency_fraction[_normalized]`, bands u+v >= block; `repae.evaluate.spectrum`).

Run as a module in its own process (the runner runs several at once):
    python -m repae.reproduce.measure RUN_DIR --samples 250 [--judges DIR]
It measures each checkpoint of RUN_DIR not yet in RUN_DIR/reproduce-metrics.json and writes
that file after each one, so a crash loses at most the checkpoint being measured. Without
--judges (saved real-data judges) it uses the toy world of the run's config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from repae.dist import device_named
from repae.evaluate.cknna import sit_encoder_alignment
from repae.evaluate.latents import latent_structure, posterior_means, vae_batch
from repae.evaluate.loading import checkpoint_step
from repae.evaluate.spectrum import DEFAULT_BLOCK, SpectrumAccumulator
from repae.evaluate.stats import frechet_distance_noise, frechet_distance_to_features
from repae.fileio import JsonFileError, read_json_object, write_json_atomic
from repae.generate import generate_images, sampler_settings, save_image_grid
from repae.pixels import to_vae_range
from repae.reproduce.judges import Judges, load_real_judges, toy_judges

METRICS_FILE = "reproduce-metrics.json"
CKNNA_T = 0.5
GRID_CLASSES = 10


def judges_for(cfg, judges_dir: Optional[Path] = None) -> Judges:
    """Saved real-data judges when `judges_dir` is given, else the toy world's."""
    from repae.config import ConfigError

    if judges_dir is not None:
        return load_real_judges(Path(judges_dir), cfg.train.device)
    if cfg.data.source != "toy":
        raise ConfigError(f"data.source={cfg.data.source!r}: measuring needs the judges the reproduction saved "
                          "(python -m repae.reproduce.measure RUN --judges OUT/judges)")
    return toy_judges(cfg)


def heldout_latents(vae, judges: Judges) -> torch.Tensor:
    """Posterior means of the judges' held-out images: [N,C,h,w] fp32 on the CPU,
    encoded once (on the VAE's device) for the latent structure, the PSNR and CKNNA."""
    return posterior_means(vae.eval(), judges.heldout_images)


def own_normalizer(z: torch.Tensor):
    """A fixed `LatentNorm` with the per-channel mean and variance of z [N,C,h,w] itself: the
    normaliser of a VAE that no run has trained a SiT on (the starting VAE), as the runs set
    theirs up from the starting VAE's latent statistics."""
    from repae.models.latent_norm import LatentNorm

    norm = LatentNorm(z.shape[1])
    zd = z.double()
    norm.init_from_stats(zd.mean(dim=(0, 2, 3)), zd.var(dim=(0, 2, 3), unbiased=False))
    return norm.eval()


def spectrum_block(x: torch.Tensor) -> int:
    """The DCT block for x [N,C,h,w]: `DEFAULT_BLOCK` (8), or the side of a smaller latent."""
    return min(DEFAULT_BLOCK, *x.shape[-2:])


@torch.no_grad()
def latent_spectrum_metrics(z: torch.Tensor, latent_norm, batch_size: int = 256) -> Dict[str, object]:
    """DCT band spectra of already-encoded latents z [N,C,h,w] (CPU), raw and normalised by
    `latent_norm` (running statistics), per `repae.evaluate.spectrum` (per-image channel means removed).

    Keys: `latent_band_fractions[_normalized]` (list over bands u+v = 0..2(block-1), summing to 1),
    `latent_high_frequency_fraction[_normalized]` (bands u+v >= block), `latent_spectrum_block`."""
    block = spectrum_block(z)
    raw, normalized = SpectrumAccumulator(block), SpectrumAccumulator(block)
    device = latent_norm.running_mean.device
    for i in range(0, len(z), batch_size):
        raw.add(z[i : i + batch_size])
        normalized.add(latent_norm.normalize(z[i : i + batch_size].to(device)).cpu())
    out: Dict[str, object] = {"latent_spectrum_block": block}
    for suffix, spectrum in (("", raw.result()), ("_normalized", normalized.result())):
        out["latent_band_fractions" + suffix] = spectrum.fractions
        out["latent_high_frequency_fraction" + suffix] = spectrum.high_frequency_fraction
    return out


@torch.no_grad()
def image_spectrum_metrics(images: torch.Tensor, batch_size: int = 64) -> Dict[str, object]:
    """DCT band spectrum of uint8 images [N,3,H,W] in the VAE's [-1,1] range, the reference the
    latent spectra are drawn against: `image_band_fractions`, `image_high_frequency_fraction`,
    `image_spectrum_block`."""
    acc = SpectrumAccumulator(spectrum_block(images))
    for i in range(0, len(images), batch_size):
        acc.add(to_vae_range(images[i : i + batch_size]))
    spectrum = acc.result()
    return {"image_spectrum_block": spectrum.block, "image_band_fractions": spectrum.fractions,
            "image_high_frequency_fraction": spectrum.high_frequency_fraction}


@torch.no_grad()
def vae_metrics(vae, judges: Judges, z: Optional[torch.Tensor] = None, latent_norm=None) -> Dict[str, object]:
    """Latent structure, latent spectra and PSNR of a VAE on the held-out images (z: their latents,
    if already encoded; they are encoded once for all three).

    Latent structure and spectra of the raw latents (`latent_*`) and of the normalised ones
    (`latent_*_normalized`), normalised by `latent_norm` (a `LatentNorm`'s running statistics;
    default `own_normalizer(z)`)."""
    from repae.toyworld import psnr

    z = heldout_latents(vae, judges) if z is None else z
    norm = latent_norm if latent_norm is not None else own_normalizer(z)
    structure = latent_structure(z, norm)
    return {"latent_spatial_variance": structure["raw/spatial_variance"],
            "latent_total_variation": structure["raw/total_variation"],
            "latent_spatial_variance_normalized": structure["normalized/spatial_variance"],
            "latent_total_variation_normalized": structure["normalized/total_variation"],
            **latent_spectrum_metrics(z, norm),
            "vae_psnr_db": psnr(vae, judges.heldout_images[: len(z)], z, batch_size=vae_batch(judges.heldout_images))}


def real_image_rows(cfg, judges: Judges, vae, num_samples: int) -> Dict[str, Dict[str, float]]:
    """What the judges give real images, measured as a run's samples are (`num_samples` class-balanced
    images, the same reference): the toy world's training images (the FID reference is the held-out set),
    and their reconstructions by the starting VAE, the best a generator of its latents can do. They place
    the arms' numbers: a toy FID of 7 against real images' 0.2 is far from the data, not a saturated task.
    {} on real data (its held-out images are the reference itself)."""
    if cfg.data.source != "toy":
        return {}
    from repae.build import vae_args
    from repae.evaluate.recon import reconstruct
    from repae.toyworld import ensure_toy_world

    world = ensure_toy_world(vae_args(cfg), cfg.toy, seed=0, progress=False)
    images, labels = world.train_images[:num_samples], world.train_labels[:num_samples]  # class = index mod classes
    device = next(vae.parameters()).device
    with torch.no_grad():
        recons = torch.cat([reconstruct(vae, images[i : i + 250].to(device)).cpu() for i in range(0, len(images), 250)])
    rows = {}
    for name, x in (("real images", images), ("starting VAE reconstructions", recons)):
        feats, predicted = judges.score(x)
        rows[name] = {"fid": frechet_distance_to_features(feats, *judges.reference),
                      "class_accuracy": (predicted.cpu() == labels).float().mean().item(), "num_images": len(x)}
    return rows


def sit_normalizer(sit):
    """The normaliser between a run's VAE and its SiT: its latent BatchNorm (running statistics),
    or the identity where the SiT takes raw latents."""
    from repae.models.latent_norm import LatentNorm

    if sit.bn is not None:
        return sit.bn
    identity = LatentNorm(sit.out_channels, eps=0.0)  # mean 0, var 1: normalize(z) == z
    return identity.eval()


# a measurement without one of these was made before it existed: the VAE metrics are filled in
# (no sampling) when the run is measured again
LATENT_KEYS = ("latent_spatial_variance_normalized", "latent_total_variation_normalized",
               "latent_high_frequency_fraction", "latent_high_frequency_fraction_normalized")


UNGUIDED_KEYS = ("fid_unguided", "class_accuracy_unguided")


def cfg_suffix(scale: float) -> str:
    """The key suffix of metrics of samples drawn at CFG scale `scale`: 2.5 -> "_cfg2.5" ("fid_cfg2.5", ...)."""
    return f"_cfg{scale:g}"


@torch.no_grad()
def sample_metrics(cfg, sit, vae, judges: Judges, num_samples: int, device, guided: bool = True,
                   grid_path: Optional[Path] = None, cfg_scale: Optional[float] = None) -> Dict[str, float]:
    """FID, its sampling noise and class accuracy of `num_samples` class-balanced samples with the run's
    sampler settings, or the same settings without CFG (guided=False: keys "fid_unguided", "fid_noise_unguided",
    "class_accuracy_unguided"), or at CFG scale `cfg_scale` (keys "fid_cfg2.5", ...: `cfg_suffix`).
    fid_noise: `frechet_distance_noise`, how far another draw of as many samples would likely move the FID
    (toy world v7, REPA at step 1200, 500 samples without CFG: FIDs of 6.4-8.4 over five sampler seeds)."""
    settings = sampler_settings(cfg, seed=cfg.sample.seed + 1, device=device)
    if not guided:
        settings["cfg_scale"] = 1.0
    elif cfg_scale is not None:
        settings["cfg_scale"] = float(cfg_scale)
    labels = torch.arange(num_samples) % cfg.model.num_classes
    images = generate_images(sit, vae, labels, batch_size=125, progress=False, **settings)
    if grid_path is not None:  # four rows of the first (up to) ten classes
        classes = cfg.model.num_classes
        cols = min(classes, GRID_CLASSES)
        shown = [r * classes + c for r in range(4) for c in range(cols) if r * classes + c < num_samples]
        save_image_grid(images[shown], grid_path, nrow=cols, upscale=max(1, 64 // images.shape[-1]))
    feats, predicted = judges.score(images)
    # a class the held-out images lack has no class mean to be recognised by: not counted
    known = (torch.isin(labels, judges.class_means[1]) if judges.class_means is not None
             else torch.ones_like(labels, dtype=torch.bool))
    suffix = "_unguided" if not guided else (cfg_suffix(cfg_scale) if cfg_scale is not None else "")
    out = {"fid" + suffix: frechet_distance_to_features(feats, *judges.reference),
           "fid_noise" + suffix: frechet_distance_noise(feats, *judges.reference),
           "class_accuracy" + suffix: (predicted.cpu() == labels)[known].float().mean().item()}
    if judges.second_opinion is not None:  # the same samples, another judge: "fid_v7judge[_unguided]", ...
        name, score, reference = judges.second_opinion
        feats, predicted = score(images)
        out.update({f"fid{name}{suffix}": frechet_distance_to_features(feats, *reference),
                    f"class_accuracy{name}{suffix}": (predicted.cpu() == labels)[known].float().mean().item()})
    return out


def unguided_sample_metrics(cfg, sit, vae, judges: Judges, num_samples: int, device,
                            guided: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """The UNGUIDED_KEYS; a run that samples without CFG already has them in `guided` (not sampled twice)."""
    if cfg.sample.cfg_scale == 1.0 and guided is not None:
        noise = {"fid_noise_unguided": guided["fid_noise"]} if "fid_noise" in guided else {}  # older records lack it
        second = judges.second_opinion[0] if judges.second_opinion is not None else None
        return {"fid_unguided": guided["fid"], "class_accuracy_unguided": guided["class_accuracy"], **noise,
                **{f"{k}_unguided": v for k, v in guided.items() if second and k.endswith(second)}}
    return sample_metrics(cfg, sit, vae, judges, num_samples, device, guided=False)


def scales_missing(stored: Optional[dict], cfg_scales: Sequence[float]) -> List[float]:
    """The CFG scales whose FID a stored measurement lacks."""
    return [s for s in cfg_scales if stored is None or "fid" + cfg_suffix(s) not in stored]


@torch.no_grad()
def scale_metrics(ckpt: Path, judges: Judges, num_samples: int, cfg_scales: Sequence[float],
                  stored: Dict[str, object]) -> Dict[str, float]:
    """FID, its noise and class accuracy at each of `cfg_scales` (keys with `cfg_suffix`) of a checkpoint
    whose measurement `stored` lacks them: the run's guided and unguided samples where the scale is theirs
    (the same samples, not drawn twice), new samples of the same seeds and labels otherwise. A sweep over
    the guidance scale, as papers tune it per model: the run's own scale (4 in the toy preset, chosen on an
    earlier toy world by class accuracy) need not be any arm's best."""
    from repae.train.checkpoint import load_for_sampling

    cfg, sit, vae = load_for_sampling(ckpt)
    device = device_named(cfg.train.device)
    sit, vae = sit.to(device), vae.to(device)
    second = [f"fid{judges.second_opinion[0]}", f"class_accuracy{judges.second_opinion[0]}"] if judges.second_opinion else []
    bases = ["fid", "fid_noise", "class_accuracy", *second]  # what sample_metrics records, less its suffix
    out: Dict[str, float] = {}
    for scale in cfg_scales:
        if scale == 1.0 and "fid_unguided" in stored:
            drawn = "_unguided"
        elif scale == cfg.sample.cfg_scale and "fid" in stored:
            drawn = ""
        else:
            out.update(sample_metrics(cfg, sit, vae, judges, num_samples, device, cfg_scale=scale))
            continue
        out.update({base + cfg_suffix(scale): stored[base + drawn] for base in bases if base + drawn in stored})
    return out


@torch.no_grad()
def missing_metrics(ckpt: Path, judges: Judges, num_samples: int, stored: Dict[str, object]) -> Dict[str, object]:
    """What a measurement made by an older version (`stored`) lacks: the VAE metrics (normalised
    latents, spectra; no sampling) and the samples without CFG, the checkpoint loaded once."""
    from repae.train.checkpoint import load_for_sampling

    cfg, sit, vae = load_for_sampling(ckpt)
    device = device_named(cfg.train.device)
    sit, vae = sit.to(device), vae.to(device)
    out: Dict[str, object] = {}
    if not all(k in stored for k in LATENT_KEYS):
        out.update(vae_metrics(vae, judges, latent_norm=sit_normalizer(sit)))
    if not all(k in stored for k in UNGUIDED_KEYS):
        out.update(unguided_sample_metrics(cfg, sit, vae, judges, num_samples, device, stored))
    return out


@torch.no_grad()
def checkpoint_metrics(ckpt: Path, judges: Judges, num_samples: int, grid_path: Optional[Path] = None) -> dict:
    from repae.train.checkpoint import load_for_sampling

    cfg, sit, vae = load_for_sampling(ckpt)
    device = device_named(cfg.train.device)  # as the run trained: sampling is most of a measurement
    sit, vae = sit.to(device), vae.to(device)
    guided = sample_metrics(cfg, sit, vae, judges, num_samples, device, grid_path=grid_path)
    unguided = unguided_sample_metrics(cfg, sit, vae, judges, num_samples, device, guided)
    z = heldout_latents(vae, judges)
    z_norm = sit.bn.normalize(z.to(device)).cpu() if sit.bn is not None else z
    alignment = sit_encoder_alignment(sit, z_norm, judges.heldout_labels, judges.alignment_feats,
                                      t=CKNNA_T, depth=cfg.model.encoder_depth, path_type=cfg.flow.path_type)
    return {**guided, **unguided, "cknna": alignment, **vae_metrics(vae, judges, z, sit_normalizer(sit)),
            "num_samples": num_samples}


def _checkpoints(run_dir: Path, every: Optional[int] = None) -> List[Path]:
    """The run's step-numbered checkpoint directories, oldest first; with `every`, only those at a multiple
    of it: an interrupted run also leaves a checkpoint where it stopped (step 36, say), which is no point of
    the plan's grid and would add a one-seed point to its curves."""
    from repae.train.checkpoint import step_dirs

    return [c for c in step_dirs(run_dir)[::-1] if _on_grid(checkpoint_step(c), every)]


def _on_grid(step: int, every: Optional[int]) -> bool:
    return every is None or step % every == 0


def _complete(record: Optional[dict], num_samples: int) -> bool:
    """A checkpoint's stored measurement that this version would not add to (an error is retried)."""
    return (record is not None and record.get("num_samples") == num_samples
            and all(k in record for k in LATENT_KEYS + UNGUIDED_KEYS))


def _still_to_measure(record: Optional[dict], num_samples: int, at_final_step: bool,
                      cfg_scales: Sequence[float]) -> Tuple[bool, List[float]]:
    """What a checkpoint's stored `record` still needs: (whether to measure or complete the record itself,
    the CFG scales of the guidance sweep it lacks: at the last step only, all of them for a record made with
    another number of samples, which is measured anew)."""
    same_samples = record is not None and record.get("num_samples") == num_samples
    return (not _complete(record, num_samples),
            scales_missing(record if same_samples else None, cfg_scales) if at_final_step else [])


def _read_done(out: Path, warn: bool = False) -> Dict[str, dict]:
    """{step: metrics} that METRICS_FILE holds. The file is our own record of measurements, which can be
    made again: an unreadable one (a torn copy, a hand edit) reads as empty and every checkpoint is
    measured anew, as is any entry that is not a step's metrics; `warn` says so on stderr."""
    if not out.is_file():
        return {}
    try:
        done = read_json_object(out)
    except JsonFileError as err:
        if warn:
            print(f"warning: {err}; measuring every checkpoint again", file=sys.stderr)
        return {}
    kept = {k: v for k, v in done.items() if k.isdigit() and isinstance(v, dict)}
    if warn and len(kept) != len(done):
        print(f"warning: {out}: {len(done) - len(kept)} entries are not a step's metrics; measuring "
              "those checkpoints again", file=sys.stderr)
    return kept


def samples_at(step: int, num_samples: int, final_step: Optional[int] = None, final_samples: Optional[int] = None) -> int:
    """How many samples the checkpoint at `step` is measured with: `final_samples` at `final_step` (the
    step the verdicts are read at, where the FID's sampling noise matters most) when given, else `num_samples`."""
    return final_samples if final_samples is not None and step == final_step else num_samples


def needs_measuring(run_dir: Path, num_samples: int, every: Optional[int] = None, final_step: Optional[int] = None,
                    final_samples: Optional[int] = None, cfg_scales: Sequence[float] = ()) -> bool:
    """Whether `measure_run` would measure anything: a checkpoint of the run not yet measured (fully)."""
    done = _read_done(run_dir / METRICS_FILE)
    return any(any(_still_to_measure(done.get(str(step)), samples_at(step, num_samples, final_step, final_samples),
                                     step == final_step, cfg_scales))
               for step in map(checkpoint_step, _checkpoints(run_dir, every)))


def measure_run(run_dir: Path, num_samples: int, judges: Optional[Judges] = None,
                judges_dir: Optional[Path] = None, every: Optional[int] = None, final_step: Optional[int] = None,
                final_samples: Optional[int] = None, cfg_scales: Sequence[float] = ()) -> Dict[str, dict]:
    """{step: metrics} for every checkpoint of a run (with `every`, those at its multiples), reusing what
    RUN/reproduce-metrics.json holds (judges: built from the first checkpoint's config, or loaded from
    `judges_dir`, when not given). The checkpoint at `final_step` is measured with `final_samples`
    samples when given: one measured with fewer is measured again; and, with `cfg_scales`, at each of
    those CFG scales too (`scale_metrics`)."""
    from repae.config import load_config

    out = run_dir / METRICS_FILE
    done = _read_done(out, warn=True)
    for m in done.values():  # files written before the real-data judges called the FID "toy_fid"
        if "toy_fid" in m:
            m["fid"] = m.pop("toy_fid")
    for ckpt in _checkpoints(run_dir, every):
        step = str(checkpoint_step(ckpt))
        n = samples_at(int(step), num_samples, final_step, final_samples)
        measured = step in done and done[step].get("num_samples") == n
        redo, scales = _still_to_measure(done.get(step), n, int(step) == final_step, cfg_scales)
        if not redo and not scales:
            continue
        if judges is None:
            judges = judges_for(load_config(None, [ckpt / "config.yaml"], world_size=1), judges_dir)
        try:
            if redo:
                if measured:  # measured before the normalised latents, spectra or unguided samples were: add them
                    done[step] = {**done[step], **missing_metrics(ckpt, judges, n, done[step])}
                else:
                    done[step] = checkpoint_metrics(ckpt, judges, n, run_dir / "reproduce-grids" / f"step-{step}.png")
        except Exception as err:  # e.g. a Frechet distance that cannot be computed on collapsed samples:
            done[step] = {"error": f"{type(err).__name__}: {err}"}  # recorded, retried on the next run
            scales = []
        if scales:  # after the record it reuses is written: a failure here keeps the run's own measurement
            write_json_atomic(out, dict(sorted(done.items(), key=lambda kv: int(kv[0]))))
            try:
                done[step] = {**done[step], **scale_metrics(ckpt, judges, n, scales, done[step])}
            except Exception as err:  # recorded beside the measurement; the sweep is retried on the next run
                done[step] = {**done[step], "error_cfg_sweep": f"{type(err).__name__}: {err}"}
        write_json_atomic(out, dict(sorted(done.items(), key=lambda kv: int(kv[0]))))
    return {k: v for k, v in done.items() if _on_grid(int(k), every)}  # stored off-grid ones left out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repae.reproduce.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=int, default=250, help="class-balanced samples per checkpoint")
    p.add_argument("--judges", type=Path, default=None, help="real-data judges saved by the runner (default: toy world)")
    p.add_argument("--every", type=int, default=None, help="only checkpoints at multiples of this step (default: all)")
    p.add_argument("--final-step", type=int, default=None, help="the step measured with --final-samples")
    p.add_argument("--final-samples", type=int, default=None, help="samples at --final-step (default: --samples)")
    p.add_argument("--cfg-scales", type=float, nargs="*", default=[],
                   help="also measure --final-step's samples at these CFG scales (a guidance sweep)")
    args = p.parse_args(argv)
    if args.cfg_scales and args.final_step is None:
        p.error("--cfg-scales measures the --final-step checkpoint: give --final-step")
    from repae.freed_memory import reuse_freed_memory

    reuse_freed_memory()  # its own entry point (the reproduction runner's subprocess), as each CLI command is
    measure_run(args.run_dir, args.samples, judges_dir=args.judges, every=args.every, final_step=args.final_step,
                final_samples=args.final_samples, cfg_scales=args.cfg_scales)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
