"""Benchmark of radit_fast.ops.answer_logprobs against its baselines and peers (a script, not a test).

    .venv/bin/python benchmarks/bench_answer_logprobs.py            # N in {2048, 4096}, d=576, V=49152 (SmolLM2)
    .venv/bin/python benchmarks/bench_answer_logprobs.py --quick    # tiny shapes, 1 repeat: a smoke run
    make bench-peers; flock /tmp/radit-bench.lock .venv/bin/python benchmarks/bench_answer_logprobs.py

The quantity is the same for every implementation: log p(t_n | h_n) = z_{n,t_n} - logsumexp_v z_nv with
z = h @ W.T, per token (``fwd``), and for ``fwdbwd`` the loss S = sum_n log p(t_n | h_n) (sum of log-probs,
no shift: the rows are already the answer positions) with its gradients w.r.t. h and W. Peers that return a
cross-entropy loss (-log p) are negated, and none of them is asked to shift (cut-cross-entropy ``shift=False``,
its default), so every row computes exactly the same numbers.

Implementations (``impl`` column):
  naive            log_softmax(h @ W.T, -1).gather(t) in the input dtype, torch autograd (N x V logits)
  torch.lce        PyTorch's chunked F.linear_cross_entropy(h, W, t, reduction="none",
                   options=torch.nn.LinearCrossEntropyOptions()) (torch >= 2.13), negated
  torch.lce-ref    the same call with options=None: PyTorch's reference path (linear + cross_entropy)
  torch.lce-sum    fwdbwd only: the chunked op with reduction="sum" (it forms the gradients in its forward)
  cce              cut-cross-entropy's linear_cross_entropy(h, W, t, reduction="none"), impl="torch_compile" on
                   CPU (logits inside a compiled region), its Triton "cce" kernel on GPU; negated
  liger            GPU: Liger-Kernel's fused linear cross-entropy (reduction="none"), negated
  torch            radit's chunked torch reference (impl="torch", float32 blocks)
  cpu | triton | cuda   radit's fused backends, answer_logprobs(..., reduction="none") (per-token output)
  cpu-sum | ...    fwdbwd only, when answer_logprobs has ``reduction``: answer_logprobs(..., reduction="sum"),
                   which forms the gradient blocks in the forward pass (3 GEMMs instead of 4)
  torch.mm         the bare product(s) in one call: fwd h @ W.T; fwdbwd also dZ @ W and dZ^T @ H (N x V output)
  torch.mm-blocked the GEMMs of radit's blocked scheme alone into one reused block buffer: fwd 1 product,
                   fwdbwd 4 (forward, recompute, two gradients); the floor of the fused design
A peer that is not installed (``make bench-peers`` installs cut-cross-entropy) is skipped with a logged line.

Columns (besides harness.FIELDS): ``threads`` (intra-op threads of the processes), ``vs_radit`` (median time /
median time of the fastest radit fused row of the same N, dtype, pass and threads: > 1 = slower than radit),
``tok_max_abs_err`` (max over tokens of |log p - float64 reference|; rows with a per-token output),
``loss_abs_err`` (fwdbwd: |S - S_float64|), ``grad_max_abs_err`` (fwdbwd: max abs error over the entries of
dS/dh and dS/dW), ``cpu_isa`` (CPU: the kernel radit's native GEMM runs for the dtype there, "avx512" or
"avx2"; "" where none runs and radit's driver uses torch.mm). The float64 reference is computed from the same (rounded) inputs upcast to float64, in row
chunks, by plain torch formulas independent of radit (``reference``), and cached per shape and dtype.
GFLOP/s counts useful work: 2 N d V forward, 6 N d V forward + backward (the recompute is not counted).
Peak extra memory: see benchmarks/harness.py (RSS high-water mark on CPU, in a fresh process per case); it
includes the outputs (the gradients of hidden and weight for fwdbwd).
Times: the implementations of one (N, dtype, pass, threads) run round-robin in one process (harness.run_group),
so a change of load on a shared machine hits all of them alike; ratios between rows of a group are fair.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

log = logging.getLogger("bench_answer_logprobs")

OP = "answer_logprobs"
# The files whose edits make the "commit" column "-dirty" (not other engineers' work in progress).
harness.DIRTY_PATHS = ["benchmarks/harness.py", "benchmarks/bench_answer_logprobs.py",
                       "radit_fast/ops/answer_logprobs.py", "radit_fast/ops/_answer_logprobs_blocked.py",
                       "radit_fast/ops/_answer_logprobs_epilogue.py", "csrc/answer_logprobs", "csrc/common", "csrc/bindings.cpp"]
RESULTS = Path(__file__).resolve().parent / "results"
D, V = 576, 49152  # SmolLM2-135M's head
FULL_TOKENS = (2048, 4096)
QUICK = (256, 64, 4096)
FIELDS = harness.FIELDS[:-1] + ["threads", "vs_radit", "tok_max_abs_err", "loss_abs_err", "grad_max_abs_err",
                                "cpu_isa", "commit"]
RADIT_FUSED = ("cpu", "triton", "cuda")
# Peers: impl -> the module that must be importable.
PEER_MODULES = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}
REF_DIR_ENV = "RADIT_BENCH_REF_DIR"  # where the float64 references are cached (set by main for its children)
REF_ROWS = 256  # rows per chunk of the float64 reference


def _inputs(case: harness.Case):
    torch.manual_seed(0)
    dtype = getattr(torch, case.dtype)
    dev = torch.device(case.device)
    hidden = torch.randn(case.N, case.d, device=dev).to(dtype)
    weight = (torch.randn(case.V, case.d, device=dev) * case.d**-0.5).to(dtype)
    targets = torch.randint(0, case.V, (case.N,), device=dev)
    return hidden, weight, targets


def has_reduction() -> bool:
    """Whether radit's answer_logprobs takes ``reduction=`` (the fused-gradient loss path)."""
    from radit_fast.ops.answer_logprobs import answer_logprobs

    return "reduction" in inspect.signature(answer_logprobs).parameters


