"""Loads the native module ``radit_fast._C`` when it was built; the package works without it."""
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

# dtype codes shared with csrc/common/checks.h (enum class DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.int64: 3,
    torch.int32: 4,
    torch.bool: 5,
}


def dtype_code(t: torch.Tensor, name: str) -> int:
    """The native dtype code of ``t``; ValueError naming ``name`` when the dtype is not supported."""
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise ValueError(f"{name}: unsupported dtype {t.dtype}") from None


def cuda_stream(t: torch.Tensor) -> int:
    """The raw current CUDA stream handle for ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
