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
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from repae.fileio import SPECIAL_FILE, JsonFileError, is_special_file, read_json_object, sha256_file
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


def _refuse_special_file(path: Path) -> None:
    if is_special_file(path):
        raise CheckpointError(f"{path} is {SPECIAL_FILE}; expected a weight file")


def read_file(path: Union[str, os.PathLike]) -> dict:
    """Load a .safetensors or a torch pickle (.pt/.pth/.bin/.ckpt) safely; CheckpointError if unreadable.
    `path` may be a hub id naming one file (`repae.hub`)."""
    path = Path(_local(path, "file"))
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a weight file (or use load_model for diffusers dirs)")
    _refuse_special_file(path)
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
        reason = torch_load_reason(err)
        if not reason.startswith("it pickles"):
            reason = f"truncated, corrupt, or holds objects outside the allow-list ({reason})"
        raise CheckpointError(f"cannot read {path}: {reason}") from None


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]{1,200})")


def torch_load_reason(err: Exception) -> str:
    """One line saying why torch.load(weights_only=True) refused a file. For a pickled object outside the
    allow-list, which object it is: torch's own message advises re-running with weights_only=False, which
    would let the file run code, and repae never does that with a file a user passes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch bolds part of its message
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        return (f"it pickles {found.group(1)}, which repae does not unpickle: only tensors and plain containers "
                f"are read from a pickle, as any other object could run code")
    return text.splitlines()[0][:300] if text else type(err).__name__


def file_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The string metadata of a .safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    _refuse_special_file(path)  # safe_open would block on a FIFO
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
    try:
        save_file(state, str(tmp), metadata=metadata or {})
    except Exception as err:  # safetensors reports a full disk as SafetensorError("... (os error 28)")
        tmp.unlink(missing_ok=True)
        code = re.search(r"os error (\d+)", str(err))
        if code:  # an OSError like any other write's, which the command line reports in one line
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        raise
    os.replace(tmp, path)
    return path


def architecture_metadata(module: nn.Module) -> Dict[str, str]:
    """{"repae_kind", "repae_args"}: the architecture of a SiT or AutoencoderKL as `load_model` reads it back
    from a file's metadata; {} for any other module (its file then holds weights only)."""
    if not isinstance(module, (SiT, AutoencoderKL)):
        return {}
    kind = "sit" if isinstance(module, SiT) else "vae"
    return {"repae_kind": kind, "repae_args": json.dumps(dataclasses.asdict(module.args))}


def save_model(model: Union[SiT, AutoencoderKL], path: Union[str, os.PathLike]) -> Path:
    """Weights plus the architecture (as JSON metadata), so `load_model(path)` needs nothing else."""
    return save_weights(model, path, architecture_metadata(model))


# ------------------------------------------------------------------- strict loading


def _short(value: object, limit: int = 80) -> str:
    """A key or value for an error message: a file may hold a megabyte-long name."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_fits(module: nn.Module, state: dict, source: str = "state dict") -> None:
    """load_strict's comparison alone: CheckpointError listing missing, unexpected and mis-shaped
    keys (and keys that are not names or values that are not tensors). `module` may live on the
    meta device, so a file can be compared with the model it describes before that is allocated."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [_short(k) for k in state if isinstance(k, str) and k not in own]
    odd = [f"{_short(k)} ({type(k).__name__})" for k in state if not isinstance(k, str)]
    not_tensors = [f"{k} ({type(state[k]).__name__})" for k in own if k in state
                   and not isinstance(state[k], torch.Tensor)]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    # a complex, integer or bool tensor where the model holds floats would be cast on loading (the
    # imaginary part dropped, weights rounded to integers) instead of refused
    dtypes = [f"{k}: file {state[k].dtype} vs model {own[k].dtype}" for k in own if k in state
              and isinstance(state[k], torch.Tensor) and state[k].dtype.is_floating_point != own[k].dtype.is_floating_point]
    if missing or unexpected or odd or not_tensors or shapes or dtypes:
        parts = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("keys that are not names", odd), ("values that are not tensors", not_tensors),
                             ("wrong shapes", shapes), ("wrong kinds of number", dtypes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(parts))


