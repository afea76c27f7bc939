"""Backend choice shared by every op: ``impl="auto"|"cpu"|"cuda"|"triton"|"torch"``.

``impl="auto"`` is decided by measurement, not by what was built: ``impl_table.json`` beside this file
holds rows ``{op, device, dtype, impl, measured}``, where ``device`` is a shell-style pattern over the
device kind (``device_kind``: ``"cpu <model name>"`` or ``"cuda <name> sm_<major><minor>"``, e.g.
``"cuda NVIDIA H200 sm_90"``), ``dtype`` a torch dtype name or ``"*"``, and ``measured`` names the commit,
benchmark and result the row came from. The first row that matches and whose backend can run here wins.
Where nothing was measured: on GPUs the vendor-GEMM driver ("cuda" when radit_fast._C has CUDA, else
"triton", else "torch"), on CPUs "cpu" (else "torch").
"""
from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import platform
from pathlib import Path

import torch

from radit_fast._native import HAS_NATIVE, HAS_NATIVE_CUDA

log = logging.getLogger(__name__)

IMPLS = ("auto", "cpu", "cuda", "triton", "torch")
IMPL_TABLE = Path(__file__).resolve().with_name("impl_table.json")
_ROW_KEYS = ("op", "device", "dtype", "impl", "measured")


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


# ----------------------------------------------------------------------------------------------------------
# The table of measured choices
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def load_impl_table(path: Path = IMPL_TABLE) -> tuple[dict, ...]:
    """The rows of ``path``; ValueError naming the row when one is malformed."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    for i, row in enumerate(rows):
        missing = [k for k in _ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}")
        if row["impl"] not in IMPLS[1:]:
            raise ValueError(f"{path}: row {i} has impl {row['impl']!r}, not one of {IMPLS[1:]}")
        if row["dtype"] != "*" and not isinstance(getattr(torch, row["dtype"], None), torch.dtype):
            raise ValueError(f"{path}: row {i} has dtype {row['dtype']!r}, not a torch dtype name or '*'")
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_kind(device: torch.device) -> str:
    """What the table's ``device`` patterns match: ``"cuda <name> sm_<major><minor>"`` or ``"cpu <model>"``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    if device.type == "cpu":
        return f"cpu {_cpu_model()}"
    return device.type


def table_impls(op: str, kind: str, dtype: torch.dtype | None,
                rows: tuple[dict, ...] | None = None) -> list[str]:
    """The impls of the rows for ``op`` whose device pattern matches ``kind`` and whose dtype is
    ``dtype`` (or ``"*"``), in table order."""
    rows = load_impl_table() if rows is None else rows
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    return [r["impl"] for r in rows
            if r["op"] == op and fnmatch.fnmatchcase(kind, r["device"]) and r["dtype"] in ("*", name)]


def _unavailable(op: str, impl: str, device: torch.device, has_cuda_kernel: bool,
                 has_triton_kernel: bool) -> str | None:
    """Why ``impl`` cannot run ``op`` on ``device`` (None when it can)."""
    if impl == "cpu":
        if device.type != "cpu":
            return f"{op}: impl='cpu' needs CPU tensors, got {device}"
        if not HAS_NATIVE:
            return f"{op}: impl='cpu' needs the native module radit_fast._C, which is not built"
    elif impl == "cuda":
        if device.type != "cuda":
            return f"{op}: impl='cuda' needs CUDA tensors, got {device}"
        if not (HAS_NATIVE_CUDA and has_cuda_kernel):
            return f"{op}: impl='cuda' needs radit_fast._C built with CUDA (RADIT_CUDA=ON)"
    elif impl == "triton":
        if not (has_triton_kernel and triton_available()):
            return f"{op}: impl='triton' needs the triton package"
        if device.type != "cuda" and not triton_interpreted():
            return f"{op}: impl='triton' on {device} tensors needs TRITON_INTERPRET=1"
    return None


def fallback_impl(device: torch.device, *, has_cuda_kernel: bool = True, has_triton_kernel: bool = True) -> str:
    """The choice where nothing was measured: the vendor-GEMM driver on GPUs, the native CPU backend on CPUs."""
    if device.type == "cuda":
        if HAS_NATIVE_CUDA and has_cuda_kernel:
            return "cuda"
        if has_triton_kernel and triton_available():
            return "triton"
        return "torch"
    return "cpu" if (device.type == "cpu" and HAS_NATIVE) else "torch"


def resolve_impl(op: str, impl: str, device: torch.device, *, dtype: torch.dtype | None = None,
                 has_cuda_kernel: bool = True, has_triton_kernel: bool = True) -> str:
    """Pick the backend for ``device`` (and ``dtype``, for the table); ValueError when an explicit choice
    cannot run there."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        reason = _unavailable(op, impl, device, has_cuda_kernel, has_triton_kernel)
        if reason is not None:
            raise ValueError(reason)
        return impl
    return _auto_impl(op, device, dtype, has_cuda_kernel, has_triton_kernel)


@torch.compiler.assume_constant_result
def _auto_impl(op: str, device: torch.device, dtype: torch.dtype | None, has_cuda_kernel: bool,
               has_triton_kernel: bool) -> str:
    """impl="auto": the table, then the fallback. A constant for torch.compile (it runs once at trace time:
    reading /proc/cpuinfo and the table file cannot be traced)."""
    kind = device_kind(device)
    for measured in table_impls(op, kind, dtype):
        if _unavailable(op, measured, device, has_cuda_kernel, has_triton_kernel) is None:
            return measured
        log.debug("%s: the table's choice %r for %s cannot run here", op, measured, kind)
    return fallback_impl(device, has_cuda_kernel=has_cuda_kernel, has_triton_kernel=has_triton_kernel)


# ----------------------------------------------------------------------------------------------------------
# The device error flag shared by every GPU backend (the CUDA epilogues and the Triton kernels): kernels OR
# FLAG_* bits into an int32 [1] tensor per device instead of synchronising with the host; it is read only
# when asked (raise_if_flagged), e.g. under RADIT_DEBUG_CHECKS=1.
# ----------------------------------------------------------------------------------------------------------
FLAG_TARGET_OUT_OF_RANGE = 1
_FLAGS: dict[torch.device, torch.Tensor] = {}


def debug_checks(device: torch.device | None = None) -> bool:
    """Whether value checks that read device memory on the host run: under RADIT_DEBUG_CHECKS=1 always, else
    only for tensors on a non-CUDA ``device`` (on GPUs they would block on a device-to-host copy)."""
    if os.environ.get("RADIT_DEBUG_CHECKS", "0") == "1":
        return True
    return device is not None and device.type != "cuda"


def _flag_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def error_flag(device: torch.device | str) -> torch.Tensor:
    """The int32 [1] error flag of ``device`` that the kernels OR bits into (FLAG_*); 0 when clean."""
    key = _flag_key(torch.device(device))
    flag = _FLAGS.get(key)
    if flag is None:
        flag = _FLAGS[key] = torch.zeros(1, dtype=torch.int32, device=key)
    return flag


def raise_if_flagged(device: torch.device | str, flag: torch.Tensor | None = None) -> None:
    """Read (host sync) and clear ``flag`` (default: the device's); ValueError when a kernel set it."""
    flag = error_flag(device) if flag is None else flag
    bits = int(flag.item())
    if bits:
        flag.zero_()
    if bits & FLAG_TARGET_OUT_OF_RANGE:
        raise ValueError("answer_logprobs: a target is outside [0, V) and is not ignore_index "
                         "(its row of tok is NaN); rerun with RADIT_DEBUG_CHECKS=1 to find it")
