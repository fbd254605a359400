"""`repae export-vae RUN`: the tuned VAE of a REPA-E run ("E2E-VAE") with its latent statistics,
in three conventions at once.

The statistics are the latent BatchNorm's running stats of the EMA SiT (DESIGN.md: sampling
de-normalises with them), or of the online SiT with `use_ema_bn=False`. Files in the output:

    vae.safetensors, latent_stats.safetensors   ours: repae.weights.load_model / load_latent_stats
    e2e-vae.pt, latents-stats.pt                the official REPA-E convention: a plain VAE state dict;
                                                {latents_scale: 1/sqrt(var), latents_bias: mean} [1,C,1,1]
    e2e-vae.json                                the architecture the .pt cannot hold (GroupNorm groups
                                                above all), read by every repae loader of e2e-vae.pt
    diffusers/                                  diffusers.AutoencoderKL.from_pretrained(...), with
                                                latents_mean / latents_std (= sqrt(var)) in its config
    export.json, README.txt                     which run, checkpoint and step; sha256 of each file

The output directory must be new, empty or an earlier export (rewritten in place). A run that did not tune
its VAE (train.tune_vae=false: REPA or vanilla SiT on a frozen VAE, `repae train-ldm`) exports the frozen VAE
it started from; export.json then says "vae_tuned": false.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from repae.models.latent_norm import LatentNorm
from repae.models.vae import AutoencoderKL
from repae.weights import (CheckpointError, check_latent_stats, load_strict, read_file, save_latent_stats, save_model,
                           write_vae_sidecar)

# what write_vae_exports writes, relative to the output directory
EXPORT_FILES = ["vae.safetensors", "latent_stats.safetensors", "e2e-vae.pt", "e2e-vae.json", "latents-stats.pt",
                "diffusers/config.json", "diffusers/diffusion_pytorch_model.safetensors"]
RECORD_FILES = ["export.json", "README.txt"]  # written by export_vae after them


def _own_names(prefix: str = "") -> set:
    """The names an export writes directly inside `out/prefix` (with their temporary `.tmp` copies)."""
    names = {f[len(prefix):].split("/")[0] for f in EXPORT_FILES + RECORD_FILES if f.startswith(prefix)}
    return names | {n + ".tmp" for n in names}


def check_export_dir(out: Path) -> None:
    """ConfigError unless `out` is new, empty or an earlier (possibly unfinished) export: an export is rewritten
    in place, so it must not be mixed into, or overwrite, files of anything else (a run, a latent cache, notes)."""
    from repae.config import ConfigError
    from repae.fileio import refuse_unrelated

    own, sub = _own_names(), _own_names("diffusers/")
    refuse_unrelated(out, own.__contains__, "export-vae", ConfigError)
    refuse_unrelated(out / "diffusers", sub.__contains__, "export-vae", ConfigError)


def _save_torch(obj: dict, path: Path) -> None:
    """torch.save of plain tensors only (loads with weights_only=True), written atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load_run_vae(run_dir: str | Path, use_ema_bn: bool = True) -> Tuple[Path, object, AutoencoderKL, torch.Tensor,
                                                                         torch.Tensor]:
    """(checkpoint dir, its config, tuned VAE, BN running mean [C], running var [C]) of a run's newest checkpoint."""
    from repae.build import vae_args
    from repae.config import load_config
    from repae.train.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoints (nothing in {run_dir / 'checkpoints'}): "
                              "train it first (`repae train`), or name the run directory itself")
    cfg = load_config(None, [ckpt / "config.yaml"])
    vae = load_strict(AutoencoderKL(vae_args(cfg)), read_file(ckpt / "vae.safetensors"), str(ckpt / "vae.safetensors"))
    sit_file = ckpt / ("ema.safetensors" if use_ema_bn else "sit.safetensors")
    sit_state = read_file(sit_file)
    if "bn.running_mean" not in sit_state:
        raise CheckpointError(f"{sit_file} has no latent BatchNorm (bn.running_mean): nothing to export as statistics")
    mean, var = sit_state["bn.running_mean"].float(), sit_state["bn.running_var"].float()
    # before anything is written: a diverged (NaN) or hand-edited BatchNorm would export statistics no reader takes
    check_latent_stats(mean, var, f"{sit_file} (bn.running_mean / bn.running_var)")
    return ckpt, cfg, vae.eval(), mean, var


