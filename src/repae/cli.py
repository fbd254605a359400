"""`repae` command line: thin wrappers over the library.

    repae train  [--preset NAME] [--config FILE ...] [key=value ...]   REPA-E training (resumes if it can)
    repae config [--preset NAME] [--config FILE ...] [key=value ...]   print the resolved config
    repae sample (--ckpt SIT | --random-init) [--vae VAE] [...] [key=value ...]   PNG grid / .npz
    repae info PATH                                                    what a weight file holds
    repae bench step|sample|evaluate [--preset NAME] [key=value ...]   throughput, FLOPs, peak memory
    repae evaluate samples|ref-stats|vae|latents|cknna ...            metrics as JSON (see --help)
    repae prepare-data SRC OUT                                         packed, sharded image store
    repae export-vae RUN | cache-latents | train-ldm                   stage 2 on the E2E-VAE

Errors the user can fix (config, missing files, unusable checkpoints or data) print one line and
exit 2; `repae --debug ...` also prints the traceback. Ctrl-C (SIGINT) or SIGTERM during training
stops at the next step boundary with a checkpoint and exits 130 / 143; elsewhere Ctrl-C exits 130.
`repae sample --npz` writes its .npz whole or not at all: Ctrl-C, SIGTERM (exit 143) or an error removes
its temporary files.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Collection, List, Optional, Union

import yaml


class UsageError(ValueError):
    """Arguments that cannot work together or with the files given (exit 2, one line), found before any work."""


# ----------------------------------------------------------------------------- argument types
#
# Checked by argparse itself, so a bad value stops the command before any model is built, and `0` is
# never mistaken for "not given": every command's numeric flags use `bounded`.


def bounded(lo: Optional[float] = None, hi: Optional[float] = None, kind: type = int) -> Callable[[str], float]:
    """An argparse `type=`: `kind(text)` within [lo, hi] (None: open), finite; else argparse's usage error."""
    what = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        rule = f"{what} in [{lo}, {hi}]"
    elif lo is not None:
        rule = f"{what} >= {lo}"
    else:
        rule = what if hi is None else f"{what} <= {hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or (lo is not None and value < lo) \
                or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = rule  # argparse names the type in some messages
    return parse


POSITIVE = bounded(1)
NON_NEGATIVE = bounded(0)


def _config_bounded(lo: int, limit: str) -> Callable[[str], float]:
    """`bounded(lo, repae.config.<limit>)`, the config reading its bound only when an argument is parsed:
    `repae --help` and every parser build stay free of the config's imports (yaml, OmegaConf)."""
    def parse(text: str):
        import repae.config

        return bounded(lo, getattr(repae.config, limit))(text)

    parse.__name__ = "an integer"
    return parse


SEED = _config_bounded(0, "MAX_SEED")  # numpy's seed range, as train.seed / sample.seed
IMAGE_SIZE = _config_bounded(1, "MAX_IMAGE_SIZE")  # as data.image_size: a typo must not ask for a 100000^2 crop


def _pil_suffixes() -> Collection[str]:
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def _figure_suffixes() -> Collection[str]:
    from matplotlib.figure import Figure

    return {"." + ext for ext in Figure().canvas.get_supported_filetypes()}


_SUFFIXES = {"image": _pil_suffixes, "figure": _figure_suffixes}


def _not_writable(directory: Path, target: Path) -> Optional[str]:
    """Why `target` cannot be written in `directory`, as far as can be told before writing (None: it can): the
    nearest existing directory at or above `directory` must be writable (not a read-only mount or another
    user's folder). Checked with the arguments, so that a command does not do its work and then fail to save."""
    here = directory
    while not here.exists() and here != here.parent:
        here = here.parent
    if here.is_dir() and not os.access(here, os.W_OK | os.X_OK):
        return f"cannot write {target}: {here} is not writable"
    return None


