"""make gpu-check (benchmarks/gpu_check.py) on the CPU: the no-GPU answer, the stage runner and its timeouts,
the float64 reference, the report writers, the build commands, and a dry run of every stage at tiny shapes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_answer_logprobs_gpu as bench  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_numerics as num  # noqa: E402
import gpu_check_report as report  # noqa: E402

from radit_fast import HAS_NATIVE  # noqa: E402

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != gpu_check.DRY_ENV}
    env.update(extra)
    return env


@no_gpu
def test_script_without_gpu_prints_the_no_gpu_line_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(gpu_check.NO_GPU_LINE)
    assert not (tmp_path / "o").exists()  # nothing measured, nothing written


@no_gpu
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_without_gpu(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"OUT={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert gpu_check.NO_GPU_LINE in proc.stdout


def test_arguments():
    a = gpu_check.parse_args(["--out", "x", "--skip", "pytest", "racecheck", "--budget", "100"])
    assert a.out == Path("x") and a.skip == ["pytest", "racecheck"] and a.budget == 100 and not a.dry_run
    assert gpu_check.parse_args([]).budget == sum(gpu_check.BUDGETS.values()) < 480  # the whole run < 8 minutes
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "nonsense"])
    os.environ[gpu_check.DRY_ENV] = "1"
    try:
        assert gpu_check.parse_args([]).dry_run
    finally:
        del os.environ[gpu_check.DRY_ENV]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_schedule_gives_saved_time_to_later_stages_and_ends_by_the_deadline():
    clock = FakeClock()
    s = gpu_check.Schedule({"a": 10, "b": 20, "c": 30}, 120, clock=clock)  # scaled x2: 20, 40, 60
    planned = ["a", "b", "c"]
    assert s.timeout("a", planned) == pytest.approx(20)
    clock.t = 5  # a finished early: b gets its 40 plus a's unused 15
    assert s.timeout("b", planned) == pytest.approx(55)
    clock.t = 60  # b used 55
    assert s.timeout("c", planned) == pytest.approx(60)
    clock.t = 119
    assert s.timeout("c", planned) == pytest.approx(1)  # never past the deadline


def test_run_command_kills_the_whole_process_group_on_timeout(tmp_path):
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    rc, secs, timed_out = gpu_check.run_command(
        ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], 1.0, tmp_path / "log")
    assert timed_out and rc is None and secs < 10 and time.monotonic() - t0 < 10
    grandchild = int(pidfile.read_text())
    for _ in range(50):  # reaped by init once killed
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        proc_stat = Path(f"/proc/{grandchild}/stat")
        state = proc_stat.read_text().split()[2] if proc_stat.exists() else "gone"
        assert state in ("Z", "gone"), f"sleep {grandchild} survived the timeout"
    rc, _, timed_out = gpu_check.run_command(["sh", "-c", "echo hello; exit 3"], 20, tmp_path / "log2")
    assert (rc, timed_out) == (3, False)
    assert "hello" in (tmp_path / "log2").read_text()


def _ctx(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return gpu_check.Ctx(tmp_path / "out", work, True, 0.0)


def test_run_stage_reports_timeouts_crashes_and_results(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    monkeypatch.setattr(gpu_check, "run_command", lambda argv, timeout, log, env=None: (None, timeout, True))
    assert gpu_check.run_stage("bench", ctx, 9.0)["status"] == "TIMEOUT"

    def killed_after_two_rows(argv, timeout, log, env=None):  # rows written as they finish survive a timeout
        rows = num.RowLog(gpu_check.partial_rows_path(ctx.work, "probes"))
        rows.append(num.row("strided", "x", "triton", "values vs f64", 1e-7, 2e-5))
        rows += [num.row("determinism", "two runs", "triton", "values bitwise equal", 0.0, ok=False)]
        return None, timeout, True
    monkeypatch.setattr(gpu_check, "run_command", killed_after_two_rows)
    res = gpu_check.run_stage("probes", ctx, 9.0)
    assert res["status"] == "TIMEOUT" and res["data"]["partial"] and "2 rows finished" in res["note"]
    assert [r["check"] for r in res["data"]["rows"]] == ["strided", "determinism"]
    assert res["data"]["rows"][1]["status"] == "FAILED"

    def crash(argv, timeout, log, env=None):
        log.write_text("Traceback ...\nRuntimeError: CUDA error: an illegal memory access was encountered\n")
        return -11, 1.0, False
    monkeypatch.setattr(gpu_check, "run_command", crash)
    res = gpu_check.run_stage("probes", ctx, 30.0)
    assert res["status"] == "FAILED" and "illegal memory access" in res["note"] and "-11" in res["note"]

    def ok(argv, timeout, log, env=None):
        assert "--stage" in argv and "env" in argv and "--dry-run" in argv
        (ctx.work / "env.json").write_text(json.dumps({"status": "ok", "note": "fine", "data": {"card": "x"}}))
        return 0, 2.0, False
    monkeypatch.setattr(gpu_check, "run_command", ok)
    res = gpu_check.run_stage("env", ctx, 30.0)
    assert res["status"] == "ok" and res["data"] == {"card": "x"} and res["seconds"] == 2.0
    assert gpu_check.run_stage("env", ctx, 1.0)["status"] == "skipped"  # no time left


def test_main_runs_every_stage_after_a_failure_and_exits_1(tmp_path, monkeypatch):
    seen = []

    def fake(name, ctx, timeout):
        seen.append(name)
        (ctx.work / f"{name}.log").write_text(f"output of {name}\n")
        status = "FAILED" if name == "build" else "ok"
        return {"stage": name, "status": status, "seconds": 1.0, "timeout": timeout, "note": name}
    monkeypatch.setattr(gpu_check, "run_stage", fake)
    out = tmp_path / "out"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "w"), "--skip", "racecheck"])
    assert rc == 1
    assert seen == [s for s in gpu_check.STAGES if s != "racecheck"]
    summary = (out / "summary.txt").read_text()
    assert "build" in summary and "FAILED" in summary
    assert "output of probes" in (out / "gpu_check.log").read_text()
    assert [s["stage"] for s in json.loads((out / "gpu_check.json").read_text())["stages"]] == seen
    monkeypatch.setattr(gpu_check, "run_stage", lambda n, c, t: {"stage": n, "status": "ok", "seconds": 0.1})
    assert gpu_check.main(["--dry-run", "--out", str(out), "--only", "env"]) == 0


@pytest.mark.parametrize("bias", [False, True])
def test_reference_f64_matches_autograd_in_float64(bias):
    gen = torch.Generator().manual_seed(0)
    n, d, v = 13, 7, 29
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[2] = t[9] = num.IGNORE
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if bias else None
    z = hh @ ww.T + (bb if bias else 0)
    keep = t != num.IGNORE
    lp = torch.log_softmax(z, -1).gather(1, torch.where(keep, t, 0)[:, None])[:, 0] * keep
    (lp * g).sum().backward()
    tok, gh, gw, gb = num.reference_f64(h, w, t, b, g, max_bytes=8 * v * 4)  # 4 rows per chunk: chunking covered
    torch.testing.assert_close(tok, lp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, hh.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ww.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(gb, bb.grad, rtol=1e-12, atol=1e-12)
    assert num.reference_f64(h, w, t, b)[1] is None  # values only


def test_rel_err_and_rows():
    ref = torch.tensor([3.0, 4.0])
    assert num.rel_err(ref, ref) == 0
    assert num.rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert num.rel_err(torch.tensor([float("nan"), 4.0]), ref) == float("inf")
    assert num.row("c", "x", "cuda", "m", 1e-3, 1e-4)["status"] == "FAILED"
    assert num.row("c", "x", "cuda", "m", float("inf"), 1e-4)["status"] == "FAILED"
    assert num.row("c", "x", "cuda", "m", 1e-5, 1e-4)["status"] == "ok"
    idx = num._subset(1000, 40, "cpu")
    assert idx[0] == 0 and idx[-1] == 999 and 30 <= idx.numel() <= 40 and bool((idx[1:] > idx[:-1]).all())


def test_report_writers(tmp_path):
    table = report.format_table(["a", "value"], [["x", 1.23456789], ["longer", None], ["y", float("inf")]])
    lines = table.splitlines()
    assert lines[0].split() == ["a", "value"] and set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["x", "1.235"] and lines[3].split() == ["longer", "-"]
    assert lines[4].split() == ["y", "inf"]
    assert len({line.index(line.split()[1]) for line in (lines[0], lines[2])}) == 1  # aligned columns
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
                   '<testsuite tests="3" failures="0" errors="1" skipped="0"/></testsuites>')
    assert report.junit_counts(xml) == {"tests": 8, "failures": 1, "errors": 1, "skipped": 2}
    assert report.junit_counts(tmp_path / "missing.xml") == {}
    text = "blah\n========= ERROR SUMMARY: 2 errors\nexercise: ok: 10/10 checks ok\n"
    assert report.sanitizer_summary(text) == "ERROR SUMMARY: 2 errors; exercise: ok: 10/10 checks ok"
    assert report.sanitizer_summary("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)") \
        .startswith("RACECHECK SUMMARY: 0 hazards")


def _bench_row(impl, pass_, median, peak, pct):
    return {"impl": impl, "pass": pass_, "median_s": str(median), "peak_extra_MB": str(peak), "pct_of_mm": str(pct),
            "status": "ok"}


def test_goals_read_off_the_benchmark_rows():
    rows = [_bench_row("torch.mm", "fwd", 1.0, 0, 100), _bench_row("torch.mm", "fwdbwd", 3.0, 0, 100),
            _bench_row("naive", "fwdbwd", 9.0, 2000, 33), _bench_row("cce", "fwdbwd", 5.0, 50, 60),
            _bench_row("triton", "fwd", 1.25, 10, 80), _bench_row("triton", "fwdbwd", 4.0, 200, 75),
            _bench_row("cuda", "fwd", 2.0, 10, 50), _bench_row("cuda", "fwdbwd", 6.0, 50, 50),
            {"impl": "cce", "pass": "fwd", "status": "unavailable"}]
    lines = dict(line.split(": ", 1) for line in report.goals(rows))
    assert set(lines) == {"cuda", "triton"}
    assert "fwd 80% of torch.mm (met" in lines["triton"]
    assert "fwd+bwd 75% of the 3-product floor (met" in lines["triton"]
    assert "memory 1/10.0 of naive (missed" in lines["triton"] and "ahead of cce" in lines["triton"]
    assert "fwd 50% of torch.mm (missed" in lines["cuda"] and "memory 1/40.0 of naive (met" in lines["cuda"]
    assert "behind cce" in lines["cuda"]


def test_build_commands_cover_every_source_and_target_the_card(tmp_path):
    cpp, cu = gpu_check.native_sources()
    assert (REPO / "csrc" / "bindings.cpp") in cpp and cu and all(p.exists() for p in cpp + cu)
    target = tmp_path / "_C.so"
    cmds = gpu_check.nvcc_build_commands("90", tmp_path, target, "/inc/pybind11")
    assert len(cmds) == len(cpp) + len(cu) + 1
    compiled = {c[c.index("-c") + 1] for c in cmds[:-1]}
    assert compiled == {str(p) for p in cpp + cu}
    assert all("-gencode=arch=compute_90,code=sm_90" in c for c in cmds if c[0] == "nvcc" and "-c" in c)
    assert all("-DRADIT_WITH_CUDA=1" in c and "-I/inc/pybind11" in c for c in cmds[:-1])
    link = cmds[-1]
    assert link[0] == "nvcc" and "-shared" in link and link[-1] == str(target)
    assert {c[c.index("-o") + 1] for c in cmds[:-1]} <= set(link)  # every object is linked
    cm = gpu_check.cmake_build_commands("90", tmp_path, "/pyb/cmake")
    assert {"-DCMAKE_CUDA_ARCHITECTURES=90", "-DRADIT_CUDA=ON", "-Dpybind11_DIR=/pyb/cmake"} <= set(cm[0])
    assert gpu_check.project_version().count(".") == 2
    wheels = gpu_check.wheels_command(["a.whl"], tmp_path / "site")
    assert {"--no-index", "--no-deps", "--target"} <= set(wheels) and wheels[-1] == "a.whl"


def test_build_steps_run_groups_in_order_and_stop_at_a_failure(tmp_path):
    log = tmp_path / "log"
    mark = tmp_path / "second"
    steps = [[["sh", "-c", "echo one"], ["sh", "-c", "echo two"]], [["sh", "-c", f"echo three > {mark}"]]]
    assert gpu_check._run_steps(steps, log, time.monotonic() + 30) and mark.exists()
    assert {"one", "two"} <= set(log.read_text().split())
    mark.unlink()
    failing = [[["sh", "-c", "exit 0"], ["sh", "-c", "echo broken; exit 2"]], [["sh", "-c", f"touch {mark}"]]]
    assert not gpu_check._run_steps(failing, log, time.monotonic() + 30) and not mark.exists()
    t0 = time.monotonic()
    assert not gpu_check._run_steps([[["sleep", "30"]]], log, time.monotonic() + 1)
    assert time.monotonic() - t0 < 10


def test_bench_says_why_a_row_cannot_run_here():
    assert bench.unavailable("torch.mm", "cpu") is None and bench.unavailable("naive", "cpu") is None
    assert "GPU" in bench.unavailable("cce", "cpu") or "not installed" in bench.unavailable("cce", "cpu")
    assert bench.unavailable("liger", "cpu") is not None
    import inspect

    from radit_fast.ops import answer_logprobs

    has_sum = "reduction" in inspect.signature(answer_logprobs).parameters
    assert (bench.unavailable("radit-sum", "cpu") is None) == has_sum


@pytest.mark.skipif(not HAS_NATIVE, reason="the dry run's impl='cpu' rows need radit_fast._C")
def test_dry_run_of_every_stage_on_cpu(tmp_path):
    """The whole script on CPU tensors at tiny shapes (RADIT_GPU_CHECK_DRY_RUN=1): every stage's plumbing,
    the references, the CSV, the PNG and the summary; the result files are what a GPU run brings back."""
    out = tmp_path / "out"
    # A generous budget: the plumbing is under test, not the speed of a shared 2-core machine.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget", "1200"], capture_output=True, text=True,
                          timeout=1300,
                          env=_env(**{gpu_check.DRY_ENV: "1"}))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.csv", "bench.png", "gpu_check.json", "gpu_check.log", "summary.txt"]
    assert len(files) <= 8 and all(p.stat().st_size < 16 << 20 for p in out.iterdir())
    stages = {s["stage"]: s for s in json.loads((out / "gpu_check.json").read_text())["stages"]}
    assert list(stages) == gpu_check.STAGES
    assert {k: v["status"] for k, v in stages.items()} == {
        "env": "ok", "wheels": "skipped", "build": "skipped", "correctness": "ok", "bench": "ok", "probes": "ok",
        "pytest": "skipped", "memcheck": "ok", "racecheck": "skipped"}
    assert all(s["seconds"] <= s["timeout"] for s in stages.values())
    checks = stages["correctness"]["data"]["rows"]
    assert {r["impl"] for r in checks} >= {"cpu", "torch", "auto", "naive", "ref"}
    grads = [r for r in checks if r["metric"] == "grad_weight vs f64" and r["impl"] == "cpu"]
    assert len(grads) == 3 and all(0 < r["value"] <= r["bound"] for r in grads)
    probes = {r["check"] for r in stages["probes"]["data"]["rows"]}
    assert probes == {"side_stream", "strided", "determinism", "other_device", "big_rows"}
    with open(out / "bench.csv", newline="") as f:
        rows = {(r["impl"], r["pass"]): r for r in csv.DictReader(f)}
    for impl in ("torch.mm", "naive", "cpu", "torch", "auto"):
        for p in ("fwd", "fwdbwd"):
            r = rows[(impl, p)]
            assert r["status"] == "ok" and float(r["median_s"]) > 0 and r["commit"] and r["torch"] == torch.__version__
    assert float(rows[("torch.mm", "fwd")]["pct_of_mm"]) == pytest.approx(100)
    assert float(rows[("cpu", "fwd")]["err_values"]) < 1e-2  # cpu rounds bf16 logits (module doc of the op)
    assert float(rows[("torch", "fwdbwd")]["err_values"]) < 2e-5
    assert rows[("cce", "fwd")]["status"] == "unavailable" and rows[("cce", "fwd")]["note"]
    summary = (out / "summary.txt").read_text()
    assert "CPU DRY RUN" in summary and "Goals (issue 10)" in summary and "big_rows" in summary
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
