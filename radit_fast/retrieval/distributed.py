"""Multi-process index builds under ``torchrun`` (gloo for coordination, CPU or GPU for encoding).

Every rank encodes a contiguous slice of the passage rows (:func:`shard_range`) and writes a float16
shard; rank 0 assembles the index after the shards are done. :func:`run_step` is the only
synchronisation primitive: each rank runs its part of a step, then all ranks exchange their outcome, so a
failure on any rank makes every rank raise at the same step (no rank waits forever on a dead peer).
Without torchrun (``WORLD_SIZE`` unset or 1) everything runs in-process with no communication.

Ranks 1..N-1 wait inside a gloo collective while rank 0 alone writes the passage store and, after the
encoding, assembles the shards, trains and fills the FAISS index and checksums the files: hours at 400M
passages. So the gloo timeout (``radit index build --dist-timeout``) defaults to 24 hours; failures are not
detected by it (:func:`run_step` reports them at once, and a dead peer closes its connections), only hangs.
"""
from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from radit_fast.io import RaditError

logger = logging.getLogger(__name__)

#: gloo timeout of an index build: longer than anything rank 0 does alone while the other ranks wait.
DEFAULT_TIMEOUT_S = 24 * 3600.0


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` when n rows are split in contiguous near-equal slices.

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class DistContext:
    """Rank/world of this process; initialises a gloo process group under torchrun when needed."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self._owns_group = owns_group

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
        """Join the torchrun job (gloo, ``timeout_s`` per collective) or run alone; an existing group is reused
        with its own timeout."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not timeout_s > 0:
            raise RaditError(f"--dist-timeout must be positive, got {timeout_s} s")
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
            owns = True
        ctx = cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)
        logger.debug("distributed build: rank %d of %d, gloo timeout %s", ctx.rank, ctx.world_size,
                     f"{timeout_s:.0f} s" if owns else "of the existing process group")
        return ctx

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            # every exit path is aligned by run_step, so all ranks get here; a barrier first keeps gloo
            # from tearing down a connection its peer still uses (which aborts the process)
            dist.barrier()
            dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # SIGTERM (SystemExit) or Ctrl-C: the ranks are not aligned by run_step, so a barrier could wait
            # for the whole timeout; the process is exiting and its connections close with it
            return
        self.close()


class PeerFailure(RaditError):
    """Another rank failed; that rank (or rank 0) reports the cause, so the CLI stays quiet on this one."""

    quiet_on_nonzero_rank = True


def run_step(ctx: DistContext, name: str, fn: Callable[[], Any]) -> list[Any]:
    """Run ``fn`` on this rank, then agree with the other ranks; returns every rank's result.

    Raises this rank's own exception if it failed, else RaditError if another rank failed.
    """
    result, error, exc = None, None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below after telling the other ranks
        exc = e
        error = str(e) if isinstance(e, RaditError) else f"{type(e).__name__}: {e}"
    outcomes = ctx.all_gather((error, result))
    if exc is not None:
        raise exc
    for rank, (err, _) in enumerate(outcomes):
        if err is not None:
            raise PeerFailure(f"{name} failed on rank {rank}: {err}")
    return [res for _, res in outcomes]
