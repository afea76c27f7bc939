"""The two tuning steps of ``radit run``: a stage trains (RA-IT on the LM, R-IT on the query encoder), its
candidates are scored on the dev split (:class:`~radit_fast.pipeline.selection.Selector`) and the best is
kept in ``selected/``. Both train in place (``step.json`` written last) and resume from their checkpoints.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radit_fast import models
from radit_fast.config.stages import RaItConfig, RetrieverConfig
from radit_fast.data.tasks import write_tasks
from radit_fast.evaluation.evaluate import evaluate_examples, example_metrics, retrieve
from radit_fast.evaluation.metrics import aggregate
from radit_fast.io import RaditError
from radit_fast.pipeline.inputs import retriever_train_subset
from radit_fast.pipeline.selection import Selector
from radit_fast.retrieval.encoder import TextEncoder
from radit_fast.retrieval.retriever import Retriever
from radit_fast.training import checkpoint as ckpt
from radit_fast.training.ra_it import train_lm
from radit_fast.training.retriever import train_retriever

if TYPE_CHECKING:
    from radit_fast.pipeline.run import Pipeline

# Stage settings that name this run's own files or only change how a run looks (progress bars, log lines,
# resuming), not what it computes. Checkpointing stays in: R-IT's kept checkpoints are its dev candidates.
_NOT_IN_STAGE_KEY = ("out", "index", "train", "cache_dir", "progress", "threads", "resume", "overwrite",
                     "log_every", "report_to")


def stage_key(stage_cfg: Any) -> dict[str, Any]:
    """The resolved settings of a tuning stage (``RaItConfig`` / ``RetrieverConfig``, defaults included) that
    decide its result: a changed default (e.g. ``append_eos``) invalidates a finished stage step, as a
    changed run-file value does. Paths inside the run folder and display settings are left out."""
    return {k: v for k, v in dataclasses.asdict(stage_cfg).items() if k not in _NOT_IN_STAGE_KEY}


# ----------------------------------------------------------------------------------- stage 1, RA-IT
def tune_lm(p: Pipeline, d: Path) -> dict[str, Any]:
    """The ``train_lm`` step in folder ``d``: RA-IT, a candidate every ``run.select_every`` steps and at the
    end, scored on dev with the base retriever."""
    cfg = p.cfg
    stage_cfg = cfg.lm_config(d / "model")
    stage_cfg.index = str(p.steps.require("index").dir / "index")
    stage_cfg.resume = True
    every = cfg.run.select_every
    stage_cfg.save_every = every if every else stage_cfg.save_every
    lm, tok = p.models.train_copy()
    selector = Selector(d, "lm", cfg.run.select_metric_lm)

    def callback(event: str, step: int, row: dict[str, Any]) -> None:
        # "resumed": a kill between a checkpoint and its step_end would otherwise lose that step's candidate
        if event in ("step_end", "resumed") and ((every and step % every == 0) or step == stage_cfg.max_steps):
            if not selector.has(step):
                _offer_lm(p, selector, lm, tok, step)

    t0 = time.perf_counter()
    train_lm(stage_cfg, callbacks=[callback], lm=lm, tokenizer=tok)
    if selector.best() is None:  # training had completed before its selection was recorded
        _offer_final_lm(p, selector, stage_cfg, tok)
    del lm
    result = selector.finish(d, {"train_seconds": time.perf_counter() - t0, "dev_examples": len(p.splits["dev"])})
    shutil.rmtree(Path(stage_cfg.out) / "checkpoints", ignore_errors=True)  # only needed to resume
    return result


def _offer_lm(p: Pipeline, selector: Selector, lm: Any, tok: Any, step: int) -> None:
    """Score the live LM on dev at ``step``; the live weights (not the evaluation copy) become the
    candidate, adapters merged."""
    model = p.models.eval_copy(lm)
    _, m = p.evaluate(model, tok, "dev", "base", desc=f"dev @ step {step}")
    del model
    selector.offer(step, m, lambda folder: (models.plain_copy(lm).save_pretrained(folder),
                                            tok.save_pretrained(folder)))


def _offer_final_lm(p: Pipeline, selector: Selector, stage_cfg: RaItConfig, tok: Any) -> None:
    """Score the stage's final model (its output folder) on dev as the candidate of its last step."""
    final, _ = models.load_lm(stage_cfg.out, device=p.device)
    model = p.models.eval_copy(final)
    _, m = p.evaluate(model, tok, "dev", "base", desc="dev (final)")
    selector.offer(stage_cfg.max_steps, m, lambda folder: (final.save_pretrained(folder),
                                                           tok.save_pretrained(folder)))