def out_file(kind: Union[str, Collection[str], None] = None) -> Callable[[str], str]:
    """An argparse `type=` for a file the command writes at its end: never an existing directory, and with
    a suffix the writer understands (`kind`: 'image' (PIL), 'figure' (matplotlib), a set of suffixes such
    as {'.npz'}, or None: any), checked before the work that would be lost."""
    def parse(text: str) -> str:
        path = Path(text)
        if not text or path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory: give a file name inside it")
        why = _not_writable(path.parent, path)
        if why:
            raise argparse.ArgumentTypeError(why)
        if kind is None:
            return text
        allowed = _SUFFIXES[kind]() if isinstance(kind, str) else kind
        if path.suffix.lower() not in allowed:
            shown = ", ".join(s for s in (".png", ".jpg", ".webp", ".pdf", ".svg", ".npz") if s in allowed)
            raise argparse.ArgumentTypeError(f"{text!r} needs a file extension saying the format "
                                             f"({shown or ', '.join(sorted(allowed))})")
        return text

    parse.__name__ = "output file"
    return parse


def out_dir(text: str) -> str:
    """An argparse `type=` for a directory the command creates or resumes: not an existing file."""
    if not text or (Path(text).exists() and not Path(text).is_dir()):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a directory (created if missing)")
    why = _not_writable(Path(text), Path(text))
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def device_arg(text: str) -> str:
    """An argparse `type=` for --device: the names train.device takes (config.DEVICE_NAMES), a CUDA one only
    where torch sees it (dist.check_cuda_device, the rule train.device follows too)."""
    from repae.config import DEVICE_NAMES, ConfigError

    if not DEVICE_NAMES.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, mps, cuda or cuda:N")
    if text.startswith("cuda"):  # only then is torch imported: `repae --help` stays fast
        from repae.dist import check_cuda_device

        try:
            check_cuda_device(text, setting="--device")
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


class Parser(argparse.ArgumentParser):
    """argparse, but a missing positional is not reported together with the optional key=value list
    (`nargs="*"` positionals after it are listed as "required" by plain argparse)."""

    def error(self, message: str):
        message = re.sub(r"(required: .*?), key=value\b", r"\1", message)
        super().error(message)


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