def _blocked_mm(hidden, weight, fwdbwd: bool):
    """The GEMMs of the fused cpu scheme without its epilogues (same block sizes, reused buffers)."""
    blocked = importlib.import_module("radit_fast.ops._answer_logprobs_blocked")
    n, d = hidden.shape
    v = weight.shape[0]
    rows, cols = blocked.blocks(n, v, hidden.element_size(), hidden.device)

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


def _logprob_fn(impl: str, device: str, targets: torch.Tensor):
    """(fn(h, w), sums): fn returns the [N] log-probs, or the scalar sum of log-probs when ``sums``."""
    from radit_fast.ops.answer_logprobs import answer_logprobs, naive_answer_logprobs

    if impl == "naive":
        return (lambda h, w: naive_answer_logprobs(h, w, targets)), False
    if impl in ("torch",) + RADIT_FUSED:
        return (lambda h, w: answer_logprobs(h, w, targets, impl=impl)), False
    if impl.endswith("-sum") and impl[:-4] in RADIT_FUSED:
        return (lambda h, w: answer_logprobs(h, w, targets, impl=impl[:-4], reduction="sum")), True
    if impl.startswith("torch.lce"):
        F = torch.nn.functional
        options = None if impl == "torch.lce-ref" else torch.nn.LinearCrossEntropyOptions()
        reduction = "sum" if impl == "torch.lce-sum" else "none"
        return (lambda h, w: -F.linear_cross_entropy(h, w, targets, reduction=reduction, options=options)), \
            reduction == "sum"
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        cce_impl = "cce" if device.startswith("cuda") else "torch_compile"
        return (lambda h, w: -linear_cross_entropy(h, w, targets, reduction="none", shift=False,
                                                   impl=cce_impl)), False
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return (lambda h, w: -liger_fused_linear_cross_entropy(h, w, targets, reduction="none")), False
    raise ValueError(f"unknown impl {impl!r}")


