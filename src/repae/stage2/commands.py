"""The stage-2 commands: `repae export-vae`, `repae cache-latents`, `repae train-ldm`.

`add_parsers(sub, add_config_args)` registers all three on the `repae` sub-command parser.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from repae.cli import IMAGE_SIZE, NON_NEGATIVE, POSITIVE, out_dir

# train-ldm's defaults, applied before --config files and overrides (which win)
LDM_DEFAULTS = {"train": {"tune_vae": False}, "latent_norm": {"mode": "fixed"}}


def cmd_export_vae(args: argparse.Namespace) -> int:
    from repae.stage2.export import export_vae

    record = export_vae(args.run, args.out, use_ema_bn=args.use_ema_bn)
    out = Path(args.out) if args.out else Path(args.run) / "e2e-vae"
    what = "E2E-VAE" if record["vae_tuned"] else "frozen (not tuned) VAE"
    print(f"wrote {out}: {what} of {record['checkpoint']} (step {record['step']}), latent stats from the "
          f"{record['latent_stats_from']} BatchNorm; ours, official (.pt) and diffusers/ formats")
    if not record["vae_tuned"]:  # a warning, not an error: exporting a frozen VAE with its stats is legitimate
        print(f"warning: {args.run} did not tune its VAE (train.tune_vae=false): the export is the frozen VAE "
              f"it started from ({record['vae_source']}), not an E2E-VAE", file=sys.stderr)
    return 0


def cmd_cache_latents(args: argparse.Namespace) -> int:
    import torch

    from repae import dist
    from repae.config import ConfigError, load_config
    from repae.fileio import paths_overlap
    from repae.stage2.cache import ToySource, cache_latents, check_cache_dir
    from repae.hub import is_hub_id
    from repae.stage2.latents import vae_files
    from repae.evaluate.sources import check_dir_role
    from repae.weights import load_model

    check_dir_role(args.vae, "vae", missing="VAE")  # a training run: export its VAE first (and say so)
    if args.data != "toy" and Path(args.data).exists() and paths_overlap(args.data, args.out):
        # shards inside an image folder become a class folder of its next listing; images inside the cache mix
        raise ConfigError(f"--out {args.out} and --data {args.data} are the same directory or one lies inside "
                          "the other; give a cache directory outside the data")
    check_cache_dir(args.out)  # a foreign or damaged --out refused before the VAE and the data are loaded
    cfg = load_config(args.preset, args.config, args.overrides)  # device, and the toy world's spec (toy.*)
    device = dist.init_from_env(cfg.train.device)
    load_path, weights, stats = vae_files(args.vae)
    vae = load_model(load_path, kind="vae").to(device).eval().requires_grad_(False)
    if args.data == "toy":
        from repae.build import vae_args
        from repae.toyworld import ensure_toy_world, generator_data

        world = ensure_toy_world(vae_args(cfg), cfg.toy, device=cfg.train.device)  # rank 0 builds first under torchrun
        source = ToySource(*generator_data(world, cfg.toy))
        if args.image_size not in (None, source.image_size):
            raise ConfigError(f"the toy world's images are {source.image_size}px; drop --image-size")
    else:  # --data in the format --source (repae.data.sources reads it)
        from repae.data.sources import cache_source

        cfg.data.source, cfg.data.path, cfg.data.image_size = args.source, args.data, args.image_size or 256
        source = cache_source(cfg, cfg.data.num_workers if args.num_workers is None else args.num_workers)
    manifest = cache_latents(
        vae, source, args.out, vae_file=weights, vae_stats=stats,
        vae_path=args.vae if is_hub_id(args.vae) else load_path,  # a hub id is recorded as such
        shard_size=args.shard_size, hflip_too=args.hflip_too, batch_size=args.batch_size, device=device,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        store_dtype=torch.bfloat16 if args.store_bf16 else torch.float32, progress=not args.no_progress)
    if dist.is_main():
        print(f"wrote {args.out}: {manifest['count']} images{' (+ mirrored)' if manifest['hflip_too'] else ''}, "
              f"latents {manifest['latent_shape']} {manifest['dtype']}, {manifest['num_shards']} shards")
        unreadable = manifest.get("unreadable_images") or {}
        if unreadable.get("count"):
            print(f"{unreadable['count']} unreadable source images: their entries hold the next readable image "
                  f"(as training reads the data); e.g. {', '.join(unreadable['examples'][:5])} "
                  f"(manifest.json: unreadable_images)", file=sys.stderr)
    return 0


def load_ldm_config(preset_name, files, overrides):
    """The train-ldm config: preset, then LDM_DEFAULTS and exp_name `<preset>-ldm`, then files and overrides."""
    import yaml

    from repae.config import ConfigError, load_config, preset

    defaults = {**LDM_DEFAULTS, "exp_name": f"{preset(preset_name).exp_name}-ldm"}
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "train-ldm-defaults.yaml"
        first.write_text(yaml.safe_dump(defaults))
        cfg = load_config(preset_name, [first, *files], overrides)
    if not cfg.latents.path:
        raise ConfigError("train-ldm needs latents.path=DIR (a cache made by `repae cache-latents`)")
    return cfg


def cmd_train_ldm(args: argparse.Namespace) -> int:
    from repae.cli import _budget_note
    from repae.train.loop import train

    cfg = load_ldm_config(args.preset, args.config, args.overrides)
    summary = train(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    note = _budget_note(summary, cfg.train.max_steps)
    if note:
        print(note, file=sys.stderr)
    return 0


def add_parsers(sub, add_config_args) -> None:
    """Register export-vae, cache-latents and train-ldm on `sub` (argparse sub-parsers)."""
    p = sub.add_parser("export-vae", help="export a run's tuned VAE (E2E-VAE) with its latent statistics")
    p.add_argument("run", help="a training run directory (its newest checkpoint is exported)")
    p.add_argument("--out", type=out_dir, help="output directory: new, empty or an earlier export, which is "
                                               "rewritten (default: RUN/e2e-vae)")
    p.add_argument("--use-ema-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="statistics from the EMA SiT's latent BatchNorm (default) or, with --no-use-ema-bn, "
                        "from the online SiT's")
    p.set_defaults(func=cmd_export_vae)

    p = sub.add_parser("cache-latents", help="encode a dataset with a frozen VAE into sharded posterior moments")
    add_config_args(p)
    p.add_argument("--vae", required=True, help="VAE: an export-vae directory, .safetensors, official .pt or "
                                                "diffusers directory")
    p.add_argument("--data", required=True, help="an image folder (class sub-folders), or 'toy'; with --source, "
                                                  "what data.path takes for that data.source")
    p.add_argument("--source", choices=("folder", "packed", "hf", "wds"), default="folder",
                   help="the format of --data (default folder; see data.source)")
    p.add_argument("--out", required=True, type=out_dir,
                   help="cache directory, new or empty; re-run the same command to resume")
    p.add_argument("--image-size", type=IMAGE_SIZE, help="ADM centre crop size for folders (default 256)")
    p.add_argument("--hflip-too", action="store_true", help="also cache every image mirrored")
    p.add_argument("--shard-size", type=POSITIVE, default=1000, help="images per shard file (default 1000)")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images per VAE forward (default 64)")
    p.add_argument("--num-workers", type=NON_NEGATIVE, help="image decoding workers (default: data.num_workers)")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (moments still stored fp32)")
    p.add_argument("--store-bf16", action="store_true", help="store the moments as bf16 (half the disk)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache_latents)

    p = sub.add_parser("train-ldm", help="train a SiT on cached latents of a frozen VAE (stage 2); resumes")
    add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs still go to metrics.jsonl)")
    p.set_defaults(func=cmd_train_ldm)
