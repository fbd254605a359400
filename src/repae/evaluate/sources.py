"""Where evaluated images come from: image folders, ADM `.npz` batches, in-memory tensors, or a
sampler; each one split across processes in contiguous blocks of whole batches.

Every source iterates over batches of uint8 [B,3,H,W] images, or (images, labels) tuples for
the labelled ones, for this process's block of the global index range only. With batch size b
the indices form ceil(n/b) batches; `shard_range(n, rank, world, b)` gives rank r the
contiguous run of batches [r*q + min(r, m), ...) with q, m = divmod(ceil(n/b), world) (the first
m ranks take one more batch). So the blocks cover 0..n-1 exactly once; concatenated in rank
order they restore the global order (which the Inception Score's splits of consecutive samples
depend on); and every batch is the batch one process would form, so the per-batch numerics
are those of a single process.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from repae.data.folder import IMAGE_SUFFIXES, list_image_folder
from repae.data.images import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image
from repae.evaluate.errors import EvaluationError
from repae.evaluate.fid import REF_IMAGES_KEY, NpzImages

PathLike = Union[str, os.PathLike]


def shard_range(n: int, rank: int, world: int, batch_size: int = 1) -> range:
    """Rank `rank`'s indices of range(n): a contiguous block of whole batches of `batch_size`;
    block sizes differ by at most one batch, with no gaps and no overlap."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    q, m = divmod(-(-n // batch_size), world)
    first = rank * q + min(rank, m)
    last = first + q + (1 if rank < m else 0)
    return range(min(n, first * batch_size), min(n, last * batch_size))


def list_images_recursive(root: PathLike) -> List[Path]:
    """Every image file under `root` (any depth), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"image folder not found: {root}")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise EvaluationError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _decode(path: Path, image_size: Optional[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[np.ndarray]:
    """uint8 [H,W,3] (ADM centre crop to `image_size` when given), or None when unreadable or over
    `max_pixels` (refused from the header, never decoded)."""
    try:
        return decode_image(path, max_pixels, image_size)
    except UnreadableImage:
        return None


class FolderImages:
    """(uint8 [B,3,H,W], labels [B]) batches from image files; unreadable files (and those over
    `max_pixels`) are skipped and listed in `skipped`, each once per pass.

    Images keep their own size unless `image_size` asks for the ADM centre crop; a batch never
    mixes sizes (it is cut short where the size changes). `labels[i]` is -1 when unknown.
    Decoding runs on `workers` threads (PIL releases the GIL while decoding)."""

    def __init__(self, files: Sequence[Path], labels: Optional[Sequence[int]] = None, batch_size: int = 64,
                 image_size: Optional[int] = None, block: Optional[range] = None, workers: int = 4,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [-1] * len(self.files)
        self.batch_size, self.image_size, self.workers = batch_size, image_size, max(1, workers)
        self.max_pixels = max_pixels
        self.block = block if block is not None else range(len(self.files))
        self.skipped: List[str] = []  # unreadable files of this process's block

    @property
    def num_images(self) -> int:
        return len(self.files)

    def __len__(self) -> int:
        return -(-len(self.block) // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.skipped = []
        images: List[np.ndarray] = []
        labels: List[int] = []

        def flush():
            batch = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))
            images.clear()
            labels.clear()
            return batch

        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(self.block.start, self.block.stop, self.batch_size):
                idx = range(start, min(start + self.batch_size, self.block.stop))
                decoded = pool.map(lambda j: _decode(self.files[j], self.image_size, self.max_pixels), idx)
                for i, arr in zip(idx, decoded):
                    if arr is None:
                        self.skipped.append(str(self.files[i]))
                        continue
                    if images and arr.shape != images[0].shape:
                        yield flush()
                    images.append(arr)
                    labels.append(self.labels[i])
                if images:
                    yield flush()


class NpzBlock(NpzImages):
    """`NpzImages` over rows [block.start, block.stop) of `arr_0`, with evaluation errors."""

    def __init__(self, path: PathLike, batch_size: int = 64, block: Optional[range] = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(path, batch_size, block=block, max_pixels=max_pixels)
        self.skipped: List[str] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            yield from super().__iter__()
        except ValueError as err:  # a truncated array
            raise EvaluationError(str(err)) from None


def open_npz(path: PathLike, batch_size: int = 64, rank: int = 0, world: int = 1,
             limit: Optional[int] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> NpzBlock:
    """This process's block of an ADM image batch, with the errors said plainly."""
    try:
        whole = NpzBlock(path, batch_size, max_pixels=max_pixels)
    except FileNotFoundError:
        raise EvaluationError(f"image batch not found: {path}") from None
    except KeyError as err:
        raise EvaluationError(f"{err.args[0]}; an image batch needs '{REF_IMAGES_KEY}' "
                              "(uint8 [N,H,W,3], as ADM and `repae sample --npz` write)") from None
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    n = min(whole.num_images, limit) if limit else whole.num_images
    whole.block = shard_range(n, rank, world, batch_size)  # blocks as the ranks agree, whatever one batch holds
    return whole


