"""GPU benchmark of answer_logprobs at an LLM-scale LM head against its peers, in one run (a script, not a test).

    python3 benchmarks/bench_answer_logprobs_gpu.py                      # N=8192 d=4096 V=128256 bf16
    python3 benchmarks/bench_answer_logprobs_gpu.py --shape 2048 1024 32000 --repeat 3 --out /tmp/b.csv
    RADIT_GPU_CHECK_DRY_RUN=1 .venv/bin/python benchmarks/bench_answer_logprobs_gpu.py --out /tmp/b.csv  # CPU

Rows (``impl``), each for the forward pass (``fwd``, under no_grad) and forward + backward (``fwdbwd``: the
per-token result summed, then backward; hidden and weight gradients):
  torch.mm     the same products as bare matmuls: fwd h @ W^T; fwdbwd also dZ @ W and dZ^T @ H (the
               3-product floor of any scheme that forms the gradients)
  naive        log_softmax(h @ W^T).gather(t) in the input dtype (N x V logits)
  torch.lce    torch.nn.functional.linear_cross_entropy(h, W, y, reduction="none",
               options=torch.nn.LinearCrossEntropyOptions()) when the running torch has it (else a row saying so)
  cce          cut-cross-entropy linear_cross_entropy(..., reduction="none", impl="cce") (its default filter_eps)
  liger        Liger-Kernel liger_fused_linear_cross_entropy(..., reduction="none");
  liger-sum    the same with reduction="sum" (its gradients are formed in the forward pass)
  cuda | triton | auto   radit_fast.ops.answer_logprobs(h, W, y, impl=...)
  radit-sum    answer_logprobs(h, W, y, reduction="sum") (gradients formed in the forward pass), when the
               running code has ``reduction`` (else a row saying so)
Each group of rows runs in its own process with a timeout (one peer crashing or hanging costs only its rows);
timing and peak memory follow benchmarks/harness.py's ``measure`` (one warm-up, one call for the peak of
torch.cuda.max_memory_allocated over what was allocated before it, then ``repeat`` synchronised calls;
median and spread = (max - min) / median). Useful work: 2 N d V FLOPs forward, 6 N d V forward + backward;
``pct_of_mm`` = torch.mm's time for the same pass / this time. Errors against float64 on a row subset: the
run is repeated with every other row's target ignored (-100), the value (per-row log-probabilities, or the
sum) and the hidden/weight gradients compared with the closed form of gpu_check_numerics.reference_f64.
Output: CSV (harness columns + tflops, pct_of_mm, errors, status, note), a PNG rendered from the CSV, and a
text table on stdout. The commit, card and torch/triton versions are in every row.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_report as report  # noqa: E402
import harness  # noqa: E402

SHAPE = (8192, 4096, 128256)  # Llama-3-8B head: d 4096, vocabulary 128256
DRY_SHAPE = (96, 32, 1000)
OUT = Path(__file__).resolve().parent / "results" / "answer_logprobs_gpu.csv"
FIELDS = harness.FIELDS + ["tflops", "pct_of_mm", "err_values", "err_grad_hidden", "err_grad_weight", "torch",
                           "triton", "status", "note"]
# Process groups, in order: the torch.mm baseline first, radit next, then the peers.
GPU_GROUPS = [["torch.mm"], ["cuda"], ["triton"], ["auto", "radit-sum"], ["cce"], ["liger", "liger-sum"],
              ["torch.lce", "naive"]]
DRY_GROUPS = [["torch.mm", "cpu", "torch", "auto", "radit-sum", "cce", "liger", "liger-sum", "torch.lce", "naive"]]
ERR_ROWS = 256
GROUP_TIMEOUT = 75.0


def unavailable(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run here (None when it can); checked without importing the peers."""
    import torch.nn.functional as F

    from radit_fast import HAS_NATIVE_CUDA
    from radit_fast.ops import answer_logprobs

    on_gpu = device.startswith("cuda")
    has_lce = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    if impl == "torch.lce" and not has_lce:
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions"
    if impl == "cce":
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut-cross-entropy not installed (put its wheel in .whl/)"
        if not on_gpu:
            return "cut-cross-entropy impl='cce' needs a GPU"
    if impl in ("liger", "liger-sum"):
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed (put its wheel in .whl/)"
        if not on_gpu:
            return "Liger-Kernel needs a GPU"
    if impl == "cuda" and not HAS_NATIVE_CUDA:
        return "radit_fast._C was not built with CUDA"
    if impl == "radit-sum" and "reduction" not in inspect.signature(answer_logprobs).parameters:
        return "this radit_fast has no answer_logprobs(..., reduction=)"
    return None


