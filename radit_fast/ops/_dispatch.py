"""Backend choice shared by every op: ``impl="auto"|"cpu"|"cuda"|"triton"|"torch"``."""
from __future__ import annotations

import functools
import os

import torch

from radit_fast._native import HAS_NATIVE, HAS_NATIVE_CUDA

IMPLS = ("auto", "cpu", "cuda", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (on CPU tensors it runs only under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def common_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """The one device of all given tensors; ValueError naming the argument that differs."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}; "
                             "all tensors must be on one device")
    if device is None:
        raise ValueError(f"{op}: no tensor given")
    return device


def resolve_impl(op: str, impl: str, device: torch.device, *, has_cuda_kernel: bool = True,
                 has_triton_kernel: bool = True) -> str:
    """Pick the backend for ``device``; ValueError when an explicit choice cannot run there."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = device.type == "cuda"
    if impl == "auto":
        if on_cuda:
            if HAS_NATIVE_CUDA and has_cuda_kernel:
                return "cuda"
            if has_triton_kernel and triton_available():
                return "triton"
            return "torch"
        return "cpu" if (device.type == "cpu" and HAS_NATIVE) else "torch"
    if impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: impl='cpu' needs CPU tensors, got {device}")
        if not HAS_NATIVE:
            raise ValueError(f"{op}: impl='cpu' needs the native module radit_fast._C, which is not built")
    elif impl == "cuda":
        if not on_cuda:
            raise ValueError(f"{op}: impl='cuda' needs CUDA tensors, got {device}")
        if not (HAS_NATIVE_CUDA and has_cuda_kernel):
            raise ValueError(f"{op}: impl='cuda' needs radit_fast._C built with CUDA (RADIT_CUDA=ON)")
    elif impl == "triton":
        if not (has_triton_kernel and triton_available()):
            raise ValueError(f"{op}: impl='triton' needs the triton package")
        if not on_cuda and not triton_interpreted():
            raise ValueError(f"{op}: impl='triton' on {device} tensors needs TRITON_INTERPRET=1")
    return impl
