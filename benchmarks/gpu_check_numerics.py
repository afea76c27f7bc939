"""Numerical stages of ``make gpu-check`` (benchmarks/gpu_check.py): correctness at LLM scale, probes, and the
small all-kernels script that compute-sanitizer runs. Uses only radit_fast's public ops.

References (independent of the library):
  * ``reference_f64``: the closed form in float64, chunked over rows. For row n with logits
    z_n = h_n W^T + b, tok_n = z_{n,t_n} - logsumexp(z_n) (0 where t_n == ignore_index); for an upstream
    gradient g, dz_n = g_n (onehot(t_n) - softmax(z_n)), grad_hidden = dz W, grad_weight = dz^T H,
    grad_bias = sum_n dz_n.
  * ``answer_logprobs_torch`` (the library's chunked float32 reference), on every row, as a second opinion.
Gradients at LLM scale are checked with an upstream gradient that is non-zero on a subset of rows only: the
float64 reference then needs only those rows, the kernels still run every row, and every other row's
hidden gradient must be exactly zero.

Bounds (``BOUNDS``, ``value_bound``): the GPU kernels accumulate in float32, so values must be within 2e-5
relative L2 of float64 whatever the input dtype (impl="cpu", in the CPU dry run on a CPU without AVX512-BF16 or AVX2, rounds bf16 logits: 2e-3);
gradients come back in the input dtype, so bfloat16 gradients carry bf16 rounding
(about 2^-9 relative): bound max(4e-3, 1.5 x the naive bfloat16 expression's own error).
Every check returns rows ``{"check", "case", "impl", "metric", "value", "bound", "status", "note"}``.
"""
from __future__ import annotations

import json
import math
import time

import torch

from radit_fast.ops import (answer_logprobs, answer_logprobs_per_sequence, lsr_loss, mixture_logprobs,
                            replug_logprob)
from radit_fast.ops.answer_logprobs import naive_answer_logprobs, answer_logprobs_torch
from radit_fast.ops import _answer_logprobs_blocked as blocked

IGNORE = -100
# (values bound, gradient floor) per input dtype; see the module doc.
BOUNDS = {torch.bfloat16: (2e-5, 4e-3), torch.float32: (2e-5, 1e-4)}
# LLM-scale cases: (name, N, d, V, dtype, bias, row subset for the float64 gradients or None = all rows).
GPU_CASES = [("llm-bf16", 8192, 4096, 128256, torch.bfloat16, False, 256),
             ("ragged-bias-bf16", 3001, 1000, 50257, torch.bfloat16, True, None),
             ("llm-fp32", 2048, 4096, 128256, torch.float32, False, 256)]
DRY_CASES = [("llm-bf16", 96, 32, 1000, torch.bfloat16, False, 16),
             ("ragged-bias-bf16", 61, 24, 517, torch.bfloat16, True, None),
             ("llm-fp32", 64, 32, 1000, torch.float32, False, 16)]
BIG_ROWS = 70001  # > 65535: the CUDA grid's y/z limit (the CPU dry run uses DRY_BIG_ROWS)
DRY_BIG_ROWS = 1000


def value_bound(impl: str, device, dtype: torch.dtype) -> float:
    """Bound on the values' relative error: float32-accurate backends 2e-5; impl="cpu" (and "auto" on CPU)
    on CPUs without AVX512-BF16 or AVX2 rounds bfloat16 logit blocks to bfloat16 before its float32 epilogue
    (radit_fast.ops.answer_logprobs, module doc, "Precision"), so bfloat16 inputs there get the bf16 rounding
    level 2^-9 ~ 2e-3."""
    on_cpu = impl == "cpu" or (impl == "auto" and torch.device(device).type == "cpu")
    rounds = on_cpu and blocked.block_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    return 2e-3 if rounds and dtype == torch.bfloat16 else BOUNDS[dtype][0]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (inf when x has a NaN or an infinity where ref is finite)."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def row(check, case, impl, metric, value, bound=None, ok=None, note=""):
    """One result row; status from ``ok`` when given, else value <= bound."""
    if ok is None:
        ok = value <= bound
    return {"check": check, "case": case, "impl": impl, "metric": metric, "value": value, "bound": bound,
            "status": "ok" if ok else "FAILED", "note": note}


