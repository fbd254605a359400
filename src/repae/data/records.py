"""The item rule every image Dataset of repae shares (folders, packed shards, parquet/arrow tables, tar shards).

Item i -> (uint8 [3,S,S], label, skipped): the image of record i ADM-centre-cropped to S, or, if record i
cannot be used (undecodable, over data.max_image_pixels, missing), the next usable record after it;
`skipped` is the tuple of record indices passed over to get it (indices, not a count, so a record met
again in a later epoch is not counted again). With `hflip` the flip is a function of (seed, i), so a
resumed run sees the very same pixels. 100 unusable records in a row is not bad luck: an error.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from repae.data.images import UnreadableImage

MAX_BAD_IN_A_ROW = 100


class UnreadableImagesError(RuntimeError):
    """A data source whose records do not decode as images (so many in a row that it is not bad luck)."""


class ImageRecords(Dataset):
    """Base class: subclasses set `hflip`, `seed` and implement `__len__`, `_load(j)` (uint8 [S,S,3], raising
    UnreadableImage for a record to skip), `_label(j)` and `_describe(j)` (a record's name for messages)."""

    hflip: bool = False
    seed: int = 0

    def _load(self, j: int) -> np.ndarray:
        raise NotImplementedError

    def _label(self, j: int) -> int:
        raise NotImplementedError

    def _describe(self, j: int) -> str:
        return f"record {j}"

    def read_record(self, j: int) -> Tuple[np.ndarray, int]:
        """Record j as stored: (uint8 [S,S,3] centre-cropped, label), never flipped or replaced. Raises
        UnreadableImage when it cannot be used: evaluation skips such a record, training takes the next."""
        return self._load(j), self._label(j)

    def describe(self, j: int) -> str:
        """Record j's name, for messages and skip lists."""
        return self._describe(j)

    def _too_many_bad(self, i: int, tried: int) -> Exception:
        return UnreadableImagesError(f"{bad_run(tried, len(self))} from {self._describe(i)}: is this an image dataset?")

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, Tuple[int, ...]]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        for bad in range(min(n, MAX_BAD_IN_A_ROW)):
            j = (i + bad) % n
            try:
                arr = self._load(j)
            except UnreadableImage:  # corrupt, truncated, unsupported, missing or over the pixel limit
                continue
            # the flip is a function of the requested index, so a resumed run sees the same pixels
            if self.hflip and random.Random(self.seed * 1_000_003 + i).random() < 0.5:
                arr = arr[:, ::-1]
            # a contiguous, writable [3,S,S] copy: collating permuted views into a batch is ~100x slower
            chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
            return torch.from_numpy(chw), self._label(j), tuple((i + k) % n for k in range(bad))
        raise self._too_many_bad(i, min(n, MAX_BAD_IN_A_ROW))


def bad_run(tried: int, n: int, unreadable: str = "unreadable") -> str:
    """How many images in a row could not be used, said truly for a dataset smaller than the run's limit."""
    return f"all {n} images are {unreadable}, starting" if tried >= n else f"{tried} {unreadable} images in a row"


class PerProcess:
    """Things opened by key (file handles, memory maps, decoded row groups), at most `limit` at a time, kept
    by the process that opened them: a forked DataLoader worker or an unpickled copy starts empty (never
    sharing a file offset or a mapping with its parent); the least recently used is closed first."""

    def __init__(self, close: Optional[Callable[[Any], None]] = None):
        self._items: "OrderedDict[Any, Any]" = OrderedDict()
        self._pid, self._close = os.getpid(), close

    def __getstate__(self) -> dict:
        return {"_items": OrderedDict(), "_pid": None, "_close": self._close}

    def get(self, key: Any, opener: Callable[[Any], Any], limit: int) -> Any:
        if self._pid != os.getpid():
            self._items, self._pid = OrderedDict(), os.getpid()
        item = self._items.get(key)
        if item is None:
            if len(self._items) >= limit:
                old = self._items.popitem(last=False)[1]
                if self._close is not None:
                    self._close(old)
            item = self._items[key] = opener(key)
        self._items.move_to_end(key)
        return item