def setup(case: harness.Case):
    """The function that runs one call of ``case`` (called in the harness's subprocess).

    fwd: returns the [N] log-probs. fwdbwd: returns (per-token log-probs or None, S, dS/dh, dS/dW)."""
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

    fn, sums = _logprob_fn(case.impl, case.device, targets)
    if not fwdbwd:
        if sums:
            raise ValueError(f"{case.impl} is a loss (fwdbwd) implementation")

        def fwd():
            with torch.no_grad():
                return fn(hidden, weight)
        return fwd
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()

    def fwd_bwd():  # the gradients are handed out and dropped, so each call's peak memory includes them
        out = fn(h, w)
        loss = out if sums else out.sum()
        loss.backward()
        grads = h.grad, w.grad
        h.grad = w.grad = None
        return (None if sums else out.detach()), loss.detach(), *grads
    return fwd_bwd


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 log-probs, their sum S and dS/dh, dS/dW by plain torch formulas, REF_ROWS rows at a time.

    dS/dz_nv = [v == t_n] - softmax(z_n)_v, so dS/dh = dZ @ W and dS/dW = dZ^T @ H."""
    h64, w64 = hidden.double(), weight.double()
    tok = torch.empty(h64.shape[0], dtype=torch.float64, device=h64.device)
    gh = torch.empty_like(h64)
    gw = torch.zeros_like(w64)
    for r0 in range(0, h64.shape[0], REF_ROWS):
        hb, tb = h64[r0:r0 + REF_ROWS], targets[r0:r0 + REF_ROWS]
        logp = torch.log_softmax(hb @ w64.T, dim=-1)
        tok[r0:r0 + REF_ROWS] = logp.gather(1, tb[:, None]).squeeze(1)
        dz = -logp.exp_()
        dz[torch.arange(len(tb), device=tb.device), tb] += 1.0
        gh[r0:r0 + REF_ROWS] = dz @ w64
        gw.addmm_(dz.T, hb)
    return {"tok": tok, "sum": tok.sum().reshape(1), "grad_hidden": gh, "grad_weight": gw}


def _cached_reference(case: harness.Case) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    hidden, weight, targets = _inputs(case)
    folder = os.environ.get(REF_DIR_ENV)
    path = Path(folder) / f"ref_{case.device.replace(':', '')}_{case.dtype}_{case.N}_{case.d}_{case.V}.safetensors" \
        if folder else None
    if path is not None and path.is_file():
        return load_file(path, device=case.device)
    ref = reference(hidden, weight, targets)
    if path is not None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in ref.items()}, tmp)
        os.replace(tmp, path)
    return ref


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max())


def extra_columns(case: harness.Case) -> dict:
    """Accuracy of one call of ``case`` against the float64 reference (run by the harness's memory process)."""
    if case.impl.startswith("torch.mm"):
        return {}
    out = setup(case)()
    ref = _cached_reference(case)
    if case.pass_ == "fwd":
        return {"tok_max_abs_err": f"{_maxabs(out, ref['tok']):.3g}"}
    tok, loss, gh, gw = out
    return {"tok_max_abs_err": "" if tok is None else f"{_maxabs(tok, ref['tok']):.3g}",
            "loss_abs_err": f"{_maxabs(loss.reshape(1), ref['sum']):.3g}",
            "grad_max_abs_err": f"{max(_maxabs(gh, ref['grad_hidden']), _maxabs(gw, ref['grad_weight'])):.3g}"}


def available(impls: list[str]) -> list[str]:
    """``impls`` without the peers that are not installed (each skipped with a logged line)."""
    out = []
    for impl in impls:
        mod = PEER_MODULES.get(impl)
        if mod is not None:
            try:
                importlib.import_module(mod)
            except ImportError as exc:
                log.warning("skipping %s: %s is not installed (%s; make bench-peers)", impl, mod, exc)
                continue
        if impl.startswith("torch.lce") and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            log.warning("skipping %s: torch %s has no F.linear_cross_entropy options (needs >= 2.13)", impl,
                        torch.__version__)
            continue
        out.append(impl)
    return out


def _available_gpu_impls() -> list[str]:
    """The GPU peers that are installed (used by bench_answer_logprobs_gpu.py)."""
    return available(["cce", "liger"])


def default_impls(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["naive", "torch.lce", "torch.lce-ref", "torch.lce-sum", "cce", "liger", "torch", "torch.mm",
                "triton", "cuda", "triton-sum", "cuda-sum"]
    return ["naive", "torch.lce", "torch.lce-ref", "torch.lce-sum", "cce", "torch", "torch.mm", "torch.mm-blocked",
            "cpu", "cpu-sum"]


def impls_for(impls: list[str], pass_: str, radit_sum: bool) -> list[str]:
    """The implementations that run in a pass: ``*-sum`` rows (loss only) in fwdbwd, radit's when it has them."""
    out = []
    for impl in impls:
        if impl.endswith("-sum"):
            if pass_ != "fwdbwd" or (impl[:-4] in RADIT_FUSED and not radit_sum):
                continue
        out.append(impl)
    return out


def add_ratios(rows: list[dict]) -> None:
    """``vs_radit`` = median / median of the fastest radit fused row of the same group (in place)."""
    def group(r):
        return r["N"], r["dtype"], r["pass"], r.get("threads", "")

    best: dict[tuple, float] = {}
    for r in rows:
        if r["impl"].removesuffix("-sum") in RADIT_FUSED:
            best[group(r)] = min(best.get(group(r), float("inf")), float(r["median_s"]))
    for r in rows:
        b = best.get(group(r))
        r["vs_radit"] = f"{float(r['median_s']) / b:.3f}" if b else ""


def summarize(rows: list[dict]) -> str:
    """Per group: radit's best time and memory against each peer's."""
    lines = []
    groups = list(dict.fromkeys((r["N"], r["dtype"], r["pass"], r.get("threads", "")) for r in rows))
    for g in groups:
        sub = [r for r in rows if (r["N"], r["dtype"], r["pass"], r.get("threads", "")) == g]
        ours = [r for r in sub if r["impl"].removesuffix("-sum") in RADIT_FUSED]
        if not ours:
            continue
        best = min(ours, key=lambda r: float(r["median_s"]))
        best_err = best.get("tok_max_abs_err") or best.get("loss_abs_err")
        peers = [r for r in sub if r["impl"] in ("naive", "cce", "liger") or r["impl"].startswith("torch.lce")]
        text = ", ".join(f"{r['impl']} {float(r['vs_radit']):.2f}x ({float(r['peak_extra_MB']):.0f} MB, "
                         f"err {r.get('tok_max_abs_err') or r.get('loss_abs_err')})" for r in peers)
        lines.append(f"N={g[0]} {g[1]} {g[2]} {g[3]} threads: {best['impl']} {float(best['median_s']):.3f} s, "
                     f"{float(best['peak_extra_MB']):.0f} MB, err {best_err}"
                     f"; speed-up of radit over {text}")
    return "\n".join(lines)


def cpu_isa(dtype: str) -> str:
    """The kernel radit's native CPU GEMM runs for dtype on this machine ('avx512', 'avx2', '' for none)."""
    from radit_fast import _native

    if _native._C is None:
        return ""
    return _native._C.answer_logprobs_gemm_cpu_isa(dtype == "bfloat16")


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny shape (N, d, V) = {QUICK}, 1 repeat, 1 thread")
    p.add_argument("--tokens", type=int, nargs="+", help=f"N values (default {FULL_TOKENS}; d={D}, V={V})")
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "d", "V"), help="one shape instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"])
    p.add_argument("--threads", type=int, nargs="+", help="intra-op thread counts on CPU (default 1 2; --quick 1)")
    p.add_argument("--impls", nargs="+", help="default: every implementation of the device (see above)")
    p.add_argument("--repeat", type=int, help="timed rounds (default 5; --quick 1)")
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/answer_logprobs_<device>.csv; "
                                            "--quick: a temporary folder)")
    args = p.parse_args(argv)
    if args.shape:
        shapes = [tuple(args.shape)]
    elif args.quick:
        shapes = [(n, QUICK[1], QUICK[2]) for n in (args.tokens or [QUICK[0]])]
    else:
        shapes = [(n, D, V) for n in (args.tokens or FULL_TOKENS)]
    on_gpu = args.device.startswith("cuda")
    threads = [0] if on_gpu else (args.threads or ([1] if args.quick else [1, 2]))
    repeat = args.repeat or (1 if args.quick else 5)
    impls = available(args.impls or default_impls(args.device))
    radit_sum = has_reduction()
    if not radit_sum:
        log.warning("radit's answer_logprobs has no reduction= yet: no *-sum rows for radit")
    out = args.out or (Path(tempfile.mkdtemp()) / f"{OP}_{args.device}.csv" if args.quick
                       else RESULTS / f"{OP}_{args.device.split(':')[0]}.csv")
    log.info("%s: shapes %s on %s, torch %s, threads %s; writing %s", OP, shapes, args.device, torch.__version__,
             threads, out)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="radit-bench-ref-") as ref_dir:
        os.environ[REF_DIR_ENV] = ref_dir
        for n, d, v in shapes:
            for pass_ in args.passes:
                for dtype in args.dtypes:
                    for t in threads:
                        cases = [harness.Case(OP, impl, args.device, dtype, n, d, v, pass_,
                                              flops=(2 if pass_ == "fwd" else 6) * n * d * v, repeat=repeat,
                                              threads=t)
                                 for impl in impls_for(impls, pass_, radit_sum)]
                        group = harness.run_group("bench_answer_logprobs", cases)
                        add_ratios(group)
                        for row in group:
                            row["cpu_isa"] = cpu_isa(dtype) if not on_gpu else ""
                            log.info("  N=%s %16s %8s %6s %s thr: %9s s  spread %s  peak +%7s MB  %7s GFLOP/s  "
                                     "x%s of radit  err tok %s loss %s grad %s", n, row["impl"], dtype, pass_, t,
                                     row["median_s"], row["spread"], row["peak_extra_MB"], row["gflops"],
                                     row["vs_radit"], row.get("tok_max_abs_err", ""), row.get("loss_abs_err", ""),
                                     row.get("grad_max_abs_err", ""))
                        rows += group
                        harness.write_csv(out, rows, FIELDS)
    if rows:
        harness.plot(out, out.with_suffix(".png"), f"{OP} on {args.device}", keys=("N", "dtype", "pass", "threads"),
                     extra_metrics=(("tok_max_abs_err", "max abs error of log p vs float64", True),
                                    ("grad_max_abs_err", "max abs error of dS/dh, dS/dW vs float64", True)))
    log.info("%s", summarize(rows))


if __name__ == "__main__":
    main()
