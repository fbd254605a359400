"""Training checkpoints: written atomically, verified on resume, never the only copy of a run.

Layout of `run_dir/checkpoints/`:
    step-0000500/   sit, ema, vae, regulariser .safetensors; state.pt; config.yaml; manifest.json
    latest          the name of the newest checkpoint written (a convenience for people)
A checkpoint is written to `step-XXXXXXX.tmp/`, each file fsynced, then `manifest.json` (the
sha256 and size of every other file) is written last and atomically, and the directory is
renamed into place. Finding the newest checkpoint scans the step-numbered directories and
verifies each manifest, newest first: a deleted `latest`, a truncated or overwritten file, or
a missing manifest costs at most the damaged checkpoints, each reported on one line.
Checkpoints written before manifests existed ("unverifiable") are still loaded, with a
warning: refusing them would strand every older run, and loading them is no less safe than
it was (safetensors and `weights_only` parsing still catch most damage, and a load failure
falls back to the next older one).
`state.pt` holds only plain data (optimiser states, step, RNG states, data position) and is
read back with `weights_only=True`. No checkpoint is written with non-finite weights.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from repae.config import RunConfig, save_config
from repae.fileio import is_number, read_json_object, sha256_file, write_json_atomic
from repae.weights import (CheckpointError, architecture_metadata, load_strict, read_file, save_weights,
                           torch_load_reason, unusable_entries)

MODULES = ("sit", "ema", "vae", "regulariser")
MANIFEST = "manifest.json"
REQUIRED = ("state.pt", "config.yaml", "sit.safetensors", "ema.safetensors", "vae.safetensors")
_STEP_DIR = re.compile(r"^step-(\d+)$")
# |w| beyond this squares to inf in float32 (norms, weight decay, the next forward pass): as unusable as inf
WEIGHT_LIMIT = 1.8e19
# checkpoints already hashed by this process: path -> (stat stamp of its files, verdict)
_VERIFIED: Dict[str, Tuple[tuple, Tuple[str, str]]] = {}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rng_state(gen: torch.Generator) -> dict:
    return {
        "step_generator": gen.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),  # the MT19937 key; position restored below
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }


_MT_WORDS = 624  # the Mersenne Twister's key length (numpy's and Python's generators)


def _check_mt_key(words: object, what: str) -> None:
    if not isinstance(words, (list, tuple)) or len(words) != _MT_WORDS or \
            not all(is_number(w, int) and 0 <= w < 2**32 for w in words):
        raise CheckpointError(f"state.pt's {what} is not {_MT_WORDS} 32-bit words")


def check_rng_state(state: object, gen: torch.Generator) -> None:
    """CheckpointError unless `state` (from rng_state) can be set, tried on scratch generators so that nothing
    global changes. The bounds come first: numpy takes a key position past 624 and then crashes the process."""
    if not isinstance(state, dict):
        raise CheckpointError(f"state.pt's random-number state is a {type(state).__name__}, not a mapping")
    _check_mt_key(state.get("numpy"), "numpy key")
    pos = state.get("numpy_pos")
    if not is_number(pos, int) or not 0 <= pos <= _MT_WORDS:
        raise CheckpointError(f"state.pt's numpy key position is {pos!r:.60}, not in [0, {_MT_WORDS}]")
    check_python_rng_state(state.get("python"), "Python random state")
    for key, scratch in (("step_generator", torch.Generator(device=gen.device)), ("torch", torch.Generator())):
        try:
            scratch.set_state(state.get(key))
        except (TypeError, RuntimeError) as err:
            raise CheckpointError(f"state.pt's {key} state is unusable: {str(err).splitlines()[0]}") from None


def check_python_rng_state(words: object, what: str) -> None:
    """CheckpointError unless `words` (the second item of random.getstate()) can be set."""
    if not isinstance(words, (list, tuple)) or len(words) != _MT_WORDS + 1:
        raise CheckpointError(f"state.pt's {what} is not {_MT_WORDS + 1} numbers")
    _check_mt_key(words[:_MT_WORDS], what)
    try:
        random.Random().setstate((3, tuple(words), None))
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"state.pt's {what} is not a valid generator state") from None


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["step_generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


# ------------------------------------------------------------------ integrity


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (best effort where the platform cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def bad_weights(modules: Dict[str, nn.Module]) -> List[str]:
    """'module.tensor' for each floating-point parameter or buffer holding NaN, inf or |w| > WEIGHT_LIMIT."""
    return [f"{name}.{key}" for name, module in modules.items()
            for key in unusable_entries(module.state_dict(), WEIGHT_LIMIT)]


def _write_manifest(tmp: Path, step: int) -> None:
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(tmp / MANIFEST, {"format": 1, "step": step, "files": files})


def check_checkpoint(path: Path, cached: bool = False) -> Tuple[str, str]:
    """('intact', ''), ('unverifiable', why) for a checkpoint without a manifest, or ('damaged', why).
    `cached`: trust this process's earlier verdict while no file in the directory has changed
    (inode, size and mtime of each: any rewrite shows there)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / "state.pt").is_file():
            return "unverifiable", "no manifest.json (written before checkpoints were verified)"
        return "damaged", "no manifest.json and no state.pt"
    try:
        stamp = tuple(sorted((p.name, st.st_ino, st.st_size, st.st_mtime_ns)
                             for p in path.iterdir() if (st := p.stat())))
    except OSError as err:
        return "damaged", f"unreadable ({err.strerror})"
    memo = _VERIFIED.get(str(path))
    if cached and memo and memo[0] == stamp:
        return memo[1]
    verdict = _verify(path)
    _VERIFIED[str(path)] = (stamp, verdict)
    return verdict


