"""Cached latents: the posterior mean and std of a frozen VAE for every image of a dataset, in order.

Layout of a cache directory:

    settings.json              what is cached: source identity, VAE sha256 and layout, shapes, dtype.
                               Written first; a re-run with other settings is refused.
    shard-00000.safetensors    images [0, S): mean, std [n,C,h,w] (+ mean_flip, std_flip with
                               hflip_too), labels int64 [n]; metadata start/count
    ...
    labels.npy                 int64 [N], written at the end
    latent_stats.safetensors   per-channel mean/var of z ~ q(z|x) over the cache (exact, from the moments)
    manifest.json              written last, once every shard exists: count, shapes, dtype, classes,
                               source, VAE, shards. A cache without it is unfinished.

A shard is written to `*.tmp`, fsynced and renamed: it exists completely or not at all, so a
re-run skips the shards on disk and writes the rest. Under torchrun shard k belongs to rank
k % W: the ranks write disjoint shards, and rank 0 checks there is no gap before it writes the
manifest. Readers memory-map the shards (`LatentCache`), so a cache larger than memory works.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from repae import dist
from repae.config import RANGES, ConfigError
from repae.fileio import (ArrayFileError, JsonFileError, is_number, read_json_object, read_npy, sha256_file, write_atomic,
                          write_json_atomic)
from repae.hub import is_hub_id
from repae.pixels import to_vae_range

FORMAT, VERSION = "repae-latents", 1
SETTINGS, MANIFEST, LABELS, STATS = "settings.json", "manifest.json", "labels.npy", "latent_stats.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16"}  # the safetensors name of each stored dtype

# Caps on what a manifest may describe, far above any real cache (SD-VAE at 512px: [4, 64, 64]) yet small
# enough that nothing sized by them (per-channel sums, an output batch) can exhaust memory before the shard
# headers, whose tensors must have exactly these shapes within the files' real sizes, are checked.
MAX_LATENT_CHANNELS, MAX_LATENT_SIDE = 4096, 16384
MAX_CLASSES = int(RANGES["model.num_classes"].hi)  # no model can use more (the same cap as repae.data.sources)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# ------------------------------------------------------------------------ image sources


class ToySource:
    """The toy world's training images (in memory), identified by a hash of their pixels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.image_size = images.shape[-1]
        # checked before the names "0".."max" are built: a damaged label must not size a list of 10^12 strings
        if len(labels) == 0 or int(labels.min()) < 0 or int(labels.max()) >= MAX_CLASSES:
            raise ConfigError(f"toy labels must be class ids in [0, {MAX_CLASSES}); got "
                              f"{'none' if len(labels) == 0 else f'{int(labels.min())}..{int(labels.max())}'}")
        self.classes = [str(c) for c in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        return {"kind": "toy", "count": len(self), "image_size": self.image_size,
                "images_sha256": hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()}

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[int]]]:
        for i in range(start, stop, batch_size):
            j = min(stop, i + batch_size)
            yield self.images[i:j], self.labels[i:j], []  # pixels in memory: none unreadable

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


def _with_substituted(items):
    """A batch of ImageRecords items: (images, labels, the unreadable records passed over to fill it)."""
    return (torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]),
            sorted({j for _, _, skipped in items for j in skipped}))


class DatasetSource:
    """Any image Dataset of repae.data.sources (folder, packed, hf, wds: no flips), decoded by DataLoader
    workers; `identity` says which data it is (kind, path, a digest of its files), recorded in the cache."""

    def __init__(self, dataset, identity: dict, num_workers: int = 4):
        self.dataset, self.identity, self.num_workers = dataset, identity, num_workers
        self.image_size = dataset.image_size
        self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> dict:
        return {**self.identity, "count": len(self), "image_size": self.image_size}

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[int]]]:
        """(uint8 images [B,3,S,S], labels [B], indices of the unreadable images whose entries hold the next
        readable image instead, as training reads the data) of images [start, stop)."""
        from torch.utils.data import DataLoader, Subset

        from repae.data.workers import worker_iter

        loader = DataLoader(Subset(self.dataset, range(start, stop)), batch_size=batch_size,
                            num_workers=self.num_workers, collate_fn=_with_substituted)
        yield from worker_iter(loader)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.dataset[int(i)][0] for i in indices])

    def name(self, j: int) -> str:
        return self.dataset.describe(j)


