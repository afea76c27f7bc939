"""Reporting for ``make gpu-check``: text tables, the benchmark's PNG, JUnit and compute-sanitizer summaries, the
goals of issue 10, and the files written into OUT (summary.txt, gpu_check.json, gpu_check.log).
No torch import at module level: the parent process of gpu_check.py stays light."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

RADIT_IMPLS = ("cuda", "triton", "auto", "radit-sum", "cpu", "torch")
PEERS = ("cce", "liger", "liger-sum", "torch.lce")


def fmt(x) -> str:
    """Numbers in 4 significant digits, None and '' as '-', everything else as str."""
    if x is None or x == "":
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, float)):
        if isinstance(x, float) and math.isinf(x):
            return "inf"
        return f"{x:.4g}"
    return str(x)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table (columns separated by two spaces, a dashed rule under the header)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


CHECK_COLS = ["check", "case", "impl", "metric", "value", "bound", "status", "note"]


def format_check(r: dict) -> str:
    return "  ".join(fmt(r.get(k)) for k in CHECK_COLS)


def checks_table(rows: list[dict]) -> str:
    return format_table(CHECK_COLS, [[r.get(k) for k in CHECK_COLS] for r in rows])


def junit_counts(path: Path) -> dict:
    """{tests, failures, errors, skipped} summed over the test suites of a JUnit XML file ({} if unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def sanitizer_summary(text: str) -> str:
    """compute-sanitizer's summary lines (ERROR SUMMARY / RACECHECK SUMMARY), joined; '' when absent."""
    found = re.findall(r"=+ ((?:ERROR|RACECHECK|LEAK) SUMMARY: [^\n]*)", text)
    exercise = re.findall(r"^(exercise: [^\n]*)", text, flags=re.M)
    return "; ".join(found + exercise[-1:])


def commit() -> str:
    """harness.commit() (short hash, "-dirty" when edited); where the tree is a copy without .git (a GPU
    machine's), the RADIT_COMMIT environment variable (e.g. ``RADIT_COMMIT=$(git rev-parse --short HEAD)``)."""
    import harness

    found = harness.commit()
    return found if found != "unknown" else os.environ.get("RADIT_COMMIT", "unknown (set RADIT_COMMIT)")


def module_version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return ""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "present"


# ---------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------
BENCH_COLS = [("impl", "impl"), ("pass", "pass"), ("median_s", "median s"), ("spread", "spread"),
              ("tflops", "TFLOP/s"), ("pct_of_mm", "% torch.mm"), ("peak_extra_MB", "peak +MB"),
              ("err_values", "err value"), ("err_grad_hidden", "err dH"), ("err_grad_weight", "err dW"),
              ("status", "status"), ("note", "note")]


def bench_table(rows: list[dict]) -> str:
    return format_table([h for _, h in BENCH_COLS], [[r.get(k, "") for k, _ in BENCH_COLS] for r in rows])


def plot_bench(csv_path: Path, png_path: Path) -> None:
    """Two panels from the CSV: % of torch.mm's rate and peak extra memory, per impl, fwd and fwdbwd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    passes = ["fwd", "fwdbwd"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.8 / max(1, len(passes))
    for ax, key, label, log in ((axes[0], "pct_of_mm", "% of torch.mm rate (same pass)", False),
                                (axes[1], "peak_extra_MB", "peak extra memory (MB)", True)):
        for j, p in enumerate(passes):
            vals = []
            for impl in impls:
                m = [r for r in rows if r["impl"] == impl and r["pass"] == p and r.get(key)]
                vals.append(max(float(m[0][key]), 1e-3) if m else 0.0)
            ax.bar([i + (j - 0.5) * width for i in range(len(impls))], vals, width, label=p)
        ax.set_xticks(range(len(impls)), impls, rotation=30, ha="right")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(70, color="k", lw=0.8, ls="--")
    r0 = rows[0] if rows else {}
    fig.suptitle(f"answer_logprobs on {r0.get('device', '?')}: N={r0.get('N')} d={r0.get('d')} V={r0.get('V')} "
                 f"{r0.get('dtype')}; commit {r0.get('commit')}; torch {r0.get('torch')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def goals(rows: list[dict]) -> list[str]:
    """Issue 10's goals, read off the benchmark rows: one line per radit impl that was measured."""
    ok = {(r["impl"], r["pass"]): r for r in rows if r.get("status") == "ok"}
    lines = []
    for impl in RADIT_IMPLS:
        fwd, fb = ok.get((impl, "fwd")), ok.get((impl, "fwdbwd"))
        if not (fwd or fb):
            continue
        parts = []
        if fwd and fwd.get("pct_of_mm"):
            p = float(fwd["pct_of_mm"])
            parts.append(f"fwd {p:.0f}% of torch.mm ({'met' if p >= 70 else 'missed'}, goal >= 70%)")
        if fb and fb.get("pct_of_mm"):
            p = float(fb["pct_of_mm"])
            parts.append(f"fwd+bwd {p:.0f}% of the 3-product floor ({'met' if p >= 60 else 'missed'}, goal >= 60%)")
        naive = ok.get(("naive", "fwdbwd"))
        if fb and naive and float(naive["peak_extra_MB"]) > 0:
            ratio = float(naive["peak_extra_MB"]) / max(float(fb["peak_extra_MB"]), 1e-9)
            parts.append(f"memory 1/{ratio:.1f} of naive ({'met' if ratio >= 20 else 'missed'}, goal <= 1/20)")
        for peer in PEERS:
            other = ok.get((peer, "fwdbwd"))
            if fb and other:
                ahead = float(fb["median_s"]) < float(other["median_s"])
                parts.append(f"{'ahead of' if ahead else 'behind'} {peer} fwd+bwd")
        lines.append(f"{impl}: " + "; ".join(parts))
    return lines


# ---------------------------------------------------------------------------------------------------------
# Files in OUT
# ---------------------------------------------------------------------------------------------------------
def summary_text(results: list[dict], total: float, planned: list[str]) -> str:
    by = {r["stage"]: r for r in results}
    env = by.get("env", {}).get("data", {})
    out = [f"radit-fast gpu-check{' (CPU DRY RUN: nothing measured on a GPU)' if env.get('dry_run') else ''}",
           f"commit {env.get('commit', '?')}  card {env.get('card', '?')}  torch {env.get('torch', '?')}  "
           f"triton {env.get('triton', '?')}  nvcc {env.get('nvcc', '?') or '-'}  date {env.get('date_utc', '?')}",
           f"total {total:.0f} s", "", "Stages",
           format_table(["stage", "status", "seconds", "timeout", "note"],
                        [[r["stage"], r["status"], r.get("seconds"), r.get("timeout"), r.get("note", "")]
                         for r in results])]
    for name, title in (("correctness", "Correctness (relative L2 error vs float64 unless named)"),
                        ("probes", "Probes")):
        rows = by.get(name, {}).get("data", {}).get("rows") if isinstance(by.get(name, {}).get("data"), dict) else None
        if rows:
            out += ["", title, checks_table(rows)]
    bench = by.get("bench", {}).get("data", {})
    if isinstance(bench, dict) and bench.get("rows"):
        out += ["", "Benchmark (bench.csv, bench.png)", bench_table(bench["rows"]), "", "Goals (issue 10)"]
        out += goals(bench["rows"]) or ["no radit row measured"]
    return "\n".join(out) + "\n"


def write_outputs(out: Path, work: Path, results: list[dict], total: float, planned: list[str],
                  tail_bytes: int) -> None:
    """summary.txt, gpu_check.json and gpu_check.log (every stage's output, the last ``tail_bytes`` each)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(summary_text(results, total, planned))
    (out / "gpu_check.json").write_text(json.dumps({"total_seconds": round(total, 1), "stages": results},
                                                   indent=1, default=str))
    with open(out / "gpu_check.log", "w") as log:
        for r in results:
            path = work / f"{r['stage']}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            cut = len(text) > tail_bytes
            log.write(f"===== {r['stage']}: {r['status']} ({r.get('seconds')} s){' [head cut]' if cut else ''}\n")
            log.write(text[-tail_bytes:] + "\n")
