"""The data plan: which training items form the global batch of each optimizer step, and which part of
it each process runs in each micro-batch.

Everything is a pure function of (number of items, seed, step), so the step number is the whole
data-order state of a checkpoint, and 1 process and N processes see the same global batches.

Length bucketing: each epoch is a seeded permutation cut into windows of ``bucket_window`` global batches;
a window is sorted by length and cut into batches, and the batches of the epoch are shuffled. Inside a
global batch, items are sorted by length and cut into contiguous micro-batches, so each micro-batch holds
items of similar length (little padding, balanced processes).
"""
from __future__ import annotations

import functools

import numpy as np

from radit_fast.io import RaditError


def check_items(n: int, batch_size: int, what: str = "training instances") -> None:
    """RaditError when a global batch of ``batch_size`` cannot be drawn from ``n`` items (checked as soon as
    the items are known, before any model runs)."""
    if n < batch_size:
        raise RaditError(f"--batch-size {batch_size} is larger than the {n} {what}; "
                         "lower --batch-size or add data")


class DataPlan:
    """Global batches of ``batch_size`` items out of ``n`` (the last partial batch of an epoch is dropped).

    ``lengths`` (optional): per-item cost used for bucketing and for ordering micro-batches.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, lengths: list[int] | np.ndarray | None = None,
                 bucket_window: int = 0, what: str = "training instances") -> None:
        check_items(n, batch_size, what)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.bucket_window = bucket_window if self.lengths is not None else 0
        self.batches_per_epoch = n // batch_size

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        perm = rng.permutation(self.n)
        usable = perm[: self.batches_per_epoch * self.batch_size]
        if self.bucket_window > 0:
            window = self.batch_size * self.bucket_window
            parts = []
            for s in range(0, len(usable), window):
                w = usable[s:s + window]
                parts.append(w[np.argsort(-self.lengths[w], kind="stable")])
            usable = np.concatenate(parts)
        batches = usable.reshape(self.batches_per_epoch, self.batch_size)
        if self.bucket_window > 0:
            batches = batches[rng.permutation(self.batches_per_epoch)]
        return batches

    def global_batch(self, step: int) -> np.ndarray:
        """Item indices of the global batch of optimizer step ``step`` (0-based)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        return self._epoch(epoch)[i]

    def micro_batches(self, step: int, *, rank: int, world_size: int, grad_accum: int) -> list[np.ndarray]:
        """The ``grad_accum`` micro-batches of process ``rank`` for ``step`` (sorted by length, longest first)."""
        batch = self.global_batch(step)
        parts = world_size * grad_accum
        if len(batch) % parts:
            raise RaditError(f"--batch-size {self.batch_size} must be a multiple of processes x --grad-accum "
                             f"= {parts}")
        if self.lengths is not None:
            batch = batch[np.argsort(-self.lengths[batch], kind="stable")]
        size = len(batch) // parts
        # micro-batch j of every process is taken from the same length band: rank r, micro j -> part j*W+r
        return [batch[(j * world_size + rank) * size:(j * world_size + rank + 1) * size] for j in range(grad_accum)]