def cmd_sample(args: argparse.Namespace) -> int:
    """Grid (and .npz) of class-conditional samples. Under `torchrun --nproc_per_node W` the .npz is
    written by all ranks together: exactly sample.num_samples samples, in index order."""
    import torch

    from repae import dist, hub
    from repae.build import build_sit, build_vae
    from repae.config import load_config, save_config
    from repae.generate import generate_images, generate_npz, sample_labels, sampler_settings, save_image_grid
    from repae.nn_utils import compile_for_sampling, init_device
    from repae.stage2.latents import vae_files
    from repae.weights import load_latent_stats, load_model

    _check_sample_inputs(args)
    if getattr(args, "num_samples", None) is not None:
        args.overrides = [*args.overrides, f"sample.num_samples={args.num_samples}"]
    # a released SiT (hf:REPA-E/sit-...): its preset, VAE and the README's sampling protocol, under
    # the user's own --preset / --vae / overrides
    args.preset, args.overrides, args.vae = hub.apply_sample_protocol(args.ckpt, args.preset, args.overrides, args.vae)
    from_run = bool(args.ckpt) and Path(args.ckpt).is_dir()
    if from_run:  # a training run: its saved config (plus any overrides), EMA SiT and tuned VAE
        from repae.train.checkpoint import load_for_sampling

        cfg, sit, vae = load_for_sampling(Path(args.ckpt), args.config, args.overrides)
    elif args.random_init:
        cfg = load_config(args.preset, args.config, args.overrides, world_size=1)  # the train batch is moot here
        torch.manual_seed(cfg.sample.seed)  # the same random weights on every rank
        sit, vae = build_sit(cfg), build_vae(cfg)
    elif args.ckpt:
        cfg = load_config(args.preset, args.config, args.overrides, world_size=1)
        sit = load_model(args.ckpt, kind="sit", prefer_ema=cfg.sample.use_ema)
        vae_path = args.vae if hub.is_hub_id(args.vae) else vae_files(args.vae)[0] if args.vae else None
        vae = load_model(vae_path, kind="vae") if vae_path else build_vae(cfg)  # or an export dir
    else:  # argparse requires one of them; a caller of cmd_sample may not have
        raise UsageError("give --ckpt PATH (a run, a SiT checkpoint) or --random-init")
    device = init_device(cfg)  # joins the torchrun process group when there is one
    is_main = dist.is_main()
    if args.random_init and is_main:
        print("smoke run: randomly initialised SiT and VAE; the images show the pipeline works, not a model")
    torch.manual_seed(cfg.sample.seed)
    if cfg.vae.latent_stats_path and sit.bn is not None and not from_run:
        # the SiT's latent channels: a stats file of another VAE is named as such, not a shape error later
        mean, var = load_latent_stats(cfg.vae.latent_stats_path, channels=sit.args.in_channels)
        sit.bn.init_from_stats(mean, var)
    sit.to(device)
    vae.to(device)
    if cfg.sample.compile:
        compile_for_sampling(sit, vae, cfg.sample.compile_mode)

    n = cfg.sample.num_samples
    labels = sample_labels(n, sit.num_classes, cfg.eval.label_sampling, cfg.sample.seed)  # balanced: i % C
    shown = min(n, 100)
    sampler = sampler_settings(cfg, device=device)
    start = time.perf_counter()
    if args.npz:  # every rank generates its batches; rank 0 assembles the .npz
        try:
            images = generate_npz(sit, vae, labels, args.npz, batch_size=cfg.sample.batch_size, keep=shown,
                                  progress=is_main, refuse_nonfinite=True, **sampler)
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: generate_npz removed its partial files
            err.args = (f"nothing was kept: {args.npz} was not written and its partial samples were removed",)
            raise
        except Exception:
            if is_main:
                print(f"repae sample: {args.npz} was not written; its partial samples were removed", file=sys.stderr)
            raise
    elif is_main:  # a grid only: rank 0 alone
        images = generate_images(sit, vae, labels[:shown], batch_size=cfg.sample.batch_size, refuse_nonfinite=True,
                                 **sampler)
    if not is_main:
        return 0
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    nrow = min(sit.num_classes, shown) if sit.num_classes <= 20 else min(shown, 10)  # toy: column c = class c
    save_image_grid(images, out, nrow=nrow, upscale=max(1, 128 // images.shape[-1]))
    save_config(cfg, out.with_suffix(".config.yaml"))
    made = n if args.npz else shown
    print(f"wrote {out} ({shown} samples, {cfg.sample.mode}-{cfg.sample.num_steps}, "
          f"{made / elapsed:.1f} images/s over {dist.world_size()} process(es))")
    if args.npz:
        print(f"wrote {args.npz} ({n} samples, ADM layout: arr_0 uint8 [N,H,W,3], labels [N], "
              f"{cfg.eval.label_sampling} labels)")
    return 0


def _check_sample_inputs(args: argparse.Namespace) -> None:
    """What `repae sample` is given, checked before anything is loaded or sampled: the checkpoint and VAE
    exist and are what they are given as, and --vae is not given with a run (whose tuned VAE it brings)."""
    from repae.evaluate.sources import check_dir_role, is_run_or_checkpoint_dir

    if args.ckpt:
        check_dir_role(args.ckpt, "sit or run", missing="checkpoint")
        if args.vae and is_run_or_checkpoint_dir(args.ckpt):  # as `repae evaluate samples RUN --vae X` refuses it
            raise UsageError(f"--vae is not used with a training run ({args.ckpt}): its tuned VAE is in the "
                             "checkpoint; give --vae only with a SiT weight file")
    if args.vae:
        check_dir_role(args.vae, "vae", missing="VAE")


def _budget_note(summary: dict, max_steps: int) -> Optional[str]:
    """Why a run trained nothing: it was already past train.max_steps (the final evaluation only re-ran)."""
    if summary.get("steps_this_invocation") == 0 and summary.get("steps", 0) > max_steps:
        return (f"note: the run was already at step {summary['steps']}, past train.max_steps={max_steps}: nothing "
                f"was trained this time; raise train.max_steps above {summary['steps']} to train further")
    return None


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from repae.train.loop import train
    from repae.train.report import is_default_toy_run, run_story

    cfg = _load_cfg(args)
    default_run = is_default_toy_run(cfg)  # asked before training fills vae.path with the toy world's VAE
    summary = train(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    if "wall_seconds" in summary:  # rank 0 (the others return only their step)
        print("\n".join(run_story(summary, cfg.run_dir, default_run, cfg.train.tune_vae)), file=sys.stderr)
        note = _budget_note(summary, cfg.train.max_steps)
        if note:
            print(note, file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from repae.evaluate.sources import check_dir_role, dir_kind
    from repae.hub import local_path
    from repae.weights import file_metadata, load_model, vae_sidecar

    check_dir_role(args.path, "weights", missing="weight file")  # a run, a latent cache, ...: says what it is
    path = local_path(args.path, args.kind or "file")  # a hub id: the file in the hub cache
    if dir_kind(path) == "export-vae":  # `repae export-vae` output: its VAE, as every other command reads it
        path = str(Path(path) / "vae.safetensors")
    model = load_model(path, kind=args.kind, norm_groups=args.norm_groups)
    meta = file_metadata(path) if Path(path).is_file() else {}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.path}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters")
    print(f"  {model.args}")
    if meta:
        print(f"  metadata keys: {sorted(meta)}")
    elif Path(path).is_file() and vae_sidecar(path).is_file() and not hasattr(model.args, "depth"):
        print(f"  architecture from the sidecar {vae_sidecar(path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="repae", description="REPA-E: end-to-end VAE + latent diffusion training")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors and interrupts (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

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
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="a training run directory (its EMA SiT, VAE and config), or SiT weights: "
                                     "our .safetensors or an official .pt (EMA preferred), or a hub id "
                                     "hf:owner/name[@revision][/file]; a released one (hf:REPA-E/sit-repae-sdvae, ...) "
                                     "brings its preset, VAE and published sampling protocol")
    p.add_argument("--vae", help="VAE for a SiT weight file (a run brings its own): .safetensors, official .pt, "
                                 "an export-vae or diffusers directory, or a hub id")
    what.add_argument("--random-init", action="store_true", help="smoke test with untrained models")
    p.add_argument("--out", default="runs/samples.png", type=out_file("image"),
                   help="image grid path (.png, .jpg, .webp; default runs/samples.png)")
    p.add_argument("--npz", type=out_file({".npz"}), help="also write the samples as an ADM-style .npz (FILE.npz)")
    p.add_argument("--num-samples", type=POSITIVE, help="number of samples (sets sample.num_samples)")
    p.set_defaults(func=cmd_sample)

    from repae import bench
    from repae.data import prepare_cli
    from repae.evaluate import cli as evaluate_cli

    from repae.stage2.commands import add_parsers as add_stage2_parsers

    bench.add_parser(sub)
    prepare_cli.add_parser(sub)
    evaluate_cli.add_parser(sub)
    add_stage2_parsers(sub, _add_config_args)  # export-vae, cache-latents, train-ldm

    p = sub.add_parser("info", help="load a weight file strictly and describe it")
    p.add_argument("path", help="a SiT or VAE weight file (.safetensors, official .pt), an export-vae or diffusers "
                                "directory, or a hub id hf:owner/name[@revision][/file]")
    p.add_argument("--kind", choices=["sit", "vae"], help="what the file holds (default: from its metadata, "
                                                          "else guessed from its tensor names)")
    p.add_argument("--norm-groups", type=POSITIVE, help="GroupNorm groups of a bare VAE state dict (.pt) that records "
                                                    "no architecture and has no .json sidecar")
    p.set_defaults(func=cmd_info)
    return parser


def _user_errors() -> tuple:
    """Exceptions that are the user's to fix: one or two lines on stderr and exit code 2."""
    from repae.config import ConfigError
    from repae.data.folder import UnreadableImagesError
    from repae.data.packed import PackedDataError
    from repae.evaluate.errors import EvaluationError
    from repae.generate import NonFiniteSamples
    from repae.weights import CheckpointError

    # FloatingPointError: training stopped after max_nonfinite_in_a_row non-finite steps (a diverged run or
    # damaged data), which its message says in full
    return (ConfigError, CheckpointError, EvaluationError, FileNotFoundError, FileExistsError, NotADirectoryError,
            UnreadableImagesError, PackedDataError, UsageError, NonFiniteSamples, FloatingPointError)


# a write (or read) refused by the storage: full, read-only, over quota, not permitted
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENAMETOOLONG}


def _plain_message(err: BaseException) -> str:
    """The error's own message: for a file, what is missing; for an error re-raised from a DataLoader
    worker, the worker traceback it carries reduced to its last line."""
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"no such file or directory: {err.filename}"
    if isinstance(err, (FileExistsError, NotADirectoryError)) and err.filename:  # a file where a directory goes
        return f"{err.filename} is a file, where a directory is needed"
    text = str(err).strip()
    if "Traceback (most recent call last)" in text:
        # "[module.]Name: message", whichever module the class was defined in when the worker raised it
        text = re.sub(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ", "", text.splitlines()[-1])
    return text


def _report(err: BaseException, command: str, debug: bool) -> Optional[int]:
    """Exit code and stderr line(s) for an exception the command line handles itself; None for any
    other (it propagates with its traceback). `debug`: print the traceback as well."""
    import traceback

    from repae import dist
    from repae.interrupt import Interrupted

    if isinstance(err, Interrupted):  # a clean stop at a step boundary; rank 0 says where it saved
        code, line = err.exit_code, str(err) if dist.is_main() else None
    elif isinstance(err, KeyboardInterrupt):  # Ctrl-C (130), or SIGTERM turned into one (its exit_code, 143)
        code, line = getattr(err, "exit_code", 130), f"repae {command}: interrupted"
        if str(err):  # what was kept or lost, e.g. by `repae sample --npz`
            line += f"; {err}"
    elif isinstance(err, _user_errors()):
        code, line = 2, f"repae {command}: error: {_plain_message(err)}"
    elif isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:  # the user's disk or permissions, not a bug
        where = f": {err.filename}" if err.filename else ""
        code, line = 2, f"repae {command}: error: {err.strerror or err}{where}"
    else:
        return None
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__)
    if line:
        print(line, file=sys.stderr, flush=True)
    if isinstance(err, Interrupted):  # all ranks got here after the save; torchrun ends the others when
        dist.barrier()                # the first one exits, so none leaves before rank 0 has said its line
    return code


def _override_hint(extra: List[str]) -> str:
    """For `--max-steps 3` and the like: the config keys of that name, which are set as key=value."""
    from repae.config import RunConfig, to_dict

    def keys(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    every = list(keys(to_dict(RunConfig())))
    hints = []
    for flag in (e for e in extra if e.startswith("--")):
        name = flag[2:].split("=", 1)[0].replace("-", "_")
        hints += [f"{key}=VALUE" for key in every if key == name or key.endswith("." + name)]
    return f" (config settings are key=value overrides: {', '.join(hints)})" if hints else ""


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # argparse takes positionals in one run, so `repae train --no-progress a=1` would reject a=1:
    # key=value overrides may stand anywhere after the command, in the order given
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # `repae train --debug ...` as well as `repae --debug train ...`
        extra = [e for e in extra if e != "--debug"]
        args.debug = True
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}{_override_hint(extra)}")
        args.overrides = list(args.overrides) + extra
    from repae.freed_memory import reuse_freed_memory

    reuse_freed_memory()  # every command: training, sampling and evaluation all make large CPU tensors
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        code = _report(err, args.command, args.debug)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    # `python -m repae.cli`: run the `repae.cli` module the subcommands import (its UsageError is the one
    # they raise), not this `__main__` copy of it
    from repae.cli import main as package_main

    sys.exit(package_main())
