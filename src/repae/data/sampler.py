"""Where the next batch comes from, resumable exactly: epoch-wise permutations seeded by
(seed, epoch), and a position inside the epoch. Saving (epoch, position) in a checkpoint
and loading it back continues with the very same images."""

from __future__ import annotations

from typing import Tuple

import torch

from repae.config import MAX_SEED
from repae.fileio import is_number

# An epoch count beyond this is no real run (10**12 epochs of one image at a microsecond each is 11 days of
# nothing but bookkeeping): the bound that keeps a hand-edited checkpoint from asking for astronomic arithmetic.
MAX_EPOCH = 10**12


class ResumableOrder:
    """Indices of range(n) in a fresh random order every epoch; `take(k)` crosses epochs."""

    def __init__(self, n: int, seed: int = 0):
        if n <= 0:
            raise ValueError("the dataset is empty: nothing to train on")
        self.n, self.seed = n, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            chunk = self._perm[self.position : self.position + k]
            out.append(chunk)
            k -= len(chunk)
            self.position += len(chunk)
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """ValueError, with nothing changed, unless `state` is a position this order can stand at."""
        self.check_state(state)
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)

    def check_state(self, state: object) -> None:
        """ValueError naming the field unless `state` is (epoch, position, n, seed) of an order over this dataset:
        a position outside [0, n) would make `take` loop forever on empty chunks."""
        if not isinstance(state, dict):
            raise ValueError(f"the data position is a {type(state).__name__}, not a mapping")
        missing = [key for key in ("epoch", "position", "n", "seed") if key not in state]
        if missing:
            raise ValueError(f"the data position lacks {', '.join(missing)}")
        for key, high in (("n", None), ("seed", MAX_SEED), ("epoch", MAX_EPOCH), ("position", self.n - 1)):
            value = state[key]
            if not is_number(value, int):
                raise ValueError(f"the data {key} is {value!r}, not a whole number")
            if key == "n" and value != self.n:
                raise ValueError(f"the checkpoint was taken on {value} images, this dataset has {self.n}")
            if high is not None and not 0 <= value <= high:
                raise ValueError(f"the data {key} is {value}, outside [0, {high}]")


def rank_slice(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch (its indices, or anything drawn for it along
    dim 0): equal parts; the config checks that the global batch divides by the world size."""
    if len(indices) % world:
        raise ValueError(f"a batch of {len(indices)} does not split over {world} processes")
    per = len(indices) // world
    return indices[rank * per:(rank + 1) * per]


class TensorBatches:
    """Batches from an in-memory uint8 image tensor [N,3,H,W] and labels [N].

    Every rank walks the same global order; `next(global_batch)` returns this rank's slice, so
    W processes see exactly the images one process would see, and the position resumes alike."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, rank: int = 0, world: int = 1):
        self.images, self.labels = images, labels
        self.order = ResumableOrder(len(images), seed)
        self.rank, self.world = rank, world

    def next(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = rank_slice(self.order.take(batch_size), self.rank, self.world)
        return self.images[idx], self.labels[idx]

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
