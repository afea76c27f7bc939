"""make gpu-check: validate and measure radit-fast's GPU path in one command, with no network (docs/gpu.md).

    make gpu-check                                   # GPU_PYTHON=python3, OUT=benchmarks/results/gpu/
    python3 benchmarks/gpu_check.py --out DIR [--budget 450] [--only STAGE ...] [--skip STAGE ...]
    RADIT_GPU_CHECK_DRY_RUN=1 .venv/bin/python benchmarks/gpu_check.py --out DIR   # CPU dry run (a test)

Without a CUDA GPU (and without the dry-run switch) it prints "gpu-check: no GPU: nothing measured" and exits 0.
On a GPU it runs these stages, each in its own process group with a timeout cut from one overall budget
(default 450 s; a stage that ends early leaves its time to the later ones; a stage that fails or times out is
reported and the next stage still runs):

  env          commit, card, driver, torch/triton/nvcc/cmake versions, tools present
  wheels       peer and build wheels from .whl/ (when the folder exists):
               pip install --no-index --no-deps --target WORK/site .whl/*.whl  (WORK/site goes first on
               PYTHONPATH and PATH of the later stages). Fill .whl/ on a machine with network access:
                 python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
                   --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
                   --platform manylinux2014_x86_64 -d .whl cut-cross-entropy liger-kernel
               and, when the GPU machine lacks them, pybind11 scikit-build-core ninja cmake (one version each).
  build        radit_fast._C for this card's architecture, in place (radit_fast/_C*.so, git-ignored): with
               cmake (+ ninja) when present, else straight with nvcc and g++ (needs only the pybind11
               headers); the build time is logged; then a fresh process must import it with CUDA
  correctness  answer_logprobs at N=8192 d=4096 V=128256 bf16, a ragged case with bias (and per-sequence
               sums), fp32; values and gradients of impl cuda/triton/auto against float64
               (benchmarks/gpu_check_numerics.py)
  bench        benchmarks/bench_answer_logprobs_gpu.py: torch.mm, naive, F.linear_cross_entropy, cce,
               Liger, radit cuda/triton/auto and reduction="sum", forward and forward+backward
  probes       side stream, strided/transposed inputs, > 65535 rows for the ensemble ops, bitwise
               determinism, tensors on a non-current device (when > 1 GPU)
  pytest       pytest -m cuda (JUnit XML in OUT)
  memcheck     compute-sanitizer --tool memcheck on every kernel at small shapes (when the tool exists)
  racecheck    compute-sanitizer --tool racecheck, likewise

Files in OUT (at most 8: the device tool brings back no more): summary.txt (the tables), gpu_check.json
(everything), gpu_check.log (every stage's output), bench.csv, bench.png, pytest_cuda.xml.
Exit status 0 when no stage failed or timed out, else 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_check_report as report  # noqa: E402

NO_GPU_LINE = "gpu-check: no GPU: nothing measured"
DRY_ENV = "RADIT_GPU_CHECK_DRY_RUN"
# Nominal seconds per stage; they sum to the default overall budget (scaled when --budget differs).
BUDGETS = {"env": 15, "wheels": 10, "build": 80, "correctness": 85, "bench": 95, "probes": 45, "pytest": 55,
           "memcheck": 35, "racecheck": 30}
STAGES = list(BUDGETS)
LOG_TAIL_BYTES = 400_000  # per stage in gpu_check.log


@dataclasses.dataclass
class Ctx:
    """What a stage needs: where to write, whether this is the CPU dry run, its own time limit."""

    out: Path
    work: Path
    dry: bool
    timeout: float

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def impls(self) -> list[str]:
        return ["cpu", "torch", "auto"] if self.dry else ["cuda", "triton", "auto"]


# ---------------------------------------------------------------------------------------------------------
# Running commands and stages under one deadline
# ---------------------------------------------------------------------------------------------------------
def run_command(argv: list[str], timeout: float, log_path: Path, env: dict | None = None,
                cwd: Path = REPO) -> tuple[int | None, float, bool]:
    """(return code or None, seconds, timed out) of ``argv`` run in its own process group, output appended
    to ``log_path``. On timeout the whole group (children such as nvcc or pytest workers) is killed."""
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(map(str, argv))}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(0.1, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = None, True
        try:  # leftovers of a finished group (e.g. a daemon a tool started) go too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return rc, time.monotonic() - t0, timed_out


class Schedule:
    """Stage timeouts from one deadline: a stage may use what is left minus the nominal budgets of the stages
    after it, so the whole run ends by the deadline and time saved early goes to later stages."""

    def __init__(self, budgets: dict[str, float], total: float, clock=time.monotonic):
        scale = total / sum(budgets.values())
        self.budgets = {k: v * scale for k, v in budgets.items()}
        self.clock = clock
        self.deadline = clock() + total

    def timeout(self, stage: str, planned: list[str]) -> float:
        later = planned[planned.index(stage) + 1:]
        return self.deadline - self.clock() - sum(self.budgets[s] for s in later)


def child_env(work: Path) -> dict:
    env = os.environ.copy()
    site = work / "site"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), env.get("PYTHONPATH", "")) if p)
    # Tools installed beside this Python (cmake, ninja, pytest of its venv) are found even off PATH.
    env["PATH"] = os.pathsep.join((str(site / "bin"), str(Path(sys.executable).parent), env.get("PATH", ""),
                                   "/usr/local/cuda/bin"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def partial_rows_path(work: Path, name: str) -> Path:
    return work / f"{name}.rows.jsonl"


def partial_rows(name: str, ctx: Ctx) -> list[dict]:
    """Rows a killed or crashed stage finished: its JSON lines (correctness, probes) or bench.csv (bench)."""
    if name == "bench":
        path = ctx.out / "bench.csv"
        if path.exists():
            import csv

            with open(path, newline="") as f:
                return list(csv.DictReader(f))
        return []
    path = partial_rows_path(ctx.work, name)
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_stage(name: str, ctx: Ctx, timeout: float, py: str = sys.executable) -> dict:
    """Runs ``--stage name`` in a child process; its result dict (status ok | FAILED | skipped | TIMEOUT)."""
    log = ctx.work / f"{name}.log"
    result_path = ctx.work / f"{name}.json"
    result_path.unlink(missing_ok=True)
    partial_rows_path(ctx.work, name).unlink(missing_ok=True)
    if name == "bench":
        (ctx.out / "bench.csv").unlink(missing_ok=True)
    if timeout < 3:
        return {"stage": name, "status": "skipped", "seconds": 0.0, "timeout": timeout,
                "note": "no time left in the budget"}
    argv = [py, str(Path(__file__).resolve()), "--stage", name, "--out", str(ctx.out), "--work", str(ctx.work),
            "--stage-timeout", f"{timeout:.1f}"] + (["--dry-run"] if ctx.dry else [])
    rc, secs, timed_out = run_command(argv, timeout, log, env=child_env(ctx.work))
    res = {"stage": name, "seconds": round(secs, 1), "timeout": round(timeout, 1)}
    if result_path.exists():
        res.update(json.loads(result_path.read_text()))
    if timed_out:
        res["status"], res["note"] = "TIMEOUT", f"killed after {timeout:.0f} s; " + res.get("note", "")
    elif "status" not in res:
        res["status"], res["note"] = "FAILED", f"exit {rc}, no result: {_last_line(log)}"
    elif rc != 0 and res["status"] == "ok":
        res["status"] = "FAILED"
    if res["status"] in ("TIMEOUT", "FAILED") and not (isinstance(res.get("data"), dict) and res["data"].get("rows")):
        rows = partial_rows(name, ctx)
        if rows:  # what the stage finished before it was killed or crashed
            res["data"] = {"rows": rows, "partial": True}
            res["note"] = f"{res.get('note', '')} ({len(rows)} rows finished before)".strip()
    return res


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------------------------------------------------
# Stages (each runs in the child process)
# ---------------------------------------------------------------------------------------------------------
def _tool_version(argv: list[str], pick: str = "") -> str:
    """The line of ``argv``'s output that contains ``pick`` (the first line when empty); "" when absent."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [x.strip() for x in out if pick in x]
    return lines[0] if lines else ""