def unusable_entries(state: StateDict, limit: float = math.inf) -> List[str]:
    """Keys of the floating-point tensors holding NaN, inf or a value with |w| > limit."""
    def unusable(t: torch.Tensor) -> bool:
        peak = t.detach().float().abs().amax()  # NaN when any entry is NaN, inf when any is inf
        return not (bool(torch.isfinite(peak)) and bool(peak <= limit))

    return [k for k, t in state.items() if t.is_floating_point() and t.numel() and unusable(t)]


def load_strict(module: nn.Module, state: StateDict, source: str = "state dict") -> nn.Module:
    """load_state_dict(strict=True) with one error listing missing, unexpected and mis-shaped keys."""
    check_fits(module, state, source)
    bad = unusable_entries(state)
    if bad:  # else NaN samples or metrics much later, with nothing naming the file
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"{source}: NaN or infinite values in {shown}: a damaged (or diverged) weight file")
    module.load_state_dict(state, strict=True)
    return module


# A file's tensors may be views of shared storage (stride 0, or many keys over one buffer), so a
# few kilobytes can describe terabytes; the model built from them would then be allocated in full.
# Genuine weight files store every tensor (tied weights at most double it): past this factor the
# file is refused before anything is built.
STORAGE_AMPLIFICATION = 4
STORAGE_SLACK_BYTES = 16 << 20


