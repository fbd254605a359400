"""`repae` command line: thin wrappers over the library.

    repae train  [--preset NAME] [--config FILE ...] [key=value ...]   REPA-E training (resumes if it can)
    repae config [--preset NAME] [--config FILE ...] [key=value ...]   print the resolved config
    repae sample (--ckpt SIT | --random-init) [--vae VAE] [...] [key=value ...]   PNG grid / .npz
    repae info PATH                                                    what a weight file holds
    repae bench step|sample|evaluate [--preset NAME] [key=value ...]   throughput, FLOPs, peak memory
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import yaml


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="starting preset (default: toy); see `repae config --list`")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file(s) merged in order")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sample.cfg_scale=4")


def _load_cfg(args: argparse.Namespace):
    from repae.config import load_config

    return load_config(args.preset, args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    from repae.config import PRESETS, to_dict

    if args.list:
        print("\n".join(PRESETS))
        return 0
    print(yaml.safe_dump(to_dict(_load_cfg(args)), sort_keys=False), end="")
    return 0


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from repae.build import build_sit, build_vae
    from repae.config import save_config
    from repae.generate import generate_images, save_image_grid
    from repae.weights import load_latent_stats, load_model

    from_run = bool(args.ckpt) and Path(args.ckpt).is_dir()
    if from_run:  # a training run: its saved config (plus any overrides), EMA SiT and tuned VAE
        from repae.train.checkpoint import load_for_sampling

        cfg, sit, vae = load_for_sampling(Path(args.ckpt), args.config, args.overrides)
    elif args.random_init:
        cfg = _load_cfg(args)
        print("smoke run: randomly initialised SiT and VAE; the images show the pipeline works, not a model")
        sit, vae = build_sit(cfg), build_vae(cfg)
    elif args.ckpt:
        cfg = _load_cfg(args)
        sit = load_model(args.ckpt, kind="sit", prefer_ema=cfg.sample.use_ema)
        vae = load_model(args.vae, kind="vae") if args.vae else build_vae(cfg)
    else:
        raise SystemExit("repae sample: give --ckpt PATH (a run, a SiT checkpoint) or --random-init")
    device = _resolve_device(cfg.train.device)
    torch.manual_seed(cfg.sample.seed)
    if cfg.vae.latent_stats_path and sit.bn is not None and not from_run:
        mean, var = load_latent_stats(cfg.vae.latent_stats_path)
        sit.bn.init_from_stats(mean, var)
    sit.to(device)
    vae.to(device)

    n = cfg.sample.num_samples
    labels = torch.arange(n) % sit.num_classes  # class-balanced, in order: column c of the grid = class c
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    start = time.perf_counter()
    images = generate_images(
        sit, vae, labels, mode=cfg.sample.mode, num_steps=cfg.sample.num_steps, heun=cfg.sample.heun,
        cfg_scale=cfg.sample.cfg_scale, guidance_low=cfg.sample.guidance_low, guidance_high=cfg.sample.guidance_high,
        path_type=cfg.flow.path_type, seed=cfg.sample.seed, batch_size=cfg.sample.batch_size, autocast_dtype=dtype,
    )
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    nrow = min(sit.num_classes, n)
    save_image_grid(images, out, nrow=nrow, upscale=max(1, 128 // images.shape[-1]))
    save_config(cfg, out.with_suffix(".config.yaml"))
    print(f"wrote {out} ({n} samples, {cfg.sample.mode}-{cfg.sample.num_steps}, {n / elapsed:.1f} images/s)")
    if args.npz:
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        print(f"wrote {args.npz} (ADM layout: arr_0 uint8 [N,H,W,3])")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from repae.train.loop import train

    cfg = _load_cfg(args)
    summary = train(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from repae.weights import file_metadata, load_model

    model = load_model(args.path, kind=args.kind)
    meta = file_metadata(args.path) if Path(args.path).is_file() else {}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.path}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters")
    print(f"  {model.args}")
    if meta:
        print(f"  metadata keys: {sorted(meta)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repae", description="REPA-E: end-to-end VAE + latent diffusion training")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="REPA-E training; re-run the same command to resume")
    _add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs still go to metrics.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.add_argument("--list", action="store_true", help="list presets")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("sample", help="generate a PNG grid (and optionally an ADM .npz)")
    _add_config_args(p)
    p.add_argument("--ckpt", help="a training run directory (its EMA SiT, VAE and config), or SiT weights: "
                                  "our .safetensors or an official .pt (EMA preferred)")
    p.add_argument("--vae", help="VAE weights: .safetensors, official .pt or diffusers directory")
    p.add_argument("--random-init", action="store_true", help="smoke test with untrained models")
    p.add_argument("--out", default="runs/samples.png", help="PNG grid path")
    p.add_argument("--npz", help="also write the samples as an ADM-style .npz")
    p.set_defaults(func=cmd_sample)

    from repae import bench

    bench.add_parser(sub)

    p = sub.add_parser("info", help="load a weight file strictly and describe it")
    p.add_argument("path")
    p.add_argument("--kind", choices=["sit", "vae"])
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from repae.config import ConfigError
    from repae.weights import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as err:
        print(f"repae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
