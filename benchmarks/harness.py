"""Shared benchmark harness: one subprocess per case, warm-up, median and spread, peak extra memory, CSV, plot.

Protocol per case (``run_case``), in a fresh Python process so that cases cannot disturb each other's memory:
  1. the benchmark module's ``setup(case)`` builds the inputs and returns the function to time;
  2. one warm-up call (library loading, JIT kernels, page faults of reused buffers);
  3. peak memory of one more call:
     * CPU: the resident-set high-water mark. /proc/self/clear_refs ("5") resets VmHWM to the current RSS,
       then peak_extra = VmHWM after the call - VmRSS before it. It sees every allocation that touches pages
       (torch, BLAS/oneDNN workspaces, OpenMP stacks), not only torch's allocator; the inputs exist before
       the reset, so only what the call adds (outputs and gradients included) counts;
     * CUDA: torch.cuda.max_memory_allocated() - memory_allocated() around the call;
  4. ``repeat`` timed calls (CUDA: synchronised); median and spread = (max - min) / median.
Rows go to CSV with the columns of ``FIELDS``; ``plot`` renders a PNG from the CSV only.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

FIELDS = ["op", "impl", "device", "dtype", "N", "d", "V", "pass", "median_s", "spread", "peak_extra_MB", "gflops",
          "commit"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: an implementation of an op on one shape, dtype and pass (fwd | fwdbwd)."""

    op: str
    impl: str
    device: str
    dtype: str
    N: int
    d: int
    V: int
    pass_: str
    flops: float  # useful floating-point operations of the pass (for GFLOP/s)
    repeat: int = 5


def commit() -> str:
    """Short hash of HEAD, with "-dirty" when tracked benchmark or op files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "benchmarks",
                                "radit_fast/ops", "csrc"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str, repeat: int) -> tuple[float, float, float]:
    """(median seconds, spread, peak extra MB) of fn() following the protocol in the module docstring."""
    fn()
    _sync(device)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kb("VmRSS")
        out = fn()
        peak = (_rss_kb("VmHWM") - before) / 1024
    del out
    gc.collect()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med, peak


def run_case(module: str, case: Case, timeout: float = 1800) -> dict:
    """Runs ``module.setup(case)`` in a subprocess and returns the CSV row (dict) of the measurement."""
    payload = json.dumps(dataclasses.asdict(case))
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import harness; "
            f"harness._child({module!r}, json.loads(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"op": case.op, "impl": case.impl, "device": case.device, "dtype": case.dtype, "N": case.N, "d": case.d,
            "V": case.V, "pass": case.pass_, "median_s": f"{res['median_s']:.6g}", "spread": f"{res['spread']:.3f}",
            "peak_extra_MB": f"{res['peak_MB']:.1f}", "gflops": f"{case.flops / res['median_s'] / 1e9:.1f}",
            "commit": commit()}


def _child(module: str, fields: dict) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    case = Case(**fields)
    fn = importlib.import_module(module).setup(case)
    med, spread, peak = measure(fn, case.device, case.repeat)
    print(json.dumps({"median_s": med, "spread": spread, "peak_MB": peak}))


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot(csv_path: Path, png_path: Path, title: str) -> None:
    """Grouped bars per (dtype, pass): time (log), peak extra memory (log) and GFLOP/s per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    groups = sorted({(r["dtype"], r["pass"]) for r in rows}, key=lambda g: (g[1] != "fwd", g[0]))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    metrics = [("median_s", "median time (s)", True), ("peak_extra_MB", "peak extra memory (MB)", True),
               ("gflops", "useful GFLOP/s", False)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(impls))
    for ax, (key, label, log) in zip(axes, metrics):
        for i, impl in enumerate(impls):
            vals = []
            for g in groups:
                match = [r for r in rows if (r["dtype"], r["pass"]) == g and r["impl"] == impl]
                vals.append(max(float(match[0][key]), 1e-3) if match else 0.0)
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, vals, width, label=impl)
        ax.set_xticks(range(len(groups)), [f"{dt}\n{p}" for dt, p in groups])
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    shape = {(r["N"], r["d"], r["V"]) for r in rows}
    fig.suptitle(f"{title}  (N, d, V) = {', '.join(map(str, sorted(shape)))}; commit {rows[0]['commit'] if rows else ''}")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
