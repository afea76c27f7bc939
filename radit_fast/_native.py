"""Loads the native module ``radit_fast._C`` when it was built; the package works without it.

The native calling convention (csrc/common/tensor.h): every tensor crosses as a TensorArg, passed as the tuple
:func:`tensor_arg` builds (data pointer, dtype code, sizes, strides, device) or None for an absent argument. The
dtype codes are read from the ``_C.DType`` enum (members named like torch's dtypes), the one place they are
defined, so no numeric code is written in Python. CUDA entry points take the raw stream of the tensors' device
last (:func:`cuda_stream`).
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

# torch dtype -> native dtype code, read from the _C.DType enum (the one source of the codes).
_DTYPES = {} if _C is None else {getattr(torch, name): int(code) for name, code in _C.DType.__members__.items()}


def dtype_code(t: torch.Tensor, name: str) -> int:
    """The native dtype code of ``t`` (``int(_C.DType.<dtype>)``); ValueError naming ``name`` when unsupported."""
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise ValueError(f"{name}: unsupported dtype {t.dtype}") from None


def tensor_arg(t: torch.Tensor | None, name: str = "tensor") -> tuple | None:
    """``t`` as the native entry points take it: (data_ptr, dtype code, sizes, strides, device index or -1 for
    the CPU) for 1 to 3 dimensions; None (an absent argument) for None."""
    if t is None:
        return None
    if not 1 <= t.dim() <= 3:
        raise ValueError(f"{name}: 1 to 3 dimensions, got shape {list(t.shape)}")
    return (t.data_ptr(), dtype_code(t, name), t.shape, t.stride(), t.get_device())


def cuda_stream(t: torch.Tensor) -> int:
    """The raw current CUDA stream handle for ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
