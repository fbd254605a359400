"""Reading and writing model weights, and loading a SiT or VAE from whatever file a user has.

Accepted sources for `load_model`:
- our `.safetensors` (architecture stored in the file's metadata),
- official REPA / REPA-E `.pt` files: a full training checkpoint (`ema`/`model`/`vae` entries),
  a bare VAE state dict, a SiT state dict; read with `weights_only=True` and an explicit
  allow-list (argparse.Namespace, which the official checkpoints pickle as `args`),
- a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).
Each may also be named by a hub id, `hf:owner/name[@revision][/file]` (`repae.hub`).
Loading is always strict; any mismatch raises CheckpointError naming each key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import torch
from torch import nn

from repae.models.sit import SiT, SiTArgs
from repae.models.vae import AutoencoderKL, VAEArgs
from repae.models import vae_diffusers

if TYPE_CHECKING:  # repae.config imports this module: a runtime import would be circular
    from repae.config import Range

StateDict = Dict[str, torch.Tensor]
# Types the official checkpoints pickle besides tensors; nothing else is unpickled.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(RuntimeError):
    """A weight file that cannot be used: missing, unreadable, or not matching the model."""


# --------------------------------------------------------------------------- files


def _local(path: Union[str, os.PathLike], kind: str) -> Union[str, os.PathLike]:
    """A hub id resolved to its local file for `kind`; any other path unchanged."""
    from repae import hub  # imports this module: a top-level import would be circular

    return hub.local_path(path, kind)


def read_file(path: Union[str, os.PathLike]) -> dict:
    """Load a .safetensors or a torch pickle (.pt/.pth/.bin/.ckpt) safely; CheckpointError if unreadable.
    `path` may be a hub id naming one file (`repae.hub`)."""
    path = Path(_local(path, "file"))
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a weight file (or use load_model for diffusers dirs)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad pickle; name the file either way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read {path}: truncated, corrupt, or holds objects outside the allow-list ({reason})"
        ) from None


def file_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The string metadata of a .safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({err})") from None


def save_weights(module_or_state: Union[nn.Module, StateDict], path: Union[str, os.PathLike],
                 metadata: Optional[Dict[str, str]] = None) -> Path:
    """Atomically write a state dict as safetensors (tmp file + rename: no half-written file on a crash)."""
    from safetensors.torch import save_file

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def save_model(model: Union[SiT, AutoencoderKL], path: Union[str, os.PathLike]) -> Path:
    """Weights plus the architecture (as JSON metadata), so `load_model(path)` needs nothing else."""
    kind = "sit" if isinstance(model, SiT) else "vae"
    meta = {"repae_kind": kind, "repae_args": json.dumps(dataclasses.asdict(model.args))}
    return save_weights(model, path, meta)


# ------------------------------------------------------------------- strict loading


def load_strict(module: nn.Module, state: StateDict, source: str = "state dict") -> nn.Module:
    """load_state_dict(strict=True) with one error listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(state, strict=True)
    return module


# --------------------------------------------------------------- architecture inference


def _count(state: StateDict, pattern: str) -> int:
    ids = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(ids) + 1 if ids else 0