# ------------------------------------------------------------------------------------ stage 2, R-IT
def tune_retriever(p: Pipeline, d: Path) -> dict[str, Any]:
    """The ``train_retriever`` step in folder ``d``: R-IT (LSR) with the frozen base LM as scorer, then the
    kept checkpoints and the final encoder scored on dev."""
    stage_cfg = _retriever_stage_config(p, d)
    scorer, tok = p.models.frozen_base()  # the frozen LM only scores (LSR targets): the evaluation dtype
    t0 = time.perf_counter()
    train_retriever(stage_cfg, lm=scorer, tokenizer=tok)
    del scorer
    train_seconds = time.perf_counter() - t0
    selector = _select_encoder(p, d, stage_cfg)
    result = selector.finish(d, {"train_seconds": train_seconds, "dev_examples": len(p.splits["dev"])})
    shutil.rmtree(Path(stage_cfg.out) / "checkpoints", ignore_errors=True)  # scored; only needed to resume
    return result


def _retriever_stage_config(p: Pipeline, d: Path) -> RetrieverConfig:
    """Stage 2's settings inside the step folder: a checkpoint (a dev candidate) every ``run.select_every``
    steps, all of them kept; the train subset (``run.retriever_train_*``) written to ``d``."""
    cfg = p.cfg
    stage_cfg = cfg.retriever_config(d / "model")
    stage_cfg.index = str(p.steps.require("index").dir / "index")
    stage_cfg.resume = True
    every = cfg.run.select_every
    if every:
        stage_cfg.save_every = every
        stage_cfg.keep_checkpoints = stage_cfg.max_steps // every + 1
    subset = retriever_train_subset(cfg, p.splits["train"])
    if subset is not None:
        stage_cfg.train = str(d / "train_subset.jsonl")
        write_tasks(stage_cfg.train, subset)
    return stage_cfg


def _select_encoder(p: Pipeline, d: Path, stage_cfg: RetrieverConfig) -> Selector:
    """Candidates: the kept checkpoints and the final encoder, scored on dev by retrieval recall (dev with
    provenance) or else by the base LM's task average with the candidate's passages."""
    cfg = p.cfg
    selector = Selector(d, "retriever", cfg.run.select_metric_retriever)
    final = Path(stage_cfg.out)
    has_prov = any(ex.provenance for ex in p.splits["dev"])
    selector.metric = cfg.run.select_metric_retriever if has_prov else "avg"
    cands = [(s, path) for s, path in ckpt.list_checkpoints(final / "checkpoints") if s < stage_cfg.max_steps]
    cands.append((stage_cfg.max_steps, None))
    for step, path in cands:
        enc = _candidate_encoder(final, path, p.device)
        selector.offer(step, _dev_metrics(p, enc, selector.metric, step), enc.save_pretrained)
    return selector


def _candidate_encoder(final: Path, checkpoint: Path | None, device: Any) -> TextEncoder:
    """The final query encoder, with a checkpoint's trained parameters (``query_encoder.*``) when given."""
    enc = TextEncoder.from_pretrained(str(final), device=str(device))
    if checkpoint is not None:
        params = ckpt.load_checkpoint(checkpoint).params
        res = enc.load_state_dict({k.removeprefix("query_encoder."): v for k, v in params.items()}, strict=False)
        # a checkpoint holds the trained parameters; the others (e.g. an unused pooler) keep the values of the
        # final folder, which are their untouched initial values
        if res.unexpected_keys or len(res.missing_keys) == len(enc.state_dict()):
            raise RaditError(f"{checkpoint}: checkpoint does not match the query encoder "
                             f"(unexpected {res.unexpected_keys[:3]})")
    return enc


def _dev_metrics(p: Pipeline, enc: TextEncoder, metric: str, step: int) -> dict[str, float]:
    """A candidate encoder's dev metrics: its recall@k (no LM), or with ``metric`` avg the base LM's."""
    cfg, dev = p.cfg, p.splits["dev"]
    retriever = Retriever.load(p.steps.require("index").dir / "index", enc, device=str(p.device))
    ret = retrieve(retriever, dev, cfg.eval.k, progress=False)
    if metric == "avg":
        base, tok = p.models.base_lm()
        _, m = evaluate_examples(p.models.eval_copy(base), tok, dev, ret, cfg.eval, train=p.splits["train"],
                                 progress=cfg.progress, desc=f"dev @ step {step}")
        return m
    return aggregate([{k: v for k, v in example_metrics(ex, "", [q for q, _, _ in r], cfg.eval.k).items()
                       if k.startswith("recall")} for ex, r in zip(dev, ret)])
