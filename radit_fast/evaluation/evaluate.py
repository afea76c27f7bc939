"""Evaluate an LM (optionally with a retriever) on a task split: predictions and metrics.

:func:`retrieve` runs the query encoder and the index once per split (top ``max(k, 10)`` passages, so
recall@10 exists even when fewer chunks augment the prompts); :func:`evaluate_examples` augments,
scores multiple-choice examples, generates answers for the others and computes the metrics:

* generation examples (no ``choices``): ``em`` and ``f1`` (SQuAD normalisation, max over gold answers);
* multiple-choice examples: ``accuracy`` (argmax of the ensemble likelihood over the options);
* examples with provenance, when retrieval ran: ``recall@1``, ``recall@k`` and ``recall@10``
  (document level: the fraction of gold documents found);
* KILT's metrics (:mod:`radit_fast.evaluation.kilt`): ``r_precision``, ``kilt_recall@5``, ``success@5``
  and ``kilt_em``/``kilt_f1``/``kilt_accuracy`` (counted only when R-precision is 1) with retrieval and
  provenance; ``rougel`` (and ``kilt_rougel``) for long-form examples.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from radit_fast.config.evaluation import EvalSettings
from radit_fast.data.tasks import Example
from radit_fast.evaluation import metrics as M
from radit_fast.evaluation.engine import LMEngine
from radit_fast.evaluation.generation import generate_answers
from radit_fast.evaluation.kilt import kilt_metrics
from radit_fast.evaluation.scoring import (Augmentation, augmentation_for, pick_demonstrations, score_candidates,
                                           score_multiple_choice)
from radit_fast.retrieval.corpus import passage_text
from radit_fast.retrieval.index import check_k
from radit_fast.retrieval.metrics import recall_at_k

log = logging.getLogger(__name__)

RECALL_AT = (1, 10)
KILT_AT = (5,)  # KILT's kilt_recall@k / success@k (its leaderboard reports R-precision and recall@5)
Retrieved = list[tuple[str, str, float]]  # (passage id, background text, retriever score), best first


def retrieve(retriever: Any, examples: Sequence[Example], k: int, *, batch_size: int = 256,
             progress: bool = True, desc: str = "retrieving") -> list[Retrieved]:
    """Top ``max(k, 10)`` passages (capped at the index size) of each example's input.

    ``retriever``: a :class:`radit_fast.retrieval.retriever.Retriever` (the index with its own query
    encoder, or with a tuned one).
    """
    check_k(k, len(retriever.index))  # refused, never clamped (the recall depth below may be clamped)
    depth = min(max(k, max(RECALL_AT)), len(retriever.index))
    out: list[Retrieved] = []
    with tqdm(total=len(examples), desc=desc, unit=" queries", disable=not progress, leave=False) as bar:
        for s in range(0, len(examples), batch_size):
            part = examples[s:s + batch_size]
            res = retriever.retrieve([ex.input for ex in part], depth)
            scores = res.scores.detach().float().cpu().tolist()
            for b in range(len(part)):
                out.append([(p.id, passage_text(p.title, p.text), sc)
                            for p, sc in zip(res.passages[b], scores[b]) if p is not None])
            bar.update(len(part))
    return out


def example_metrics(ex: Example, prediction: str, retrieved_ids: Sequence[str] | None, k: int) -> dict[str, float | None]:
    """The metrics of one example (see the module docstring); None marks a metric that does not apply."""
    out: dict[str, float | None] = {}
    if ex.choices is not None:
        out["accuracy"] = M.accuracy(prediction, ex.answers)
    else:
        out["em"] = M.exact_match(prediction, ex.answers)
        out["f1"] = M.token_f1(prediction, ex.answers)
    if retrieved_ids is not None and ex.provenance:
        for at in sorted({*RECALL_AT, k} - {0}):
            if at <= len(retrieved_ids) or at in RECALL_AT:
                out[f"recall@{at}"] = recall_at_k(retrieved_ids, ex.provenance, at)
    out.update(kilt_metrics(ex, prediction, retrieved_ids, KILT_AT))
    return out


def predict_examples(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example],
                     retrieved: Sequence[Retrieved] | None, settings: EvalSettings, *,
                     train: Sequence[Example] | None = None, progress: bool = True, desc: str = "eval",
                     engine: LMEngine | None = None, score_answers: bool = False,
                     ) -> tuple[list[dict[str, Any]], list[Augmentation]]:
    """The predictions of a split: ONE code path for ``radit eval``, ``radit run`` and the inference API
    (:class:`radit_fast.inference.RaditSystem`).

    Multiple-choice examples are scored (``{"prediction", "choice_logprobs"}``), the others generated
    (``{"prediction", ...}`` as :func:`generate_answers` returns it). ``score_answers``: every non-empty
    generated answer is also scored by the REPLUG ensemble behind the same prompts (``"answer_logprob"``;
    multiple choice carries the chosen option's). Returns the results (in order) and each example's
    :class:`Augmentation` (its backgrounds, passage ids and retriever scores).
    """
    settings.validate()
    if settings.k > 0 and retrieved is None and any(not ex.context for ex in examples):
        raise ValueError("k > 0 needs retrieval results (or examples with a gold context)")
    if retrieved is not None and len(retrieved) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(retrieved)} retrieval results")
    if engine is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        engine = LMEngine(model, pad_id=int(pad), batch_size=settings.batch_size, max_rows=settings.max_rows,
                          impl=settings.impl)
    demos = pick_demonstrations(train, settings.shots, seed=settings.seed, show_choices=settings.show_choices,
                                template=settings.template)
    for mc, kind in ((False, "generation"), (True, "multiple-choice")):
        have = len(demos[mc])
        if settings.shots and have < settings.shots and any((ex.choices is not None) == mc for ex in examples):
            log.warning("--shots %d: the train split has only %d %s example(s), so %s examples get %d "
                        "demonstration(s)", settings.shots, have, kind, kind, have)
    augs = [augmentation_for(ex, retrieved[b] if retrieved is not None else None, settings.k)
            for b, ex in enumerate(examples)]
    mc = [b for b, ex in enumerate(examples) if ex.choices is not None]
    gen = [b for b, ex in enumerate(examples) if ex.choices is None]
    results: list[dict[str, Any]] = [{} for _ in examples]
    n_prompts = lambda idx: sum(len(augs[b].chunks) for b in idx)  # noqa: E731
    if mc:
        with tqdm(total=n_prompts(mc), desc=f"{desc}: multiple choice", unit=" prompts", disable=not progress,
                  leave=False) as bar:
            for b, r in zip(mc, score_multiple_choice(engine, tokenizer, [examples[b] for b in mc],
                                                      [augs[b] for b in mc], settings, demos, progress=bar)):
                results[b] = {"prediction": r["prediction"], "choice_logprobs": r["logprobs"]}
                if r["scored"] != r["candidates"]:  # a lettered template: the letters were scored
                    results[b]["scored"] = r["scored"]
                if score_answers:
                    results[b]["answer_logprob"] = r["logprobs"][r["candidates"].index(r["prediction"])]
    if gen:
        with tqdm(total=n_prompts(gen), desc=f"{desc}: generation", unit=" prompts", disable=not progress,
                  leave=False) as bar:
            for b, r in zip(gen, generate_answers(engine, tokenizer, [examples[b] for b in gen],
                                                  [augs[b] for b in gen], settings, demos, progress=bar)):
                results[b] = r
        if score_answers:
            _score_generated(engine, tokenizer, examples, augs, gen, results, settings, demos)
    return results, augs


def _score_generated(engine, tokenizer, examples, augs, gen, results, settings, demos) -> None:
    """``answer_logprob``: the REPLUG ensemble log-likelihood of each generated answer (None when empty)."""
    todo = [b for b in gen if results[b]["prediction"]]
    for b in gen:
        results[b]["answer_logprob"] = None
    if not todo:
        return
    scored = score_candidates(engine, tokenizer, [examples[b] for b in todo], [augs[b] for b in todo],
                              [[results[b]["prediction"]] for b in todo], settings, demos)
    for b, s in zip(todo, scored):
        results[b]["answer_logprob"] = s["logprobs"][0]


def evaluate_examples(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example],
                      retrieved: Sequence[Retrieved] | None, settings: EvalSettings, *,
                      train: Sequence[Example] | None = None, progress: bool = True,
                      desc: str = "eval") -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Predictions (one dict per example, in order) and the mean metrics of a split.

    ``retrieved``: each example's ranked passages from :func:`retrieve` (None: no retriever; only
    ``k = 0`` or examples with a gold context are then possible). ``train`` supplies the demonstrations
    when ``settings.shots > 0``. The predictions come from :func:`predict_examples`.
    """
    results, augs = predict_examples(model, tokenizer, examples, retrieved, settings, train=train,
                                     progress=progress, desc=desc)
    gen = [b for b, ex in enumerate(examples) if ex.choices is None]
    predictions, per_example = [], []
    for b, ex in enumerate(examples):
        ids = [p for p, _, _ in retrieved[b]] if retrieved is not None else None
        m = example_metrics(ex, results[b]["prediction"], ids, settings.k)
        per_example.append(m)
        row: dict[str, Any] = {"id": ex.id, "input": ex.input, "prediction": results[b]["prediction"],
                               "answers": ex.answers}
        row.update({name: v for name, v in m.items() if v is not None})
        row["passages"] = augs[b].passage_ids
        row["retriever_scores"] = augs[b].scores if augs[b].passage_ids else []
        row.update({k: v for k, v in results[b].items() if k != "prediction"})
        predictions.append(row)
    agg = M.aggregate(per_example)
    agg["n_examples"] = len(examples)
    agg["n_generation"] = len(gen)
    agg["n_multiple_choice"] = len(examples) - len(gen)
    return predictions, agg


def per_task_metrics(examples: Sequence[Example], predictions: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean metrics per task (``meta["task"]``; MMLU also per subject as ``mmlu/{subject}``); ``{}`` when
    no example names a task. The metrics are those :func:`evaluate_examples` stored in each prediction."""
    groups: dict[str, list[dict[str, float | None]]] = {}
    for ex, row in zip(examples, predictions):
        meta = ex.meta if isinstance(ex.meta, dict) else {}
        task = meta.get("task")
        if not task:
            continue
        metrics = {k: v for k, v in row.items() if isinstance(v, float)}  # the metrics (lists hold the rest)
        groups.setdefault(str(task), []).append(metrics)
        if meta.get("subject"):
            groups.setdefault(f"{task}/{meta['subject']}", []).append(metrics)
    out = {}
    for task, rows in groups.items():
        agg = M.aggregate(rows)
        agg["n_examples"] = len(rows)
        out[task] = agg
    return out

