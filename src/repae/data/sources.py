"""The one door to training data (DESIGN.md section 7): `repae train`, stage 2, held-out sets for
reproduction and the benchmarks ask here for data and never pick a format themselves.

data.source  data.path
  toy        (none) the toy world's images, built and cached by repae.toyworld
  folder     an image folder: one sub-folder per class (ImageNet's train/ layout); `imagenet` is the same
  packed     a `repae prepare-data` output (repae.data.packed)
  hf         Hugging Face `datasets` parquet/arrow files, a directory of them, or a dataset repo id in the
             huggingface_hub cache, hf:owner/name[@revision][/dir] (repae.data.hf); data.split picks the split
  wds        WebDataset tar shards: a brace pattern, a glob, a directory of .tar or one .tar (repae.data.wds)

Every image source is an ImageRecords Dataset (item i -> uint8 [3,S,S] ADM-centre-cropped to
data.image_size, label, indices of bad records skipped) read through DatasetBatches: one global order per
epoch (ResumableOrder, seeded by train.seed), each rank loading only its slice of every global batch
(rank_slice), an exact resumable position (state_dict / load_state_dict), bad records counted once.
Cached latents (latents.path) come through LatentBatches with the same order rules.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from repae import dist
from repae.config import RANGES, ConfigError, RunConfig
from repae.data.images import DEFAULT_MAX_PIXELS
from repae.data.records import ImageRecords

# Every label must lie below model.num_classes, which the config caps here: readers that number classes by the
# largest label (wds, hf) refuse a larger one at open, before anything is sized by it (a 20-byte label file
# saying 10**12 would otherwise ask for a list of 10**12 class names).
MAX_CLASSES = int(RANGES["model.num_classes"].hi)

_PATH_HELP = {
    "folder": "a folder of class sub-folders",
    "imagenet": "a folder of class sub-folders",
    "packed": "a `repae prepare-data` output",
    "hf": "parquet/arrow files, a directory of them, or hf:owner/name of a cached dataset repo",
    "wds": "WebDataset .tar shards: a brace pattern such as train-{0000..0146}.tar, a glob or a directory",
}


def resolve(cfg: RunConfig) -> None:
    """Before anything is built: with latents.path, point the config at the VAE and statistics the cache
    was made with (and check that the config fits it)."""
    if cfg.latents.path:
        from repae.stage2.latents import resolve_latents

        resolve_latents(cfg)


def _hf_root(path: str, split: str) -> str:
    """A local directory or file for data.source=hf: a hub id is resolved in the huggingface_hub cache
    (the split's files and the metadata only)."""
    from repae.hub import dataset_dir, is_hub_id

    if not is_hub_id(path):
        return path
    return str(dataset_dir(path, [f"*{split}*.parquet", f"*{split}*.arrow", f"*{split}*/*.arrow", "*.json"]))


def _open(cfg: RunConfig, root: str, hflip: bool) -> ImageRecords:
    return open_images(data_kind(cfg), root, cfg.data.image_size, split=cfg.data.split, hflip=hflip,
                       seed=cfg.train.seed, max_pixels=cfg.data.max_image_pixels)


def open_images(kind: str, path: str, image_size: int, split: str = "train", hflip: bool = False, seed: int = 0,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRecords:
    """The ImageRecords Dataset of `path` read as `kind` (folder | packed | hf | wds; hf: a local path or a
    hub id, files named by split filtered by `split`), ADM-centre-cropped to `image_size`. The readers' own errors
    (ValueError and subclasses, FileNotFoundError) name what is wrong."""
    kw = dict(image_size=image_size, hflip=hflip, seed=seed, max_pixels=max_pixels)
    if kind == "packed":
        from repae.data.packed import PackedDataset

        dataset = PackedDataset(path, hflip, seed, max_pixels)
        if dataset.image_size != image_size:
            raise ValueError(f"{path} holds {dataset.image_size}px crops, not {image_size}px "
                             f"(data.image_size, or the model's image size when evaluating)")
        return dataset
    if kind == "hf":
        from repae.data.hf import open_table_images

        return open_table_images(_hf_root(path, split), split, **kw)
    if kind == "wds":
        from repae.data.wds import TarImages, list_tar_shards

        return TarImages(list_tar_shards(path), **kw)
    from repae.data.folder import ImageFolder

    return ImageFolder(path, **kw)


def detect_kind(path: str) -> str:
    """Which reader a bare path needs, for commands that take one (`repae evaluate ... --data PATH`):
    a hub id, a .parquet/.arrow file, or a directory with such files at its top, in data/ or beside a
    `datasets` dataset_dict.json / dataset_info.json -> hf; a .tar, a brace pattern or a glob, or a
    directory of .tar files -> wds; a `repae prepare-data` output (manifest.json) -> packed; any other
    directory -> folder. Only the top of a directory (and data/) is looked at: an ImageNet folder is not walked."""
    from repae.data.hf import TABLE_SUFFIXES
    from repae.hub import is_hub_id

    if is_hub_id(path):
        return "hf"
    p = Path(path)
    if "{" in path or (not p.exists() and any(c in path for c in "*?[")) or p.suffix == ".tar":
        return "wds"
    if p.is_file():
        return "hf" if p.suffix in TABLE_SUFFIXES else "folder"
    if not p.is_dir():
        return "folder"  # the folder reader's "not found" names the path
    from repae.data.packed import MANIFEST

    top = {q.name: q for q in p.iterdir()}
    if MANIFEST in top:
        return "packed"
    data = [q for q in (p / "data").iterdir()] if (p / "data").is_dir() else []
    if ({"dataset_dict.json", "dataset_info.json"} & top.keys()
            or any(q.suffix in TABLE_SUFFIXES and q.is_file() for q in [*top.values(), *data])):
        return "hf"
    if any(q.suffix == ".tar" and q.is_file() for q in top.values()):
        return "wds"
    return "folder"


def image_dataset(cfg: RunConfig, path: Optional[str] = None, hflip: bool = False) -> ImageRecords:
    """The Dataset of cfg.data at data.image_size, or of `path` instead (held-out images: any source
    `detect_kind` tells apart; tables named by split give their validation split).
    ConfigError (one line, naming data.path or the path) if it cannot be used."""
    from repae.hub import HubError

    if path is not None:
        kind = detect_kind(path)
        try:
            return open_images(kind, path, cfg.data.image_size, split="validation", hflip=hflip, seed=cfg.train.seed,
                               max_pixels=cfg.data.max_image_pixels)
        except (FileNotFoundError, ValueError, HubError) as err:
            raise ConfigError(f"{path} ({kind}): {err}") from None
    if not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path "
                          f"({_PATH_HELP.get(cfg.data.source, 'a folder of class sub-folders')})")
    try:
        return _open(cfg, cfg.data.path, hflip)
    except (FileNotFoundError, ValueError, HubError) as err:  # the readers' errors are ValueErrors
        raise ConfigError(f"data.path: {err}") from None


def check_labels(labels, num_classes: int, where: str) -> None:
    """ConfigError unless every label lies in [0, num_classes). Each reader keeps its labels consistent with its
    own class list; this is the one check against the model, whatever the source: label num_classes is the
    classifier-free-guidance null class (training on it is silently unconditional) and anything above it has
    no embedding row (an IndexError, or a device assert on CUDA, mid-training)."""
    labels = np.asarray(labels)  # [N] integers
    if len(labels) == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        example = int(labels[bad][0])
        raise ConfigError(f"{where}: {int(bad.sum())} of {len(labels)} labels are outside 0..{num_classes - 1} "
                          f"(model.num_classes={num_classes}), e.g. {example}"
                          + (" (the id of the null class of classifier-free guidance)" if example == num_classes
                             else ""))


def training_batches(cfg: RunConfig, toy=None, pin_memory: bool = False):
    """The loop's batch source for cfg: `.next(global batch size)` -> this rank's (uint8 images [B,3,S,S],
    labels [B]) (stage 2: cached moments too), `.state_dict()`, `.load_state_dict()`. `toy`: the ToyWorld
    when data.source=toy. `pin_memory` (for a GPU): batches a DataLoader reads come in page-locked memory,
    for copies to the device that do not hold the host (the toy world's batches are slices of tensors in
    memory, and stay as they are)."""
    from repae.data.folder import DatasetBatches
    from repae.data.sampler import TensorBatches

    if cfg.latents.path:  # stage 2: cached posterior moments of a frozen VAE (+ images for REPA)
        from repae.stage2.latents import latent_batches

        return latent_batches(cfg, toy, pin_memory)
    if toy is not None:
        from repae.toyworld import generator_data

        return TensorBatches(*generator_data(toy, cfg.toy), seed=cfg.train.seed, rank=dist.rank(),
                             world=dist.world_size())
    dataset = image_dataset(cfg, hflip=cfg.data.hflip)
    if len(dataset.classes) > cfg.model.num_classes:
        raise ConfigError(f"{cfg.data.path} has {len(dataset.classes)} classes but model.num_classes="
                          f"{cfg.model.num_classes}")
    check_labels(dataset.labels, cfg.model.num_classes, cfg.data.path)
    return DatasetBatches(dataset, seed=cfg.train.seed, num_workers=cfg.data.num_workers, rank=dist.rank(),
                          world=dist.world_size(), pin_memory=pin_memory)


# ----------------------------------------------------------------- stage 2: the images latents are cached from


def data_kind(cfg: RunConfig) -> str:
    """The format of cfg.data (imagenet is an image folder)."""
    return "folder" if cfg.data.source in ("folder", "imagenet") else cfg.data.source


def location(path: str) -> str:
    """data.path as a cache records it: a hub id as written, a local path (or shard pattern) absolute."""
    from repae.hub import is_hub_id

    return path if is_hub_id(path) else str(Path(path).resolve())


def identity(kind: str, path: str, dataset) -> dict:
    """Which data `dataset` is, for latent caches made from it: kind, path and a sha256 of its listing (folder:
    file names relative to the folder and labels, as caches have always recorded it; hf / wds: the names and
    sizes of the table files / shards; packed: the shards' recorded sha256)."""
    if kind == "folder":
        listing = "\n".join(f"{p.relative_to(dataset.root)}\t{y}" for p, y in zip(dataset.files, dataset.labels))
    elif kind == "packed":
        listing = "\n".join(f"{rec['bin']}\t{rec['bin_sha256']}" for rec in dataset.manifest["shards"])
    else:
        files = [t.path for t in dataset.tables] if kind == "hf" else [Path(p) for p in dataset.shards]
        listing = "\n".join(f"{p.name}\t{p.stat().st_size}" for p in files)
    return {"kind": kind, "path": path, "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def cache_source(cfg: RunConfig, num_workers: int = 0):
    """The images of cfg.data (no flips) as stage 2 reads them: `repae cache-latents` encodes them, and
    training on cached latents loads them by index when an alignment encoder needs them."""
    from repae.stage2.cache import DatasetSource

    dataset = image_dataset(cfg)
    return DatasetSource(dataset, identity(data_kind(cfg), location(cfg.data.path), dataset), num_workers)
