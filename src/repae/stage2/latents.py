"""Stage 2's training data: a frozen VAE's cached posterior moments instead of encoding images.

`repae train-ldm ... latents.path=DIR` (or `repae train latents.path=DIR`) uses the run loop as
it is; the data source yields `(images or None, labels, (mean, std))` and the step draws
z = mean + std * eps with the same eps the VAE pass would have drawn. Images are loaded by index
alongside the latents only when an alignment encoder needs them (REPA: `loss.proj_coeff > 0`).
The order is the loop's: ResumableOrder over the cache's items, each rank taking its slice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.utils.data import Dataset

from repae import dist
from repae.config import ConfigError, RunConfig
from repae.data.sampler import ResumableOrder
from repae.data.workers import ordered_batches
from repae.models.vae import VAEArgs
from repae.fileio import sha256_file
from repae.hub import is_hub_id, local_path
from repae.stage2.cache import STATS, LatentCache, ToySource, read_manifest


def vae_files(path: str | Path) -> Tuple[Path, Path, Optional[Path]]:
    """A VAE given as a file, an `export-vae` directory or a diffusers directory ->
    (what load_model reads, the weight file to fingerprint, latent statistics exported beside it).
    A hub id: the same, of the file or diffusers directory it resolves to in the hub cache."""
    path = Path(local_path(path, "vae"))
    if path.is_dir() and (path / "vae.safetensors").is_file():  # repae export-vae output
        stats = path / "latent_stats.safetensors"
        return path / "vae.safetensors", path / "vae.safetensors", stats if stats.is_file() else None
    if path.is_dir():
        from repae.models.vae_diffusers import WEIGHTS_NAME

        return path, path / WEIGHTS_NAME, None
    return path, path, None


def resolve_latents(cfg: RunConfig) -> dict:
    """Point the config at the VAE and statistics the cache was made with, and check that the
    config fits the cache (same VAE bytes and layout, latent shape, image source). Returns the manifest."""
    from repae.build import vae_args

    root = Path(cfg.latents.path)
    manifest = read_manifest(root)
    made_with = manifest["vae"]
    if cfg.vae.path:
        load_path, weights, stats = vae_files(cfg.vae.path)
        if not weights.is_file() or sha256_file(weights) != made_with["sha256"]:
            raise ConfigError(f"vae.path={cfg.vae.path} is not the VAE the latents in {root} were cached with "
                              f"({made_with['path']}, sha256 {made_with['sha256'][:12]}...)")
        # a hub id stays one: resolving the cache's symlink would give a blob without its suffix
        cfg.vae.path = cfg.vae.path if is_hub_id(cfg.vae.path) else str(load_path.resolve())
    else:
        if not is_hub_id(made_with["path"]) and not Path(made_with["path"]).exists():
            raise ConfigError(f"the VAE the latents in {root} were cached with, {made_with['path']}, is not there; "
                              "pass vae.path=... (the same weights)")
        cfg.vae.path, stats = made_with["path"], made_with.get("latent_stats")
    if not cfg.vae.latent_stats_path:  # the exported (EMA BN) statistics, else the cache's own
        cfg.vae.latent_stats_path = str(Path(stats if stats and Path(stats).is_file() else root / STATS).resolve())
    ours, theirs = _layout(vae_args(cfg)), _layout(VAEArgs(**made_with["args"])) if made_with.get("args") else None
    if theirs is not None and ours != theirs:
        diff = {k: v for k, v in theirs.items() if ours.get(k) != v}
        raise ConfigError(f"the config's VAE layout differs from the cached VAE's {diff}: set vae.* to match")
    _check_source(cfg, manifest)
    return manifest


def _layout(args: VAEArgs) -> dict:
    """What the weights' computation depends on (attention placement, not how it was spelled)."""
    out = dataclasses.asdict(args)
    out["attn_resolutions"] = args.attn_levels()
    out.pop("resolution")
    return out