def find_sanitizer() -> str | None:
    nvcc = shutil.which("nvcc")
    for cand in (shutil.which("compute-sanitizer"), nvcc and str(Path(nvcc).parent / "compute-sanitizer"),
                 "/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def stage_env(ctx: Ctx) -> dict:
    import torch

    info = {"commit": report.commit(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "dry_run": ctx.dry, "triton": _module_version("triton"),
            "nvcc": _tool_version(["nvcc", "--version"], "release"), "cmake": _tool_version(["cmake", "--version"]),
            "ninja": _tool_version(["ninja", "--version"]), "compute_sanitizer": find_sanitizer() or "",
            "pybind11": _module_version("pybind11"), "cut_cross_entropy": _module_version("cut_cross_entropy"),
            "liger_kernel": _module_version("liger_kernel"),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_GiB=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    driver=_tool_version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        info.update(card="cpu (dry run)" if ctx.dry else "none", gpus=0)
    return {"status": "ok", "note": f"{info['card']}, torch {info['torch']}, triton {info['triton']}", "data": info}


def _module_version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return ""
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:  # noqa: BLE001 - a module without metadata
        return getattr(importlib.import_module(name), "__version__", "present")


def wheels_command(wheels: list[str], site: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]


def stage_wheels(ctx: Ctx) -> dict:
    wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
    if not wheels:
        return {"status": "skipped", "note": "no .whl/ folder or no wheels in it: peers absent unless installed"}
    if ctx.dry:
        return {"status": "skipped", "note": f"dry run: would install {len(wheels)} wheels",
                "data": {"command": wheels_command(wheels, ctx.work / "site")}}
    rc, secs, timed_out = run_command(wheels_command(wheels, ctx.work / "site"), ctx.timeout - 2,
                                      ctx.work / "wheels.pip.log")
    _copy_log(ctx.work / "wheels.pip.log")
    names = [Path(w).name.split("-")[0] for w in wheels]
    return {"status": "ok" if rc == 0 else "FAILED",
            "note": f"{len(wheels)} wheels in {secs:.0f} s: {', '.join(names)}"}


def _copy_log(path: Path) -> None:
    sys.stdout.write(path.read_text(errors="replace")[-LOG_TAIL_BYTES:])
    sys.stdout.flush()


def native_sources() -> tuple[list[Path], list[Path]]:
    """(C++ sources, CUDA sources) of radit_fast._C: csrc/bindings.cpp and every csrc/<op>/ source."""
    cpp = [REPO / "csrc" / "bindings.cpp"] + sorted((REPO / "csrc").glob("*/*.cpp"))
    return cpp, sorted((REPO / "csrc").glob("*/*.cu"))


def project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def nvcc_build_commands(arch: str, build: Path, target: Path, pybind_include: str) -> list[list[str]]:
    """Compile and link commands of the nvcc/g++ path (no cmake): one per source, then the link."""
    cpp, cu = native_sources()
    inc = [f"-I{REPO / 'csrc'}", f"-I{sysconfig.get_paths()['include']}", f"-I{pybind_include}"]
    defs = ["-DRADIT_WITH_CUDA=1", f'-DRADIT_VERSION="{project_version()}"']
    cmds, objs = [], []
    for src in cpp:
        obj = build / (src.parent.name + "_" + src.stem + ".o")
        cmds.append(["g++", "-O3", "-fno-math-errno", "-fopenmp", "-fPIC", "-fvisibility=hidden", "-std=c++17",
                     *inc, *defs, "-c", str(src), "-o", str(obj)])
        objs.append(obj)
    for src in cu:
        obj = build / (src.parent.name + "_" + src.stem + ".cu.o")
        cmds.append(["nvcc", "-O3", "-lineinfo", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                     "-Xcompiler", "-fPIC,-fvisibility=hidden", *inc, *defs, "-c", str(src), "-o", str(obj)])
        objs.append(obj)
    cmds.append(["nvcc", "-shared", "-cudart", "static", "-Xcompiler", "-fopenmp", *map(str, objs), "-lgomp",
                 "-o", str(target)])
    return cmds


def cmake_build_commands(arch: str, build: Path, pybind_cmake_dir: str) -> list[list[str]]:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    return [["cmake", "-S", str(REPO), "-B", str(build), *gen, "-DRADIT_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
             "-DCMAKE_BUILD_TYPE=Release", f"-DSKBUILD_PROJECT_VERSION={project_version()}",
             f"-Dpybind11_DIR={pybind_cmake_dir}", f"-DPython_EXECUTABLE={sys.executable}"],
            ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 4)]]


def stage_build(ctx: Ctx) -> dict:
    if importlib.util.find_spec("pybind11") is None:
        return {"status": "FAILED", "note": "pybind11 is not importable: put a pybind11 wheel in .whl/"}
    import pybind11

    if ctx.dry:
        arch = "90"
    else:
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}{minor}"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return {"status": "FAILED", "note": f"no Python.h for {sys.executable} ({sysconfig.get_paths()['include']})"}
    build = ctx.work / "build"
    build.mkdir(parents=True, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = REPO / "radit_fast" / f"_C{suffix}"
    plans = []  # (name, steps: groups of commands run in parallel, one group after the other)
    if shutil.which("cmake"):
        plans.append(("cmake", [[c] for c in cmake_build_commands(arch, build / "cmake", pybind11.get_cmake_dir())]))
    nv = nvcc_build_commands(arch, build, target, pybind11.get_include())
    plans.append(("nvcc", [nv[:-1], nv[-1:]]))
    if ctx.dry:
        tools = " or else ".join(n for n, _ in plans)
        return {"status": "skipped", "note": f"dry run: would build sm_{arch} with {tools}",
                "data": {"commands": {n: steps for n, steps in plans}}}
    if shutil.which("nvcc") is None:
        return {"status": "FAILED", "note": "nvcc not found"}
    t0 = time.monotonic()
    log = ctx.work / "build.cmd.log"
    deadline = t0 + ctx.timeout - 14
    used, tried = None, []
    for name, steps in plans:  # cmake first; the nvcc path when cmake fails and time is left
        if deadline - time.monotonic() < 20:
            break
        tried.append(name)
        if _run_steps(steps, log, deadline):
            if name == "cmake":
                built = sorted((build / "cmake").glob(f"_C*{suffix}")) or sorted((build / "cmake").rglob("_C*.so"))
                if not built:
                    continue
                shutil.copy2(built[0], target)
            used = name
            break
    if used is None:
        _copy_log(log)
        return {"status": "FAILED", "note": f"build failed ({', '.join(tried) or 'no time'}); see the log"}
    secs = time.monotonic() - t0
    _copy_log(log)
    check = subprocess.run([sys.executable, "-c", "import radit_fast._C as C, radit_fast._native as n; "
                            "print(C.__file__, C.with_cuda, n.HAS_NATIVE_CUDA)"], capture_output=True, text=True,
                           cwd=REPO, env=child_env(ctx.work), timeout=12)
    print(check.stdout, check.stderr)
    ok = check.returncode == 0 and check.stdout.split()[-2:] == ["True", "True"]
    return {"status": "ok" if ok else "FAILED",
            "note": f"sm_{arch} with {used} in {secs:.0f} s" + (f" (after {tried[0]} failed)" if len(tried) > 1 else "")
                    + ("" if ok else f"; import check: {(check.stdout + check.stderr).strip()[-200:]}"),
            "data": {"build_seconds": round(secs, 1), "arch": arch, "module": str(target), "tool": used}}


def _run_steps(steps: list[list[list[str]]], log: Path, deadline: float) -> bool:
    """Runs each group of commands in parallel, the groups in order; False at the first failure or timeout."""
    with open(log, "ab") as out:
        for group in steps:
            procs = [subprocess.Popen(c, stdout=out, stderr=subprocess.STDOUT, cwd=REPO) for c in group]
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    codes.append(None)
            if any(c != 0 for c in codes):
                return False
    return True


def _rows_status(rows: list[dict]) -> tuple[str, str]:
    bad = [r for r in rows if r["status"] != "ok"]
    note = f"{len(rows) - len(bad)}/{len(rows)} checks ok"
    if bad:
        note += "; first failure: " + ", ".join(str(bad[0][k]) for k in ("check", "case", "impl", "metric", "note"))
    return ("ok" if not bad else "FAILED"), note


def stage_correctness(ctx: Ctx) -> dict:
    import gpu_check_numerics as num

    rows = num.correctness(ctx.device, ctx.impls, ctx.dry, log_path=partial_rows_path(ctx.work, "correctness"))
    status, note = _rows_status(rows)
    return {"status": status, "note": note, "data": {"rows": rows}}


def stage_probes(ctx: Ctx) -> dict:
    import gpu_check_numerics as num

    rows = num.probes(ctx.device, ctx.impls, ctx.dry, log_path=partial_rows_path(ctx.work, "probes"))
    status, note = _rows_status(rows)
    return {"status": status, "note": note, "data": {"rows": rows}}


def stage_bench(ctx: Ctx) -> dict:
    import bench_answer_logprobs_gpu as bench

    rows = bench.run(ctx.out / "bench.csv", dry=ctx.dry, repeat=2 if ctx.dry else 7, budget=ctx.timeout - 10)
    failed = [r for r in rows if r["status"] not in ("ok", "unavailable")]
    note = f"{sum(r['status'] == 'ok' for r in rows)} rows measured, {len(failed)} failed"
    return {"status": "FAILED" if failed or not rows else "ok", "note": note, "data": {"rows": rows}}


def pytest_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", f"--junitxml={out / 'pytest_cuda.xml'}", "python_tests"]


def stage_pytest(ctx: Ctx) -> dict:
    if ctx.dry:
        return {"status": "skipped", "note": "dry run: " + " ".join(pytest_command(ctx.out)[1:])}
    rc, secs, timed_out = run_command(pytest_command(ctx.out), ctx.timeout - 3, ctx.work / "pytest.run.log",
                                      env=child_env(ctx.work))
    _copy_log(ctx.work / "pytest.run.log")
    counts = report.junit_counts(ctx.out / "pytest_cuda.xml")
    note = ", ".join(f"{v} {k}" for k, v in counts.items()) or _last_line(ctx.work / "pytest.run.log")
    if timed_out:
        return {"status": "TIMEOUT", "note": note, "data": counts}
    return {"status": "ok" if rc == 0 else "FAILED", "note": f"{note} in {secs:.0f} s", "data": counts}


def exercise_command(ctx: Ctx) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--exercise", "--out", str(ctx.out), "--work",
            str(ctx.work)] + (["--dry-run"] if ctx.dry else [])


