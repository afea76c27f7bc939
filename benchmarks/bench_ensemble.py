"""Benchmark of the ensemble-family ops (replug_logprob, lsr_loss, mixture_logprobs) and the fused scorer
(score_chunks) on the shared harness.

Implementations: ``naive`` (the plain PyTorch expression, imported from the op modules), ``torch`` (the
guarded reference path, impl="torch") and ``cpu`` (the fused C++ kernel, impl="cpu"); on a GPU machine also
``cuda`` and ``triton``. Passes: ``fwd`` (no autograd) and ``fwdbwd`` (forward + backward of the sum).
Shapes (CSV: N = B*k rows, k in its own column, d = 0 where the op has no hidden dimension):
  * replug_logprob, lsr_loss: B*k in {64, 1024, 16384} with k = 8 (V = 0);
  * mixture_logprobs: the same B*k with k = 8 and V = 32000, except V = 4096 at B*k = 16384 (see MIX_V);
  * score_chunks: one SmolLM2-135M-sized step, B = 4 queries x k = 8 chunks x T = 8 answer tokens
    (N = 256 answer positions, d = 576, V = 49152), both outputs (REPLUG ensemble and LSR loss); naive is
    ``naive_score_chunks`` (N x V logits, then the naive ensemble and LSR expressions); fwdbwd backpropagates
    -ensemble.mean() + lsr_loss into hidden, weight and the retriever scores.

The [B, k] ops move a few bytes per element and are memory/latency bound, so the CSV reports the effective
bandwidth ``GB_s`` of their minimal traffic (inputs read once, outputs and gradients written once) next to
the time, and ``vs_naive`` = naive median / this median. The harness's GFLOP/s column is 0 for them; for the
scorer it counts the LM-head products (2 N d V forward, 6 N d V forward + backward, recompute not counted).
Times: the implementations of one (op, shape, pass) run round-robin in one process (harness.run_group), so
a change of load on a shared machine hits all of them alike.

Threads: every case runs with OMP_NUM_THREADS = --threads (default 1, for torch and the native OpenMP
loops alike): on the shared 2-core CI machine more threads only measure oversubscription.

Usage: flock /tmp/radit-bench.lock .venv/bin/python benchmarks/bench_ensemble.py [--quick] [--threads N]
(--quick: one small size per op and a small scorer shape, a smoke run of a minute or two.)
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

# Chunks per query of every op (a power of two so that B*k is exactly each size below).
K = 8
BK_SIZES = (64, 1024, 16384)
# Vocabulary of the mixture per B*k. V = 32000 (a Llama-2-sized vocabulary) up to B*k = 1024. At B*k = 16384 a
# float32 [B, k, V] input alone would be 2.1 GB at V = 32000 and the naive fwdbwd holds ~5 such tensors, so V
# drops to 4096 there: every case stays under ~2 GB (inputs 268 MB, peak ~1.3 GB). The CSV's V column says
# which; compare rows of equal V.
MIX_V = {64: 32000, 1024: 32000, 16384: 4096}
# The scorer: B queries x K chunks x SCORER_T answer tokens per chunk (N = B K T rows), an LM head (d, V).
SCORER_T = 8
SCORER_FULL = (4, 576, 49152)  # (B, d, V): SmolLM2-135M head, N = 256
SCORER_QUICK = (1, 64, 2048)   # N = 64
RESULTS = Path(__file__).resolve().parent / "results"
EXTRA = ["k", "GB_s", "vs_naive"]


def _inputs(case: harness.Case):
    gen = torch.Generator().manual_seed(0)
    B, k, dev = case.N // K, K, case.device
    if case.op == "score_chunks":
        B, T = case.N // (K * SCORER_T), SCORER_T
        seg = torch.arange(B * k).repeat_interleave(T)  # segment b * k + i: query b, chunk i
        targets = torch.randint(0, case.V, (case.N,), generator=gen)
        targets[::T] = -100  # one ignored position per sequence
        hidden = torch.randn(case.N, case.d, generator=gen)
        weight = torch.randn(case.V, case.d, generator=gen) / case.d**0.5
        scores = torch.randn(B, k, generator=gen) * 3
        return tuple(t.to(dev) for t in (hidden, weight, targets, seg, scores))
    if case.op == "mixture_logprobs":
        x = torch.randn(B, k, case.V, generator=gen).to(dev)
        w = torch.log_softmax(torch.randn(B, k, generator=gen), -1).to(dev)
        return x, w, None
    s = (torch.randn(B, k, generator=gen) * 3).to(dev)
    lm = (-torch.rand(B, k, generator=gen) * 20).to(dev)
    mask = torch.rand(B, k, generator=gen) > 0.1
    mask[:, 0] = True
    return lm, s, mask.to(dev)


def _setup_scorer(case: harness.Case):
    from radit_fast.ops.scorer import ScorerOptions, naive_score_chunks, score_chunks

    hidden, weight, targets, seg, scores = _inputs(case)
    if case.impl == "naive":
        f = lambda h, w, s: naive_score_chunks(h, w, targets, seg, s)  # noqa: E731
    else:
        opts = ScorerOptions(impl=case.impl)

        def f(h, w, s):
            res = score_chunks(h, w, targets, seg, s, options=opts)
            return res.ensemble, res.lsr_loss
    if case.pass_ == "fwd":
        def fwd():
            with torch.no_grad():
                return f(hidden, weight, scores)
        return fwd
    h, w, s = (t.detach().clone().requires_grad_() for t in (hidden, weight, scores))

    def fwdbwd():
        ens, lsr = f(h, w, s)
        loss = lsr - ens.mean()
        loss.backward()
        h.grad = w.grad = s.grad = None
        return loss
    return fwdbwd


def setup(case: harness.Case):
    """The function the harness times for ``case`` (called in the case's own subprocess)."""
    from radit_fast.ops.lsr import lsr_loss, naive_lsr_loss
    from radit_fast.ops.mixture import mixture_logprobs, naive_mixture_logprobs
    from radit_fast.ops.replug import naive_replug_logprob, replug_logprob

    if case.op == "score_chunks":
        return _setup_scorer(case)
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


def min_bytes(op: str, N: int, k: int, d: int, V: int, pass_: str) -> int:
    """Minimal traffic: inputs read once (float32 + bool mask), outputs and gradients written once."""
    B = N // k
    bwd = pass_ == "fwdbwd"
    if op == "score_chunks":  # hidden, weight, targets (int64) and scores in; the LM-head gradients out
        return 4 * (N * d + V * d) + 8 * 2 * N + 4 * 2 * B * k + (4 * (N * d + V * d + B * k) if bwd else 0)
    if op == "mixture_logprobs":
        return 4 * (N * V + N + B * V) + (4 * (N * V + N) + 4 * N * V if bwd else 0)
    n_grads = {"replug_logprob": 2, "lsr_loss": 1}[op]
    base = 4 * 2 * N + N + 4 * B
    return base + (4 * n_grads * N if bwd else 0)


def groups(quick: bool) -> list[list[harness.Case]]:
    """One group per (op, shape, pass): the cases of every implementation, timed round-robin."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ["naive", "torch", "cuda", "triton"] if dev == "cuda" else ["naive", "torch", "cpu"]
    sizes = BK_SIZES[:1] if quick else BK_SIZES
    out = []
    for op in ("replug_logprob", "lsr_loss"):
        for n in sizes:
            for p in ("fwd", "fwdbwd"):
                out.append([harness.Case(op, impl, dev, "float32", n, 0, 0, p, 0.0, repeat=300 if n <= 1024 else 100)
                            for impl in impls])
    for n in sizes:
        v = 1024 if quick else MIX_V[n]
        for p in ("fwd", "fwdbwd"):
            out.append([harness.Case("mixture_logprobs", impl, dev, "float32", n, 0, v, p, 0.0, repeat=10)
                        for impl in impls])
    b, d, v = SCORER_QUICK if quick else SCORER_FULL
    n = b * K * SCORER_T
    for p in ("fwd", "fwdbwd"):
        out.append([harness.Case("score_chunks", impl, dev, "float32", n, d, v, p, (2 if p == "fwd" else 6) * n * d * v,
                                 repeat=3 if quick else 10) for impl in impls])
    return out


def add_extras(rows: list[dict]) -> list[dict]:
    naive = {(r["op"], r["N"], r["V"], r["pass"]): float(r["median_s"]) for r in rows if r["impl"] == "naive"}
    for r in rows:
        t = float(r["median_s"])
        r["k"] = str(K)
        r["GB_s"] = f"{min_bytes(r['op'], int(r['N']), K, int(r['d']), int(r['V']), r['pass']) / t / 1e9:.2f}"
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
        vs = sorted({r["V"] for r in rows if r["op"] == op and r["V"] != "0"}, key=int)
        k = next(r["k"] for r in rows if r["op"] == op)
        ax.set_title(f"{op} {p} (k={k}" + (f", V={'/'.join(vs)}" if vs else "") + ")", fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (answer positions)" if op == "score_chunks" else "B*k")
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
    for group in groups(args.quick):
        for r in harness.run_group("bench_ensemble", group):
            rows.append(r)
            print(f"{r['op']:16s} {r['impl']:6s} {r['pass']:6s} N={r['N']!s:>6} d={r['d']!s:>4} V={r['V']!s:>6} "
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