def _verify(path: Path) -> Tuple[str, str]:
    try:
        manifest = read_json_object(path / MANIFEST)
        files = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError, OverflowError) as err:  # JsonFileError is a ValueError
        return "damaged", f"manifest.json unreadable ({type(err).__name__})"
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != step:
        return "damaged", f"manifest.json is for step {step}"
    # a hand-edited or damaged manifest must read as a damaged checkpoint, never as a crash: each entry
    # is a plain file name of this directory with an integer size and a hex digest
    if not isinstance(files, dict) or not all(
            isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and isinstance(want, dict) and is_number(want.get("bytes"), int)
            and isinstance(want.get("sha256"), str) for name, want in files.items()):
        return "damaged", "manifest.json is malformed (files must map file names to their bytes and sha256)"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return "damaged", f"manifest.json lists no {', '.join(missing)}"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return "damaged", f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return "damaged", f"{name} has {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
        try:
            digest = sha256_file(file)
        except OSError as err:
            return "damaged", f"{name} unreadable ({err.strerror})"
        if digest != want["sha256"]:
            return "damaged", f"{name} does not match its sha256 in manifest.json (corrupted)"
    return "intact", ""


# ------------------------------------------------------------------ writing


def save_checkpoint(run_dir: Path, step: int, modules: Dict[str, nn.Module], state: dict, cfg: RunConfig,
                    keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically with its manifest, point `latest` at it, prune old ones.
    CheckpointError, before writing anything, when a weight is non-finite (or absurdly large)."""
    bad = bad_weights(modules)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"refusing to save checkpoint step {step}: non-finite or overflowing weights in "
                              f"{', '.join(bad[:3])}{more}; the previous checkpoints are kept")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, module in modules.items():
            # with its architecture: `repae info` / `load_model` read a checkpoint's weight file on its own,
            # and without the record they would infer it from shapes (guessing the SiT's head count)
            save_weights(module, tmp / f"{name}.safetensors", architecture_metadata(module))
        torch.save(state, tmp / "state.pt")
        save_config(cfg, tmp / "config.yaml")
        for file in tmp.iterdir():
            _fsync(file)
        _write_manifest(tmp, step)  # last: a directory with a valid manifest is complete
        _fsync(tmp)
    except BaseException:  # a full disk, an interrupt: no half-written step-*.tmp left to fill the disk further
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    check_checkpoint(final)  # hashes what is on disk now, and remembers it for pruning
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` intact checkpoints. Damaged or unverifiable ones do not count as
    kept; they are deleted only once `keep_last` intact checkpoints are newer than they are."""
    if keep_last <= 0:
        return
    kept = 0
    for path in step_dirs(root.parent):
        status, _ = check_checkpoint(path, cached=True)
        if kept >= keep_last:
            shutil.rmtree(path, ignore_errors=True)
        elif status == "intact":
            kept += 1


# ------------------------------------------------------------------ finding and reading


def step_dirs(run_dir: Path) -> List[Path]:
    """The step-numbered checkpoint directories of a run, newest first (whatever `latest` says)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def has_checkpoints(run_dir: Path) -> bool:
    return bool(step_dirs(run_dir)) or (checkpoint_dir(run_dir) / "latest").is_file()


def usable_checkpoints(run_dir: Path, skipped: Optional[List[str]] = None) -> Iterator[Path]:
    """Checkpoints worth loading, newest first: intact ones, and unverifiable (pre-manifest) ones with a
    warning. Each damaged one is reported on one line (and appended to `skipped`) and passed over."""
    for path in step_dirs(run_dir):
        status, why = check_checkpoint(path)
        if status == "damaged":
            line = f"skipping checkpoint {path}: {why}"
            _say(line)
            if skipped is not None:
                skipped.append(line)
            continue
        if status == "unverifiable":
            _say(f"warning: checkpoint {path} cannot be verified: {why}")
        yield path


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest usable checkpoint; None when the run has none; CheckpointError when it has
    checkpoints but every one is damaged (a run is never silently restarted over its own files)."""
    skipped: List[str] = []
    for path in usable_checkpoints(run_dir, skipped):
        return path
    if skipped:  # read by sample, evaluate and export-vae too: "start the run again" is training's remedy alone
        raise CheckpointError(f"{run_dir}: no intact checkpoint ({len(skipped)} damaged, each named above); nothing "
                              f"can be read from this run until one is restored from a copy (to train it afresh "
                              f"instead, move {checkpoint_dir(run_dir)} away)")
    return None


def read_checkpoint(path: Path, names) -> Tuple[Dict[str, dict], dict]:
    """({module name: state dict}, plain state) read from `path`, nothing applied yet."""
    weights = {name: read_file(path / f"{name}.safetensors") for name in names}
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {torch_load_reason(err)}") from None
    return weights, state


MAX_STEP = 10**12  # no run takes this many steps: the bound on counts read from a (possibly edited) state.pt


def check_train_state(state: object, optimisers: List[str], gen: torch.Generator) -> None:
    """CheckpointError naming the first field of a checkpoint's plain state (read_checkpoint's) that a run could
    not resume from: a hand-edited or foreign state.pt is refused before any of it is applied. The data
    position is the data source's to check (its load_state_dict)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"state.pt holds a {type(state).__name__}, not a training state")
    missing = [key for key in ("step", "nonfinite_in_a_row", "rng", "data", *optimisers) if key not in state]
    if missing:
        raise CheckpointError(f"state.pt lacks {', '.join(missing)}: not a training state of this run")
    for key in ("step", "nonfinite_in_a_row"):
        value = state[key]
        if not is_number(value, int) or not 0 <= value <= MAX_STEP:
            raise CheckpointError(f"state.pt's {key} is {value!r:.60}, not a whole number in [0, {MAX_STEP}]")
    check_rng_state(state["rng"], gen)
    if "regulariser_rng" in state:
        check_python_rng_state(state["regulariser_rng"], "regulariser's random state")
    for key in optimisers:
        _check_optimiser_state(state[key], key)


def _check_optimiser_state(opt_state: object, name: str) -> None:
    """Every number of the optimiser's state finite: its hyper-parameters (betas, eps, weight decay; lr is set
    again every step) and its moments. Whether it fits the parameters is Optimizer.load_state_dict's check."""
    if not isinstance(opt_state, dict) or not isinstance(opt_state.get("param_groups"), list) or \
            not isinstance(opt_state.get("state"), dict):
        raise CheckpointError(f"state.pt's {name} is not an optimiser state (param_groups, state)")
    for group in opt_state["param_groups"]:
        if not isinstance(group, dict):
            raise CheckpointError(f"state.pt's {name} has a parameter group that is not a mapping")
        for key, value in group.items():
            numbers = value if isinstance(value, (tuple, list)) and key != "params" else (value,)
            if key != "params" and any(is_number(v) and not math.isfinite(v) for v in numbers):
                raise CheckpointError(f"state.pt's {name} has {key} = {value!r:.60}: not finite")
    for param_state in opt_state["state"].values():
        tensors = param_state.values() if isinstance(param_state, dict) else (param_state,)
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in tensors):
            raise CheckpointError(f"state.pt's {name} holds moments that are not finite")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory from a run directory, a checkpoints/ directory or a step-* directory."""
    path = Path(path)
    if (path / "state.pt").is_file() or (path / MANIFEST).is_file():
        status, why = check_checkpoint(path)
        if status == "damaged":
            raise CheckpointError(f"checkpoint {path} is damaged: {why}")
        return path
    for run_dir in (path, path.parent):
        if has_checkpoints(run_dir):
            found = latest_checkpoint(run_dir)
            if found is not None:
                return found
    raise CheckpointError(f"{path} is not a run directory or a training checkpoint (no checkpoints/step-*)")


def load_for_sampling(path: Path, config_files=(), overrides=()):
    """(config, SiT, VAE) from a training checkpoint, for sampling or evaluation. The run's saved
    config is the base; `config_files` and `overrides` (e.g. sample.cfg_scale=2) go on top."""
    from repae.build import build_sit, vae_args
    from repae.config import load_config
    from repae.models.vae import AutoencoderKL

    ckpt = resolve_checkpoint(path)
    # world_size=1: sampling does not split the training batch, whatever WORLD_SIZE torchrun sets
    cfg = load_config(None, [ckpt / "config.yaml", *config_files], overrides, world_size=1)
    weights = read_file(ckpt / ("ema.safetensors" if cfg.sample.use_ema else "sit.safetensors"))
    n_proj = len({k.split(".")[1] for k in weights if k.startswith("projectors.")})
    z_dims = [weights[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
    sit = load_strict(build_sit(cfg, z_dims=z_dims), weights, str(ckpt))
    vae = load_strict(AutoencoderKL(vae_args(cfg)), read_file(ckpt / "vae.safetensors"), str(ckpt))
    from repae.dist import device_named
    from repae.train.setup import uses_channels_last

    # the layout the run trained in, and decoded its own end-of-run samples in: the convolutions round
    # differently per layout, so `repae evaluate samples` gives the run's own scores only in the same one
    if uses_channels_last(cfg, device_named(cfg.train.device)):
        vae = vae.to(memory_format=torch.channels_last)
    return cfg, sit.eval(), vae.eval()