# ----------------------------------------------------------------------------- writing


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, device: torch.device,
                   autocast_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B,3,H,W] -> the posterior's (mean, std), float32 [B,C,h,w] each, on the CPU."""
    x = to_vae_range(images.to(device))
    if autocast_dtype is not None:
        with torch.autocast(device.type, dtype=autocast_dtype):
            posterior = vae.encode(x)
    else:
        posterior = vae.encode(x)
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


def _before_settings(name: str) -> bool:
    """What an earlier cache_latents can have left in a directory without settings.json: only that file's
    temporary copy, as it writes settings.json first. Shards without it record no settings (which VAE, which
    images) and are never taken as a resumable cache."""
    return name == SETTINGS + ".tmp"


def check_cache_dir(out: str | Path) -> Optional[dict]:
    """The settings of the earlier cache in `out` (None: a new or empty directory, where a cache can start);
    ConfigError for a directory that is neither, e.g. one holding other files (the cache would be mixed into
    them), and for damaged settings. Cheap: `repae cache-latents` calls it before loading anything."""
    from repae.fileio import refuse_unrelated

    out = Path(out)
    path = out / SETTINGS
    if not path.is_file():
        refuse_unrelated(out, _before_settings, "cache-latents", ConfigError)
        return None
    try:
        old = read_json_object(path)
    except JsonFileError as err:
        raise ConfigError(f"{err}; delete {out} and run the command again") from None
    if old.get("format") != FORMAT:  # another program's settings.json: not ours to resume or delete
        raise ConfigError(f"{out} is not a latent cache ({path} is not a {FORMAT} settings file); give a new "
                          "or empty --out directory")
    return old


