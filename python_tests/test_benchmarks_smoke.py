"""The benchmark scripts run (--quick, tiny shapes) and their accuracy columns are right.

The scripts are run as a user runs them (a subprocess per script, CSV into a temporary folder); their error
columns are checked against bounds, and the pieces those columns rely on (the float64 reference of
bench_answer_logprobs, the loss patch of bench_hf_step) are checked against plain PyTorch here."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_answer_logprobs  # noqa: E402
import bench_hf_step  # noqa: E402
import harness  # noqa: E402


def _run(script: str, *args: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"{script}.csv"
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == getattr(sys.modules[script], "FIELDS")
    return rows


def _one(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_reference_matches_float64_autograd():
    """bench_answer_logprobs.reference (chunked, closed-form gradients) equals float64 autograd of log_softmax."""
    torch.manual_seed(1)
    n = bench_answer_logprobs.REF_ROWS + 37  # two chunks, the second ragged
    h = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (n,))
    tok = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None]).squeeze(1)
    tok.sum().backward()
    ref = bench_answer_logprobs.reference(h.detach(), w.detach(), t)
    torch.testing.assert_close(ref["tok"], tok.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref["sum"], tok.sum().detach().reshape(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(ref["grad_hidden"], h.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref["grad_weight"], w.grad, rtol=0, atol=1e-12)


def test_head_patch_loss_and_grads_equal_unpatched():
    """The benchmark's loss patch for the peers computes HF's loss (shift, -100, mean) and its gradients.

    Checked with PyTorch's chunked op (row torch.lce); row cce-head plugs cut-cross-entropy's op into the same
    patch (not run here: its torch.compile takes minutes on a shared 2-core machine)."""
    impl = "torch.lce"
    case = harness.Case(bench_hf_step.OP, impl, "cpu", "float32", 64, 64, 4096, "labels_answer", 0.0)
    batch = bench_hf_step.make_batch(case, 2, 32)
    assert (batch["labels"][:, :16] == -100).all() and (batch["labels"][:, 16:] == batch["input_ids"][:, 16:]).all()
    ref_model = bench_hf_step.load_model(case, torch.float32)
    ref_loss, ref_grads = bench_hf_step._loss_and_grads(ref_model, batch)
    logits = ref_model(input_ids=batch["input_ids"]).logits.detach()  # plain PyTorch check of HF's own loss
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 4096), batch["labels"][:, 1:].reshape(-1))
    assert abs(ref_loss - float(plain)) < 1e-5
    model = bench_hf_step.patch(bench_hf_step.load_model(case, torch.float32), impl)
    loss, grads = bench_hf_step._loss_and_grads(model, batch)
    assert abs(loss - ref_loss) < 1e-5
    assert model(**batch).logits is None
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_bench_answer_logprobs_quick(tmp_path):
    impls = ["naive", "torch.lce", "cpu", "cpu-sum"]
    rows = _run("bench_answer_logprobs", "--dtypes", "float32", "--impls", *impls, tmp_path=tmp_path)
    radit_sum = bench_answer_logprobs.has_reduction()
    expected = {("fwd", i) for i in impls if not i.endswith("-sum")} | {("fwdbwd", i) for i in impls
                                                                         if radit_sum or i != "cpu-sum"}
    assert {(r["pass"], r["impl"]) for r in rows} == expected
    n, d, v = bench_answer_logprobs.QUICK
    for r in rows:
        assert (int(r["N"]), int(r["d"]), int(r["V"]), r["threads"]) == (n, d, v, "1")
        assert float(r["median_s"]) > 0 and float(r["peak_extra_MB"]) >= 0
        if r["tok_max_abs_err"]:  # every row but the *-sum ones has per-token log-probs
            assert float(r["tok_max_abs_err"]) < 1e-4, r
    for pass_ in ("fwd", "fwdbwd"):
        cpu = _one(rows, impl="cpu", **{"pass": pass_})
        assert float(cpu["tok_max_abs_err"]) < 1e-5  # float32 logits: ~1e-6 against float64
        assert float(cpu["vs_radit"]) >= 1.0 and min(float(r["vs_radit"]) for r in rows if r["pass"] == pass_
                                                      and r["impl"] in ("cpu", "cpu-sum")) == 1.0
    for r in (r for r in rows if r["pass"] == "fwdbwd"):
        assert float(r["grad_max_abs_err"]) < 1e-5, r
        assert float(r["loss_abs_err"]) < 1e-3, r  # a sum of 256 float32 log-probs


@pytest.mark.slow
def test_bench_hf_step_quick(tmp_path):
    rows = _run("bench_hf_step", "--dtypes", "float32", "--labels", "labels_answer", "--impls", "hf", "radit",
                "torch.lce", tmp_path=tmp_path)
    impls = {r["impl"] for r in rows}
    assert {"hf", "torch.lce"} <= impls <= {"hf", "radit", "torch.lce"}
    hf = _one(rows, impl="hf")
    assert float(hf["loss_abs_diff"]) == 0.0 and float(hf["grad_rel_err"]) == 0.0 and hf["vs_hf"] == "1.000"
    assert 7.0 < float(hf["loss"]) < 10.0  # a random tiny Llama over 4096 tokens: about log(4096) = 8.3
    for r in rows:
        assert r["batch"] == "2x32" and r["pass"] == "labels_answer" and r["threads"] == "1"
        assert float(r["median_s"]) > 0 and float(r["peak_rss_MB"]) > 0
        assert float(r["loss_abs_diff"]) < 1e-4, r
        assert float(r["grad_rel_err"]) < 1e-4, r