def open_folder(root: PathLike, batch_size: int = 64, image_size: Optional[int] = None, rank: int = 0,
                world: int = 1, limit: Optional[int] = None, labelled: bool = False,
                workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS) -> FolderImages:
    """This process's block of an image folder. `labelled`: one class per sub-folder (ImageNet
    layout, via `list_image_folder`; a flat folder has no labels); else every image under the
    root at any depth, unlabelled."""
    labels: Optional[List[int]] = None
    if labelled:
        try:
            files, labels, classes = list_image_folder(root)
        except (FileNotFoundError, ValueError) as err:
            raise EvaluationError(str(err)) from None
        if len(classes) == 1 and not any(p.is_dir() for p in Path(root).iterdir()):
            labels = None  # a flat folder: no class information
    else:
        files = list_images_recursive(root)
    n = min(len(files), limit) if limit else len(files)
    files = files[:n]
    labels = labels[:n] if labels is not None else None
    return FolderImages(files, labels, batch_size, image_size, shard_range(n, rank, world, batch_size), workers,
                        max_pixels)


class TensorImages:
    """(uint8 [B,3,H,W], labels [B]) batches of this process's block of in-memory images [N,3,H,W]."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, batch_size: int = 64,
                 rank: int = 0, world: int = 1, limit: Optional[int] = None):
        n = min(len(images), limit) if limit else len(images)
        self.images = images[:n]
        self.labels = labels[:n] if labels is not None else torch.full((n,), -1, dtype=torch.long)
        self.batch_size, self.block, self.skipped = batch_size, shard_range(n, rank, world, batch_size), []

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return -(-len(self.block) // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.block.start, self.block.stop, self.batch_size):
            j = min(i + self.batch_size, self.block.stop)
            yield self.images[i:j], self.labels[i:j]


class RecordImages:
    """(uint8 [B,3,S,S], labels [B]) batches of this process's block of an ImageRecords dataset (parquet/arrow
    tables, tar shards, a packed store; see repae.data.sources), each record once and in index order: an
    unusable record is skipped and listed in `skipped` (not replaced by the next one, as training does)."""

    def __init__(self, dataset, batch_size: int = 64, rank: int = 0, world: int = 1, limit: Optional[int] = None):
        n = min(len(dataset), limit) if limit else len(dataset)
        self.dataset, self.n = dataset, n
        self.batch_size, self.block = batch_size, shard_range(n, rank, world, batch_size)
        self.skipped: List[str] = []

    @property
    def num_images(self) -> int:
        return self.n

    def __len__(self) -> int:
        return -(-len(self.block) // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.skipped = []
        for start in range(self.block.start, self.block.stop, self.batch_size):
            images, labels = [], []
            for j in range(start, min(start + self.batch_size, self.block.stop)):
                try:
                    arr, label = self.dataset.read_record(j)  # uint8 [S,S,3], int
                except UnreadableImage:
                    self.skipped.append(self.dataset.describe(j))
                    continue
                images.append(np.ascontiguousarray(arr.transpose(2, 0, 1)))
                labels.append(int(label))
            if images:
                yield torch.from_numpy(np.stack(images)), torch.tensor(labels)


# ----------------------------------------------------------------------------- sampled images


def class_labels(n: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """Class ids [n] of the samples, the same as `repae sample` draws (`repae.generate.sample_labels`):
    balanced: sample i gets class i % num_classes, so every class gets n/num_classes samples
    (counts differ by at most one when n does not divide); uniform: independent uniform draws,
    as the reference sampling scripts do, label i a function of (seed, i)."""
    from repae.generate import sample_labels

    try:
        return sample_labels(n, num_classes, mode, seed)
    except ValueError as err:
        raise EvaluationError(f"eval.label_sampling: {err}") from None


class SampledImages:
    """uint8 [B,3,H,W] batches generated on the fly for this process's block of sample indices.

    The initial noise of sample i depends only on (seed, i) (`repae.generate`), and the blocks
    are whole batches of `batch_size`, so W processes generate exactly the samples one process
    generates."""

    def __init__(self, sit, vae, labels: torch.Tensor, settings: dict, batch_size: int = 64, rank: int = 0,
                 world: int = 1, autocast_dtype: Optional[torch.dtype] = None):
        self.sit, self.vae, self.labels, self.settings = sit, vae, labels, settings
        self.batch_size, self.autocast_dtype = batch_size, autocast_dtype
        self.block, self.skipped = shard_range(len(labels), rank, world, batch_size), []

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return -(-len(self.block) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        from repae.generate import generate_images

        s = self.settings
        for i in range(self.block.start, self.block.stop, self.batch_size):
            j = min(i + self.batch_size, self.block.stop)
            yield generate_images(
                self.sit, self.vae, self.labels[i:j], mode=s["mode"], num_steps=s["num_steps"], heun=s["heun"],
                heun_cfg_at=s["heun_cfg_at"],
                cfg_scale=s["cfg_scale"], guidance_low=s["guidance_low"], guidance_high=s["guidance_high"],
                path_type=s["path_type"], seed=s["seed"], batch_size=j - i, first_index=i,
                autocast_dtype=self.autocast_dtype, progress=False, refuse_nonfinite=True)


# ----------------------------------------------------------------------------- what a path is


def is_run_or_checkpoint_dir(path: PathLike) -> bool:
    """A training run directory (checkpoints/step-* or checkpoints/latest), its checkpoints/ directory
    or one of its checkpoint directories."""
    from repae.train.checkpoint import has_checkpoints

    p = Path(path)
    return p.is_dir() and ((p / "state.pt").is_file() or has_checkpoints(p)
                           or (p.name == "checkpoints" and has_checkpoints(p.parent)))


# What each directory repae writes is, and what to do with it: said when one is given where another
# thing is expected (a run where a VAE file goes, a latent cache where a SiT goes, ...), instead of the
# loader's guess ("diffusers VAE directory X has no config.json").
DIR_KINDS = {
    "run": ("a training run directory",
            "`repae sample --ckpt {p}` and `repae evaluate ... {p}` take the run itself; for its VAE alone run "
            "`repae export-vae {p}` first and pass the export ({p}/e2e-vae)"),
    "export-vae": ("an exported VAE (`repae export-vae` output)",
                   "pass it where a VAE goes: --vae {p} or vae.path={p}"),
    "latents": ("a latent cache (`repae cache-latents` output)",
                "train a SiT on it with `repae train-ldm latents.path={p}`"),
    "packed": ("a packed image store (`repae prepare-data` output)",
               "use it as data: --data {p}, or data.source=packed data.path={p}"),
    "diffusers": ("a diffusers VAE directory", "pass it where a VAE goes: --vae {p} or vae.path={p}"),
}
_SNIFF_BYTES = 4096  # our manifests write "format" first: the head of the file is enough to tell them apart
_FORMAT = re.compile(rb'"format"\s*:\s*"(repae-[a-z0-9-]+)"')


def _sniff_format(path: Path) -> Optional[str]:
    """The "format" a repae JSON record names near its start (a bounded read, nothing parsed), or None."""
    try:
        with open(path, "rb") as f:
            m = _FORMAT.search(f.read(_SNIFF_BYTES))
    except OSError:
        return None
    return m.group(1).decode() if m else None


def dir_kind(path: PathLike) -> Optional[str]:
    """Which DIR_KINDS entry a directory is (from the files repae writes into it), or None (not a
    directory, or none of them: an image folder, a foreign directory)."""
    p = Path(path)
    if not p.is_dir():
        return None
    if is_run_or_checkpoint_dir(p):
        return "run"
    if (p / "vae.safetensors").is_file():  # what stage2.latents.vae_files takes for an export
        return "export-vae"
    formats = {_sniff_format(p / name) for name in ("manifest.json", "settings.json")}
    if "repae-latents" in formats:
        return "latents"
    if "repae-packed" in formats:
        return "packed"
    if (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model.*")):
        return "diffusers"
    return None


# role -> (what the command wanted, the directory kinds it takes)
DIR_ROLES = {
    "vae": ("a VAE", ("export-vae", "diffusers")),
    "vae or run": ("a VAE", ("export-vae", "diffusers", "run")),
    "sit or run": ("a SiT checkpoint or training run", ("run",)),
    "weights": ("a weight file", ("export-vae", "diffusers")),
    "images": ("images to evaluate", ("run",)),
}


def check_dir_role(path: PathLike, role: str, missing: Optional[str] = None) -> None:
    """CheckpointError when `path` is a repae directory of a kind `role` (a DIR_ROLES key) does not take,
    saying what it is and what to run; nothing for a file, a hub id or an unknown directory (its
    loader reports those). `missing`, e.g. "VAE": a local path that does not exist is then a
    CheckpointError "VAE not found: PATH", said before anything is loaded."""
    from repae.hub import is_hub_id
    from repae.weights import CheckpointError

    if missing and not is_hub_id(path) and not Path(path).exists():
        raise CheckpointError(f"{missing} not found: {path}")
    kind = dir_kind(path)
    wanted, takes = DIR_ROLES[role]
    if kind is None or kind in takes:
        return
    what, hint = DIR_KINDS[kind]
    raise CheckpointError(f"{path} is {what}, not {wanted}: {hint.format(p=path)}")


def source_kind(path: PathLike, what: str = "sample source",
                expected: str = "a run directory / SiT checkpoint to sample from") -> str:
    """'checkpoint' (run / checkpoint dir, SiT weight file or hub id), 'npz' or 'folder'; EvaluationError otherwise.
    `what` / `expected`: how a missing path is reported (ref-stats reads images only)."""
    from repae.hub import is_hub_id

    if is_hub_id(path):  # resolved (and its errors raised) when the SiT is loaded
        return "checkpoint"
    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"{what} not found: {p} (give a folder of images, an .npz with "
                              f"'{REF_IMAGES_KEY}', or {expected})")
    if p.is_dir():
        check_dir_role(p, "images")
        return "checkpoint" if is_run_or_checkpoint_dir(p) else "folder"
    if p.suffix == ".npz":
        return "npz"
    if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        return "checkpoint"
    raise EvaluationError(f"{p}: not a folder, an .npz image batch, or a checkpoint (.safetensors/.pt)")