def export_vae(run_dir: str | Path, out_dir: Optional[str | Path] = None, use_ema_bn: bool = True) -> dict:
    """Write the E2E-VAE of the run's newest checkpoint to `out_dir` (default RUN/e2e-vae).
    Returns the export record (also in export.json)."""
    from repae.fileio import sha256_file

    out = Path(out_dir) if out_dir else Path(run_dir) / "e2e-vae"
    check_export_dir(out)
    ckpt, cfg, vae, mean, var = load_run_vae(run_dir, use_ema_bn)
    files = write_vae_exports(vae, mean, var, out, cfg.data.image_size)
    record = {
        "format": "repae-e2e-vae", "run": str(Path(run_dir).resolve()), "checkpoint": ckpt.name,
        "step": int(ckpt.name.split("-")[-1]),
        # False: the run trained only its SiT (train.tune_vae=false, e.g. train-ldm): this is the VAE it started
        # from, unchanged, not an E2E-VAE
        "vae_tuned": bool(cfg.train.tune_vae), "vae_source": frozen_vae_source(cfg),
        "latent_stats_from": "ema" if use_ema_bn else "sit",
        "latent_norm_mode": cfg.latent_norm.mode, "image_size": cfg.data.image_size,
        "vae_args": dataclasses.asdict(vae.args), "latents_mean": mean.tolist(), "latents_var": var.tolist(),
        "sha256": {f: sha256_file(out / f) for f in files},
    }
    (out / "export.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.txt").write_text(_readme(record))
    return record


def frozen_vae_source(cfg) -> Optional[str]:
    """Where a run that did not tune its VAE got it (None for a run that tuned it): vae.path, the toy world's
    pretrained VAE, or the random initialisation it kept."""
    if cfg.train.tune_vae:
        return None
    if cfg.vae.from_scratch:
        return "random initialisation (vae.from_scratch=true)"
    if cfg.vae.path:
        return str(cfg.vae.path)
    return "the toy world's pretrained VAE" if cfg.data.source == "toy" else "the preset's VAE"


def write_vae_exports(vae: AutoencoderKL, mean: torch.Tensor, var: torch.Tensor, out: Path,
                      image_size: int) -> list:
    """`vae` and its latent statistics (mean [C], var [C]) in all three conventions under `out`;
    returns EXPORT_FILES. The official .pt gets its architecture sidecar (e2e-vae.json)."""
    from repae.models.vae_diffusers import export_diffusers

    out.mkdir(parents=True, exist_ok=True)
    save_model(vae, out / "vae.safetensors")
    save_latent_stats(mean, var, out / "latent_stats.safetensors")
    _save_torch({k: v.detach().cpu().clone() for k, v in vae.state_dict().items()}, out / "e2e-vae.pt")
    write_vae_sidecar(vae.args, out / "e2e-vae.pt")
    bn = LatentNorm(mean.numel())
    bn.init_from_stats(mean, var)
    _save_torch(bn.scale_bias(), out / "latents-stats.pt")
    export_diffusers(vae, out / "diffusers", latents_mean=mean, latents_std=var.sqrt(), sample_size=image_size)
    return list(EXPORT_FILES)


def _groups_note(r: dict) -> str:
    groups = r["vae_args"]["norm_groups"]
    if groups == 32:
        return ""
    return (f"\nNote: this VAE's GroupNorms have {groups} group(s); a bare state dict (e2e-vae.pt) cannot say so.\n"
            f"repae reads it from e2e-vae.json; other readers (the official code) assume LDM's 32: build\n"
            f"their AutoencoderKL with {groups} groups (export.json['vae_args']), or use diffusers/, which records it.\n")


def _frozen_note(r: dict) -> str:
    if r["vae_tuned"]:
        return ""
    return (f"\nNot an E2E-VAE: this run did not tune its VAE (train.tune_vae=false); the VAE is the frozen one it\n"
            f"started from ({r['vae_source']}), unchanged.\n")


def _readme(r: dict) -> str:
    what = "E2E-VAE" if r["vae_tuned"] else "Frozen (not tuned) VAE"
    return f"""{what} exported by `repae export-vae` from {r['run']}
checkpoint {r['checkpoint']} (step {r['step']}); latent statistics: the {r['latent_stats_from'].upper()} SiT's
latent BatchNorm running stats (latent_norm.mode={r['latent_norm_mode']}), images {r['image_size']}px.

vae.safetensors            repae.weights.load_model(...) (architecture in the file's metadata)
latent_stats.safetensors   repae.weights.load_latent_stats(...) -> (mean [C], var [C])
e2e-vae.pt                 official REPA-E convention: plain AutoencoderKL state dict (LDM key names)
e2e-vae.json               its architecture (VAEArgs), which a plain state dict cannot hold; repae loaders read it
latents-stats.pt           official convention: latents_scale = 1/sqrt(var), latents_bias = mean, [1,C,1,1];
                           a latent z is normalised as (z - latents_bias) * latents_scale
diffusers/                 diffusers.AutoencoderKL.from_pretrained(...); config holds latents_mean and
                           latents_std = sqrt(var)
export.json                this record, with the sha256 of every file
{_frozen_note(r)}{_groups_note(r)}
Stage 2: repae cache-latents --vae THIS_DIR --data ... --out LATENTS, then
         repae train-ldm latents.path=LATENTS
"""
