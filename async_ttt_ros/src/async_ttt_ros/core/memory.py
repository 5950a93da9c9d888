"""LatentMemory: the adapter's bounded store of recent latents.

Why latents: the stem is frozen, so a latent computed by any model version stays valid for the
adapter forever; only the head is re-run. Why a memory at all: frames arrive one at a time (or in
small batches) at sensor rate while the adapter steps on its own clock; it trains on batches
sampled from the memory, which decouples its batch size from the sensor's.

Two parts, both bounded and preallocated:
- training slots: what `sample(n)` draws from;
- a held-out slice: samples never used for training the candidate, used by the reputation gate
  to compare candidate and served model on data neither was fitted to.
Each incoming latent goes to the held-out slice with probability `holdout_fraction` (seeded RNG).

`class_balanced=True` keeps the memory balanced over pseudo-labels (RoTTA's category-balanced
sampling idea): when full, a new sample evicts the oldest sample of the currently largest class,
or the oldest of its own class when that class is already the largest. This keeps a
class-correlated stream (long runs of one class) from filling the memory with one class, which
is what makes entropy minimisation collapse.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class _Slots:
    """Fixed-capacity storage with per-slot label and insertion stamp."""

    def __init__(self, capacity: int, class_balanced: bool):
        self.capacity = int(capacity)
        self.class_balanced = class_balanced
        self.data: Tensor | None = None
        self.labels = np.full(self.capacity, -1, np.int64)
        self.stamp = np.full(self.capacity, -1, np.int64)     # -1 = empty slot
        self.count = 0
        self._next = 0          # ring pointer (non-balanced mode)
        self._clock = 0

    def __len__(self) -> int:
        return self.count

    def _slot_for(self, label: int) -> int:
        if self.count < self.capacity:
            if not self.class_balanced:
                return self._next
            return int(np.flatnonzero(self.stamp < 0)[0])
        if not self.class_balanced:
            return self._next
        used = self.labels[self.stamp >= 0]
        classes, counts = np.unique(used, return_counts=True)
        largest = counts.max()
        own = counts[classes == label]
        own = int(own[0]) if own.size else 0
        if own >= largest:
            victim_class = label
        else:
            # among the largest classes, evict from the one holding the oldest sample
            big = classes[counts == largest]
            mask = np.isin(self.labels, big) & (self.stamp >= 0)
            victim_class = int(self.labels[np.flatnonzero(mask)[np.argmin(self.stamp[mask])]])
        mask = (self.labels == victim_class) & (self.stamp >= 0)
        idx = np.flatnonzero(mask)
        return int(idx[np.argmin(self.stamp[idx])])

    def add(self, z: Tensor, label: int) -> None:
        if self.capacity == 0:
            return
        if self.data is None:
            self.data = torch.zeros((self.capacity, *z.shape), dtype=torch.float32)
        slot = self._slot_for(label)
        if self.stamp[slot] < 0:
            self.count += 1
        self.data[slot].copy_(z)
        self.labels[slot] = label
        self.stamp[slot] = self._clock
        self._clock += 1
        if not self.class_balanced:
            self._next = (self._next + 1) % self.capacity

    def used(self) -> np.ndarray:
        idx = np.flatnonzero(self.stamp >= 0)
        return idx[np.argsort(self.stamp[idx])]            # oldest first

    def clear(self) -> None:
        self.labels[:] = -1
        self.stamp[:] = -1
        self.count = 0
        self._next = 0


class LatentMemory:
    """Bounded latent store with a held-out slice and seeded sampling.

    capacity: total number of latents kept (training slots + held-out slice).
    holdout_fraction: share of the capacity (and of incoming samples) reserved for the gate.
    class_balanced: balance the training slots over pseudo-labels (needs pseudo_labels in add()).
    """

    def __init__(self, capacity: int, class_balanced: bool = False, holdout_fraction: float = 0.2,
                 seed: int = 0):
        if capacity < 2:
            raise ValueError(f'LatentMemory capacity must be >= 2, got {capacity}')
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f'holdout_fraction must be in [0, 1), got {holdout_fraction}')
        self.capacity = int(capacity)
        self.class_balanced = bool(class_balanced)
        self.holdout_fraction = float(holdout_fraction)
        hold_cap = int(round(self.capacity * self.holdout_fraction))
        if holdout_fraction > 0 and hold_cap == 0:
            hold_cap = 1
        self._train = _Slots(self.capacity - hold_cap, self.class_balanced)
        self._hold = _Slots(hold_cap, False)
        self._rng = np.random.default_rng(seed)
        self.latent_shape: tuple[int, ...] | None = None
        self.added = 0

    def __len__(self) -> int:
        """Number of training samples available to `sample`."""
        return len(self._train)

    @property
    def holdout_size(self) -> int:
        return len(self._hold)

    def add(self, latents: Tensor, pseudo_labels: Tensor | None = None) -> None:
        """Store a batch [N, *shape] (the shape is fixed by the first call)."""
        z = torch.as_tensor(latents).detach().to(torch.float32)
        if self.latent_shape is None:
            if z.dim() < 2:
                raise ValueError(f'latents must be [N, *shape], got shape {tuple(z.shape)}')
            self.latent_shape = tuple(z.shape[1:])
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f'latent shape {tuple(z.shape[1:])} does not match memory shape {self.latent_shape}')
        n = z.shape[0]
        if pseudo_labels is None:
            if self.class_balanced:
                raise ValueError('class-balanced memory needs pseudo_labels')
            labels = np.zeros(n, np.int64)
        else:
            labels = np.asarray(torch.as_tensor(pseudo_labels).cpu().numpy(), np.int64).reshape(-1)
            if labels.size != n:
                raise ValueError(f'{labels.size} pseudo labels for {n} latents')
        to_hold = self._rng.random(n) < self.holdout_fraction if self._hold.capacity else np.zeros(n, bool)
        for i in range(n):
            (self._hold if to_hold[i] else self._train).add(z[i], int(labels[i]))
        self.added += n

    def sample(self, n: int) -> Tensor:
        """min(n, len) training latents drawn uniformly without replacement (seeded)."""
        if len(self._train) == 0:
            raise ValueError('LatentMemory.sample: memory is empty')
        used = self._train.used()
        k = min(int(n), used.size)
        pick = self._rng.choice(used, size=k, replace=False)
        return self._train.data[torch.from_numpy(np.sort(pick))].clone()

    def recent(self, n: int) -> Tensor:
        """The newest min(n, len) training latents (oldest first)."""
        used = self._train.used()[-int(n):]
        return self._train.data[torch.from_numpy(used)].clone()

    def holdout(self) -> Tensor:
        """All held-out latents (oldest first); empty [0, *shape] before anything arrived."""
        used = self._hold.used()
        if self._hold.data is None or used.size == 0:
            return torch.zeros((0, *(self.latent_shape or ())), dtype=torch.float32)
        return self._hold.data[torch.from_numpy(used)].clone()

    def label_counts(self) -> dict[int, int]:
        """Pseudo-label histogram of the training slots (what class balancing acts on)."""
        labels = self._train.labels[self._train.stamp >= 0]
        classes, counts = np.unique(labels, return_counts=True)
        return {int(c): int(k) for c, k in zip(classes, counts)}

    def clear(self) -> None:
        self._train.clear()
        self._hold.clear()