def sanitizer_command(tool: str, sanitizer: str, ctx: Ctx) -> list[str]:
    return [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "30",
            "--target-processes", "application-only", *exercise_command(ctx)]


def stage_sanitizer(ctx: Ctx, tool: str) -> dict:
    sanitizer = find_sanitizer()
    env = child_env(ctx.work)
    if ctx.dry or sanitizer is None:
        if not ctx.dry:
            return {"status": "skipped", "note": "compute-sanitizer not found"}
        if tool != "memcheck":
            return {"status": "skipped", "note": "dry run: the exercise script runs once, under memcheck's stage"}
        argv, why = exercise_command(ctx), "dry run: the exercise script without compute-sanitizer"
    else:
        argv, why = sanitizer_command(tool, sanitizer, ctx), ""
        env["CUDA_MODULE_LOADING"] = "LAZY"  # only the kernels that run are loaded (and instrumented)
        if tool == "memcheck":
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every tensor its own allocation: no out-of-bounds hidden
    log = ctx.work / f"{tool}.run.log"
    rc, secs, timed_out = run_command(argv, ctx.timeout - 3, log, env=env)
    _copy_log(log)
    text = log.read_text(errors="replace")
    summary = report.sanitizer_summary(text)
    note = (why + "; " if why else "") + (summary or _last_line(log)) + f" ({secs:.0f} s)"
    if timed_out:
        return {"status": "TIMEOUT", "note": note}
    return {"status": "ok" if rc == 0 else "FAILED", "note": note}


