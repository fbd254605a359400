"""Where the next batch comes from, resumable exactly: epoch-wise permutations seeded by
(seed, epoch), and a position inside the epoch. Saving (epoch, position) in a checkpoint
and loading it back continues with the very same images."""

from __future__ import annotations

from typing import Tuple

import torch


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
        if state["n"] != self.n:
            raise ValueError(f"the checkpoint was taken on {state['n']} images, this dataset has {self.n}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)


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
