"""What `repae evaluate` reads: the Inception network, SiT/VAE checkpoints (training runs or
weight files), reference batches, and the evaluated data (an image folder or the toy world).

Every function returns, besides the object, the files it read (role -> path), so that the
result can record their sha256.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from repae import dist
from repae.evaluate.errors import NO_IMAGES
from repae.evaluate.fid import REF_IMAGES_KEY, Reference, load_reference
from repae.data.images import DEFAULT_MAX_PIXELS
from repae.evaluate.sources import (
    EvaluationError, RecordImages, TensorImages, check_dir_role, is_run_or_checkpoint_dir, open_folder,
)

Files = Dict[str, Optional[str]]


# ----------------------------------------------------------------------------- Inception, reference


def inception_path(given: Optional[str], cfg=None) -> Optional[str]:
    """--inception, else eval.inception_path, else the published file name under $REPAE_WEIGHTS."""
    from repae.models.encoders import weights_dir
    from repae.models.inception import WEIGHTS_FILE

    if given:
        return given
    if cfg is not None and cfg.eval.inception_path:
        return cfg.eval.inception_path
    candidate = weights_dir() / WEIGHTS_FILE
    return str(candidate) if candidate.is_file() else None


def load_inception(path: Optional[str], device: torch.device):
    """The FID InceptionV3 from a local file; EvaluationError naming the expected file if missing."""
    from repae.models.inception import InceptionV3, InceptionWeightsError

    try:
        return InceptionV3.from_file(path).to(device)
    except InceptionWeightsError as err:
        raise EvaluationError(f"{err} (pass --inception PATH or set eval.inception_path)") from None


def check_reference(path: Optional[str], need_images: bool) -> None:
    """Cheap checks of a reference batch before any heavy work (every rank runs them)."""
    if not path:
        raise EvaluationError("no reference batch: pass --ref REF.npz (an ADM reference batch, or statistics "
                              "from `repae evaluate ref-stats`) or set eval.ref_batch")
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"reference batch not found: {p}")
    if not zipfile.is_zipfile(p):
        raise EvaluationError(f"{p} is not an .npz archive (expected an ADM reference batch)")
    with zipfile.ZipFile(p) as zf:
        keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
    has_images, has_stats = REF_IMAGES_KEY in keys, {"mu", "sigma"} <= set(keys)
    if not has_images and not has_stats:
        raise EvaluationError(f"{p} holds neither reference images ('{REF_IMAGES_KEY}', uint8 [N,H,W,3]) nor "
                              f"statistics (mu, sigma[, mu_s, sigma_s]); found {keys}")
    if need_images and not has_images:
        raise EvaluationError(f"precision/recall needs the reference images ('{REF_IMAGES_KEY}'), and {p} holds "
                              f"only statistics ({keys}): pass --no-pr, or a reference batch with images")


def read_reference(path: str, inception, need_features: bool, batch_size: int, device,
                   autocast, progress: bool) -> Reference:
    try:
        return load_reference(path, inception, need_features=need_features, batch_size=batch_size,
                              device=device, autocast=autocast, progress=progress)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise EvaluationError(str(err.args[0] if err.args else err)) from None


# ----------------------------------------------------------------------------- checkpoints


def load_cfg(preset: Optional[str], config_files: Sequence[str], overrides: Sequence[str]):
    """Preset + files + overrides, validated as for one process (the training batch split is moot here)."""
    from repae.config import load_config

    return load_config(preset, list(config_files), list(overrides), world_size=1)


def checkpoint_step(ckpt_dir: Path) -> Optional[int]:
    name = ckpt_dir.name
    return int(name.split("-")[1]) if name.startswith("step-") and name.split("-")[1].isdigit() else None


@dataclass
class Loaded:
    """A SiT (may be None), its VAE, the config they go with, and the files read."""

    cfg: object
    sit: Optional[torch.nn.Module]
    vae: Optional[torch.nn.Module]
    files: Files = field(default_factory=dict)
    run_dir: Optional[Path] = None
    step: Optional[int] = None


def load_run(path: str, config_files: Sequence[str] = (), overrides: Sequence[str] = ()) -> Loaded:
    """A training run (or one of its checkpoints): its config, EMA (or raw) SiT and tuned VAE."""
    from repae.train.checkpoint import load_for_sampling, resolve_checkpoint

    ckpt = resolve_checkpoint(Path(path))
    cfg, sit, vae = load_for_sampling(Path(path), list(config_files), list(overrides))
    files = {"sit": str(ckpt / ("ema.safetensors" if cfg.sample.use_ema else "sit.safetensors")),
             "vae": str(ckpt / "vae.safetensors"), "config": str(ckpt / "config.yaml")}
    return Loaded(cfg, sit, vae, files, run_dir=ckpt.parent.parent, step=checkpoint_step(ckpt))


def load_vae_file(path: str):
    """(VAE, files) from a weight file, a diffusers directory, or a run / checkpoint directory."""
    from repae.weights import load_model

    check_dir_role(path, "vae or run")  # a latent cache, a packed store: say so, not "no config.json"
    if is_run_or_checkpoint_dir(path):
        run = load_run(path)
        return run.vae, {"vae": run.files["vae"]}
    return load_model(path, kind="vae").eval(), {"vae": path}


def load_sit_file(path: str, cfg, vae_path: Optional[str]) -> Loaded:
    """A SiT weight file (ours or official) with the VAE from `vae_path` or `vae.path`; the latent
    BatchNorm takes `vae.latent_stats_path` when the config gives one (as `repae sample` does)."""
    from repae.build import build_vae
    from repae.weights import load_latent_stats, load_model

    sit = load_model(path, kind="sit", prefer_ema=cfg.sample.use_ema).eval()
    files: Files = {"sit": path}
    if vae_path:
        vae, vf = load_vae_file(vae_path)
        files.update(vf)
    elif cfg.vae.path:
        vae, files["vae"] = build_vae(cfg).eval(), cfg.vae.path
    else:
        raise EvaluationError(f"{path} is a SiT weight file: give its VAE with --vae PATH (or vae.path=...)")
    if cfg.vae.latent_stats_path and sit.bn is not None:
        sit.bn.init_from_stats(*load_latent_stats(cfg.vae.latent_stats_path, channels=sit.bn.num_features))
        files["latent_stats"] = cfg.vae.latent_stats_path
    return Loaded(cfg, sit, vae, files)


def load_sit_and_vae(ckpt: str, vae_path: Optional[str], preset: Optional[str], config_files: Sequence[str],
                     overrides: Sequence[str]) -> Loaded:
    """`--ckpt` as `repae sample` reads it: a run directory (config, EMA SiT, tuned VAE; the
    config files and overrides go on top of the run's config) or a SiT weight file or hub id; a
    released SiT (hf:REPA-E/sit-...) brings its preset, VAE and published sampling protocol."""
    from repae import hub

    if hub.is_hub_id(ckpt):
        preset, overrides, vae_path = hub.apply_sample_protocol(ckpt, preset, overrides, vae_path)
        return load_sit_file(ckpt, load_cfg(preset, config_files, overrides), vae_path)
    check_dir_role(ckpt, "sit or run", missing="checkpoint")  # an exported VAE, a latent cache, ...: say what it is
    if is_run_or_checkpoint_dir(ckpt):
        if vae_path:
            raise EvaluationError(f"--vae is not used with a training run ({ckpt}): its tuned VAE is in the checkpoint")
        return load_run(ckpt, config_files, overrides)
    return load_sit_file(ckpt, load_cfg(preset, config_files, overrides), vae_path)


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    """The evaluated images of this process, what they are, and the files they came from."""

    source: object  # FolderImages | TensorImages | RecordImages
    info: dict
    files: Files = field(default_factory=dict)
    toy: Optional[object] = None  # the ToyWorld when the data is its held-out set

    @property
    def has_labels(self) -> bool:
        return bool(self.info.get("labelled"))


def toy_world(cfg):
    """The toy world of `cfg` (built once and cached; rank 0 first under torchrun)."""
    from repae.build import vae_args
    from repae.toyworld import ensure_toy_world

    return ensure_toy_world(vae_args(cfg), cfg.toy, device=cfg.train.device)


def open_data(data: Optional[str], cfg, *, image_size: Optional[int], batch_size: int, limit: Optional[int],
              workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS, split: str = "validation") -> Data:
    """`--data`: 'toy' (the toy world's held-out images and labels; also the default when `cfg`
    is a toy-world run), an image folder (class sub-folders give labels), or any other source
    repae.data.sources reads (parquet/arrow tables, where files named by split are filtered by
    `split`; tar shards; a prepare-data store), told apart by `detect_kind`; ADM centre crop to
    `image_size`. This process gets its contiguous block."""
    rank, world = dist.rank(), dist.world_size()
    if data == "toy" or (data is None and cfg is not None and cfg.data.source == "toy"):
        if cfg is None:
            raise EvaluationError("--data toy needs the toy world's config (use --preset toy)")
        tw = toy_world(cfg)
        source = TensorImages(tw.heldout_images, tw.heldout_labels, batch_size, rank, world, limit)
        info = {"data": "toy world held-out set", "toy_cache_dir": str(tw.cache_dir), "labelled": True,
                "image_size": int(tw.heldout_images.shape[-1]), "num_images": source.num_images}
        return Data(source, info, {"data": str(tw.cache_dir / "heldout.npz")}, toy=tw)
    if data is None:
        raise EvaluationError("--data is required: an image folder (class sub-folders give labels), parquet/arrow "
                              "files, tar shards, a prepare-data store, or 'toy'")
    from repae.data.sources import detect_kind

    kind = detect_kind(data)
    if kind != "folder":
        return open_records(kind, data, image_size, batch_size, limit, max_pixels, split, rank, world)
    if Path(data).exists() and not Path(data).is_dir():  # was "data folder not found" for a file that is there
        hint = " (an .npz of images is scored with `repae evaluate samples` or `ref-stats`)" \
            if data.endswith(".npz") else ""
        raise EvaluationError(f"--data {data} is a file of no kind it reads: give an image folder, parquet/arrow "
                              f"files, tar shards or a prepare-data store{hint}")
    if not Path(data).is_dir():
        raise EvaluationError(f"data folder not found: {data}")
    source = open_folder(data, batch_size, image_size, rank, world, limit, labelled=True, workers=workers,
                         max_pixels=max_pixels)
    info = {"data": str(Path(data).resolve()), "labelled": source.labels[0] != -1 if source.labels else False,
            "image_size": image_size, "crop": "ADM centre crop" if image_size else None,
            "num_images": source.num_images}
    return Data(source, info)


def open_records(kind: str, data: str, image_size: Optional[int], batch_size: int, limit: Optional[int],
                 max_pixels: int, split: str, rank: int, world: int) -> Data:
    """`data` read by the repae.data.sources reader of `kind` ('hf', 'wds' or 'packed', as `detect_kind`
    named it), ADM centre crop to `image_size`; this process's contiguous block of batches."""
    from repae.data.sources import open_images
    from repae.hub import HubError

    if not image_size:
        raise EvaluationError(f"{data} is read as {kind} data, which needs an image size (--image-size)")
    try:
        dataset = open_images(kind, data, image_size, split=split, max_pixels=max_pixels)
    except (FileNotFoundError, ValueError, HubError) as err:  # the readers' one-line errors
        raise EvaluationError(f"--data {data} ({kind}): {err}") from None
    source = RecordImages(dataset, batch_size, rank, world, limit)
    info = {"data": data, "data_kind": kind, "labelled": True, "image_size": image_size, "crop": "ADM centre crop",
            "num_images": source.num_images, **({"split": split} if kind == "hf" else {})}
    return Data(source, info)


def first_images(source, n: int, progress: bool = False,
                 desc: str = "read images") -> Tuple[torch.Tensor, torch.Tensor]:
    """The first `n` (images uint8 [n,3,H,W], labels [n]) of a labelled source's batches (with
    `progress`, a bar of the images read: decoding a thousand files takes a while)."""
    from repae.evaluate.pipeline import progress_bar

    images: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    count = 0
    total = min(n, source.num_images) if isinstance(getattr(source, "num_images", None), int) else n
    with progress_bar(desc=desc, progress=progress, unit="img", total=total) as bar:
        for batch in source:
            x, y = batch if isinstance(batch, (tuple, list)) else (batch, torch.full((len(batch),), -1))
            images.append(x)
            labels.append(y)
            bar.update(min(count + len(x), total) - min(count, total))
            count += len(x)
            if count >= n:
                break
    if not images:
        raise EvaluationError(NO_IMAGES)
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def save_npz_atomic(path: str, **arrays: np.ndarray) -> Path:
    """np.savez to `path` exactly (no '.npz' appended), through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
