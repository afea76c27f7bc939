"""The report of ``radit run``: the five rows' test metrics, the run's settings, the steps' timings and the
dev selection of both tuning steps, written by :func:`radit_fast.evaluation.report.write_report`.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from radit_fast.evaluation.report import write_report
from radit_fast.pipeline.paper import ROWS

if TYPE_CHECKING:
    from radit_fast.pipeline.run import Pipeline


def write_run_report(p: Pipeline, passages: int, t_start: float) -> dict[str, Any]:
    """OUT/report.json, report.md and report.png from the finished steps; returns the report dict.
    ``passages``: the index's size; ``t_start``: when this invocation started (``time.perf_counter``)."""
    cfg, steps = p.cfg, p.steps
    rows = {row: {k: v for k, v in steps.require(f"eval_{row}").result.items()
                  if not k.startswith("n_")} for row in ROWS}
    timings = steps.timings()
    timings["total (this invocation)"] = round(time.perf_counter() - t_start, 2)
    timings["total (all steps)"] = round(sum(r.seconds for r in steps.results.values()), 2)
    test_m = steps.require("eval_lm_only").result
    config = {"corpus": cfg.corpus, "train": cfg.train, "dev": cfg.dev, "test": cfg.test,
              "lm": cfg.lm or "SmolLM2-135M-Instruct (embedded)",
              "encoder": cfg.encoder or "all-MiniLM-L6-v2 (embedded)", "passages": passages,
              "eval_split": "test", "n_eval_examples": test_m.get("n_examples"),
              "n_train": len(p.splits["train"]), "n_dev_for_selection": len(p.splits["dev"]),
              "k": cfg.eval.k, "shots": cfg.eval.shots, "decode": cfg.eval.decode,
              "retriever_temperature": cfg.eval.retriever_temperature, "eval_dtype": cfg.run.eval_dtype,
              "chunk_words": cfg.run.chunk_words, "train_lm": cfg.train_lm,
              "train_retriever": cfg.train_retriever,
              "selected_lm_step": steps.require("train_lm").result.get("step"),
              "selected_retriever_step": steps.require("train_retriever").result.get("step"),
              "torch_threads": torch.get_num_threads(), "device": str(p.device)}
    selection = {"train_lm": steps.require("train_lm").result,
                 "train_retriever": steps.require("train_retriever").result}
    return write_report(p.out, rows, config=config, timings=timings, extra={"selection": selection})
