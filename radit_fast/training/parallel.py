"""DDP or FSDP2 wrapping of a model on the process group of :mod:`radit_fast.distributed` (training only).

Single process: the module itself. Under FSDP the model may still be on the CPU when it is wrapped (an LM
too large for one device); its parameters are then DTensor shards, gathered by :func:`full_state_dict` and
loaded shard by shard by :func:`load_params`.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from radit_fast.distributed import DistEnv
from radit_fast.io import RaditError


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