def error_row(check, case, impl, exc: BaseException):
    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
    return {"check": check, "case": case, "impl": impl, "metric": "error", "value": None, "bound": None,
            "status": "FAILED", "note": f"{type(exc).__name__}: {msg}"}


class RowLog(list):
    """A list of result rows that also appends each row as a JSON line to ``path`` (when given), so that rows
    finished before a stage is killed at its timeout still reach the report."""

    def __init__(self, path=None):
        super().__init__()
        self.path = path

    def append(self, r):
        super().append(r)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")

    def extend(self, rs):
        for r in rs:
            self.append(r)
        return self

    __iadd__ = extend


def reference_f64(hidden, weight, targets, bias=None, grad=None, ignore_index=IGNORE, max_bytes=1 << 30):
    """(tok [N], grad_hidden [N, d] | None, grad_weight [V, d] | None, grad_bias [V] | None) in float64.

    The closed form of the module doc, chunked over rows so that one float64 logit block stays under
    ``max_bytes``. ``grad`` is the upstream gradient [N] of the per-row log-probabilities (None: values only)."""
    n, v = hidden.shape[0], weight.shape[0]
    w = weight.double()
    b = None if bias is None else bias.double()
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0).long()
    tok = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    gh = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device) if grad is not None else None
    gw = torch.zeros(w.shape, dtype=torch.float64, device=hidden.device) if grad is not None else None
    gb = torch.zeros(v, dtype=torch.float64, device=hidden.device) if grad is not None and bias is not None else None
    rows = max(1, min(n, max_bytes // (8 * v)))
    for r0 in range(0, n, rows):
        h = hidden[r0:r0 + rows].double()
        z = h @ w.T
        if b is not None:
            z += b
        lse = torch.logsumexp(z, 1)
        tr, vr = t[r0:r0 + rows], valid[r0:r0 + rows]
        tok[r0:r0 + rows] = torch.where(vr, z.gather(1, tr[:, None])[:, 0] - lse, 0.0)
        if grad is None:
            continue
        g = torch.where(vr, grad[r0:r0 + rows].double(), 0.0)
        dz = torch.exp(z - lse[:, None]).mul_(-g[:, None])
        dz[torch.arange(dz.shape[0], device=dz.device), tr] += g
        gh[r0:r0 + rows] = dz @ w
        gw += dz.T @ h
        if gb is not None:
            gb += dz.sum(0)
        del z, dz
    return tok, gh, gw, gb


def _inputs(n, d, v, dtype, device, bias, seed):
    """Random inputs drawn on ``device`` (a [128256, 4096] weight drawn on the CPU would take seconds)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, generator=gen, device=device).to(dtype)
    w = (torch.randn(v, d, generator=gen, device=device) * (2 * d ** -0.5)).to(dtype)  # logits of std ~2
    b = torch.randn(v, generator=gen, device=device).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=gen, device=device)
    t[3::7] = IGNORE
    t[-1] = v - 1  # the last vocabulary entry and the last row
    return h, w, b, t


def _subset(n: int, size: int | None, device) -> torch.Tensor:
    """Evenly spaced rows including the first and the last few (large row offsets); all rows for None."""
    if size is None or size >= n:
        return torch.arange(n, device=device)
    idx = torch.cat([torch.linspace(0, n - 1, size - 4).round().long(), torch.arange(n - 4, n)])
    return torch.unique(idx).to(device)


def _run_op(impl, h, w, b, t, g, seg=None):
    """Values and gradients of the op for upstream gradient g [N] (or [S] with seg = cu_seqlens).

    The inputs go in as given (``detach`` keeps their strides; a clone could make them contiguous)."""
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    bb = None if b is None else b.detach().requires_grad_()
    if seg is None:
        out = answer_logprobs(hh, ww, t, bias=bb, impl=impl)
    else:
        out = answer_logprobs_per_sequence(hh, ww, t, cu_seqlens=seg, bias=bb, impl=impl)
    (out * g).sum().backward()
    return out.detach(), hh.grad, ww.grad, None if bb is None else bb.grad


def correctness(device: str, impls: list[str], dry: bool, log_path=None) -> list[dict]:
    """Values and gradients of answer_logprobs (and per_sequence on the ragged case) against float64."""
    rows = RowLog(log_path)
    for case, n, d, v, dtype, bias, sub in (DRY_CASES if dry else GPU_CASES):
        t0 = time.perf_counter()
        h, w, b, t = _inputs(n, d, v, dtype, device, bias, seed=n)
        gfloor = BOUNDS[dtype][1]
        idx = _subset(n, sub, device)
        gen = torch.Generator(device="cpu").manual_seed(1)
        g = torch.zeros(n, device=device)
        g[idx] = torch.randn(idx.shape[0], generator=gen).to(device)
        ref_tok, ref_gh, ref_gw, ref_gb = reference_f64(h[idx], w, t[idx], b, g[idx])
        # The references' own agreement, and PyTorch's own error in this dtype (the naive expression).
        lib64 = answer_logprobs_torch(h[idx].double(), w.double(), t[idx],
                                      bias=None if b is None else b.double())
        rows.append(row("correctness", case, "ref", "f64 closed form vs answer_logprobs_torch f64",
                        rel_err(lib64, ref_tok), 1e-12))
        ref32 = answer_logprobs_torch(h, w, t, bias=b)  # float32 chunked, every row
        rows.append(row("correctness", case, "ref", "answer_logprobs_torch f32 vs f64 (subset)",
                        rel_err(ref32[idx], ref_tok), BOUNDS[dtype][0]))
        nv, ngh, ngw, ngb = _naive_grads(h[idx], w, b, t[idx], g[idx])
        naive = {"grad_hidden": rel_err(ngh, ref_gh), "grad_weight": rel_err(ngw, ref_gw)}
        if b is not None:
            naive["grad_bias"] = rel_err(ngb, ref_gb)
        rows.append(row("correctness", case, "naive", "values vs f64", rel_err(nv, ref_tok), math.inf,
                        note="PyTorch's own error in this dtype (context)"))
        for k, e in naive.items():
            rows.append(row("correctness", case, "naive", f"{k} vs f64", e, math.inf, note="context"))
        for impl in impls:
            try:
                vb = value_bound(impl, device, dtype)
                tok, gh, gw, gb = _run_op(impl, h, w, b, t, g)
                rows.append(row("correctness", case, impl, "values vs f64 (subset)", rel_err(tok[idx], ref_tok), vb))
                rows.append(row("correctness", case, impl, "values vs torch f32 (all rows)", rel_err(tok, ref32), vb))
                outside = torch.ones(n, dtype=torch.bool, device=device)
                outside[idx] = False
                rows.append(row("correctness", case, impl, "grad_hidden == 0 where g == 0",
                                float((gh[outside] != 0).sum()), ok=not bool((gh[outside] != 0).any())))
                for name, got, ref in (("grad_hidden", gh[idx], ref_gh), ("grad_weight", gw, ref_gw),
                                       ("grad_bias", gb, ref_gb)):
                    if ref is None:
                        continue
                    bound = gfloor if dtype == torch.float32 else max(gfloor, 1.5 * naive[name])
                    rows.append(row("correctness", case, impl, f"{name} vs f64", rel_err(got, ref), bound))
                if b is not None:  # ragged sequences, an empty one among them, through answer_logprobs_per_sequence
                    cu = torch.tensor([0, 1, 1, n // 3, n // 2 + 1, n - 5, n], device=device)
                    gs = torch.randn(cu.shape[0] - 1, generator=gen).to(device)
                    seq, sgh, sgw, sgb = _run_op(impl, h, w, b, t, gs, seg=cu)
                    seg_of_row = torch.searchsorted(cu[1:], torch.arange(n, device=device), right=True)
                    rt, rgh, rgw, rgb = reference_f64(h, w, t, b, gs[seg_of_row])
                    ref_seq = torch.zeros(cu.shape[0] - 1, dtype=torch.float64, device=device)
                    ref_seq.index_add_(0, seg_of_row, rt)
                    rows.append(row("correctness", case, impl, "per_sequence values vs f64", rel_err(seq, ref_seq), vb))
                    for name, got, ref in (("grad_hidden", sgh, rgh), ("grad_weight", sgw, rgw),
                                           ("grad_bias", sgb, rgb)):
                        rows.append(row("correctness", case, impl, f"per_sequence {name} vs f64", rel_err(got, ref),
                                        max(gfloor, 1.5 * naive[name])))
            except Exception as exc:  # noqa: BLE001 - reported, the next impl still runs
                rows.append(error_row("correctness", case, impl, exc))
                if not cuda_alive(device):
                    rows.append(_context_lost("correctness", case, impl))
                    return rows
        rows.append(row("correctness", case, "-", "seconds", time.perf_counter() - t0, ok=True,
                        note=f"N={n} d={d} V={v} {str(dtype).replace('torch.', '')} bias={bias}"))
        del h, w, b, t, ref_gw
        _empty_cache(device)
    return rows


def _naive_grads(h, w, b, t, g):
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    bb = None if b is None else b.detach().requires_grad_()
    out = naive_answer_logprobs(hh, ww, t, bias=bb)
    (out * g).sum().backward()
    return out.detach(), hh.grad, ww.grad, None if bb is None else bb.grad


def cuda_alive(device) -> bool:
    """False after a sticky CUDA error (e.g. an illegal memory access): every later call in this process fails."""
    if torch.device(device).type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def _context_lost(check, case, impl):
    return row(check, case, impl, "CUDA context lost: the stage's later checks were not run", 1.0, ok=False,
               note="a sticky CUDA error (e.g. an illegal memory access) during this impl")


def _empty_cache(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------
def probes(device: str, impls: list[str], dry: bool, log_path=None) -> list[dict]:
    """Side stream, strided/transposed inputs, > 65535 rows for the ensemble ops, bitwise determinism, a
    non-current device. Each probe and impl is reported on its own; one failing does not stop the others."""
    n, d, v = (48, 24, 301) if dry else (2048, 1024, 32000)
    rows = RowLog(log_path)
    h, w, b, t = _inputs(n, d, v, torch.bfloat16, device, True, seed=7)
    g = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(device)
    ref = reference_f64(h, w, t, b, g)
    gfloor = BOUNDS[torch.bfloat16][1]
    for impl in impls:
        vb = value_bound(impl, device, torch.bfloat16)
        for name, fn in (("side_stream", _probe_side_stream), ("strided", _probe_strided),
                         ("determinism", _probe_determinism), ("other_device", _probe_other_device)):
            try:
                rows += fn(impl, h, w, b, t, g, ref, vb, gfloor)
            except Exception as exc:  # noqa: BLE001
                rows.append(error_row(name, f"N={n} d={d} V={v}", impl, exc))
            if not cuda_alive(device):
                rows.append(_context_lost(name, f"N={n} d={d} V={v}", impl))
                return rows
        try:
            rows += _probe_big_rows(impl, device, DRY_BIG_ROWS if dry else BIG_ROWS)
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row("big_rows", f"B={BIG_ROWS}", impl, exc))
        if not cuda_alive(device):
            rows.append(_context_lost("big_rows", f"B={BIG_ROWS}", impl))
            return rows
    return rows


def _check_all(check, case, impl, got, ref, vb, gfloor):
    out = [row(check, case, impl, "values vs f64", rel_err(got[0], ref[0]), vb)]
    for name, x, r in zip(("grad_hidden", "grad_weight", "grad_bias"), got[1:], ref[1:]):
        out.append(row(check, case, impl, f"{name} vs f64", rel_err(x, r), gfloor * 2))
    return out


def _probe_side_stream(impl, h, w, b, t, g, ref, vb, gfloor):
    if h.device.type != "cuda":
        return [row("side_stream", "-", impl, "skipped", 0, ok=True, note="needs CUDA tensors")]
    base = _run_op(impl, h, w, b, t, g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # delays the side stream: an op launched on another stream reads too early
        h2, w2, b2, t2, g2 = h.clone(), w.clone(), b.clone(), t.clone(), g.clone()
        got = _run_op(impl, h2, w2, b2, t2, g2)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    out = _check_all("side_stream", "side stream after a 50M-cycle sleep", impl, got, ref, vb, gfloor)
    same = all(torch.equal(x, y) for x, y in zip(base, got))
    out.append(row("side_stream", "side stream", impl, "bitwise equal to the default stream", float(same),
                   ok=True, note="informational (see determinism)"))
    return out


def _probe_strided(impl, h, w, b, t, g, ref, vb, gfloor):
    n, d = h.shape
    v = w.shape[0]
    wide_h = torch.zeros(n, 2 * d, dtype=h.dtype, device=h.device)
    wide_h[:, 1:d + 1] = h
    wide_w = torch.zeros(v, d + 8, dtype=w.dtype, device=w.device)
    wide_w[:, :d] = w
    t2 = torch.stack([t, torch.zeros_like(t)], 1).reshape(-1)[::2]
    b2 = torch.stack([b, torch.zeros_like(b)], 1).reshape(-1)[::2]
    variants = {
        "hidden column slice (row stride 2d)": (wide_h[:, 1:d + 1], w, b, t),
        "hidden transposed storage": (h.T.contiguous().T, w, b, t),
        "weight transposed storage": (h, w.T.contiguous().T, b, t),
        "weight row stride d+8": (h, wide_w[:, :d], b, t),
        "targets and bias stride 2": (h, w, b2, t2),
    }
    out = []
    for name, (hh, ww, bb, tt) in variants.items():
        try:
            got = _run_op(impl, hh, ww, bb, tt, g)
            out += _check_all("strided", name, impl, got, ref, vb, gfloor)
        except Exception as exc:  # noqa: BLE001
            out.append(error_row("strided", name, impl, exc))
    return out


def _probe_determinism(impl, h, w, b, t, g, ref, vb, gfloor):
    first = _run_op(impl, h, w, b, t, g)
    second = _run_op(impl, h, w, b, t, g)
    return [row("determinism", "two runs", impl, f"{name} bitwise equal", float(torch.equal(x, y)),
                ok=bool(torch.equal(x, y)))
            for name, x, y in zip(("values", "grad_hidden", "grad_weight", "grad_bias"), first, second)]


def _probe_other_device(impl, h, w, b, t, g, ref, vb, gfloor):
    if h.device.type != "cuda" or torch.cuda.device_count() < 2:
        return [row("other_device", "-", impl, "skipped", 0, ok=True, note="needs 2 GPUs")]
    with torch.cuda.device(0):
        moved = [x.to("cuda:1") for x in (h, w, b, t, g)]
        got = _run_op(impl, *moved)
        torch.cuda.synchronize(1)
    got = tuple(x.to(h.device) for x in got)
    return _check_all("other_device", "tensors on cuda:1, cuda:0 current", impl, got, ref, vb, gfloor)


def _probe_big_rows(impl, device, B, k=8, V=16):
    """replug_logprob, lsr_loss and mixture_logprobs with B > 65535 rows against their float64 torch path."""
    gen = torch.Generator().manual_seed(11)
    lm = (torch.randn(B, k, generator=gen) * 3 - 10).to(device)
    s = torch.randn(B, k, generator=gen).to(device)
    mask = torch.rand(B, k, generator=gen) > 0.2
    mask[:, 0] = True
    mask = mask.to(device)
    logits = torch.randn(B, k, V, generator=gen).to(device)
    lw = torch.log_softmax(torch.randn(B, k, generator=gen), -1).to(device)
    gl = torch.randn(B, generator=gen).to(device)
    gm = torch.randn(B, V, generator=gen).to(device)
    tail = slice(65535, B)
    cases = {  # op: (function, inputs, which inputs are differentiated, upstream gradient)
        "replug_logprob": (lambda x, y, im: replug_logprob(x, y, temperature=0.7, mask=mask, impl=im), (lm, s),
                           (True, True), gl),
        "lsr_loss": (lambda x, y, im: lsr_loss(x, y, lm_temperature=0.1, mask=mask, reduction="none", impl=im),
                     (s, lm), (True, False), gl),
        "lsr_loss retriever_to_lsr": (lambda x, y, im: lsr_loss(x, y, lm_temperature=0.1, mask=mask, reduction="none",
                                                                direction="retriever_to_lsr", impl=im),
                                      (s, lm), (True, False), gl),
        "mixture_logprobs": (lambda x, y, im: mixture_logprobs(x, y, impl=im), (logits, lw), (True, True), gm),
    }
    out = []
    for op, (fn, args, diff, up) in cases.items():
        try:
            got = [a.detach().clone().requires_grad_(r) for a, r in zip(args, diff)]
            res = fn(*got, impl)
            (res * up).sum().backward()
            ref_in = [a.detach().double().requires_grad_(r) for a, r in zip(args, diff)]
            ref = fn(*ref_in, "torch")
            (ref * up.double()).sum().backward()
            case = f"{op} B={B} k={k}" + (f" V={V}" if op == "mixture_logprobs" else "")
            out.append(row("big_rows", case, impl, "values vs f64", rel_err(res, ref), 2e-5))
            if B > 65535:
                out.append(row("big_rows", case, impl, "values of rows >= 65535 vs f64",
                               rel_err(res[tail], ref[tail]), 2e-5))
            for i, (x, r) in enumerate(zip(got, ref_in)):
                if r.requires_grad:
                    gx = x.grad if x.grad is not None else torch.zeros_like(r.grad)
                    out.append(row("big_rows", case, impl, f"grad of input {i} vs f64", rel_err(gx, r.grad), 2e-5))
        except Exception as exc:  # noqa: BLE001
            out.append(error_row("big_rows", f"{op} B={B}", impl, exc))
    return out


# ---------------------------------------------------------------------------------------------------------
# Every kernel once, at small ragged shapes (what compute-sanitizer runs)
# ---------------------------------------------------------------------------------------------------------
def exercise_kernels(device: str, impls: list[str]) -> list[dict]:
    """Each op forward and backward once per impl at tiny ragged shapes, loosely checked against float64."""
    rows = []
    h, w, b, t = _inputs(70, 72, 300, torch.bfloat16, device, True, seed=5)
    g = torch.randn(70, generator=torch.Generator().manual_seed(2)).to(device)
    ref = reference_f64(h, w, t, b, g)
    for impl in impls:
        try:
            rows += _check_all("exercise", "answer_logprobs", impl, _run_op(impl, h, w, b, t, g), ref,
                               value_bound(impl, device, torch.bfloat16), 1e-2)
            cu = torch.tensor([0, 5, 5, 70], device=device)
            seq = _run_op(impl, h, w, b, t, torch.ones(3, device=device), seg=cu)[0]
            ref_seq = torch.stack([ref[0][0:5].sum(), ref[0][5:5].sum(), ref[0][5:70].sum()])
            rows.append(row("exercise", "answer_logprobs_per_sequence", impl, "values vs f64",
                            rel_err(seq, ref_seq), value_bound(impl, device, torch.bfloat16)))
            fp32 = [x.float() for x in (h, w, b)]
            rows += _check_all("exercise", "answer_logprobs fp32", impl, _run_op(impl, *fp32, t, g), ref, 2e-5, 1e-4)
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row("exercise", "answer_logprobs", impl, exc))
        try:
            rows += _probe_big_rows(impl, device, 37, k=5, V=33)
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row("exercise", "ensemble ops", impl, exc))
    return rows
