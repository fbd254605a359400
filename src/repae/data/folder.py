"""Image folders (ImageNet layout: root/<class>/<image>) with the ADM centre crop.

Files are listed once and opened lazily in whichever worker process reads them. A file
that cannot be decoded is replaced by the next readable one and counted, never fatal.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from repae.data.sampler import ResumableOrder, rank_slice
from repae.interrupt import ignore_stop_signals


class UnreadableImagesError(RuntimeError):
    """A data folder whose files do not decode as images (so many in a row that it is not bad luck)."""


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jpe"}


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM (guided-diffusion) centre crop: halve with BOX while >= 2x the size, BICUBIC-resize the
    short side to `size`, crop the centre. Returns uint8 [size,size,3]."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def list_image_folder(root: str | Path) -> Tuple[List[Path], List[int], List[str]]:
    """(files, labels, class names): one class per sub-directory, sorted by name; files sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    if classes:
        for label, name in enumerate(classes):
            found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
    else:  # a flat folder: one unlabelled class
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = [0] * len(files)
        classes = [root.name]
    if not files:
        raise ValueError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, classes


class ImageFolder(Dataset):
    """Item i -> (uint8 [3,S,S], label, bad) where `bad` counts unreadable files skipped to get it."""

    def __init__(self, root: str | Path, image_size: int = 256, hflip: bool = False, seed: int = 0):
        self.files, self.labels, self.classes = list_image_folder(root)
        self.image_size, self.hflip, self.seed = image_size, hflip, seed

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> np.ndarray:
        with Image.open(self.files[i]) as img:
            return adm_center_crop(img, self.image_size)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, int]:
        for bad in range(min(len(self.files), 100)):
            j = (i + bad) % len(self.files)
            try:
                arr = self._load(j)
            except (OSError, ValueError, SyntaxError):  # PIL raises these for truncated/corrupt files
                continue
            # the flip is a function of the index, so a resumed run sees the same pixels
            if self.hflip and random.Random(self.seed * 1_000_003 + i).random() < 0.5:
                arr = arr[:, ::-1]
            # a contiguous CHW copy: stacking permuted views into a batch is ~100x slower
            return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous(), self.labels[j], bad
        raise UnreadableImagesError(f"100 unreadable images in a row from {self.files[i]}: is this an image folder?")


def _collate(items):
    return (torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]),
            sum(b for _, _, b in items))


class DatasetBatches:
    """Batches from a Dataset through a DataLoader, resumable exactly: the order is drawn from a
    ResumableOrder and the state advances only for batches actually consumed."""

    def __init__(self, dataset: Dataset, seed: int = 0, num_workers: int = 0, rank: int = 0, world: int = 1):
        self.dataset, self.num_workers = dataset, num_workers
        self.order = ResumableOrder(len(dataset), seed)
        self.rank, self.world = rank, world  # each rank loads only its slice of every global batch
        self.bad_images = 0
        self._it, self._batch = None, None

    def _loader(self, batch_size: int):
        ahead = ResumableOrder(self.order.n, self.order.seed)
        ahead.load_state_dict(self.order.state_dict())
        rank, world = self.rank, self.world  # locals: a generator holding `self` keeps workers alive 10 s at exit
        batches = (rank_slice(ahead.take(batch_size), rank, world).tolist() for _ in itertools.count())
        return iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                               collate_fn=_collate, persistent_workers=self.num_workers > 0,
                               worker_init_fn=ignore_stop_signals))

    def next(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._it is None or batch_size != self._batch:
            self._it, self._batch = self._loader(batch_size), batch_size
        images, labels, bad = next(self._it)
        self.order.take(batch_size)
        self.bad_images += bad
        return images, labels

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "bad_images": self.bad_images}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.bad_images = state.get("bad_images", 0)
        self._it = None