def sit_args_from_state(state: StateDict, encoder_depth: int = 8, **overrides) -> SiTArgs:
    """Rebuild SiTArgs from an official SiT state dict. `encoder_depth` cannot be read from
    weights (the reference default is 8); pass it if the run used another."""
    try:
        proj = state["x_embedder.proj.weight"]  # [D, C, p, p]
        hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        tokens = state["pos_embed"].shape[1]
        table = state["y_embedder.embedding_table.weight"].shape[0]
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a SiT state dict: missing key {err.args[0]!r}") from None
    depth = _count(state, r"blocks\.(\d+)\.")
    n_proj = _count(state, r"projectors\.(\d+)\.")
    z_dims = [state[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
    projector_dim = state["projectors.0.0.weight"].shape[0] if n_proj else 2048
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0] if qk_norm else None
    num_heads = hidden // head_dim if head_dim else {384: 6, 768: 12, 1024: 16, 1152: 16}.get(hidden, hidden // 64)
    num_classes = overrides.pop("num_classes", None)
    if num_classes is None:  # official models: 1000 classes (+1 null row when trained with label dropout)
        num_classes = 1000 if table in (1000, 1001) else table - 1
    if table not in (num_classes, num_classes + 1):
        raise CheckpointError(f"label table has {table} rows, which does not fit num_classes={num_classes}")
    args = SiTArgs(
        input_size=int(round(tokens**0.5)) * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, z_dims=z_dims,
        projector_dim=projector_dim, encoder_depth=min(encoder_depth, depth), qk_norm=qk_norm,
        latent_norm="bn.running_mean" in state, num_classes=num_classes, with_null_class=table == num_classes + 1,
    )
    return dataclasses.replace(args, **overrides)


def vae_args_from_state(state: StateDict) -> VAEArgs:
    """Rebuild VAEArgs (LDM layout) from an LDM AutoencoderKL state dict; norm_groups is NOT read
    (it cannot be): use guess_vae_args to load a file that does not record it."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        z = state["post_quant_conv.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not an AutoencoderKL state dict: missing key {err.args[0]!r}") from None
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    res_blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    resolution = 256
    attn = [resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    # the GroupNorm group count is not in the tensors: norm_groups is left at VAEArgs' 32 here;
    # loaders take it from a record (metadata, sidecar) or from guess_vae_args, which says so
    return VAEArgs(ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks, z_channels=z,
                   attn_resolutions=attn, resolution=resolution)


# ------------------------------------------------------------------------ load_model


def _pick(obj: dict, kind: str, prefer_ema: bool) -> Tuple[StateDict, str]:
    """The state dict of `kind` inside a loaded file (full training checkpoint or bare state dict)."""
    if kind == "vae":
        if "vae" in obj and isinstance(obj["vae"], dict):
            return obj["vae"], "['vae']"
        return obj, ""
    for entry in (["ema", "model"] if prefer_ema else ["model", "ema"]):
        if entry in obj and isinstance(obj[entry], dict):
            return obj[entry], f"[{entry!r}]"
    return obj, ""


def _guess_kind(state: dict) -> str:
    if "x_embedder.proj.weight" in state or "ema" in state or "model" in state:
        return "sit"
    if "encoder.conv_in.weight" in state or "vae" in state:
        return "vae"
    raise CheckpointError("cannot tell whether this file holds a SiT or a VAE; pass kind='sit' or kind='vae'")


def load_model(path: Union[str, os.PathLike], kind: Optional[str] = None, args=None, prefer_ema: bool = True,
               norm_groups: Optional[int] = None, **sit_overrides) -> Union[SiT, AutoencoderKL]:
    """Build and strictly load a SiT or VAE from a local file or diffusers directory, or a hub id
    (`hf:owner/name[@revision][/file]`; without a file, the repo's file for `kind`).

    kind: "sit" | "vae" | None (detected). args: SiTArgs / VAEArgs to build with (default: read
    from our metadata, a `.json` sidecar beside a `.pt` VAE, or inferred from the weights).
    norm_groups: the GroupNorm group count of a VAE whose file records no architecture (see
    `guess_vae_args`); an error if it contradicts a record. prefer_ema picks `ema` over `model` in
    training checkpoints. Raises CheckpointError naming the path and any mismatched keys.
    """
    path = Path(_local(path, kind or "file"))
    if path.is_dir():
        if kind not in (None, "vae"):
            raise CheckpointError(f"{path} is a directory: only diffusers VAE directories are supported")
        return _load_diffusers_dir(path, args, norm_groups)
    meta = file_metadata(path)
    obj = read_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    saved_kind = meta.get("repae_kind")
    if saved_kind is not None and saved_kind not in ("sit", "vae"):
        raise CheckpointError(f"{path}: metadata repae_kind={saved_kind[:40]!r} must be 'sit' or 'vae'")
    if kind and saved_kind and kind != saved_kind and "repae_args" in meta:
        raise CheckpointError(f"{path} holds a {saved_kind}, not a {kind} (metadata repae_kind)")
    kind = kind or saved_kind or _guess_kind(obj)
    if kind not in ("sit", "vae"):
        raise CheckpointError(f"kind must be 'sit' or 'vae', got {kind!r}")
    state, where = _pick(obj, kind, prefer_ema)
    recorded = None
    if "repae_args" in meta:
        # checked against caps and against the tensors in the file before anything is allocated:
        # a small file must not make us build the huge model its metadata claims
        recorded = args_from_metadata(path, kind, meta["repae_args"])
        check_args_match_weights(path, recorded, state)
    elif kind == "vae" and vae_sidecar(path).is_file():
        recorded = read_vae_sidecar(path, state)
    elif kind == "vae":
        recorded = _export_record_args(path, state)
    if kind == "vae":
        _check_norm_groups(path, recorded, args, norm_groups)
    args = args or recorded
    if kind == "sit":
        args = args or sit_args_from_state(state, **sit_overrides)
        model: nn.Module = SiT(args)
    else:
        model = AutoencoderKL(args or guess_vae_args(path, state, norm_groups))
    return load_strict(model, state, f"{path}{where}")


# ------------------------------------------------ VAE architecture beside a bare state dict
#
# A bare VAE state dict (the official REPA-E `e2e-vae.pt`, an SD-VAE `.pt`) records every width
# but not the GroupNorm group count: GroupNorm's weight and bias are per channel, so ANY common
# divisor of the widths fits the tensors, and a wrong count loads strictly yet computes another
# function. `repae export-vae` therefore writes a sidecar FILE.json beside FILE.pt, and every
# loader reads it. Without a sidecar the count is guessed only where one answer is known:


def vae_sidecar(path: Union[str, os.PathLike]) -> Path:
    """The architecture record beside a bare VAE state dict: e2e-vae.pt -> e2e-vae.json."""
    return Path(path).with_suffix(".json")


def write_vae_sidecar(args: VAEArgs, weights_path: Union[str, os.PathLike]) -> Path:
    """Write `vae_sidecar(weights_path)`: {"repae_kind": "vae", "repae_args": {VAEArgs fields}}."""
    record = {"repae_kind": "vae", "repae_args": dataclasses.asdict(args)}
    out = vae_sidecar(weights_path)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


def read_vae_sidecar(path: Union[str, os.PathLike], state: StateDict) -> VAEArgs:
    """VAEArgs from the sidecar of `path`, checked against the tensors. `repae_args` may name only
    some fields (e.g. {"norm_groups": 8}): the others are read from the tensor shapes."""
    side = vae_sidecar(path)
    text = side.read_text()[: MAX_METADATA_CHARS + 1]
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{side} (architecture of {Path(path).name}) is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(record, dict) or record.get("repae_kind", "vae") != "vae" or not isinstance(
            record.get("repae_args"), dict):
        raise CheckpointError(f'{side} must be {{"repae_kind": "vae", "repae_args": {{VAEArgs fields}}}}')
    fields = record["repae_args"]
    args_from_metadata(side, "vae", json.dumps(fields))  # known fields, right types, within caps
    args = dataclasses.replace(vae_args_from_state(state), **fields)
    check_args_match_weights(side, args, state)
    return args


def _export_record_args(path: Path, state: StateDict) -> Optional[VAEArgs]:
    """VAEArgs from the export.json an older `repae export-vae` (before sidecars) wrote beside this
    very file (its sha256 listed there), else None."""
    record_file = path.parent / "export.json"
    if not record_file.is_file() or record_file.stat().st_size > 1 << 20:
        return None
    try:
        record = json.loads(record_file.read_text())
        listed, fields = record["sha256"][path.name], record["vae_args"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    from repae.fileio import sha256_file

    if not isinstance(fields, dict) or listed != sha256_file(path):
        return None
    args = args_from_metadata(record_file, "vae", json.dumps(fields))
    check_args_match_weights(record_file, args, state)
    return args


def group_count_choices(args: VAEArgs) -> list:
    """Every GroupNorm group count the tensors of a VAE with these widths allow: the divisors of
    the greatest common divisor of all widths (ch * each ch_mult, and ch itself)."""
    g = math.gcd(*[args.ch * m for m in [1, *args.ch_mult]])
    return [d for d in range(1, g + 1) if g % d == 0]


LDM_BASE_WIDTH = 128  # ch of every published LDM-family VAE (SD 1.x/2.x, SDXL, FLUX, REPA-E E2E-VAEs): 32 groups


def guess_vae_args(path: Union[str, os.PathLike], state: StateDict, norm_groups: Optional[int] = None) -> VAEArgs:
    """VAEArgs of a VAE state dict with no architecture record; says on stderr (one line) what it took.

    The widths, depth and attention come from the tensor shapes. The group count does not: rule:
    - `norm_groups` given: used, if it divides every width;
    - only one count divides every width (their gcd is 1): that one;
    - base width ch == 128, the LDM family's (every published SD/SDXL/FLUX/REPA-E VAE, all with
      32 groups): 32, the LDM convention;
    - otherwise several counts fit equally and nothing says which: CheckpointError naming the file,
      the counts that fit, the sidecar to write and the option to pass."""
    found = vae_args_from_state(state)
    choices = group_count_choices(found)
    if norm_groups is not None:
        if norm_groups not in choices:
            raise CheckpointError(f"{path}: norm_groups={norm_groups} does not divide the VAE widths "
                                  f"(ch={found.ch}, ch_mult={list(found.ch_mult)}); counts that fit: {choices}")
        groups, why = norm_groups, "as passed"
    elif len(choices) == 1:
        groups, why = choices[0], "the only count that divides the widths"
    elif found.ch == LDM_BASE_WIDTH and 32 in choices:
        groups, why = 32, f"the LDM convention for ch={LDM_BASE_WIDTH} (SD-VAE family)"
    else:
        raise CheckpointError(
            f"{path}: a bare VAE state dict does not record its GroupNorm group count, and with ch={found.ch}, "
            f"ch_mult={list(found.ch_mult)} the tensors fit {len(choices)} counts ({choices}); no sidecar "
            f"{vae_sidecar(path)} is beside it. Pass the count: vae.norm_groups=N (a run config), "
            f"--norm-groups N (repae info), norm_groups=N (repae.weights.load_model), or write "
            f'{vae_sidecar(path)} as {{"repae_kind": "vae", "repae_args": {{"norm_groups": N}}}}')
    args = dataclasses.replace(found, norm_groups=groups)
    print(f"repae: {path} records no VAE architecture (no {vae_sidecar(path).name}); guessed from tensor shapes: "
          f"ch={args.ch}, ch_mult={list(args.ch_mult)}, num_res_blocks={args.num_res_blocks}, "
          f"z_channels={args.z_channels}, attention levels={args.attn_levels()}, norm_groups={groups} ({why})",
          file=sys.stderr)
    return args


def _check_norm_groups(path, recorded: Optional[VAEArgs], args: Optional[VAEArgs], norm_groups: Optional[int]) -> None:
    """A group count given by the caller (args / norm_groups) must equal the one the file records."""
    for given, how in ((args.norm_groups if args else None, "the given VAEArgs"), (norm_groups, "norm_groups")):
        if given is not None and recorded is not None and given != recorded.norm_groups:
            raise CheckpointError(f"{path} records norm_groups={recorded.norm_groups}, but {how} say(s) {given}: "
                                  f"the same weights would compute another function (set vae.norm_groups="
                                  f"{recorded.norm_groups})")


# Caps on the architecture a weight file's metadata may describe: far above any published model
# (SiT-XL: depth 28, hidden 1152; SD-VAE: ch 128, ch_mult of 4, z 4) yet small enough that a
# typo or a hostile file cannot ask for terabytes before the tensors are compared.
def _metadata_rules() -> Dict[str, Dict[str, "Range"]]:
    from repae.config import Range

    def i(lo: int, hi: int) -> Range:
        return Range(lo, hi, integer=True)

    def ints(lo: int, hi: int, min_len: int, max_len: int) -> Range:
        return Range(lo, hi, integer=True, each=True, min_len=min_len, max_len=max_len)

    return {
        "sit": {"input_size": i(1, 1024), "patch_size": i(1, 16), "in_channels": i(1, 4096),
                "hidden_size": i(1, 16384), "depth": i(1, 256), "num_heads": i(1, 1024),
                "mlp_ratio": Range(0, 64, lo_open=True), "num_classes": i(1, 1_000_000),
                "z_dims": ints(1, 65536, 0, 16), "projector_dim": i(1, 65536), "encoder_depth": i(1, 256),
                "bn_momentum": Range(0, 1), "bn_eps": Range(0, 1, lo_open=True),
                "time_scale": Range(0, 1e6, lo_open=True)},
        "vae": {"ch": i(1, 4096), "ch_mult": ints(1, 64, 1, 8), "num_res_blocks": i(1, 64),
                "z_channels": i(1, 4096), "attn_resolutions": ints(1, 65536, 0, 16),
                "resolution": i(1, 65536), "norm_groups": i(1, 4096), "in_channels": i(1, 64)},
    }


_METADATA_BOOLS = {"with_null_class", "qk_norm", "latent_norm", "bn_denorm_eps", "pos_embed_trainable"}
_METADATA_CHOICES = {"attention": ("auto", "sdpa", "math")}
MAX_METADATA_CHARS = 1 << 16  # the JSON of an args dataclass is a few hundred characters


def args_from_metadata(path: Union[str, os.PathLike], kind: str, text: str) -> Union[SiTArgs, VAEArgs]:
    """SiTArgs / VAEArgs from a file's `repae_args` JSON: known fields only, right types, within caps.
    CheckpointError naming the file and the field otherwise."""
    cls = SiTArgs if kind == "sit" else VAEArgs
    where = f"{path}: metadata repae_args"
    if len(text) > MAX_METADATA_CHARS:
        raise CheckpointError(f"{where} is {len(text)} characters; architecture arguments are a few hundred")
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{where} is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where} must be a JSON object of {cls.__name__} fields")
    known = {f.name for f in dataclasses.fields(cls)}
    rules = _metadata_rules()[kind]
    errors = [f"unknown field {k[:40]!r} for a {kind}" for k in fields if k not in known]
    for key, value in fields.items():
        if key in rules:
            msg = rules[key].check(key, value)
            errors += [msg] if msg else []
        elif key in _METADATA_BOOLS and not isinstance(value, bool):
            errors.append(f"{key}={str(value)[:40]} must be true or false")
        elif key in _METADATA_CHOICES and value not in _METADATA_CHOICES[key]:
            errors.append(f"{key}={str(value)[:40]!r} must be one of {_METADATA_CHOICES[key]}")
    if errors:
        raise CheckpointError(f"{where}: " + "; ".join(errors[:10]))
    return cls(**fields)


def check_args_match_weights(path: Union[str, os.PathLike], args: Union[SiTArgs, VAEArgs], state: StateDict) -> None:
    """The architecture fields of `args` against what the file's tensor shapes imply, before building:
    CheckpointError naming the file and each field that differs."""
    try:
        if isinstance(args, SiTArgs):
            found = sit_args_from_state(state, num_classes=args.num_classes)
            pairs = {f: (getattr(args, f), getattr(found, f)) for f in (
                "input_size", "patch_size", "in_channels", "hidden_size", "depth", "qk_norm", "latent_norm",
                "with_null_class")}
            pairs["z_dims"] = (list(args.z_dims), list(found.z_dims))
            if args.z_dims:
                pairs["projector_dim"] = (args.projector_dim, found.projector_dim)
            pairs["mlp_ratio"] = (int(args.hidden_size * args.mlp_ratio), round(found.mlp_ratio * found.hidden_size))
            if args.qk_norm:
                pairs["num_heads"] = (args.num_heads, found.num_heads)
        else:
            found = vae_args_from_state(state)
            pairs = {f: (getattr(args, f), getattr(found, f)) for f in ("ch", "z_channels", "num_res_blocks")}
            pairs["ch_mult"] = (list(args.ch_mult), list(found.ch_mult))
            pairs["in_channels"] = (args.in_channels, state["encoder.conv_in.weight"].shape[1])
            if pairs["ch_mult"][0] == pairs["ch_mult"][1]:
                pairs["attn_resolutions"] = (args.attn_levels(), found.attn_levels())
    except CheckpointError as err:
        raise CheckpointError(f"{path}: metadata describes a {type(args).__name__[:-4]}, but {err}") from None
    except (KeyError, IndexError, ZeroDivisionError) as err:
        raise CheckpointError(f"{path}: the tensors do not form the model its metadata describes ({err!r})") from None
    wrong = [f"{k}={a} (tensors: {b})" for k, (a, b) in pairs.items() if a != b]
    if wrong:
        raise CheckpointError(f"{path}: metadata repae_args does not match the tensors in the file: " + ", ".join(wrong))
    if isinstance(args, SiTArgs) and args.encoder_depth > args.depth:
        raise CheckpointError(f"{path}: metadata repae_args encoder_depth={args.encoder_depth} is deeper than "
                              f"depth={args.depth}")
    if isinstance(args, SiTArgs) and args.hidden_size % args.num_heads:
        raise CheckpointError(f"{path}: metadata repae_args hidden_size={args.hidden_size} is not divisible by "
                              f"num_heads={args.num_heads}")
    if isinstance(args, VAEArgs) and any((args.ch * m) % args.norm_groups for m in [1, *args.ch_mult]):
        raise CheckpointError(f"{path}: metadata repae_args norm_groups={args.norm_groups} does not divide the "
                              f"VAE widths (ch={args.ch}, ch_mult={list(args.ch_mult)})")


def _load_diffusers_dir(path: Path, args: Optional[VAEArgs], norm_groups: Optional[int] = None) -> AutoencoderKL:
    config_file, weights = path / vae_diffusers.CONFIG_NAME, path / vae_diffusers.WEIGHTS_NAME
    for f in (config_file, weights):
        if not f.is_file():
            raise CheckpointError(f"diffusers VAE directory {path} has no {f.name}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
    try:
        recorded = vae_diffusers.args_from_diffusers_config(config)
        _check_norm_groups(path, recorded, args, norm_groups)
        args = args or recorded
        state = vae_diffusers.from_diffusers_state(read_file(weights), args)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: {err.args[0]}") from None
    return load_strict(AutoencoderKL(args), state, str(weights))


# ------------------------------------------------------------------- latent statistics


def load_latent_stats(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean [C], var [C]) from an official `*-latents-stats.pt`
    ({'latents_scale': 1/std, 'latents_bias': mean}) or our safetensors ({'mean', 'var'}); or a hub id
    (without a file: the repo's `*-latents-stats.pt`)."""
    path = _local(path, "latent_stats")
    obj = read_file(path)
    if "latents_scale" in obj and "latents_bias" in obj:
        scale = obj["latents_scale"].reshape(-1).double()
        return obj["latents_bias"].reshape(-1).float(), scale.pow(-2).float()
    if "mean" in obj and "var" in obj:
        return obj["mean"].reshape(-1).float(), obj["var"].reshape(-1).float()
    raise CheckpointError(
        f"{path} holds no latent statistics: expected keys latents_scale/latents_bias or mean/var, found {sorted(obj)}"
    )


def save_latent_stats(mean: torch.Tensor, var: torch.Tensor, path: Union[str, os.PathLike]) -> Path:
    return save_weights({"mean": mean.reshape(-1).float(), "var": var.reshape(-1).float()}, path)