def check_state_dict(state: object, source: str) -> StateDict:
    """`state` as a state dict: a dict of names to dense CPU tensors whose sizes the file really
    stores. CheckpointError naming `source` and the first entry that is not, or when the tensors
    describe far more bytes than their storage holds."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    needed, storages = 0, {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {_short(key)} is of type {type(key).__name__}; state dict keys "
                                  f"are names")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {_short(key)!r} holds a value of type {type(value).__name__}, "
                                  f"not a tensor")
        if value.layout != torch.strided or value.device.type != "cpu":
            raise CheckpointError(f"{source}: {_short(key)!r} is a {value.layout} tensor on {value.device}; "
                                  f"weight files hold dense tensors")
        needed += value.numel() * value.element_size()
        storage = value.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    stored = sum(storages.values())
    if needed > STORAGE_AMPLIFICATION * stored + STORAGE_SLACK_BYTES:
        raise CheckpointError(f"{source}: its tensors describe {needed / 2**20:.0f} MiB but store only "
                              f"{stored / 2**20:.1f} MiB (views of shared or expanded storage); a weight file "
                              f"stores its tensors, so nothing is built from this one")
    return state


# --------------------------------------------------------------- architecture inference


def _count(state: StateDict, pattern: str) -> int:
    # patterns take at most 6 digits: a longer index matches nothing and is named as an unexpected key
    ids = {int(m.group(1)) for k in state if isinstance(k, str) for m in [re.match(pattern, k)] if m}
    return max(ids) + 1 if ids else 0


INFERRED = "architecture inferred from key names and tensor shapes"


def _tensor(state: StateDict, key: str, ndim: int, what: str) -> torch.Tensor:
    """state[key], which the architecture is read from: CheckpointError when missing or not an
    `ndim`-D tensor (a file may put anything under a known name)."""
    value = state.get(key)
    if value is None:
        raise CheckpointError(f"not {what} state dict: missing key {key!r}")
    if not isinstance(value, torch.Tensor) or value.dim() != ndim:
        shape = f"a {value.dim()}-D tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise CheckpointError(f"not {what} state dict: {key} is {shape}, expected a {ndim}-D tensor")
    return value


PUBLISHED_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # SiT-S/B/L/XL: width -> heads


def _guess_heads(hidden: int) -> int:
    """The head count, which weights without q/k norms cannot tell: the published SiTs' (S/B/L/XL), else heads of
    64 channels as theirs are, at least one, and a divisor of `hidden` (a small model of width 48 has one head
    here, not 48 // 64 = 0)."""
    known = PUBLISHED_HEADS.get(hidden)
    if known:
        return known
    return next(h for h in range(max(1, hidden // 64), 0, -1) if hidden % h == 0)


def sit_args_from_state(state: StateDict, encoder_depth: int = 8, **overrides) -> SiTArgs:
    """Rebuild SiTArgs from an official SiT state dict. `encoder_depth` cannot be read from
    weights (the reference default is 8); pass it if the run used another."""
    proj = _tensor(state, "x_embedder.proj.weight", 4, "a SiT")  # [D, C, p, p]
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    tokens = _tensor(state, "pos_embed", 3, "a SiT").shape[1]
    table = _tensor(state, "y_embedder.embedding_table.weight", 2, "a SiT").shape[0]
    mlp_hidden = _tensor(state, "blocks.0.mlp.fc1.weight", 2, "a SiT").shape[0]
    if hidden < 1:
        raise CheckpointError("not a SiT state dict: x_embedder.proj.weight has no output channels")
    depth = _count(state, r"blocks\.(\d{1,6})\.")
    n_proj = _count(state, r"projectors\.(\d{1,6})\.")
    z_dims = [_tensor(state, f"projectors.{i}.4.weight", 2, "a SiT").shape[0] for i in range(n_proj)]
    projector_dim = _tensor(state, "projectors.0.0.weight", 2, "a SiT").shape[0] if n_proj else 2048
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    head_dim = _tensor(state, "blocks.0.attn.q_norm.weight", 1, "a SiT").shape[0] if qk_norm else None
    num_heads = hidden // head_dim if head_dim else _guess_heads(hidden)
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
    args = dataclasses.replace(args, **overrides)
    check_architecture(INFERRED, args, caps_only=True)  # numbers read from key names and shapes: capped
    return args


def vae_args_from_state(state: StateDict) -> VAEArgs:
    """Rebuild VAEArgs (LDM layout) from an LDM AutoencoderKL state dict; norm_groups is NOT read
    (it cannot be): use guess_vae_args to load a file that does not record it."""
    what = "an AutoencoderKL"
    ch = _tensor(state, "encoder.conv_in.weight", 4, what).shape[0]
    z = _tensor(state, "post_quant_conv.weight", 4, what).shape[0]
    if ch < 1:
        raise CheckpointError("not an AutoencoderKL state dict: encoder.conv_in.weight has no output channels")
    levels = _count(state, r"encoder\.down\.(\d{1,6})\.")
    ch_mult = [_tensor(state, f"encoder.down.{i}.block.0.conv1.weight", 4, what).shape[0] // ch
               for i in range(levels)]
    res_blocks = _count(state, r"encoder\.down\.0\.block\.(\d{1,6})\.")
    resolution = 256
    attn = [resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    # the GroupNorm group count is not in the tensors: norm_groups is left at VAEArgs' 32 here;
    # loaders take it from a record (metadata, sidecar) or from guess_vae_args, which says so
    args = VAEArgs(ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks, z_channels=z,
                   attn_resolutions=attn, resolution=resolution)
    check_architecture(INFERRED, args, caps_only=True)  # capped before anything loops over or builds it
    return args


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
    source = f"{path}{where}"
    # names, dense tensors, sizes the file really stores: checked before anything reads a shape
    check_state_dict(state, source)
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
        if args is None:
            try:
                args = sit_args_from_state(state, **sit_overrides)
            except CheckpointError as err:
                raise CheckpointError(f"{source}: {err}") from None
            if not args.qk_norm and args.hidden_size not in PUBLISHED_HEADS and "num_heads" not in sit_overrides:
                # as a VAE's GroupNorm groups: a wrong count loads strictly and computes another function
                print(f"warning: {source}: the weights do not say the SiT's head count; assuming {args.num_heads} "
                      f"(heads of 64 channels); a model trained with another loads but computes something else",
                      file=sys.stderr)
        return _build_checked(SiT, args, state, source)
    return _build_checked(AutoencoderKL, args or guess_vae_args(path, state, norm_groups), state, source)


def _build_checked(cls: type, args: Union[SiTArgs, VAEArgs], state: StateDict, source: str) -> nn.Module:
    """`cls(args)` strictly loaded with `state`, compared first on the meta device: a file whose
    key names claim a deeper or wider network than its tensors hold is refused before the
    network is allocated (the tensors themselves were bounded by check_state_dict)."""
    check_architecture(f"{source}: architecture", args)
    try:
        with torch.device("meta"), _NoNormalInit():  # key names and shapes only: nothing is allocated
            skeleton = cls(args)
    except (ValueError, AssertionError, RuntimeError) as err:
        raise CheckpointError(f"{source}: cannot build a {cls.__name__} from these arguments ({err})") from None
    check_fits(skeleton, state, source)
    return load_strict(cls(args), state, source)


class _NoNormalInit(TorchFunctionMode):
    """For a build on the meta device: normal-distribution initialisation is skipped. Meta tensors
    hold no values, and torch runs normal_ on them through its Python reference kernels, whose
    first use imports torch._dynamo (seconds per process)."""

    SKIPPED = (torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.Tensor.normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:  # torch.nn.init passes its tensor by keyword, Tensor.normal_ as self
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


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
    try:
        record = read_json_object(side, max_bytes=MAX_METADATA_CHARS)
    except JsonFileError as err:
        raise CheckpointError(f"architecture of {Path(path).name}: {err}") from None
    if record.get("repae_kind", "vae") != "vae" or not isinstance(record.get("repae_args"), dict):
        raise CheckpointError(f'{side} must be {{"repae_kind": "vae", "repae_args": {{VAEArgs fields}}}}')
    fields = record["repae_args"]
    args_from_metadata(side, "vae", json.dumps(fields))  # known fields, right types, within caps
    try:
        found = vae_args_from_state(state)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    args = dataclasses.replace(found, **fields)
    check_args_match_weights(side, args, state)
    return args


def _export_record_args(path: Path, state: StateDict) -> Optional[VAEArgs]:
    """VAEArgs from the export.json an older `repae export-vae` (before sidecars) wrote beside this
    very file (its sha256 listed there), else None."""
    record_file = path.parent / "export.json"
    try:  # none there (the usual case) is a JsonFileError too
        record = read_json_object(record_file, max_bytes=1 << 20)
        listed, fields = record["sha256"][path.name], record["vae_args"]
    except (JsonFileError, KeyError, TypeError):
        return None
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
    try:
        found = vae_args_from_state(state)  # capped: group_count_choices loops up to the widths' gcd
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
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


# A SiT builds its fixed sin-cos position embedding (tokens x hidden, float64) even on the meta
# device; SiT-XL/2 at 512 px holds 1.2M entries. Past this many the architecture is refused.
MAX_SIT_POS_EMBED_ENTRIES = 1 << 25


def check_architecture(source: Union[str, os.PathLike], args: Union[SiTArgs, VAEArgs], caps_only: bool = False) -> None:
    """CheckpointError naming `source` when `args` exceeds the caps of `_metadata_rules` or cannot
    describe a network (encoder_depth > depth, heads not dividing the width, ...). Applied to every
    architecture read or inferred from a file, before anything loops over it or builds it. `caps_only`
    for arguments inferred from tensors, whose head and group counts are guesses a record may replace."""
    kind = "sit" if isinstance(args, SiTArgs) else "vae"
    fields = dataclasses.asdict(args)
    errors = [msg for key, rule in _metadata_rules()[kind].items() if key in fields
              for msg in [rule.check(key, fields[key])] if msg]
    if not errors and not caps_only:
        errors = _inconsistencies(args)
    if errors:
        raise CheckpointError(f"{source}: out of bounds or inconsistent: " + "; ".join(errors[:10]))


def _inconsistencies(args: Union[SiTArgs, VAEArgs]) -> list:
    """What makes capped arguments unbuildable (or too costly to build even on the meta device)."""
    errors = []
    if isinstance(args, VAEArgs):
        if any((args.ch * m) % args.norm_groups for m in [1, *args.ch_mult]):
            errors.append(f"norm_groups={args.norm_groups} does not divide the VAE widths "
                          f"(ch={args.ch}, ch_mult={list(args.ch_mult)})")
        return errors
    grid = args.input_size // args.patch_size
    if args.input_size % args.patch_size:
        errors.append(f"input_size={args.input_size} is not divisible by patch_size={args.patch_size}")
    if args.encoder_depth > args.depth:
        errors.append(f"encoder_depth={args.encoder_depth} is deeper than depth={args.depth}")
    if args.hidden_size % args.num_heads:
        errors.append(f"hidden_size={args.hidden_size} is not divisible by num_heads={args.num_heads}")
    if grid * grid * args.hidden_size > MAX_SIT_POS_EMBED_ENTRIES:
        errors.append(f"a {grid}x{grid} token grid of width {args.hidden_size} exceeds "
                      f"{MAX_SIT_POS_EMBED_ENTRIES} position-embedding entries")
    return errors


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
    try:  # a diffusers VAE config is a few hundred bytes
        config = read_json_object(config_file, max_bytes=MAX_DIFFUSERS_CONFIG_BYTES)
    except JsonFileError as err:
        raise CheckpointError(f"diffusers VAE config: {err}") from None
    try:
        recorded = vae_diffusers.args_from_diffusers_config(config)
        # capped before the layout is built (even on the meta device) to list its keys
        check_architecture(f"{config_file}: architecture", recorded)
        _check_norm_groups(path, recorded, args, norm_groups)
        args = args or recorded
        state = vae_diffusers.from_diffusers_state(check_state_dict(read_file(weights), str(weights)), args)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: {err.args[0]}") from None
    return _build_checked(AutoencoderKL, args, state, str(weights))


MAX_DIFFUSERS_CONFIG_BYTES = 1 << 20  # SDXL's config.json is under 1 KB; FLUX's with latents_mean/std similar


# ------------------------------------------------------------------- latent statistics


MAX_LATENT_CHANNELS = 4096  # the z_channels cap of _metadata_rules


def load_latent_stats(path: Union[str, os.PathLike], channels: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean [C], var [C]) from an official `*-latents-stats.pt`
    ({'latents_scale': 1/std, 'latents_bias': mean}) or our safetensors ({'mean', 'var'}); or a hub id
    (without a file: the repo's `*-latents-stats.pt`). CheckpointError naming the file unless both
    are real tensors of the same C entries (C = `channels` when given), finite, with var > 0 (a
    negative variance turns every sample into NaN, silently; a zero one has no latents_scale)."""
    path = _local(path, "latent_stats")
    obj = read_file(path)
    names = [n for n in (("latents_scale", "latents_bias"), ("mean", "var"))
             if isinstance(obj, dict) and all(k in obj for k in n)]
    if not names:
        found = sorted(_short(k, 40) for k in obj)[:10] if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path} holds no latent statistics: expected keys latents_scale/latents_bias "
                              f"or mean/var, found {found}")
    first, second = names[0]
    for key in (first, second):
        value = obj[key]
        if not isinstance(value, torch.Tensor) or value.is_complex() or value.dtype == torch.bool \
                or value.layout != torch.strided or value.device.type != "cpu":
            raise CheckpointError(f"{path}: {key} must be a real-valued tensor, found "
                                  f"{type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}")
        if not 1 <= value.numel() <= MAX_LATENT_CHANNELS:
            raise CheckpointError(f"{path}: {key} has {value.numel()} entries; expected one per latent channel "
                                  f"(1 to {MAX_LATENT_CHANNELS})")
    if obj[first].numel() != obj[second].numel():
        raise CheckpointError(f"{path}: {first} has {obj[first].numel()} entries but {second} has "
                              f"{obj[second].numel()}; both hold one per latent channel")
    if first == "latents_scale":
        scale = obj["latents_scale"].reshape(-1).double()
        if not bool((scale > 0).all()):
            raise CheckpointError(f"{path}: latents_scale (1/std) must be positive in every channel")
        mean, var = obj["latents_bias"].reshape(-1).float(), scale.pow(-2).float()
    else:
        mean, var = obj["mean"].reshape(-1).float(), obj["var"].reshape(-1).float()
    if channels is not None and mean.numel() != channels:
        raise CheckpointError(f"{path} holds statistics of {mean.numel()} latent channels; the VAE has {channels}")
    check_latent_stats(mean, var, str(path))
    return mean, var


def check_latent_stats(mean: torch.Tensor, var: torch.Tensor, source: str) -> None:
    """CheckpointError unless the latent statistics (mean [C], var [C], float32) are finite with var > 0: what
    de-normalising with them needs, and what load_latent_stats accepts."""
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise CheckpointError(f"{source}: latent statistics must be finite (found inf or NaN, or a variance "
                              f"beyond float32)")
    if not bool((var > 0).all()):
        raise CheckpointError(f"{source}: latent variance must be positive in every channel, found "
                              f"{[round(v, 6) for v in var.tolist()[:8]]}")


def save_latent_stats(mean: torch.Tensor, var: torch.Tensor, path: Union[str, os.PathLike]) -> Path:
    """Write statistics load_latent_stats reads back: anything else is refused before a byte is written."""
    mean, var = mean.reshape(-1).float(), var.reshape(-1).float()
    check_latent_stats(mean, var, f"latent statistics for {path}")
    return save_weights({"mean": mean, "var": var}, path)
