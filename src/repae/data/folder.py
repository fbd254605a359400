"""Image folders (ImageNet layout: root/<class>/<image>) with the ADM centre crop.

Files are listed once and opened lazily in whichever worker process reads them. A file
that cannot be decoded (or is over the pixel limit, see repae.data.images) is replaced by the
next readable one and counted once however often it is met, never fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Set, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from repae.data.images import DEFAULT_MAX_PIXELS, adm_center_crop, decode_image
from repae.data.records import ImageRecords, UnreadableImagesError, bad_run
from repae.data.sampler import ResumableOrder
from repae.data.workers import ordered_batches
from repae.fileio import is_number


__all__ = ["IMAGE_SUFFIXES", "adm_center_crop", "list_image_folder", "ImageFolder", "DatasetBatches"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jpe"}


def _is_image_file(p: Path) -> bool:
    """An image by its suffix, and a regular file (or a link to one): reading a FIFO named x.jpg blocks forever."""
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def list_image_folder(root: str | Path) -> Tuple[List[Path], List[int], List[str]]:
    """(files, labels, class names): one class per sub-directory, sorted by name; files sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    if classes:
        for label, name in enumerate(classes):
            found = sorted(p for p in (root / name).rglob("*") if _is_image_file(p))
            files += found
            labels += [label] * len(found)
    else:  # a flat folder: one unlabelled class
        files = sorted(p for p in root.iterdir() if _is_image_file(p))
        labels = [0] * len(files)
        classes = [root.name]
    if not files:
        raise ValueError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, classes


class ImageFolder(ImageRecords):
    """Item i -> (uint8 [3,S,S], label, skipped) by the rule of repae.data.records: `skipped` holds the indices
    of the files passed over (unreadable or over `max_pixels`) to get it."""

    def __init__(self, root: str | Path, image_size: int = 256, hflip: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.files, self.labels, self.classes = list_image_folder(root)
        self.image_size, self.hflip, self.seed, self.max_pixels = image_size, hflip, seed, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, j: int) -> np.ndarray:
        return decode_image(self.files[j], self.max_pixels, self.image_size)

    def _label(self, j: int) -> int:
        return self.labels[j]

    def _describe(self, j: int) -> str:
        return self.files[j].relative_to(self.root).as_posix()

    def _too_many_bad(self, i: int, tried: int) -> Exception:
        return UnreadableImagesError(f"{bad_run(tried, len(self))} from {self.files[i]}: is this an image folder?")


def _collate(items):
    return (torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]),
            {j for _, _, skipped in items for j in skipped})


class DatasetBatches:
    """Batches from a Dataset through a DataLoader, resumable exactly: the order is drawn from a
    ResumableOrder and the state advances only for batches actually consumed."""

    def __init__(self, dataset: Dataset, seed: int = 0, num_workers: int = 0, rank: int = 0, world: int = 1,
                 pin_memory: bool = False):
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.order = ResumableOrder(len(dataset), seed)
        self.rank, self.world = rank, world  # each rank loads only its slice of every global batch
        self.skipped: Set[int] = set()  # dataset indices of the unreadable files met so far (this rank)
        self._it, self._batch = None, None

    def _loader(self, batch_size: int):
        return ordered_batches(self.dataset, self.order, batch_size, self.rank, self.world, self.num_workers,
                               _collate, pin_memory=self.pin_memory)

    def next(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._it is None or batch_size != self._batch:
            self._it, self._batch = self._loader(batch_size), batch_size
        images, labels, skipped = next(self._it)
        self.order.take(batch_size)
        self.skipped |= skipped
        return images, labels

    @property
    def bad_images(self) -> int:
        """Distinct unreadable files met by this rank (a file skipped in every epoch counts once)."""
        return len(self.skipped)

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "bad_images": self.bad_images, "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.order.check_state(state)
        skipped = state.get("skipped", [])
        if not isinstance(skipped, list) or not all(is_number(j, int) and 0 <= j < self.order.n for j in skipped):
            raise ValueError(f"the data's unreadable-image list is not a list of indices below {self.order.n}")
        self.order.load_state_dict(state)
        self.skipped = set(skipped)
        self._it = None