def _check_source(cfg: RunConfig, manifest: dict) -> None:
    from repae.config import vae_downsample_factor
    from repae.data.sources import data_kind, location

    source, root = manifest["source"], cfg.latents.path
    if (source["kind"] == "toy") != (cfg.data.source == "toy") or \
            (source["kind"] != "toy" and source["kind"] != data_kind(cfg)):
        raise ConfigError(f"the latents in {root} come from a {source['kind']} source, but data.source="
                          f"{cfg.data.source}: use the source they were cached from")
    if source["kind"] != "toy":
        if not cfg.data.path:
            cfg.data.path = source["path"]
        elif location(cfg.data.path) != source["path"]:
            raise ConfigError(f"data.path={cfg.data.path} is not {source['path']}, "
                              f"where the latents in {root} come from")
    if cfg.data.image_size != source["image_size"]:
        raise ConfigError(f"data.image_size={cfg.data.image_size}, but the latents in {root} were cached at "
                          f"{source['image_size']}")
    f = vae_downsample_factor(cfg.vae)
    if cfg.data.image_size // f != manifest["latent_shape"][-1]:
        raise ConfigError(f"cached latents are {manifest['latent_shape']}, the config's VAE makes "
                          f"{cfg.data.image_size // f}x{cfg.data.image_size // f}")


class _Items(Dataset):
    """Batch-level dataset: a list of cache items -> (uint8 images or None, labels, (mean, std))."""

    def __init__(self, cache: LatentCache, images=None):
        self.cache, self.images = cache, images

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, items):
        base, flipped = self.cache.split(items)
        labels = torch.from_numpy(self.cache.labels[base].copy())
        images = None
        if self.images is not None:
            images = self.images.load(base.tolist())
            if flipped.any():  # the mirrored item: the image the cached moments were computed on
                sel = torch.from_numpy(flipped)
                images[sel] = images[sel].flip(-1)
        return images, labels, self.cache.moments(items)


def _as_is(batch):
    return batch


class LatentBatches:
    """Resumable batches of cached moments (+ images on demand), like the loop's other sources:
    every rank walks the same global order and takes its contiguous slice."""

    def __init__(self, cache: LatentCache, images=None, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        self.items, self.num_workers, self.pin_memory = _Items(cache, images), num_workers, pin_memory
        self.order = ResumableOrder(len(cache), seed)
        self.rank, self.world = rank, world
        self._it, self._batch = None, None

    def _loader(self, batch_size: int):
        return ordered_batches(self.items, self.order, batch_size, self.rank, self.world, self.num_workers,
                               _as_is, batched=True, pin_memory=self.pin_memory)

    def next(self, batch_size: int):
        if self._it is None or batch_size != self._batch:
            self._it, self._batch = self._loader(batch_size), batch_size
        batch = next(self._it)
        self.order.take(batch_size)
        return batch

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self._it = None


def latent_batches(cfg: RunConfig, toy=None, pin_memory: bool = False) -> LatentBatches:
    """The loop's data source for `latents.path` (after resolve_latents); `pin_memory`: see training_batches."""
    from repae.data.sources import check_labels

    cache = LatentCache(cfg.latents.path)
    check_labels(cache.labels, cfg.model.num_classes, cfg.latents.path)
    recorded = cache.manifest["source"]
    need_images = cfg.loss.proj_coeff > 0
    images = None
    if toy is not None:
        from repae.toyworld import generator_data

        images = ToySource(*generator_data(toy, cfg.toy))
        if images.describe() != recorded:
            raise ConfigError(f"the toy world of this config (toy.*) is not the one the latents in "
                              f"{cfg.latents.path} were cached from")
    elif need_images:
        from repae.data.sources import cache_source

        images = cache_source(cfg, num_workers=0)
        if images.describe() != recorded:
            raise ConfigError(f"{cfg.data.path} holds other images than when the latents were cached")
    workers = cfg.data.num_workers if toy is None and need_images else 0
    return LatentBatches(cache, images if need_images else None, seed=cfg.train.seed, rank=dist.rank(),
                         world=dist.world_size(), num_workers=workers, pin_memory=pin_memory)
