"""The identity-balanced buffer: stratified batches drawn from a stream instead of an index.

The stream fills per-identity reservoirs; batches are drawn from what the buffer holds:

- `pk`: P identities uniformly among those holding K samples (or all the samples this worker
  will ever see of an identity that has fewer, topped up with repeats as the exact sampler does),
  K distinct samples each; the identity then leaves the buffer, so within one pass over the
  stream an identity is drawn at most once, as in an exact P x K epoch.
- `balance`: each of the B draws picks an identity uniformly among those held, then one of its
  samples uniformly, with replacement (the original's class-balanced sampling, within a window).

Memory is bounded: at most `capacity` samples in all (the identity that arrived least recently
leaves first), and at most `per_identity` per identity (reservoir sampling keeps a uniform
subset of a large identity). Only sample indices live here; the caller keeps their bytes.
Every choice comes from the generator it is given, so a buffer fed the same stream with the
same seed draws the same batches.
"""

from __future__ import annotations

import numpy as np

from ognet.data.sampler import _interleave_cameras


class _IndexedSet:
    """A set with O(1) add, remove and uniform choice (a list plus positions)."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.where: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, x: int) -> bool:
        return x in self.where

    def add(self, x: int) -> None:
        if x not in self.where:
            self.where[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: int) -> None:
        i = self.where.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i], self.where[last] = last, i


class IdentityBuffer:
    """Per-identity reservoirs of sample indices; see the module docstring."""

    def __init__(
        self,
        labels: np.ndarray,
        capacity: int,
        per_identity: int,
        rng: np.random.Generator,
        expected: dict[int, int] | None = None,
        camids: np.ndarray | None = None,
    ):
        """`labels[i]` (and `camids[i]`) of every sample index; `expected[label]`: how many samples
        of it this stream holds in one pass (an identity with fewer than K is complete then)."""
        self.labels, self.camids, self.rng = labels, camids, rng
        self.capacity, self.per_identity = capacity, per_identity
        self.expected = expected or {}
        self.held: dict[int, list[int]] = {}  # label -> sample indices, least recently fed first
        self.seen: dict[int, int] = {}  # label -> samples fed since it entered (reservoir sampling)
        self.present, self.eligible = _IndexedSet(), _IndexedSet()
        self.size = 0
        self.k = 0  # the K of pk draws, for eligibility (0: balance mode)
        if not 1 <= per_identity <= capacity:
            raise ValueError(f"per_identity {per_identity} must be in 1..capacity ({capacity})")

    def __len__(self) -> int:
        return self.size

    def set_k(self, k: int) -> None:
        self.k = k

    def feed(self, index: int) -> list[int]:
        """Add one sample from the stream; returns the sample indices that left the buffer."""
        label = int(self.labels[index])
        left: list[int] = []
        members = self.held.pop(label, None)
        if members is None:
            members, self.seen[label] = [], 0
            self.present.add(label)
        self.held[label] = members  # re-inserted last: the most recently fed identity
        self.seen[label] += 1
        if index in members:
            pass  # the stream came round to it again while it is still held
        elif len(members) < self.per_identity:
            members.append(index)
            self.size += 1
        else:
            slot = int(self.rng.integers(self.seen[label]))  # Algorithm R: each fed sample kept with p = R / seen
            if slot < self.per_identity:
                left.append(members[slot])
                members[slot] = index
            else:
                left.append(index)
        self._update(label)
        while self.size > self.capacity:
            left.extend(self._remove(next(iter(self.held))))
        return left

    def draw_pk(self, p: int, k: int) -> tuple[np.ndarray, list[int]] | None:
        """P x K sample indices (identity after identity), or None while fewer than P identities
        are eligible; also returns every index that left the buffer with the drawn identities."""
        if len(self.eligible) < p:
            return None
        chosen = [self.eligible.items[i] for i in self.rng.choice(len(self.eligible), p, replace=False)]
        batch, left = [], []
        for label in chosen:
            members = np.array(self.held[label])
            members = self.rng.permutation(members)
            if self.camids is not None:
                members = _interleave_cameras(self.rng, members, self.camids[members])
            picked = (
                members[:k]
                if len(members) >= k
                else np.concatenate([members, self.rng.choice(members, k - len(members))])
            )
            batch.append(picked)
            left.extend(self._remove(label))
        return np.concatenate(batch), left

    def draw_balance(self, b: int) -> np.ndarray | None:
        """B sample indices, identities uniform among those held, with replacement; None when empty."""
        if not len(self.present):
            return None
        labels = [self.present.items[i] for i in self.rng.integers(len(self.present), size=b)]
        return np.array([self.held[label][int(self.rng.integers(len(self.held[label])))] for label in labels])

    def ready_pk(self, p: int) -> bool:
        return len(self.eligible) >= p

    def _need(self, label: int) -> int:
        return min(self.k, self.expected.get(label, self.k))

    def _update(self, label: int) -> None:
        if self.k and len(self.held[label]) >= self._need(label):
            self.eligible.add(label)

    def _remove(self, label: int) -> list[int]:
        members = self.held.pop(label)
        self.seen.pop(label)
        self.present.discard(label)
        self.eligible.discard(label)
        self.size -= len(members)
        return members
