"""Loads the native module ``radit_fast._C`` when it was built; the package works without it.

The native calling convention (csrc/common/tensor.h): every tensor crosses as a ``_C.TensorArg`` (data pointer,
dtype, sizes, strides, device) built by :func:`tensor_arg`; dtypes are the members of the ``_C.DType`` enum,
named like torch's dtypes, so no numeric dtype code is written on either side. CUDA entry points take the raw
stream of the tensors' device last (:func:`cuda_stream`).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the build
    from radit_fast import _C  # type: ignore[attr-defined]

    HAS_NATIVE = True
    HAS_NATIVE_CUDA = bool(getattr(_C, "with_cuda", False))
except ImportError as exc:  # the torch reference path still works
    _C = None
    HAS_NATIVE = False
    HAS_NATIVE_CUDA = False
    log.debug("radit_fast._C not available (%s); using the torch reference", exc)

# torch dtype -> _C.DType member (the enum is the one source of the codes).
_DTYPES = {} if _C is None else {
    getattr(torch, name): getattr(_C.DType, name)
    for name in ("float32", "bfloat16", "float16", "int64", "int32", "bool")
}


def dtype_code(t: torch.Tensor, name: str):
    """The native dtype (a ``_C.DType`` member) of ``t``; ValueError naming ``name`` when it is not supported."""
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise ValueError(f"{name}: unsupported dtype {t.dtype}") from None


def tensor_arg(t: torch.Tensor | None, name: str = "tensor"):
    """``t`` as the native entry points take it (a ``_C.TensorArg``); an absent argument for None."""
    if t is None:
        return _C.TensorArg()
    if t.dim() > 3:
        raise ValueError(f"{name}: at most 3 dimensions, got shape {list(t.shape)}")
    device = t.device.index if t.device.type == "cuda" else -1
    return _C.TensorArg(t.data_ptr(), dtype_code(t, name), list(t.shape), list(t.stride()), device)


def cuda_stream(t: torch.Tensor) -> int:
    """The raw current CUDA stream handle for ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
