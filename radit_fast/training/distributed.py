"""Process-group helpers for ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPU), DDP and FSDP.

Outside torchrun (no ``WORLD_SIZE`` in the environment) everything degrades to a single process and no
process group is created.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, *, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by torchrun's environment variables (if any).

    ``device``: "cpu" | "cuda" | None (cuda when available). On CUDA each process uses ``LOCAL_RANK``.
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
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        created = True
        # Kept for the life of the process (both stages may run in one torchrun worker: re-creating a group
        # on the same rendezvous is not reliable), destroyed at exit.
        import atexit

        atexit.register(_destroy)
        log.info("rank %d/%d joined the %s process group", rank, world, backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def cleanup(env: DistEnv) -> None:
    """End of a stage: wait for every process (the group itself lives until the process exits)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few Python floats over all processes (float64 on the CPU/GPU of the process group)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """``obj`` of rank 0 on every process (small, picklable control data only — never tensors of weights)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool, env: DistEnv) -> bool:
    """True on every process when ``flag`` is true on at least one (for agreeing on errors)."""
    return all_reduce_sum([1.0 if flag else 0.0], env)[0] > 0


def wrap_model(module: nn.Module, env: DistEnv, *, fsdp: bool = False,
               shard_modules: tuple[type, ...] = (), find_unused_parameters: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` on each ``shard_modules`` instance, then the root).

    Single process: the module itself. The wrapped module's ``forward`` must be what the training step
    calls, so that gradient synchronisation hooks run.
    """
    if not env.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        # The module may still be on the CPU (an LM too large for one device): fully_shard moves each
        # managed module's parameters to the mesh's device and keeps only this process's shard there.
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for sub in module.modules():
            if shard_modules and isinstance(sub, shard_modules):
                fully_shard(sub, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module.to(env.device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect

    ids = [env.device.index] if env.device.type == "cuda" else None
    # Buffers (rotary tables) are equal on every process: no per-forward broadcast.
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False})
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters, **sync)


def no_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce for micro-batches before the last one of a step (DDP and FSDP2)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: Any):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and hasattr(module, "no_sync") else module


def full_state_dict(module: nn.Module, names: list[str] | None, env: DistEnv, fsdp: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of the named parameters; collective under FSDP, local otherwise."""
    params = dict(unwrap(module).named_parameters())
    names = list(params) if names is None else names
    out = {}
    for n in names:
        p = params[n]
        if fsdp and env.distributed and hasattr(p, "full_tensor"):
            p = p.full_tensor()
        out[n] = p.detach().to("cpu").clone()
    return out


def load_params(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the named parameters (each rank keeps its own shard under FSDP)."""
    params = dict(unwrap(module).named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        from radit_fast.io import RaditError

        raise RaditError(f"checkpoint has parameters this model lacks: {missing[:3]} "
                         "(resume with the same --lm and --lora settings)")
    with torch.no_grad():
        for n, t in tensors.items():
            p = params[n]
            if hasattr(p, "to_local") and hasattr(p, "placements"):  # FSDP2 DTensor shard
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(t.to(device=p.device, dtype=p.dtype))


def main_then_broadcast(env: DistEnv, fn: Any) -> Any:
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
    box = [(None if error is None else (type(error).__name__, str(error)), result)]
    dist.broadcast_object_list(box, src=0)
    err, result = box[0]
    if error is not None:
        raise error
    if err is not None:
        from radit_fast.io import RaditError

        raise RaditError(err[1]) if err[0] in ("RaditError", "CheckpointError") else RuntimeError(
            f"rank 0 failed: {err[0]}: {err[1]}")
    return result
