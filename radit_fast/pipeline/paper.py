"""The paper's Table 2 from a finished ``radit run``: five rows x MMLU, NQ, TQA, ELI5, 0-shot and 5-shot.

RA-DIT (Lin et al., 2023, Table 2) reports, per row, MMLU accuracy, Natural Questions and TriviaQA exact
match and ELI5 ROUGE-L, and their unweighted mean, once 0-shot and once 5-shot. The rows are those of the
ablation that ``radit run`` trains (:data:`ROWS`): the LM alone, REPLUG (base LM + base retriever), RA-IT
(tuned LM), R-IT (tuned query encoder) and RA-DIT (both). :func:`paper_table` takes the run folder, the
task files in their native formats (MMLU's CSV folder, KILT's NQ/TriviaQA/ELI5 files) and the few-shot
pools (MMLU: its dev split; KILT tasks: their train files), evaluates every cell through
:func:`radit_fast.evaluation.evaluate.evaluate_examples` (the one prediction path) and writes
``paper_table.json``, ``paper_table.md`` and each cell's predictions and metrics.

Retrieval runs once per task and retriever; each LM is loaded once. Tasks may be any subset, and any other
task the readers know can be added with its metric (``metrics=``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from radit_fast.config.evaluation import EvalSettings
from radit_fast.data.readers import load_examples
from radit_fast.evaluation import evaluate as E
from radit_fast.evaluation.scoring import check_prompts_fit
from radit_fast.inference import run_parts
from radit_fast.io import RaditError, atomic_file, write_json, write_jsonl
from radit_fast.models import load_lm, load_tokenizer
from radit_fast.retrieval.retriever import Retriever

log = logging.getLogger(__name__)

#: row -> (LM, retriever), as radit run's ablation.
ROWS = {"lm_only": ("base", None), "replug": ("base", "base"), "ra_it": ("tuned", "base"),
        "r_it": ("base", "tuned"), "ra_dit": ("tuned", "tuned")}
#: The paper's tasks, their column names and the metric Table 2 reports for each.
PAPER_METRICS = {"mmlu": "accuracy", "nq": "em", "triviaqa": "em", "eli5": "rougel"}
COLUMN = {"mmlu": "MMLU", "nq": "NQ", "triviaqa": "TQA", "eli5": "ELI5"}


def table_average(cells: Mapping[str, float | None]) -> float | None:
    """The unweighted mean over the tasks (the paper's ``Avg``); None when a task has no value."""
    vals = list(cells.values())
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def render_paper_table(table: Mapping[str, Any]) -> str:
    """paper_table.md: one Markdown table per shot setting, values in percent."""
    tasks = table["tasks"]
    lines = ["# RA-DIT Table 2 layout", "",
             "Metrics: " + ", ".join(f"{COLUMN.get(t, t)} {table['metrics'][t]}" for t in tasks) +
             "; Avg is their unweighted mean.", ""]
    for shots, rows in table["results"].items():
        lines += [f"## {shots}-shot", "", "| row | " + " | ".join(COLUMN.get(t, t) for t in tasks) + " | Avg |",
                  "|---|" + "---:|" * (len(tasks) + 1)]
        for row, cells in rows.items():
            vals = [cells["tasks"].get(t) for t in tasks] + [cells["avg"]]
            lines.append(f"| {row} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def paper_table(run: str | os.PathLike, tasks: Mapping[str, str | os.PathLike], out: str | os.PathLike, *,
                train: Mapping[str, str | os.PathLike] | None = None, shots: Sequence[int] = (0, 5),
                rows: Sequence[str] = tuple(ROWS), metrics: Mapping[str, str] | None = None,
                settings: EvalSettings | None = None, max_new_tokens: Mapping[str, int] | None = None,
                limit: int | None = None, device: str | None = None, dtype: str | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Evaluate ``rows`` x ``tasks`` x ``shots`` and write the table in ``out`` (see the module docstring).

    ``tasks``: task name -> file or folder (format detected); ``train``: task name -> few-shot pool (MMLU
    defaults to the dev split of its own folder); ``metrics``: task name -> metric (default
    :data:`PAPER_METRICS`); ``settings``: inference settings (default: the run's ``eval`` section);
    ``max_new_tokens``: per-task generation budgets (e.g. longer for ELI5); ``limit``: first N examples
    per task. Returns the table dict (also ``out/paper_table.json``).
    """
    metrics = {**PAPER_METRICS, **(metrics or {})}
    unknown = [t for t in tasks if t not in metrics]
    if unknown:
        raise RaditError(f"no metric for task(s) {unknown}: give metrics={{name: metric}}")
    bad_rows = [r for r in rows if r not in ROWS]
    if bad_rows:
        raise RaditError(f"unknown row(s) {bad_rows} (known: {', '.join(ROWS)})")
    parts = {(lm, ret): run_parts(run, lm=lm, retriever=ret or "base") for lm, ret in (ROWS[r] for r in rows)}
    cfg = next(iter(parts.values()))["config"]
    if settings is None:
        known = {f.name for f in dataclasses.fields(EvalSettings)}
        settings = EvalSettings(**{k: v for k, v in (cfg.get("eval") or {}).items() if k in known})
    data, pools = {}, {}
    for name, path in tasks.items():
        exs = load_examples(path, split="test")
        data[name] = exs[:limit] if limit else exs
        pool = (train or {}).get(name)
        if pool is None and Path(path).is_dir():  # MMLU: the dev split of the same folder
            pool = path
        if max(shots) > 0 and pool is None:
            raise RaditError(f"task {name}: {max(shots)}-shot needs a train file (train={{'{name}': path}})")
        pools[name] = load_examples(pool, split="dev") if pool is not None and max(shots) > 0 else None
    tok = load_tokenizer(parts[next(iter(parts))]["lm"])
    for name, exs in data.items():  # every prompt fits max_length, before any model runs
        for s in shots:
            st = dataclasses.replace(settings, shots=s,
                                     max_new_tokens=(max_new_tokens or {}).get(name, settings.max_new_tokens))
            try:
                check_prompts_fit(tok, exs, st, pools[name])
            except RaditError as e:
                raise RaditError(f"task {name}, {s}-shot: {e}") from None
    dev = torch.device(device or cfg.get("run", {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = dtype or cfg.get("run", {}).get("eval_dtype", "fp32")
    torch_dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    out = Path(out)
    retrieved: dict[tuple[str, str], list] = {}
    for which in {ROWS[r][1] for r in rows} - {None}:
        p = parts[next(ROWS[r] for r in rows if ROWS[r][1] == which)]
        retriever = Retriever.load(p["index"], p["query_encoder"], device=dev.type)
        for name, exs in data.items():
            retrieved[(which, name)] = E.retrieve(retriever, exs, max(settings.k, 1), progress=progress)
        del retriever
    results: dict[str, dict[str, Any]] = {str(s): {} for s in shots}
    for lm_which in dict.fromkeys(ROWS[r][0] for r in rows):
        p = parts[next(ROWS[r] for r in rows if ROWS[r][0] == lm_which)]
        model, tok = load_lm(p["lm"], dtype=torch_dtype, device=dev)
        for row in [r for r in rows if ROWS[r][0] == lm_which]:
            ret_which = ROWS[row][1]
            for s in shots:
                cells: dict[str, float | None] = {}
                for name, exs in data.items():
                    st = copy.copy(settings)
                    st.shots = s
                    st.k = settings.k if ret_which is not None else 0
                    if max_new_tokens and name in max_new_tokens:
                        st.max_new_tokens = max_new_tokens[name]
                    ret = retrieved[(ret_which, name)] if ret_which is not None else None
                    preds, m = E.evaluate_examples(model, tok, exs, ret, st, train=pools[name], progress=progress,
                                                   desc=f"{row} {name} {s}-shot")
                    cell = out / "cells" / f"{row}-{name}-{s}shot"
                    write_jsonl(cell / "predictions.jsonl", preds)
                    write_json(cell / "metrics.json", m)
                    cells[name] = m.get(metrics[name])
                    log.info("%s %s %d-shot: %s = %s", row, name, s, metrics[name], cells[name])
                results[str(s)][row] = {"tasks": cells, "avg": table_average(cells)}
        del model
    ordered = {s: {r: results[s][r] for r in rows} for s in results}
    table = {"tasks": list(tasks), "metrics": {t: metrics[t] for t in tasks}, "rows": list(rows),
             "results": ordered, "settings": dataclasses.asdict(settings), "run": str(run),
             "n_examples": {t: len(v) for t, v in data.items()}}
    write_json(out / "paper_table.json", table)
    with atomic_file(out / "paper_table.md") as f:
        f.write(render_paper_table(table))
    return table
