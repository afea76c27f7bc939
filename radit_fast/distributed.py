"""The process group of ``torchrun --nproc_per_node N``: one environment, one init, the collectives.

:func:`init_distributed` reads torchrun's environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)
and returns a :class:`DistEnv`. Without torchrun (``WORLD_SIZE`` unset or 1) everything runs in-process: no
process group is created and every collective returns at once. An existing process group is reused with its
own timeout. Indexing (``radit index build``), both training stages and the LSR cache use it:

* Training joins with the device's backend (NCCL on CUDA, where each process uses ``cuda:LOCAL_RANK``; gloo on
  the CPU) and :data:`DEFAULT_TIMEOUT_S`. The group is kept for the life of the process and destroyed at
  exit: both stages may run in one torchrun worker, and re-creating a group on the same rendezvous is not
  reliable. A stage ends with :meth:`DistEnv.barrier`. The DDP/FSDP wrapping of the model lives in
  :mod:`radit_fast.training.parallel`.
* Index builds coordinate over gloo (``init_distributed("cpu")``) and encode on ``cuda:LOCAL_RANK`` or the
  CPU. Every rank encodes a contiguous slice of the passage rows (:func:`shard_range`) and writes a float16
  shard; rank 0 assembles the index after the shards are done. :func:`run_step` is the only synchronisation
  there: a build is a sequence of steps, and :meth:`DistEnv.close` (a barrier, then the group is destroyed)
  ends it. Ranks 1..N-1 wait inside a gloo collective while rank 0 alone writes the passage store and, after
  the encoding, assembles the shards, trains and fills the FAISS index and checksums the files: hours at 400M
  passages. So the gloo timeout (``radit index build --dist-timeout``) defaults to
  :data:`INDEX_BUILD_TIMEOUT_S`, 24 hours; failures are not detected by it (:func:`run_step` reports them at
  once, and a dead peer closes its connections), only hangs.

No rank waits forever on a failed peer: :func:`run_step` (every rank runs its part of a step, then all ranks
exchange their outcome, so a failure on any rank makes every rank raise at the same step) and
:func:`main_then_broadcast` (rank 0 runs a step alone, every rank gets its result or its error).
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from radit_fast.io import RaditError

log = logging.getLogger(__name__)

#: timeout of each collective of a training stage (torch's own default).
DEFAULT_TIMEOUT_S = 1800.0
#: gloo timeout of an index build: longer than anything rank 0 does alone while the other ranks wait.
INDEX_BUILD_TIMEOUT_S = 24 * 3600.0


@dataclass
class DistEnv:
    """Rank, world size, local rank and device of this process; ``owns_group``: :func:`init_distributed`
    created the process group (and :meth:`close` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0 on every rank (small, picklable control data only — never tensors of weights)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few Python floats over all ranks (float64 on the CPU/GPU of the process group)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (for agreeing on errors)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def close(self) -> None:
        """Destroy the process group this env created, after a barrier (gloo aborts a process whose peer tears
        down a connection it still uses). Every rank must get here; a group not owned is left alone."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    def __enter__(self) -> DistEnv:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # SIGTERM (SystemExit) or Ctrl-C: the ranks are not aligned by run_step, so a barrier could wait
            # for the whole timeout; the process is exiting and its connections close with it
            return
        self.close()


def init_distributed(device: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group described by torchrun's environment variables (if any), ``timeout_s`` per
    collective.

    ``device``: "cpu" (gloo) | "cuda" (NCCL; each process uses ``cuda:LOCAL_RANK``) | None (cuda when
    available).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device == "cuda") or (device is None and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    created = False
    if world > 1 and not dist.is_initialized():
        if not timeout_s > 0:
            raise RaditError(f"the process-group timeout must be positive, got {timeout_s} s")
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        created = True
        atexit.register(_destroy)
        log.info("rank %d/%d joined the %s process group (%s timeout %.0f s)", rank, world, backend, backend,
                 timeout_s)
    elif world > 1:
        log.debug("rank %d/%d: using the existing process group and its timeout", rank, world)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=created)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` when n rows are split in contiguous near-equal slices.

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class PeerFailure(RaditError):
    """Another rank failed; that rank (or rank 0) reports the cause, so the CLI stays quiet on this one."""

    quiet_on_nonzero_rank = True


def run_step(env: DistEnv, name: str, fn: Callable[[], Any]) -> list[Any]:
    """Run ``fn`` on this rank, then agree with the other ranks; returns every rank's result.

    Raises this rank's own exception if it failed, else :class:`PeerFailure` if another rank failed.
    """
    result, error, exc = None, None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below after telling the other ranks
        exc = e
        error = str(e) if isinstance(e, RaditError) else f"{type(e).__name__}: {e}"
    outcomes = env.all_gather((error, result))
    if exc is not None:
        raise exc
    for rank, (err, _) in enumerate(outcomes):
        if err is not None:
            raise PeerFailure(f"{name} failed on rank {rank}: {err}")
    return [res for _, res in outcomes]


def main_then_broadcast(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on rank 0 only and give its result to every process; if it raises, every process
    raises (a RaditError keeps its message), so no process waits forever for a failed peer."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            if not env.distributed:
                raise
            error = e
    if not env.distributed:
        return result
    err, result = env.broadcast((None if error is None else (type(error).__name__, str(error)), result))
    if error is not None:
        raise error
    if err is not None:
        raise RaditError(err[1]) if err[0] in ("RaditError", "CheckpointError") else RuntimeError(
            f"rank 0 failed: {err[0]}: {err[1]}")
    return result
