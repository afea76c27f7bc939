"""Helpers shared by the ensemble-family ops (replug, lsr, mixture, scorer): argument checks, backend choice for
float inputs, and the -inf-safe torch building blocks of their references.

The native calling convention itself (``tensor_arg``, ``cuda_stream``) lives in :mod:`radit_fast._native`; it is
re-exported here so that an op module imports its helpers from one place.
"""
from __future__ import annotations


import torch

from radit_fast import _native
from radit_fast._native import cuda_stream, tensor_arg  # noqa: F401  (re-exported for the ops)
from radit_fast.ops._dispatch import debug_checks, resolve_impl

NEG_INF = float("-inf")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- checks shared by the ensemble-family ops ----
def check_bk(op: str, name: str, t: torch.Tensor, shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """``t`` is a floating [B, k] tensor (of ``shape`` when given); returns (B, k)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must have shape [B, k], got {list(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape [B, k] = {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have k >= 1 chunks per row, got shape {list(t.shape)}")
    return int(t.shape[0]), int(t.shape[1])


def check_temperature(op: str, name: str, value: float) -> float:
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def check_mask(op: str, mask: torch.Tensor | None, shape: tuple[int, int], rows: bool = True) -> torch.Tensor | None:
    """``mask`` is None or a bool [B, k] tensor with at least one True per row (True = chunk present).

    ``rows=False`` skips the per-row check for the cpu backend, whose entry points check the rows themselves
    with the same message. On GPU tensors the per-row check would block on a device-to-host copy, so it runs
    only under ``RADIT_DEBUG_CHECKS=1`` (:func:`debug_checks`); without it a row with no present chunk gives the
    kernels' empty-row result (REPLUG: -inf with zero gradient; LSR: loss 0 with zero gradient)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{op}: mask must be a bool tensor of shape [B, k] = {list(shape)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{op}: mask must have shape [B, k] = {list(shape)}, got {list(mask.shape)}")
    if not debug_checks(mask.device):
        rows = False
    if rows and mask.numel() and not bool(mask.any(dim=1).all()):
        row = int((~mask.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"{op}: mask row {row} has no present chunk (all k entries are False)")
    return mask


def native_ok(*tensors: torch.Tensor) -> bool:
    """True when every tensor has a dtype the native/Triton kernels read (float32, bfloat16, float16)."""
    return all(t.dtype in _FLOAT_DTYPES for t in tensors)


def has_cuda_kernel(name: str) -> bool:
    """True when the native module has the CUDA entry point ``name`` (built with RADIT_CUDA=ON)."""
    return _native._C is not None and hasattr(_native._C, name)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (the accumulation dtype of the torch path)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def pick_impl(op: str, impl: str, device: torch.device, *tensors: torch.Tensor, cuda_kernel: str) -> str:
    """resolve_impl, with float64 inputs routed to the torch path under impl='auto'."""
    if impl == "auto" and not native_ok(*tensors):
        impl = "torch"
    impl = resolve_impl(op, impl, device, dtype=tensors[0].dtype if tensors else None,
                        has_cuda_kernel=has_cuda_kernel(cuda_kernel))
    if impl != "torch" and not native_ok(*tensors):
        bad = next(t.dtype for t in tensors if t.dtype not in _FLOAT_DTYPES)
        raise ValueError(f"{op}: impl={impl!r} takes float32, bfloat16 or float16 inputs, got {bad}; "
                         "use impl='torch' for float64")
    return impl


def safe_logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """logsumexp that is -inf (with zero gradient, not NaN) for slices that are entirely -inf."""
    dead = (x == NEG_INF).all(dim=dim, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, torch.zeros_like(x), x), dim=dim, keepdim=True)
    lse = torch.where(dead, torch.full_like(lse, NEG_INF), lse)
    return lse if keepdim else lse.squeeze(dim)


def masked_log_softmax(z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log_softmax over the last dim restricted to ``mask``; -inf (zero gradient) outside it and for z = -inf."""
    if mask is not None:
        z = torch.where(mask, z, torch.full_like(z, NEG_INF))
    lse = safe_logsumexp(z, dim=-1, keepdim=True)
    gone = z == NEG_INF
    return torch.where(gone, torch.full_like(z, NEG_INF), z - torch.where(gone, torch.zeros_like(lse), lse))
