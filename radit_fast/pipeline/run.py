"""``radit run``: the RA-DIT ablation on any corpus and task, step by step, each step cached in OUT.

Steps (folder names in OUT)::

    inputs            validate every split (answers, fields, non-empty, disjoint), the LM and encoder
                      references (configs, weights present, tokenizers) and that every prompt fits its
                      max_length (RA-IT, R-IT, evaluation) before any compute or output folder
    index             radit index build (corpus chunked, encoded with the base encoder, FAISS)
    retrieve_base     top passages of dev and test with the base query encoder
    eval_lm_only      base LM, no retrieval                      (test)
    eval_replug       base LM + base retriever, REPLUG ensemble  (test)
    train_lm          stage 1, RA-IT; a candidate every run.select_every steps scored on dev, best kept
    train_retriever   stage 2, R-IT (LSR) with the base LM; candidates scored on dev, best kept
    retrieve_tuned    top passages of dev and test with the tuned query encoder
    eval_ra_it        tuned LM + base retriever                  (test)
    eval_r_it         base LM + tuned retriever                  (test)
    eval_ra_dit       tuned LM + tuned retriever                 (test)
    report.json, report.md, report.png

Steps are selected on the dev split only; the test split is never seen by training or selection. A step
whose settings and inputs did not change is skipped on a rerun (an interrupted run resumes where it
stopped; the training stages resume from their last checkpoint).
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from radit_fast.config.run import RunConfig
from radit_fast.evaluation.evaluate import evaluate_examples, retrieve
from radit_fast.io import RaditError, claimed_dir, write_json, write_jsonl
from radit_fast.pipeline.inputs import load_splits, retriever_train_subset
from radit_fast.pipeline.lm_models import RunModels
from radit_fast.pipeline.paper import ROWS
from radit_fast.pipeline.report import write_run_report
from radit_fast.pipeline.steps import StepResult, StepRunner, file_fingerprint
from radit_fast.pipeline.tuning import stage_key, tune_lm, tune_retriever
from radit_fast.records import read_jsonl
from radit_fast.retrieval import build
from radit_fast.retrieval.index import check_k

log = logging.getLogger(__name__)


class Pipeline:
    """One ``radit run``; :meth:`run` executes (or reuses) every step and writes the report."""

    def __init__(self, cfg: RunConfig, *, force: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.splits, documents = load_splits(cfg)  # every input error before any compute
        if cfg.run.dev_examples:
            self.splits["dev"] = self.splits["dev"][: cfg.run.dev_examples]
        dev_name = cfg.run.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev_name)
        r_train = retriever_train_subset(cfg, self.splits["train"])
        lines, heavy = cfg.plan(documents=documents, n_train=len(self.splits["train"]), n_dev=len(self.splits["dev"]),
                                n_test=len(self.splits["test"]), device=self.device.type,
                                n_retriever_train=len(self.splits["train"] if r_train is None else r_train))
        log.info("\n".join(lines))
        if heavy:
            log.warning("these are the paper's GPU-sized settings: on a CPU the run takes many hours; "
                        "`radit run --preset cpu` uses radit demo's sizing (about 15 minutes on 2 cores)")
        self.steps = StepRunner(self.out, force=force)  # the first output, after the checks and the plan
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.models = RunModels(cfg, self.device, self.steps)
        self.inputs_key = {name: file_fingerprint(getattr(cfg, name)) for name in ("corpus", "train", "dev", "test")}
        self.inputs_key["dev_examples"] = cfg.run.dev_examples

    # ------------------------------------------------------------------------------ retrieval
    def _retrieve_step(self, which: str, key: dict[str, Any]) -> None:
        def work(d: Path) -> dict[str, Any]:
            retriever = self.models.retriever_for(which)
            out = {}
            for split in ("dev", "test"):
                exs = self.splits[split]
                res = retrieve(retriever, exs, self.cfg.eval.k, progress=self.cfg.progress,
                               desc=f"retrieving {split} ({which} retriever)")
                write_jsonl(d / f"{split}.jsonl", ({"id": ex.id, "passages": r} for ex, r in zip(exs, res)))
                out[split] = len(res)
            return out

        self.steps.run(f"retrieve_{which}", key, work)

    def retrieved(self, which: str, split: str) -> list[list[tuple[str, str, float]]]:
        rows = read_jsonl(self.steps.require(f"retrieve_{which}").dir / f"{split}.jsonl")
        ids = [ex.id for ex in self.splits[split]]
        if [r["id"] for r in rows] != ids:
            raise RaditError(f"retrieve_{which}/{split}.jsonl does not match the {split} split; rerun with --force")
        return [[tuple(p) for p in r["passages"]] for r in rows]

    # ------------------------------------------------------------------------------------- eval
    def evaluate(self, model, tok, split: str, retriever: str | None, *, desc: str
                 ) -> tuple[list[dict], dict[str, float]]:
        """Evaluate ``model`` on ``split`` with the passages of the ``retriever`` step (``base`` / ``tuned``;
        None: no retrieval)."""
        settings = copy.copy(self.cfg.eval)
        if retriever is None:
            settings.k = 0
        ret = self.retrieved(retriever, split) if retriever is not None else None
        return evaluate_examples(model, tok, self.splits[split], ret, settings, train=self.splits["train"],
                                 progress=self.cfg.progress, desc=desc)

    def _eval_row(self, row: str, key: dict[str, Any]) -> None:
        lm_which, ret_which = ROWS[row]

        def work(d: Path) -> dict[str, Any]:
            model, tok = self.models.lm_for(lm_which)
            preds, metrics = self.evaluate(model, tok, "test", ret_which, desc=row)
            write_jsonl(d / "predictions.jsonl", preds)
            write_json(d / "metrics.json", metrics)
            return metrics

        res = self.steps.run(f"eval_{row}", key, work)
        log.info("%s: %s", row, {k: round(v, 4) for k, v in res.result.items() if isinstance(v, float)})

    # --------------------------------------------------------------------------------- stages
    def _index_step(self) -> StepResult:
        """The index of the corpus, then every k checked against its size."""
        cfg = self.cfg
        key = {"corpus": self.inputs_key["corpus"], "encoder": cfg.encoder, "chunk_words": cfg.run.chunk_words,
               "factory": cfg.run.index_factory}

        def work(d: Path) -> dict[str, Any]:
            build.build_index(cfg.corpus, d / "index", build.IndexBuildConfig(
                encoder=cfg.encoder, chunk_words=cfg.run.chunk_words, index_factory=cfg.run.index_factory,
                batch_size=cfg.run.encoder_batch_size, device=self.device.type))
            return json.loads((d / "index" / "manifest.json").read_text())["count"]

        idx = self.steps.run("index", key, work)
        log.info("index: %s passages", idx.result)
        for option, k in (("eval.k", cfg.eval.k), ("train_lm.k", cfg.lm_config(self.out / "train_lm").k),
                          ("train_retriever.k", cfg.retriever_config(self.out / "train_retriever").k)):
            if k:  # refused, never clamped, before any retrieval or training (eval.k 0: no retrieval)
                check_k(k, int(idx.result), option)
        return idx

    def _tune_step(self, name: str, label: str, key: dict[str, Any],
                   work: Callable[[Pipeline, Path], dict[str, Any]]) -> None:
        res = self.steps.run(name, key, functools.partial(work, self), atomic=False)
        log.info("%s: selected step %s on dev (%s)", label, res.result.get("step"), res.result.get("metrics"))

    # ------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Every step (reused when cached), then the report; OUT is held against a second ``radit run`` on it
        (:func:`radit_fast.io.claimed_dir`), which would otherwise interleave its steps with this one's."""
        with claimed_dir(self.out, fresh=False):
            return self._run_steps()

    def _run_steps(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        write_json(self.out / "run_config.json", cfg.to_dict())
        inputs = self.inputs_key
        base_key = {"inputs": inputs, "lm": cfg.lm, "encoder": cfg.encoder}
        idx = self._index_step()
        ev = {k: v for k, v in vars(cfg.eval).items()}
        ret_key = {"index": idx.fingerprint, "inputs": inputs, "k": cfg.eval.k}
        self._retrieve_step("base", ret_key)
        eval_key = {**base_key, "eval": ev, "eval_dtype": cfg.run.eval_dtype, "index": idx.fingerprint}
        self._eval_row("lm_only", {**eval_key, "index": None})
        self._eval_row("replug", eval_key)
        lm_key = {**base_key, "index": idx.fingerprint, "train_lm": stage_key(cfg.lm_config(self.out / "train_lm")),
                  "eval": ev,
                  "eval_dtype": cfg.run.eval_dtype, "train_dtype": cfg.run.train_dtype,
                  "select": [cfg.run.select_every, cfg.run.select_metric_lm, cfg.run.dev_examples]}
        self._tune_step("train_lm", "RA-IT", lm_key, tune_lm)
        r_key = {**base_key, "index": idx.fingerprint,
                 "train_retriever": stage_key(cfg.retriever_config(self.out / "train_retriever")), "eval": ev,
                 "select": [cfg.run.select_every, cfg.run.select_metric_retriever, cfg.run.dev_examples],
                 "subset": [cfg.run.retriever_train_examples, cfg.run.retriever_train_kind],
                 "lsr_dtype": cfg.run.eval_dtype}
        self._tune_step("train_retriever", "R-IT", r_key, tune_retriever)
        self._retrieve_step("tuned", {**ret_key, "retriever": self.steps.require("train_retriever").fingerprint})
        tuned_lm = self.steps.require("train_lm").fingerprint
        tuned_r = self.steps.require("train_retriever").fingerprint
        self._eval_row("ra_it", {**eval_key, "tuned_lm": tuned_lm})
        self._eval_row("r_it", {**eval_key, "tuned_retriever": tuned_r})
        self._eval_row("ra_dit", {**eval_key, "tuned_lm": tuned_lm, "tuned_retriever": tuned_r})
        return write_run_report(self, idx.result, t_start)


def run_pipeline(cfg: RunConfig, *, force: bool = False) -> dict[str, Any]:
    """Run (or resume) ``radit run``; returns the report dict (also written to OUT/report.json)."""
    return Pipeline(cfg, force=force).run()
