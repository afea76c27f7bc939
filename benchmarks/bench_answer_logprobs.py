"""Benchmark of radit_fast.ops.answer_logprobs against its baselines (a script, not a test).

    .venv/bin/python benchmarks/bench_answer_logprobs.py            # N=4096, d=576, V=49152 (SmolLM2-135M head)
    .venv/bin/python benchmarks/bench_answer_logprobs.py --quick    # small shapes, a smoke run
    flock /tmp/radit-bench.lock .venv/bin/python benchmarks/bench_answer_logprobs.py   # shared machines

Implementations (``impl`` column):
  naive            log_softmax(h @ W.T, -1).gather(t) in the input dtype, torch autograd (N x V logits)
  torch            radit's chunked torch reference (impl="torch", float32 blocks)
  cpu | triton | cuda   radit's fused backends
  torch.mm         the bare product(s) in one call: fwd h @ W.T; fwdbwd also dZ @ W and dZ^T @ H (N x V output)
  torch.mm-blocked the GEMMs of the blocked scheme alone, into one reused block buffer: fwd 1 product,
                   fwdbwd 4 (forward, recompute, two gradients); the floor of the fused design
  cce | liger      cut-cross-entropy / Liger-Kernel on GPU when importable
GFLOP/s counts useful work: 2 N d V forward, 6 N d V forward + backward (the recompute is not counted).
Peak extra memory: see benchmarks/harness.py (RSS high-water mark on CPU, in a fresh process per case); it
includes the outputs (the gradients of hidden and weight for fwdbwd).
Times: the implementations of one (dtype, pass) run round-robin in one process (harness.run_group), so a
change of load on a shared machine hits all of them alike; ratios between rows of a group are fair.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

OP = "answer_logprobs"
# The files whose edits make the "commit" column "-dirty" (not other engineers' work in progress).
harness.DIRTY_PATHS = ["benchmarks/harness.py", "benchmarks/bench_answer_logprobs.py", "radit_fast/ops/answer_logprobs.py",
                       "csrc/answer_logprobs", "csrc/common", "csrc/bindings.cpp"]
RESULTS = Path(__file__).resolve().parent / "results"
FULL = (4096, 576, 49152)
QUICK = (512, 128, 8192)


def _inputs(case: harness.Case):
    torch.manual_seed(0)
    dtype = getattr(torch, case.dtype)
    dev = torch.device(case.device)
    hidden = torch.randn(case.N, case.d, device=dev).to(dtype)
    weight = (torch.randn(case.V, case.d, device=dev) * case.d**-0.5).to(dtype)
    targets = torch.randint(0, case.V, (case.N,), device=dev)
    return hidden, weight, targets


def _blocked_mm(hidden, weight, fwdbwd: bool):
    """The GEMMs of the fused cpu scheme without its epilogues (same block sizes, reused buffers)."""
    al = importlib.import_module("radit_fast.ops.answer_logprobs")
    n, d = hidden.shape
    v = weight.shape[0]
    rows, cols = al._cpu_blocks(n, v, hidden.element_size())

    def run():  # allocates its buffers and outputs per call, like the fused op
        buf = torch.empty(rows * cols, dtype=hidden.dtype, device=hidden.device)
        gh = torch.zeros(n, d, dtype=hidden.dtype, device=hidden.device) if fwdbwd else None
        gw = torch.empty_like(weight) if fwdbwd else None
        for v0 in range(0, v, cols):
            c = min(cols, v - v0)
            wb = weight[v0:v0 + c]
            for r0 in range(0, n, rows):
                rr = min(rows, n - r0)
                z = buf[:rr * c].view(rr, c)
                torch.mm(hidden[r0:r0 + rr], wb.T, out=z)
                if fwdbwd:
                    torch.mm(hidden[r0:r0 + rr], wb.T, out=z)
                    gh[r0:r0 + rr].addmm_(z, wb)
                    torch.mm(z.T, hidden[r0:r0 + rr], out=gw[v0:v0 + c])
        return buf, gh, gw

    return run


def setup(case: harness.Case):
    """The function that runs one call of ``case`` (called in the harness's subprocess)."""
    hidden, weight, targets = _inputs(case)
    fwdbwd = case.pass_ == "fwdbwd"
    if case.impl == "torch.mm-blocked":
        return _blocked_mm(hidden, weight, fwdbwd)
    if case.impl == "torch.mm":
        if not fwdbwd:
            return lambda: hidden @ weight.T

        def mm3():
            z = hidden @ weight.T
            return z @ weight, z.T @ hidden
        return mm3

    from radit_fast.ops.answer_logprobs import answer_logprobs, naive_answer_logprobs
    if case.impl == "naive":
        fn = lambda h, w: naive_answer_logprobs(h, w, targets)  # noqa: E731
    elif case.impl in ("torch", "cpu", "triton", "cuda"):
        fn = lambda h, w: answer_logprobs(h, w, targets, impl=case.impl)  # noqa: E731
    elif case.impl == "cce":
        from cut_cross_entropy import linear_cross_entropy
        fn = lambda h, w: -linear_cross_entropy(h, w, targets, reduction="none")  # noqa: E731
    elif case.impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        fn = lambda h, w: -liger_fused_linear_cross_entropy(h, w, targets, reduction="none")  # noqa: E731
    else:
        raise ValueError(f"unknown impl {case.impl!r}")
    if not fwdbwd:
        def fwd():
            with torch.no_grad():
                return fn(hidden, weight)
        return fwd
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()

    def fwd_bwd():  # the gradients are handed out and dropped, so each call's peak memory includes them
        fn(h, w).sum().backward()
        grads = h.grad, w.grad
        h.grad = w.grad = None
        return grads
    return fwd_bwd


def _available_gpu_impls() -> list[str]:
    out = []
    for impl, mod in (("cce", "cut_cross_entropy"), ("liger", "liger_kernel")):
        try:
            importlib.import_module(mod)
            out.append(impl)
        except ImportError:
            pass
    return out


def summarize(rows: list[dict]) -> str:
    """Ratios of the fused backend against the naive expression and torch.mm, per (dtype, pass)."""
    lines = []
    fused = [r for r in rows if r["impl"] in ("cpu", "cuda", "triton")]
    for r in fused:
        def get(impl, key):
            m = [x for x in rows if x["impl"] == impl and (x["dtype"], x["pass"]) == (r["dtype"], r["pass"])]
            return float(m[0][key]) if m else float("nan")
        t, mem, gf = float(r["median_s"]), float(r["peak_extra_MB"]), float(r["gflops"])
        lines.append(
            f"{r['impl']:>6} {r['dtype']:>8} {r['pass']:>6}: {t:.3f} s (spread {r['spread']}), "
            f"time/naive {t / get('naive', 'median_s'):.2f}, extra memory {mem:.0f} MB = "
            f"1/{get('naive', 'peak_extra_MB') / max(mem, 1e-9):.1f} of naive, {gf:.0f} GFLOP/s = "
            f"{gf / get('torch.mm', 'gflops'):.0%} of torch.mm, {gf / get('torch.mm-blocked', 'gflops'):.0%} "
            f"of torch.mm-blocked")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small shapes {QUICK} (default {FULL})")
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "d", "V"), help="override the shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"])
    p.add_argument("--impls", nargs="+", help="default: naive torch torch.mm torch.mm-blocked + the fused backend(s)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/answer_logprobs_<device>.csv; "
                                            "--quick: a temporary folder)")
    args = p.parse_args(argv)
    n, d, v = args.shape or (QUICK if args.quick else FULL)
    on_gpu = args.device.startswith("cuda")
    impls = args.impls or (["naive", "torch", "torch.mm"] + (["triton", "cuda"] + _available_gpu_impls() if on_gpu
                                                             else ["torch.mm-blocked", "cpu"]))
    out = args.out or (Path(tempfile.mkdtemp()) / f"{OP}_{args.device}.csv" if args.quick
                       else RESULTS / f"{OP}_{args.device.split(':')[0]}.csv")
    print(f"{OP}: N={n} d={d} V={v} on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; writing {out}", flush=True)
    rows = []
    for pass_ in args.passes:
        for dtype in args.dtypes:
            cases = [harness.Case(OP, impl, args.device, dtype, n, d, v, pass_,
                                  flops=(2 if pass_ == "fwd" else 6) * n * d * v, repeat=args.repeat)
                     for impl in impls]
            for row in harness.run_group("bench_answer_logprobs", cases):
                rows.append(row)
                print(f"  {row['impl']:>16} {dtype:>8} {pass_:>6}: {row['median_s']:>9} s  spread {row['spread']}  "
                      f"peak +{row['peak_extra_MB']:>7} MB  {row['gflops']:>7} GFLOP/s", flush=True)
            harness.write_csv(out, rows)
    harness.plot(out, out.with_suffix(".png"), f"{OP} on {args.device}")
    print(summarize(rows))


if __name__ == "__main__":
    main()