def make_fn(impl: str):
    """(f(h, W, targets) -> per-row log-probabilities [N] or their sum (a scalar), sums_rows)."""
    from radit_fast.ops import answer_logprobs
    from radit_fast.ops.answer_logprobs import naive_answer_logprobs

    if impl == "naive":
        return (lambda h, w, t: naive_answer_logprobs(h, w, t)), False
    if impl in ("cuda", "triton", "auto", "cpu", "torch"):
        return (lambda h, w, t: answer_logprobs(h, w, t, impl=impl)), False
    if impl == "radit-sum":
        return (lambda h, w, t: answer_logprobs(h, w, t, reduction="sum")), True
    if impl == "torch.lce":
        import torch.nn.functional as F

        opts = torch.nn.LinearCrossEntropyOptions()
        return (lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none", options=opts)), False
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return (lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl="cce")), False
    if impl in ("liger", "liger-sum"):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        red = "sum" if impl == "liger-sum" else "none"
        return (lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction=red)), impl == "liger-sum"
    raise ValueError(f"unknown impl {impl!r}")


def _inputs(n, d, v, dtype, device):
    """Random inputs drawn on ``device`` (never zeros: they can run faster than real data)."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, d, generator=gen, device=device) * d**-0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    return hidden, weight, targets


def timed_fn(impl: str, pass_: str, h, w, t):
    """The function harness.measure times: one call of the pass."""
    if impl == "torch.mm":
        if pass_ == "fwd":
            return lambda: h @ w.T

        def mm3():
            z = h @ w.T
            return z @ w, z.T @ h
        return mm3
    fn, _ = make_fn(impl)
    if pass_ == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(h, w, t)
        return fwd
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd_bwd():  # gradients handed out and dropped: the peak includes them
        fn(hh, ww, t).sum().backward()
        grads = hh.grad, ww.grad
        hh.grad = ww.grad = None
        return grads
    return fwd_bwd


def errors(impl: str, h, w, t, ref) -> dict:
    """Relative L2 errors against float64 with only the subset rows' targets kept (the others ignored)."""
    import gpu_check_numerics as num

    idx, ref_tok, ref_gh, ref_gw = ref
    fn, sums = make_fn(impl)
    t_err = torch.full_like(t, num.IGNORE)
    t_err[idx] = t[idx]
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(hh, ww, t_err)
    out.sum().backward()
    value = num.rel_err(out.reshape(1), ref_tok.sum().reshape(1)) if sums else num.rel_err(out[idx], ref_tok)
    return {"err_values": value, "err_grad_hidden": num.rel_err(hh.grad[idx], ref_gh),
            "err_grad_weight": num.rel_err(ww.grad, ref_gw)}