def _check_or_write_settings(out: Path, settings: dict) -> None:
    """Resume a cache made with the same settings, or start one in a new or empty directory; ConfigError for
    a cache with other settings and for a directory that holds anything else."""
    old = check_cache_dir(out)
    if old is not None:
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(f"{out} holds a latent cache made with other settings ({', '.join(diff)}); "
                              "use another --out directory or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SETTINGS, settings)


def _shard_on_disk(path: Path, count: int) -> bool:
    """A finished shard of `count` items (renamed into place only when complete; a damaged one, e.g.
    truncated by a bad copy, is not finished and is written again)."""
    try:
        layout = _shard_layout(path)
    except (OSError, ValueError, RecursionError):
        return False
    return "labels" in layout and layout["labels"][1] == (count,)


def _write_shard(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cache_latents(vae, source, out_dir: str | Path, *, vae_file: str | Path,
                  vae_path: Optional[str | Path] = None, vae_stats: Optional[str | Path] = None,
                  shard_size: int = 1000, hflip_too: bool = False, batch_size: int = 64,
                  autocast_dtype: Optional[torch.dtype] = None, store_dtype: torch.dtype = torch.float32,
                  device: Optional[torch.device] = None, progress: bool = True) -> dict:
    """Encode every image of `source` with the frozen `vae` into `out_dir` (see the module docstring).

    vae_file: the weight file `vae` was loaded from (its sha256 goes into the manifest; train-ldm
    checks it); vae_path: what load_model reads (default vae_file; e.g. a diffusers directory).
    vae_stats: the latent statistics exported with it, if any. Resumable; under
    torchrun each rank writes shards k with k % W == rank. Returns the manifest.
    """
    out, device = Path(out_dir), device or next(vae.parameters()).device
    if shard_size < 1:
        raise ConfigError("--shard-size must be >= 1")
    n, f = len(source), vae.downsample_factor
    settings = {
        "format": FORMAT, "version": VERSION, "count": n, "shard_size": shard_size, "hflip_too": hflip_too,
        "dtype": {v: k for k, v in _DTYPES.items()}[store_dtype],
        "latent_shape": [vae.z_channels, source.image_size // f, source.image_size // f],
        "encode_autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else None,
        "source": source.describe(), "classes": source.classes,
        # a hub id is kept as such: the resolved cache symlink points at a blob without its suffix
        "vae": {"path": vae_path if is_hub_id(vae_path) else str(Path(vae_path or vae_file).resolve()),
                "sha256": sha256_file(vae_file),
                "args": dataclasses.asdict(vae.args) if hasattr(vae, "args") else None,
                "latent_stats": str(Path(vae_stats).resolve()) if vae_stats else None},
    }
    with dist.main_first():  # rank 0 checks or writes the settings, then the others read them
        _check_or_write_settings(out, settings)
    vae.eval()
    num_shards = math.ceil(n / shard_size)
    rank, world = dist.rank(), dist.world_size()
    ranges = {k: (k * shard_size, min(n, (k + 1) * shard_size)) for k in range(rank, num_shards, world)}
    todo = [k for k, (a, b) in ranges.items() if not _shard_on_disk(out / shard_name(k), b - a)]
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    bar = tqdm(total=total, desc=f"cache latents (rank {rank})" if world > 1 else "cache latents", unit="img",
               disable=not progress or rank != 0)
    for k in todo:
        a, b = ranges[k]
        parts: Dict[str, List[torch.Tensor]] = {"mean": [], "std": [], "labels": []}
        if hflip_too:
            parts.update(mean_flip=[], std_flip=[])
        substituted: List[int] = []
        for images, labels, passed_over in source.batches(a, b, batch_size):
            substituted += passed_over
            mean, std = encode_moments(vae, images, device, autocast_dtype)
            parts["mean"].append(mean.to(store_dtype))
            parts["std"].append(std.to(store_dtype))
            parts["labels"].append(labels.long())
            if hflip_too:
                mean, std = encode_moments(vae, images.flip(-1), device, autocast_dtype)
                parts["mean_flip"].append(mean.to(store_dtype))
                parts["std_flip"].append(std.to(store_dtype))
            bar.update(len(images))
        _write_shard(out / shard_name(k), {key: torch.cat(v) for key, v in parts.items()},
                     {"start": str(a), "count": str(b - a), SUBSTITUTED: json.dumps(sorted(set(substituted)))})
    bar.close()
    dist.barrier()
    if dist.is_main():
        _finish(out, settings, num_shards, getattr(source, "name", str))
    dist.barrier()
    return read_manifest(out)


SUBSTITUTED = "substituted"  # shard metadata: the unreadable images whose entries hold the next readable one
MAX_NAMED = 20  # unreadable images the manifest names (all are counted)


def _substituted(out: Path, num_shards: int) -> List[int]:
    """The unreadable images of the whole cache, from its shards' metadata (header only; none for shards
    written before it was recorded)."""
    from safetensors import safe_open

    found: set = set()
    for k in range(num_shards):
        with safe_open(str(out / shard_name(k)), "np") as f:
            try:
                found.update(int(j) for j in json.loads((f.metadata() or {}).get(SUBSTITUTED, "[]")))
            except (ValueError, TypeError):
                raise ConfigError(f"{out / shard_name(k)}: its metadata '{SUBSTITUTED}' is not a list of image "
                                  f"indices; delete the shard and run the command again") from None
    return sorted(found)


def _finish(out: Path, settings: dict, num_shards: int, name=str) -> dict:
    """Check every shard is there, then write labels, statistics and (last) the manifest, which counts (and
    names, by `name(index)`, the first MAX_NAMED of) the unreadable images."""
    from repae.weights import save_latent_stats

    n, size = settings["count"], settings["shard_size"]
    missing = [k for k in range(num_shards)
               if not _shard_on_disk(out / shard_name(k), min(n, (k + 1) * size) - k * size)]
    if missing:
        raise RuntimeError(f"latent cache {out}: shards {missing[:10]} are missing after every rank finished")
    cache = LatentCache(out, settings=settings)
    labels = np.concatenate([cache._views(k)["labels"] for k in range(num_shards)]).astype(np.int64)
    write_atomic(out / LABELS, _npy_bytes(labels))
    mean, var = cache.channel_stats()
    save_latent_stats(mean, var, out / STATS)
    unreadable = _substituted(out, num_shards)
    manifest = {**settings, "complete": True, "num_shards": num_shards,
                "unreadable_images": {"count": len(unreadable), "examples": [name(j) for j in unreadable[:MAX_NAMED]],
                                      "entries": "each holds the next readable image (as training reads the data)"},
                "shards": [shard_name(k) for k in range(num_shards)], "labels": LABELS,
                "latent_stats": STATS, "stats_mean": mean.tolist(), "stats_var": var.tolist()}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ----------------------------------------------------------------------------- reading


def _why(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _int(value, lo: int, hi: Optional[int] = None) -> bool:
    return is_number(value, int) and value >= lo and (hi is None or value <= hi)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a finished cache, checked (types, required keys, bounds, consistency); ConfigError
    naming what is wrong and the remedy otherwise."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if (root / SETTINGS).is_file():
            raise ConfigError(f"latent cache {root} is unfinished (no {MANIFEST}): run the same "
                              "`repae cache-latents` command again to complete it")
        raise ConfigError(f"{root} is not a latent cache (no {MANIFEST}); make one with `repae cache-latents`")
    remedy = (f"run the same `repae cache-latents` command again to rewrite it (it keeps the finished shards), "
              f"or delete {root} and make the cache anew")
    try:
        manifest = read_json_object(path)
    except JsonFileError as err:
        raise ConfigError(f"{err}; {remedy}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{path} is not a {FORMAT} v{VERSION} manifest")
    problems = _manifest_problems(manifest)
    if problems:
        raise ConfigError(f"{path} is damaged or hand-edited: {'; '.join(problems[:5])}; {remedy}")
    return manifest


def _manifest_problems(m: dict) -> List[str]:
    """What is wrong with a manifest's fields (empty: usable). Every field a reader sizes or indexes by
    is checked here, so nothing later meets a string for a number or a shape of a trillion."""
    bad: List[str] = []
    if m.get("complete") is not True:
        bad.append("it is not marked complete")
    count, size = m.get("count"), m.get("shard_size")
    if not _int(count, 1):
        bad.append(f"count={repr(count)[:40]} must be an integer >= 1")
    if not _int(size, 1):
        bad.append(f"shard_size={repr(size)[:40]} must be an integer >= 1")
    if not isinstance(m.get("hflip_too"), bool):
        bad.append("hflip_too must be true or false")
    if m.get("dtype") not in _DTYPES:
        bad.append(f"dtype={repr(m.get('dtype'))[:40]} must be one of {sorted(_DTYPES)}")
    shape = m.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and _int(shape[0], 1, MAX_LATENT_CHANNELS)
            and all(_int(n, 1, MAX_LATENT_SIDE) for n in shape[1:])):
        bad.append(f"latent_shape={str(shape)[:60]} must be [C, h, w] with 1 <= C <= {MAX_LATENT_CHANNELS} and "
                   f"1 <= h, w <= {MAX_LATENT_SIDE}")
    if _int(count, 1) and _int(size, 1):
        n, shards = math.ceil(count / size), m.get("shards")
        # compared name by name: a forged count must not build a list of 10^12 names to compare with
        if m.get("num_shards") != n or not (isinstance(shards, list) and len(shards) == n
                                            and all(name == shard_name(k) for k, name in enumerate(shards))):
            bad.append(f"num_shards and shards must name the {n} shards of {count} images in shards of {size}")
    classes = m.get("classes")
    if not (isinstance(classes, list) and 1 <= len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes)):
        bad.append(f"classes must be a list of 1 to {MAX_CLASSES} class names")
    source = m.get("source")
    if not (isinstance(source, dict) and isinstance(source.get("kind"), str) and _int(source.get("image_size"), 1)
            and (source.get("kind") == "toy" or isinstance(source.get("path"), str))):
        bad.append("source must record the kind, path and image_size of the images")
    vae = m.get("vae")
    if not (isinstance(vae, dict) and isinstance(vae.get("path"), str) and isinstance(vae.get("sha256"), str)
            and isinstance(vae.get("latent_stats"), (str, type(None)))
            and isinstance(vae.get("args"), (dict, type(None)))):
        bad.append("vae must record the path, sha256, args and latent_stats of the VAE")
    elif vae["args"] is not None:
        from repae.weights import CheckpointError, args_from_metadata

        try:  # the same known fields, types and caps as a weight file's architecture metadata
            args_from_metadata(MANIFEST, "vae", json.dumps(vae["args"]))
        except CheckpointError as err:
            bad.append(f"vae.args: {str(err).split(': ', 2)[-1]}")
    return bad


_NP_DTYPES = {"F32": np.float32, "BF16": np.uint16, "I64": np.int64, "F16": np.float16}
MAX_HEADER_BYTES = 100_000_000  # a shard's header is a few hundred bytes


def _shard_layout(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...], int]]:
    """{tensor name: (safetensors dtype, shape, byte offset in the file)} of a safetensors file, checked:
    a JSON object header, known dtypes, integer shapes, and data offsets that match shape x itemsize and
    lie within the file. ValueError (or OSError) saying what is wrong otherwise; memory-mapping the
    result can neither fail nor read past the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"it has {size} bytes, fewer than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"its header length {length} is beyond the file's {size} bytes: not a safetensors file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    start, out = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _NP_DTYPES:
            raise ValueError(f"tensor {name[:40]!r} has no known dtype ({str(info)[:60]})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_int(n, 0) for n in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_int(o, 0) for o in offsets)):
            raise ValueError(f"tensor {name[:40]!r} has a malformed shape or data_offsets")
        nbytes = math.prod(shape) * np.dtype(_NP_DTYPES[info["dtype"]]).itemsize
        begin, end = offsets
        if end - begin != nbytes or start + end > size:
            raise ValueError(f"tensor {name[:40]!r} {shape} does not fit the file's {size} bytes (truncated?)")
        out[name] = (info["dtype"], tuple(shape), start + begin)
    return out


# a VAE posterior's mean and std are latents of order 1-10 (SD-VAE's raw latents stay within about +-40):
# a moment beyond this is not a VAE's, and squared in the loss it overflows float32
MAX_MOMENT = 1e6


class LatentCache:
    """Random access to a finished cache. Item j < N is image j; with hflip_too, item N + j is its
    mirror image. Shards are memory-mapped lazily in each process (pickle-safe for DataLoader workers)."""

    def __init__(self, root: str | Path, settings: Optional[dict] = None):
        self.root = Path(root)
        self.manifest = settings if settings is not None else read_manifest(self.root)
        self.count, self.shard_size = self.manifest["count"], self.manifest["shard_size"]
        self.hflip_too = bool(self.manifest["hflip_too"])
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self._maps: Dict[int, Dict[str, np.ndarray]] = {}
        self._labels: Optional[np.ndarray] = None
        self._views(0)  # a damaged first shard is reported now, not in a data-loading worker mid-training

    def __len__(self) -> int:
        return self.count * (2 if self.hflip_too else 1)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def _views(self, k: int) -> Dict[str, np.ndarray]:
        """Shard k's tensors as read-only memmaps (bf16 as uint16 bits), once their dtypes and shapes are
        the manifest's: ConfigError naming the shard, and the remedy, otherwise."""
        if k not in self._maps:
            path = self.root / shard_name(k)
            n = min(self.count, (k + 1) * self.shard_size) - k * self.shard_size
            latent = (_ST_DTYPES[self.manifest["dtype"]], (n, *self.latent_shape))
            want = {"mean": latent, "std": latent, "labels": ("I64", (n,))}
            if self.hflip_too:
                want.update(mean_flip=latent, std_flip=latent)
            try:
                layout = _shard_layout(path)
                for name, (dtype, shape) in want.items():
                    if name not in layout:
                        raise ValueError(f"it holds no {name!r} tensor")
                    if layout[name][:2] != (dtype, shape):
                        raise ValueError(f"{name!r} is {layout[name][0]} {list(layout[name][1])}, the manifest "
                                         f"says {dtype} {list(shape)}")
            except FileNotFoundError:
                raise ConfigError(f"latent cache shard {path} is missing: run the same `repae cache-latents` "
                                  "command again (it writes the missing shards)") from None
            except (OSError, ValueError, RecursionError) as err:
                raise ConfigError(f"latent cache shard {path} is damaged ({_why(err)}): delete that file and run "
                                  "the same `repae cache-latents` command again (it rewrites missing shards)") from None
            self._maps[k] = {name: np.memmap(path, dtype=_NP_DTYPES[layout[name][0]], mode="r",
                                             offset=layout[name][2], shape=shape) for name, (_, shape) in want.items()}
        return self._maps[k]

    @property
    def labels(self) -> np.ndarray:
        """int64 [count]: every image's class id, below the manifest's number of classes."""
        if self._labels is None:
            path = self.root / LABELS
            remedy = "run the same `repae cache-latents` command again to rewrite it"
            try:  # bounded: a forged header cannot allocate more than the file (and `count` labels) holds
                labels = read_npy(path, max_bytes=8 * self.count)
            except FileNotFoundError:
                raise ConfigError(f"latent cache labels {path} are missing: {remedy}") from None
            except ArrayFileError as err:
                raise ConfigError(f"latent cache labels unreadable: {err}; {remedy}") from None
            classes = len(self.manifest["classes"])
            if labels.shape != (self.count,) or labels.dtype.kind not in "iu":
                raise ConfigError(f"latent cache labels {path} are {labels.dtype} {list(labels.shape)}, not "
                                  f"{self.count} integer class ids: {remedy}")
            if labels.min() < 0 or labels.max() >= classes:
                raise ConfigError(f"latent cache labels {path} hold ids outside 0..{classes - 1} (the manifest's "
                                  f"{classes} classes): {remedy}")
            self._labels = labels.astype(np.int64, copy=False)
        return self._labels

    def split(self, items: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Item ids -> (image index in the source, flipped?)."""
        items = np.asarray(items, dtype=np.int64)
        if items.size and (items.min() < 0 or items.max() >= len(self)):
            raise IndexError(f"latent cache item out of range [0, {len(self)})")
        return items % self.count, items >= self.count

    def moments(self, items: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32 [len(items), C, h, w] for cache items (see the class docstring)."""
        base, flipped = self.split(np.asarray(items))
        shard, row = base // self.shard_size, base % self.shard_size
        for k in np.unique(shard):  # checked against the manifest before latent_shape sizes anything
            self._views(int(k))
        out = {key: np.empty((len(base), *self.latent_shape), dtype=np.float32) for key in ("mean", "std")}
        for k in np.unique(shard):
            views = self._views(int(k))
            for flip in (False, True):
                sel = (shard == k) & (flipped == flip)
                if sel.any():
                    for key in ("mean", "std"):
                        src = views[f"{key}_flip" if flip else key]
                        out[key][sel] = _to_f32(src[row[sel]])
        self._check_values(out, base, shard)
        return torch.from_numpy(out["mean"]), torch.from_numpy(out["std"])

    def _check_values(self, out: Dict[str, np.ndarray], base: np.ndarray, shard: np.ndarray) -> None:
        """ConfigError naming the item and shard when a read moment is NaN/inf, beyond MAX_MOMENT, or a negative
        std: a damaged cache, which would otherwise train on NaN batches (skipped as 'non-finite steps', the run
        blamed for diverging) or stop with a FloatingPointError. Per batch read: a few microseconds."""
        mean, std = out["mean"].reshape(len(base), -1), out["std"].reshape(len(base), -1)
        bad = ~(np.isfinite(mean).all(1) & np.isfinite(std).all(1) & (np.abs(mean) <= MAX_MOMENT).all(1)
                & (std >= 0).all(1) & (std <= MAX_MOMENT).all(1))
        if bad.any():
            i = int(np.argmax(bad))
            raise ConfigError(f"latent cache {self.root}: image {int(base[i])} (in {shard_name(int(shard[i]))}) has a "
                              f"posterior mean or std that is NaN, infinite, negative or beyond {MAX_MOMENT:.0e}: the "
                              f"cache is damaged; delete it and run repae cache-latents again")

    def channel_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and variance of z ~ N(mean, std^2) over every item, exactly (float64 sums):
        E[z] = avg(mean), E[z^2] = avg(mean^2 + std^2)."""
        c = self.latent_shape[0]
        s1, s2, count = np.zeros(c), np.zeros(c), 0
        for k in range(math.ceil(self.count / self.shard_size)):
            views = self._views(k)
            for suffix in (("", "_flip") if self.hflip_too else ("",)):
                mean = _to_f32(views["mean" + suffix]).astype(np.float64)
                std = _to_f32(views["std" + suffix]).astype(np.float64)
                s1 += mean.sum(axis=(0, 2, 3))
                s2 += (mean**2 + std**2).sum(axis=(0, 2, 3))
                count += mean.size // c
        m = s1 / count
        return torch.from_numpy(m).float(), torch.from_numpy(np.maximum(s2 / count - m**2, 0)).float()


def _to_f32(arr: np.ndarray) -> np.ndarray:
    """float32 copy of a memmapped array; bf16 is stored as uint16 bits (the high half of a float32)."""
    if arr.dtype == np.uint16:
        return (np.asarray(arr).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)
