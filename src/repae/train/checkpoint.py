"""Training checkpoints: written atomically, resumed exactly.

Layout of `run_dir/checkpoints/`:
    step-0000500/   sit, ema, vae, regulariser .safetensors; state.pt; config.yaml
    latest          the name of the newest complete checkpoint directory
A checkpoint is written to `step-XXXXXXX.tmp/` and renamed when complete, then `latest`
is replaced atomically: a crash mid-write leaves the previous checkpoint as `latest`.
`state.pt` holds only plain data (optimiser states, step, RNG states, data position) and
is read back with `weights_only=True`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from repae.config import RunConfig, save_config
from repae.weights import CheckpointError, load_strict, read_file, save_weights

MODULES = ("sit", "ema", "vae", "regulariser")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state(gen: torch.Generator) -> dict:
    return {
        "step_generator": gen.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),  # the MT19937 key; position restored below
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["step_generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def save_checkpoint(run_dir: Path, step: int, modules: Dict[str, nn.Module], state: dict, cfg: RunConfig,
                    keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        save_weights(module, tmp / f"{name}.safetensors")
    torch.save(state, tmp / "state.pt")
    save_config(cfg, tmp / "config.yaml")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None when the run has none."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path, modules: Dict[str, nn.Module]) -> dict:
    """Strictly load each module's weights from `path`; returns the plain state."""
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        load_strict(module, read_file(file), str(file))
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {err}") from None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory from a run directory, a checkpoints/ directory or a step-* directory."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    for run_dir in (path, path.parent):
        if (checkpoint_dir(run_dir) / "latest").is_file():
            return latest_checkpoint(run_dir)
    raise CheckpointError(f"{path} is not a run directory or a training checkpoint (no checkpoints/latest)")


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
    return cfg, sit.eval(), vae.eval()