def child(impls: list[str], shape, dtype: str, device: str, repeat: int, out_json: Path) -> None:
    """Measures ``impls`` in this process; appends one JSON line per row to ``out_json`` as it goes."""
    import gpu_check_numerics as num

    n, d, v = shape
    h, w, t = _inputs(n, d, v, getattr(torch, dtype), device)
    idx = num._subset(n, ERR_ROWS, device)
    ref = None
    if any(i != "torch.mm" for i in impls):
        ref_tok, ref_gh, ref_gw, _ = num.reference_f64(h[idx], w, t[idx], None, torch.ones(idx.shape[0], device=device))
        ref = (idx, ref_tok, ref_gh, ref_gw)
    for impl in impls:
        errs = {}
        if impl != "torch.mm":
            try:
                errs = errors(impl, h, w, t, ref)
            except Exception as exc:  # noqa: BLE001 - the timing still runs; the error is noted
                errs = {"note": f"error run failed: {type(exc).__name__}: {str(exc).strip()[:200]}"}
        for pass_ in ("fwd", "fwdbwd"):
            flops = (2 if pass_ == "fwd" else 6) * n * d * v
            row = {"impl": impl, "pass": pass_, **errs}
            try:
                med, spread, peak = harness.measure(timed_fn(impl, pass_, h, w, t), device, repeat)
                row.update(median_s=med, spread=spread, peak_extra_MB=peak, flops=flops, status="ok")
            except Exception as exc:  # noqa: BLE001
                row.update(status="FAILED", note=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
            with open(out_json, "a") as f:
                f.write(json.dumps(row) + "\n")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def _card(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def finish_rows(raw: list[dict], shape, dtype: str, device: str) -> list[dict]:
    """CSV rows (FIELDS) from the children's raw rows, with TFLOP/s and the fraction of torch.mm's rate."""
    n, d, v = shape
    mm = {r["pass"]: r["median_s"] for r in raw if r["impl"] == "torch.mm" and r.get("status") == "ok"}
    common = {"op": "answer_logprobs", "device": _card(device), "dtype": dtype, "N": n, "d": d, "V": v,
              "commit": report.commit(), "torch": torch.__version__,
              "triton": report.module_version("triton")}
    rows = []
    for r in raw:
        row = {k: "" for k in FIELDS}
        row.update(common, impl=r["impl"], **{"pass": r["pass"]}, status=r.get("status", "FAILED"),
                   note=r.get("note", ""))
        if row["status"] == "ok":
            med = r["median_s"]
            row.update(median_s=f"{med:.6g}", spread=f"{r['spread']:.3f}", peak_extra_MB=f"{r['peak_extra_MB']:.1f}",
                       gflops=f"{r['flops'] / med / 1e9:.1f}", tflops=f"{r['flops'] / med / 1e12:.2f}",
                       pct_of_mm=f"{100 * mm[r['pass']] / med:.1f}" if r["pass"] in mm else "")
        for k in ("err_values", "err_grad_hidden", "err_grad_weight"):
            if k in r:
                row[k] = f"{r[k]:.3g}"
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        wr.writeheader()
        wr.writerows(rows)


def run(out: Path, dry: bool = False, shape=None, dtype: str = "bfloat16", repeat: int = 7,
        budget: float = 600.0) -> list[dict]:
    """Measures every group in its own process within ``budget`` seconds; writes CSV, PNG and prints a table."""
    device = "cpu" if dry else "cuda"
    shape = tuple(shape or (DRY_SHAPE if dry else SHAPE))
    deadline = time.monotonic() + budget
    raw: list[dict] = []
    print(f"answer_logprobs on {_card(device)}: N={shape[0]} d={shape[1]} V={shape[2]} {dtype}, "
          f"torch {torch.__version__}; writing {out}", flush=True)
    for group in (DRY_GROUPS if dry else GPU_GROUPS):
        runnable = []
        for impl in group:
            why = unavailable(impl, device)
            if why:
                raw += [{"impl": impl, "pass": p, "status": "unavailable", "note": why} for p in ("fwd", "fwdbwd")]
            else:
                runnable.append(impl)
        if not runnable:
            continue
        left = deadline - time.monotonic()
        if left < 5:
            raw += [{"impl": i, "pass": p, "status": "skipped", "note": "no time left in the budget"}
                    for i in runnable for p in ("fwd", "fwdbwd")]
            continue
        raw += _run_group(runnable, shape, dtype, device, repeat, min(GROUP_TIMEOUT * len(runnable), left))
        write_csv(out, finish_rows(raw, shape, dtype, device))
    rows = finish_rows(raw, shape, dtype, device)
    write_csv(out, rows)
    report.plot_bench(out, out.with_suffix(".png"))
    print(report.bench_table(rows), flush=True)
    return rows


def _run_group(impls, shape, dtype, device, repeat, timeout) -> list[dict]:
    out_json = Path(os.environ.get("TMPDIR", "/tmp")) / f"radit-bench-{os.getpid()}-{impls[0]}.jsonl"
    out_json.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", *impls, "--shape", *map(str, shape),
            "--dtype", dtype, "--device", device, "--repeat", str(repeat), "--json", str(out_json)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        why = f"exit {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        rc, why = None, f"timed out after {timeout:.0f} s"
    got = [json.loads(x) for x in out_json.read_text().splitlines()] if out_json.exists() else []
    out_json.unlink(missing_ok=True)
    done = {(r["impl"], r["pass"]) for r in got}
    missing = [{"impl": i, "pass": p, "status": "FAILED", "note": f"process {why}"}
               for i in impls for p in ("fwd", "fwdbwd") if (i, p) not in done]
    print(f"  group {' '.join(impls)}: {time.monotonic() - t0:.0f} s, {why}", flush=True)
    return got + missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "d", "V"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--budget", type=float, default=600.0, help="overall seconds")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, tuple(args.shape), args.dtype, args.device, args.repeat, args.json)
        return 0
    dry = os.environ.get("RADIT_GPU_CHECK_DRY_RUN", "") not in ("", "0")
    if not dry and not torch.cuda.is_available():
        print("bench_answer_logprobs_gpu: no CUDA GPU visible; nothing measured (run it on a GPU machine).")
        return 0
    rows = run(args.out, dry=dry, shape=args.shape, dtype=args.dtype, repeat=args.repeat, budget=args.budget)
    return 0 if all(r["status"] in ("ok", "unavailable") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
