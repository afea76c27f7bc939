"""Benchmark of the ensemble-family ops (replug_logprob, lsr_loss, mixture_logprobs) on the shared harness.

Implementations: ``naive`` (the plain PyTorch expression, imported from the op modules), ``torch`` (the
guarded reference path, impl="torch") and ``cpu`` (the fused C++ kernel, impl="cpu"); on a GPU machine also
``cuda`` and ``triton``. Passes: ``fwd`` (no autograd) and ``fwdbwd`` (forward + backward of the sum).
Shapes: the [B, k] ops at B*k in {64, 1024, 16384} with k = 10 (CSV: N = B*k, d = k, V = 0); the mixture
at decoding sizes B*k in {20, 160}, V = 32000 (CSV: V = vocabulary).

The [B, k] ops move a few bytes per element and are memory/latency bound, so the CSV reports the effective
bandwidth ``GB_s`` of their minimal traffic (inputs read once, outputs and gradients written once) next to
the time, and ``vs_naive`` = naive median / this median. The harness's GFLOP/s column stays 0.

Threads: every case runs with OMP_NUM_THREADS = --threads (default 1, for torch and the native OpenMP
loops alike): on the shared 2-core CI machine more threads only measure oversubscription.

Usage: flock /tmp/radit-bench.lock .venv/bin/python benchmarks/bench_ensemble.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

K = 10
BK_SIZES = (64, 1024, 16384)
MIX_SIZES = ((20, 32000), (160, 32000))
RESULTS = Path(__file__).resolve().parent / "results"
EXTRA = ["GB_s", "vs_naive"]


def _inputs(case: harness.Case):
    gen = torch.Generator().manual_seed(0)
    B, k, dev = case.N // case.d, case.d, case.device
    if case.op == "mixture_logprobs":
        x = torch.randn(B, k, case.V, generator=gen).to(dev)
        w = torch.log_softmax(torch.randn(B, k, generator=gen), -1).to(dev)
        return x, w, None
    s = (torch.randn(B, k, generator=gen) * 3).to(dev)
    lm = (-torch.rand(B, k, generator=gen) * 20).to(dev)
    mask = torch.rand(B, k, generator=gen) > 0.1
    mask[:, 0] = True
    return lm, s, mask.to(dev)


def setup(case: harness.Case):
    """The function the harness times for ``case`` (called in the case's own subprocess)."""
    from radit_fast.ops.lsr import lsr_loss, naive_lsr_loss
    from radit_fast.ops.mixture import mixture_logprobs, naive_mixture_logprobs
    from radit_fast.ops.replug import naive_replug_logprob, replug_logprob

    a, b, mask = _inputs(case)
    bwd = case.pass_ == "fwdbwd"
    if case.op == "replug_logprob":
        if case.impl == "naive":
            f = lambda x, y: naive_replug_logprob(x, y, temperature=0.5, mask=mask)  # noqa: E731
        else:
            f = lambda x, y: replug_logprob(x, y, temperature=0.5, mask=mask, impl=case.impl)  # noqa: E731
        grads = (True, True)
    elif case.op == "lsr_loss":
        if case.impl == "naive":
            f = lambda x, y: naive_lsr_loss(y, x, mask=mask)  # noqa: E731
        else:
            f = lambda x, y: lsr_loss(y, x, mask=mask, impl=case.impl)  # noqa: E731
        grads = (False, True)
    else:
        if case.impl == "naive":
            f = naive_mixture_logprobs
        else:
            f = lambda x, y: mixture_logprobs(x, y, impl=case.impl)  # noqa: E731
        grads = (True, True)
    if not bwd:
        def fwd():
            with torch.no_grad():
                return f(a, b)
        return fwd
    a, b = (t.detach().clone().requires_grad_(g) for t, g in zip((a, b), grads))

    def fwdbwd():
        out = f(a, b)
        out.sum().backward()
        a.grad = b.grad = None
        return out
    return fwdbwd


def min_bytes(op: str, N: int, k: int, V: int, pass_: str) -> int:
    """Minimal traffic: inputs read once (float32 + bool mask), outputs and gradients written once."""
    B = N // k
    if op == "mixture_logprobs":
        return 4 * (N * V + N + B * V) + (4 * (N * V + N) + 4 * N * V if pass_ == "fwdbwd" else 0)
    n_grads = {"replug_logprob": 2, "lsr_loss": 1}[op]
    base = 4 * 2 * N + N + 4 * B
    return base + (4 * n_grads * N if pass_ == "fwdbwd" else 0)


def cases(quick: bool) -> list[harness.Case]:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ["naive", "torch", "cuda", "triton"] if dev == "cuda" else ["naive", "torch", "cpu"]
    out = []
    for op in ("replug_logprob", "lsr_loss"):
        for n in BK_SIZES[:2] if quick else BK_SIZES:
            for p in ("fwd", "fwdbwd"):
                for impl in impls:
                    out.append(harness.Case(op, impl, dev, "float32", n, K, 0, p, 0.0,
                                            repeat=300 if n <= 1024 else 100))
    for n, v in MIX_SIZES[:1] if quick else MIX_SIZES:
        for p in ("fwd", "fwdbwd"):
            for impl in impls:
                out.append(harness.Case("mixture_logprobs", impl, dev, "float32", n, K, v, p, 0.0, repeat=10))
    return out


def add_extras(rows: list[dict]) -> list[dict]:
    naive = {(r["op"], r["N"], r["V"], r["pass"]): float(r["median_s"]) for r in rows if r["impl"] == "naive"}
    for r in rows:
        t = float(r["median_s"])
        r["GB_s"] = f"{min_bytes(r['op'], int(r['N']), int(r['d']), int(r['V']), r['pass']) / t / 1e9:.2f}"
        base = naive.get((r["op"], r["N"], r["V"], r["pass"]))
        r["vs_naive"] = f"{base / t:.2f}" if base else ""
    return rows


def plot(csv_path: Path, png_path: Path) -> None:
    """Median time vs B*k per implementation, one panel per (op, pass); rendered from the CSV only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = harness.read_csv(csv_path)
    panels = list(dict.fromkeys((r["op"], r["pass"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cols = 2
    fig, axes = plt.subplots((len(panels) + 1) // cols, cols, figsize=(11, 3.4 * ((len(panels) + 1) // cols)),
                             squeeze=False)
    for ax, (op, p) in zip(axes.flat, panels):
        for impl in impls:
            pts = sorted((int(r["N"]), float(r["median_s"]) * 1e6, r["vs_naive"]) for r in rows
                         if (r["op"], r["pass"], r["impl"]) == (op, p, impl))
            if not pts:
                continue
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=impl)
            if impl not in ("naive",):
                for x, y, ratio in pts:
                    ax.annotate(f"{ratio}x", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        v = next(r["V"] for r in rows if r["op"] == op)
        ax.set_title(f"{op} {p}" + (f" (V={v})" if v != "0" else " (k=10)"), fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B*k")
        ax.set_ylabel("median time (us)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"ensemble ops on {dev}, float32, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}; "
                 "annotations: speed-up vs naive; commit "
                 f"{rows[0]['commit'] if rows else ''}", fontsize=10)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every case (default 1)")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/ensemble_<device>.csv)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the harness's per-case subprocesses
    rows = []
    for case in cases(args.quick):
        rows.append(harness.run_case("bench_ensemble", case))
        r = rows[-1]
        print(f"{r['op']:16s} {r['impl']:6s} {r['pass']:6s} N={r['N']!s:>6} V={r['V']!s:>6} "
              f"median {float(r['median_s']) * 1e6:10.1f} us  spread {r['spread']}", flush=True)
    rows = add_extras(rows)
    dev = rows[0]["device"]
    csv_path = Path(args.out) if args.out else RESULTS / f"ensemble_{dev}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=harness.FIELDS + EXTRA)
        w.writeheader()
        w.writerows(rows)
    plot(csv_path, csv_path.with_suffix(".png"))
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