STAGE_FUNCS = {"env": stage_env, "wheels": stage_wheels, "build": stage_build, "correctness": stage_correctness,
               "bench": stage_bench, "probes": stage_probes, "pytest": stage_pytest,
               "memcheck": lambda c: stage_sanitizer(c, "memcheck"),
               "racecheck": lambda c: stage_sanitizer(c, "racecheck")}


def child_main(name: str, ctx: Ctx) -> int:
    try:
        res = STAGE_FUNCS[name](ctx)
    except Exception as exc:  # noqa: BLE001 - the parent reports it and runs the next stage
        import traceback

        traceback.print_exc()
        res = {"status": "FAILED", "note": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
    (ctx.work / f"{name}.json").write_text(json.dumps(res, default=str))
    print(f"[{name}] {res['status']}: {res.get('note', '')}", flush=True)
    return 0 if res["status"] in ("ok", "skipped") else 1


def exercise_main(ctx: Ctx) -> int:
    import gpu_check_numerics as num

    rows = num.exercise_kernels(ctx.device, ctx.impls)
    for r in rows:
        print(report.format_check(r))
    status, note = _rows_status(rows)
    print(f"exercise: {status}: {note}", flush=True)
    return 0 if status == "ok" else 1


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu",
                   help="folder for summary.txt, gpu_check.json, gpu_check.log, bench.csv/png, pytest_cuda.xml")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--budget", type=float, default=float(sum(BUDGETS.values())),
                   help="overall seconds for all stages (default %(default)s)")
    p.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    p.add_argument("--skip", nargs="+", choices=STAGES, default=[], help="leave these stages out")
    p.add_argument("--dry-run", action="store_true", help=f"CPU dry run at tiny shapes (also {DRY_ENV}=1)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--stage-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--exercise", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dry_run = args.dry_run or os.environ.get(DRY_ENV, "") not in ("", "0")
    return args


def gpu_missing() -> str | None:
    """Why there is no GPU to check (None when torch sees a CUDA device)."""
    try:
        import torch
    except ImportError:
        return f"torch is not importable by {sys.executable}"
    return None if torch.cuda.is_available() else f"no CUDA device visible to torch {torch.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage or args.exercise:
        ctx = Ctx(args.out, args.work, args.dry_run, args.stage_timeout)
        return exercise_main(ctx) if args.exercise else child_main(args.stage, ctx)
    why = None if args.dry_run else gpu_missing()
    if why:
        print(f"{NO_GPU_LINE} ({why}).")
        return 0
    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="radit-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args.out, work, args.dry_run, 0.0)
    planned = [s for s in (args.only or STAGES) if s not in args.skip]
    sched = Schedule({s: BUDGETS[s] for s in planned}, args.budget)
    print(f"gpu-check{' (CPU dry run)' if ctx.dry else ''}: stages {', '.join(planned)}; budget {args.budget:.0f} s; "
          f"OUT={args.out} WORK={work}", flush=True)
    results = []
    for name in planned:
        timeout = sched.timeout(name, planned)
        print(f"[{name}] start (timeout {timeout:.0f} s)", flush=True)
        res = run_stage(name, ctx, timeout)
        results.append(res)
        print(f"[{name}] {res['status']} in {res['seconds']:.0f} s: {res.get('note', '')}", flush=True)
    total = time.monotonic() - t_start
    report.write_outputs(args.out, work, results, total, planned, LOG_TAIL_BYTES)
    print((args.out / "summary.txt").read_text())
    bad = [r["stage"] for r in results if r["status"] in ("FAILED", "TIMEOUT")]
    print(f"gpu-check: {'all stages passed' if not bad else 'FAILED: ' + ', '.join(bad)} in {total:.0f} s; "
          f"results in {args.out}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
