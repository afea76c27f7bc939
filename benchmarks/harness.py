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
``run_group`` measures several cases that should be compared (the implementations of one shape, dtype and
pass): peak memory per case in its own process as above, and the times in one process, round-robin (one
call of each case in turn, ``repeat`` rounds), so that a change of machine load (shared machines) hits
every case alike and the ratios stay fair.
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
    threads: int = 0  # intra-op threads of the case's process (OMP_NUM_THREADS, torch.set_num_threads); 0: default


# Tracked paths whose uncommitted edits mark the commit "-dirty"; a benchmark may narrow it to its own files.
DIRTY_PATHS = ["benchmarks", "radit_fast", "csrc"]


def commit() -> str:
    """Short hash of HEAD, with "-dirty" when tracked files under ``DIRTY_PATHS`` differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *DIRTY_PATHS],
                               cwd=root, capture_output=True, text=True).stdout.strip()
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
    if repeat == 0:
        return float("nan"), float("nan"), peak
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med, peak


def _row(case: Case, median_s: float, spread: float, peak_mb: float, extra: dict | None = None) -> dict:
    """The CSV row of a case; ``extra`` holds the benchmark's own columns (see ``_child``: ``extra_columns``)."""
    return {"op": case.op, "impl": case.impl, "device": case.device, "dtype": case.dtype, "N": case.N, "d": case.d,
            "V": case.V, "pass": case.pass_, "median_s": f"{median_s:.6g}", "spread": f"{spread:.3f}",
            "peak_extra_MB": f"{peak_mb:.1f}", "gflops": f"{case.flops / median_s / 1e9:.1f}",
            **({"threads": case.threads} if case.threads else {}), **(extra or {}), "commit": commit()}


def _spawn(module: str, mode: str, cases: list[Case], timeout: float) -> dict:
    payload = json.dumps([dataclasses.asdict(c) for c in cases])
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import harness; "
            f"harness._child({module!r}, {mode!r}, json.loads(sys.argv[1]))")
    env = os.environ.copy()
    if cases[0].threads:  # before the child starts: OpenMP reads it once (torch's and the native module's pools)
        env["OMP_NUM_THREADS"] = str(cases[0].threads)
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, timeout=timeout,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} of {[c.impl for c in cases]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(module: str, case: Case, timeout: float = 1800) -> dict:
    """Runs ``module.setup(case)`` in a subprocess and returns the CSV row (dict) of the measurement."""
    res = _spawn(module, "case", [case], timeout)
    return _row(case, res["median_s"], res["spread"], res["peak_MB"], res.get("extra"))


def run_group(module: str, cases: list[Case], timeout: float = 3600) -> list[dict]:
    """Rows of cases to be compared: memory per case in its own process, times round-robin in one process.

    A case whose memory run fails (e.g. out of memory, a backend not built) is reported on stdout and left out;
    the other cases are still timed. Cases are keyed by ``impl``: one group holds one case per implementation."""
    peaks, extras, ok = {}, {}, []
    for case in cases:
        try:
            res = _spawn(module, "memory", [case], timeout)
            peaks[case.impl], extras[case.impl] = res["peak_MB"], res.get("extra")
            ok.append(case)
        except RuntimeError as exc:
            print(f"  {case.impl} {case.dtype} {case.pass_}: FAILED {str(exc).splitlines()[-1]}", flush=True)
    if not ok:
        return []
    times = _spawn(module, "interleaved", ok, timeout)
    return [_row(c, times[c.impl]["median_s"], times[c.impl]["spread"], peaks[c.impl], extras[c.impl]) for c in ok]


def _child(module: str, mode: str, fields: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    cases = [Case(**f) for f in fields]
    if cases[0].threads:
        torch.set_num_threads(cases[0].threads)
    mod = importlib.import_module(module)
    setup = mod.setup
    # A module may define extra_columns(case) -> dict of its own CSV columns (e.g. accuracy against a reference);
    # it runs in the memory (or single-case) process after the measurement, so it cannot disturb it.
    extra = getattr(mod, "extra_columns", None)
    if mode == "case":
        med, spread, peak = measure(setup(cases[0]), cases[0].device, cases[0].repeat)
        print(json.dumps({"median_s": med, "spread": spread, "peak_MB": peak,
                          "extra": extra(cases[0]) if extra else None}))
    elif mode == "memory":
        peak = measure(setup(cases[0]), cases[0].device, 0)[2]
        print(json.dumps({"peak_MB": peak, "extra": extra(cases[0]) if extra else None}))
    else:  # interleaved: warm every case up, then `repeat` rounds of one call of each case in turn
        fns = [setup(c) for c in cases]
        for fn in fns:
            fn()
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(max(c.repeat for c in cases)):
            for fn, ts in zip(fns, times):
                _sync(cases[0].device)
                t0 = time.perf_counter()
                fn()
                _sync(cases[0].device)
                ts.append(time.perf_counter() - t0)
        out = {}
        for c, ts in zip(cases, times):
            med = statistics.median(ts)
            out[c.impl] = {"median_s": med, "spread": (max(ts) - min(ts)) / med}
        print(json.dumps(out))


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Rows to CSV with the columns ``fields`` (default ``FIELDS``); keys of a row outside them are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot(csv_path: Path, png_path: Path, title: str, keys: tuple[str, ...] = ("dtype", "pass"),
         extra_metrics: tuple[tuple[str, str, bool], ...] = ()) -> None:
    """Grouped bars per value of the columns ``keys`` (default (dtype, pass)): time (log), peak extra memory (log),
    GFLOP/s and the ``extra_metrics`` (column, axis label, log scale) per implementation; empty cells: no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)

    def group_of(r: dict) -> tuple:
        return tuple(r.get(k, "") for k in keys)

    def tick(g: tuple) -> str:
        return "\n".join(v if k in ("dtype", "pass") else f"{k}={v}" for k, v in zip(keys, g))

    groups = sorted({group_of(r) for r in rows}, key=lambda g: [(x != "fwd", x) for x in g])
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    metrics = [("median_s", "median time (s)", True), ("peak_extra_MB", "peak extra memory (MB)", True),
               ("gflops", "useful GFLOP/s", False), *extra_metrics]
    ncols, nrows = min(3, len(metrics)), -(-len(metrics) // 3)
    fig, grid = plt.subplots(nrows, ncols, figsize=(16, 4.8 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    width = 0.8 / max(1, len(impls))
    for ax, (key, label, log) in zip(axes, metrics):
        for i, impl in enumerate(impls):
            vals = []
            for g in groups:
                match = [r for r in rows if group_of(r) == g and r["impl"] == impl and r.get(key)]
                floor = 1e-3 if key == "peak_extra_MB" else 0.0  # 0 MB still shows on the log axis
                vals.append(max(float(match[0][key]), floor) if match else 0.0)
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, vals, width, label=impl)
        ax.set_xticks(range(len(groups)), [tick(g) for g in groups], fontsize=7)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    shapes = sorted({f"N={r['N']} d={r['d']} V={r['V']}" for r in rows})
    fig.suptitle(f"{title}: {'; '.join(shapes)}; commit {rows[0]['commit'] if rows else ''}")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
