"""The ablation report of ``radit run``: report.json, report.md (the table) and report.png (a bar chart).

Rows follow the paper's ablation: ``lm_only`` (no retrieval), ``replug`` (base LM + base retriever),
``ra_it`` (tuned LM + base retriever), ``r_it`` (base LM + tuned retriever), ``ra_dit`` (both). Each row
maps metric names (``em``, ``f1``, ``accuracy``, ``recall@1``, ``recall@10``, ...) to values in [0, 1].

``check_ordering`` states, for the paper's expected ordering, which comparisons hold and which do not,
in plain words; ``regressions`` lists every single metric on which a row falls below the row it builds on
(e.g. RA-IT's exact match below REPLUG's while its task average rises). The report prints both, so a row
that fails to improve, on any metric, is never hidden.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from radit_fast.io import atomic_file, write_json

log = logging.getLogger(__name__)

ROW_ORDER = ("lm_only", "replug", "ra_it", "r_it", "ra_dit")
ROW_LABELS = {
    "lm_only": "LM only (no retrieval)",
    "replug": "REPLUG (base LM + base retriever)",
    "ra_it": "+ RA-IT (tuned LM + base retriever)",
    "r_it": "+ R-IT (base LM + tuned retriever)",
    "ra_dit": "RA-DIT (tuned LM + tuned retriever)",
}
METRIC_ORDER = ("avg", "em", "f1", "accuracy", "rougel", "kilt_em", "kilt_f1", "kilt_accuracy", "kilt_rougel",
                "r_precision", "r_precision_paragraph", "recall@1", "recall@10")
# Task metrics averaged into "avg", one per task type (the paper averages EM / accuracy over tasks).
TASK_METRICS = ("em", "accuracy")


def task_average(metrics: Mapping[str, float | None]) -> float | None:
    """Mean of the task metrics present (exact match for generation, accuracy for multiple choice)."""
    vals = [metrics[m] for m in TASK_METRICS if metrics.get(m) is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}"


def check_ordering(rows: Mapping[str, Mapping[str, float | None]]) -> list[dict[str, Any]]:
    """The paper's expected ordering, each comparison with the numbers and whether it holds.

    Returns a list of ``{"claim", "metric", "left", "right", "holds", "text"}``; comparisons whose rows or
    metric are missing are reported with ``holds=None``.
    """
    def val(row: str, metric: str) -> float | None:
        r = rows.get(row)
        if r is None:
            return None
        return task_average(r) if metric == "avg" else r.get(metric)

    specs = [
        ("replug", ">", "lm_only", "avg", "retrieval augmentation helps the base LM"),
        ("ra_it", ">", "replug", "avg", "RA-IT (LM tuning) improves on REPLUG"),
        ("r_it", ">", "replug", "recall@1", "R-IT (retriever tuning) improves recall@1"),
        ("r_it", ">", "replug", "avg", "R-IT (retriever tuning) improves on REPLUG"),
        ("ra_dit", ">=", "ra_it", "avg", "RA-DIT is at least as good as RA-IT alone"),
        ("ra_dit", ">=", "r_it", "avg", "RA-DIT is at least as good as R-IT alone"),
    ]
    out = []
    for left, op, right, metric, claim in specs:
        a, b = val(left, metric), val(right, metric)
        name = "task average" if metric == "avg" else metric
        if a is None or b is None:
            holds = None
            text = f"not checked: {claim} ({left} or {right} has no {name})"
        else:
            holds = a > b if op == ">" else a >= b
            verdict = "holds" if holds else "DOES NOT HOLD"
            text = (f"{verdict}: {left} {op} {right} on {name} "
                    f"({_fmt(a)} vs {_fmt(b)}) - {claim}")
        out.append({"claim": claim, "left": left, "op": op, "right": right, "metric": metric,
                    "left_value": a, "right_value": b, "holds": holds, "text": text})
    return out


# Each row and the rows it builds on (the paper's ablation): a metric lower than theirs is a regression.
# RA-DIT is compared with REPLUG as well, so a drop below the untuned system is never hidden behind a gain
# over a weaker single-stage row.
BASELINES = (("replug", "lm_only"), ("ra_it", "replug"), ("r_it", "replug"), ("ra_dit", "replug"),
             ("ra_dit", "ra_it"), ("ra_dit", "r_it"))


def regressions(rows: Mapping[str, Mapping[str, float | None]]) -> list[dict[str, Any]]:
    """Every metric (task average included) on which a row is below a row it builds on (:data:`BASELINES`).

    Returns ``[{"row", "baseline", "metric", "value", "baseline_value", "text"}, ...]`` in table order;
    metrics that either row lacks are skipped.
    """
    out = []
    for row, base in BASELINES:
        if row not in rows or base not in rows:
            continue
        a, b = dict(rows[row]), dict(rows[base])
        a["avg"], b["avg"] = task_average(a), task_average(b)
        for metric in _metric_columns({row: a, base: b}):
            va, vb = a.get(metric), b.get(metric)
            if va is None or vb is None or not va < vb:
                continue
            name = "task average" if metric == "avg" else metric
            out.append({"row": row, "baseline": base, "metric": metric, "value": va, "baseline_value": vb,
                        "text": f"{row} is below {base} on {name} ({_fmt(va)} vs {_fmt(vb)})"})
    return out


def _ordered_rows(rows: Mapping[str, Any]) -> list[str]:
    return [r for r in ROW_ORDER if r in rows] + [r for r in rows if r not in ROW_ORDER]


def _metric_columns(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    present: set[str] = set()
    for r in rows.values():
        present.update(k for k, v in r.items() if v is not None and not k.startswith("n_"))
    cols = [m for m in METRIC_ORDER if m in present or (m == "avg" and present & set(TASK_METRICS))]
    cols += sorted((m for m in present if m not in METRIC_ORDER), key=_metric_key)
    return sorted(cols, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER and not m.startswith("recall")
                                       else len(METRIC_ORDER), _metric_key(m)))


def _metric_key(name: str) -> tuple[str, float]:
    """Order recall@1, recall@3, recall@10 numerically after the task metrics."""
    base, _, at = name.partition("@")
    return (base, float(at) if at.isdigit() else 0.0)


def render_table(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """A Markdown table of the rows (values in percent, ``-`` where a metric is absent)."""
    cols = _metric_columns(rows)
    lines = ["| row | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name in _ordered_rows(rows):
        r = dict(rows[name])
        r["avg"] = task_average(r)
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: the table, the ordering checks, the timings and the settings."""
    rows = report["rows"]
    parts = ["# RA-DIT ablation", ""]
    split = report.get("config", {}).get("eval_split", "test")
    n = report.get("config", {}).get("n_eval_examples")
    parts.append(f"Metrics on the {split} split" + (f" ({n} examples)" if n else "") +
                 ", in percent. `avg` is the mean of exact match (generation) and accuracy (multiple choice).")
    parts += ["", render_table(rows), "", "Rows:", ""]
    parts += [f"* `{r}`: {ROW_LABELS.get(r, r)}" for r in _ordered_rows(rows)]
    checks = report.get("checks") or check_ordering(rows)
    parts += ["", "## Expected ordering (paper)", ""]
    parts += [f"* {c['text']}" for c in checks]
    failed = [c for c in checks if c["holds"] is False]
    if failed:
        parts += ["", f"**{len(failed)} of {len(checks)} expected improvements did not happen on this run.**"]
    worse = report.get("regressions")
    if worse is None:
        worse = regressions(rows)
    parts += ["", "## Metrics that got worse", ""]
    parts += [f"* {w['text']}" for w in worse] or ["* none: no row is below the rows it builds on, on any metric"]
    timings = report.get("timings") or {}
    if timings:
        parts += ["", "## Timings", "", "| step | seconds |", "|---|---:|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in timings.items() if isinstance(v, (int, float))]
    cfg = report.get("config") or {}
    if cfg:
        parts += ["", "## Settings", "", "```"]
        parts += [f"{k}: {v}" for k, v in cfg.items()]
        parts += ["```"]
    return "\n".join(parts) + "\n"


def plot_rows(rows: Mapping[str, Mapping[str, float | None]], path: str | os.PathLike) -> bool:
    """A grouped bar chart (one group per metric, one bar per row) saved as PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception as e:  # matplotlib is optional for the library
        log.warning("no report.png: matplotlib is not available (%s)", e)
        return False
    names = _ordered_rows(rows)
    cols = _metric_columns(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cols) + 2), 4.0))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        r = dict(rows[name])
        r["avg"] = task_average(r)
        ys = [100 * (r.get(c) or 0.0) for c in cols]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    ax.set_title("RA-DIT ablation")
    ax.legend(fontsize=8, ncol=min(5, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: str | os.PathLike, rows: Mapping[str, Mapping[str, float | None]], *,
                 config: Mapping[str, Any] | None = None, timings: Mapping[str, float] | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json, report.md and report.png in ``out_dir``; returns the report dict."""
    out = Path(out_dir)
    report: dict[str, Any] = {
        "rows": {name: dict(rows[name]) for name in _ordered_rows(rows)},
        "config": dict(config or {}),
        "timings": dict(timings or {}),
        "checks": check_ordering(rows),
        "regressions": regressions(rows),
    }
    if extra:
        report.update(extra)
    write_json(out / "report.json", report)
    with atomic_file(out / "report.md") as f:
        f.write(render_markdown(report))
    plot_rows(rows, out / "report.png")
    return report
