"""Stage 2, R-IT: LM-supervised retrieval (LSR) fine-tuning of the query encoder.

1. Retrieve the top-k chunks of every training example (task examples, plus optional self-supervised
   corpus items) with the initial query encoder.
2. Score every (example, chunk) with the frozen LM: ``l_i = log p_LM(y | c_i o x)`` (sum over answer
   tokens, fused LM head, no logits) — once, cached on disk by :mod:`radit_fast.training.lsr_cache`.
3. Train the query encoder on ``lsr_loss(s, lsr_scores(l, |y|, kind), ...)`` with
   ``s_i = E_q(x) . E_d(c_i)`` where ``E_d(c_i)`` comes from the index's stored document embeddings: the
   gradient reaches the query encoder, the document side and the index folder never change. Optional
   second objective ``e2e_weight * -log sum_i softmax(s/tau_R)_i exp(l_i)`` (REPLUG ensemble likelihood).

The loss is summed over the examples of each micro-batch and divided by the global batch size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radit_fast import models
from radit_fast.config.stages import RetrieverConfig
from radit_fast.distributed import DistEnv, main_then_broadcast
from radit_fast.io import RaditError
from radit_fast.ops.lsr import lsr_loss, lsr_scores
from radit_fast.ops.replug import replug_logprob
from radit_fast.retrieval.metrics import hit_at_k
from radit_fast.retrieval.retriever import stored_scores
from radit_fast.training import identity, lsr_cache, sources
from radit_fast.training.loop import Callback, Trainer, stage_run
from radit_fast.training.plan import DataPlan, check_items

log = logging.getLogger(__name__)


class LsrObjective(nn.Module):
    """``forward(micro_batch)``: query embeddings -> scores against stored document embeddings -> LSR loss.

    Holds the trainable query encoder (``TextEncoder``) and a reference to the index (not a submodule: its
    embeddings are constants read from the memory map).
    """

    def __init__(self, query_encoder: nn.Module, index: Any, cfg: RetrieverConfig) -> None:
        super().__init__()
        self.query_encoder = query_encoder
        self._index = index
        self.cfg = cfg

    def scores(self, tokens: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """``[b, k]`` differentiable ``E_q(x) . E_d(c)``; -inf where ``rows`` is -1 (the retriever's own
        :func:`~radit_fast.retrieval.retriever.stored_scores`)."""
        return stored_scores(self.query_encoder(**tokens).float(), self._index, rows)

    def forward(self, mb: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        s = self.scores(mb["tokens"], mb["rows"])
        sums, lengths = mb["lm_logprobs"].to(s.device), mb["lengths"].to(s.device)
        mask = lengths > 0
        target = lsr_scores(sums, lengths, kind=cfg.score_kind)
        kl = lsr_loss(s, target, retriever_temperature=cfg.retriever_temperature,
                      lm_temperature=cfg.lm_temperature, mask=mask, direction=cfg.direction, reduction="sum",
                      impl=cfg.impl)
        loss_sum = kl
        out: dict[str, Any] = {"kl_sum": kl.detach()}
        if cfg.e2e_weight > 0:
            ll = replug_logprob(sums.masked_fill(~mask, float("-inf")), s, temperature=cfg.retriever_temperature,
                                mask=mask, impl=cfg.impl)
            nll = -ll.sum()
            loss_sum = loss_sum + cfg.e2e_weight * nll
            out["e2e_nll_sum"] = nll.detach()
        b = float(len(lengths))
        out.update({"loss": loss_sum * (mb["world"] / mb["norm"]), "loss_sum": loss_sum.detach(),
                    "loss_norm": b, "examples": b, "tokens": float(mb["tokens"]["attention_mask"].sum())})
        return out


@dataclass
class RItData:
    queries: list[str]            # x of each training item (task examples first, then corpus items)
    rows: np.ndarray              # int64 [n, k] retrieved passage rows (-1 = none)
    lm_logprobs: np.ndarray       # float32 [n, k] log p_LM(y | c o x)
    lengths: np.ndarray           # int64 [n, k] answer tokens (0 = missing chunk)
    n_task: int
    cache_path: str
    eval_queries: list[str]
    eval_gold: list[list[str]]    # provenance passage/document ids of each evaluation example


def _items(cfg: RetrieverConfig, index: sources.IndexSource, tokenizer: Any) -> tuple[list[Any], int]:
    examples = sources.load_examples(cfg.train, cfg.max_examples)
    items: list[Any] = list(examples)
    if cfg.corpus_fraction > 0:
        want = round(len(examples) * cfg.corpus_fraction / (1.0 - cfg.corpus_fraction))
        fitted = (sources.fit_corpus_item(it, tokenizer, cfg.max_length // 2)
                  for it in sources.corpus_items(index, want, seed=cfg.seed, corpus=cfg.corpus))
        items += [it for it in fitted if it is not None]
    check_items(len(items), cfg.batch_size, "training examples")
    return items, len(examples)


def load_inputs(cfg: RetrieverConfig, tokenizer: Any) -> tuple[list[str], list[list[str]]]:
    """Check the training examples fit ``max_length`` and read the evaluation examples (only their inputs and
    provenance: answers are not needed to measure recall) — before any index or model is opened."""
    sources.check_fit(tokenizer, sources.load_examples(cfg.train, cfg.max_examples), cfg.max_length)
    if not cfg.eval_file:
        return [], []
    ev = sources.load_examples(cfg.eval_file, require_answers=False)[: cfg.eval_examples]
    return [e.input for e in ev], [list(e.provenance) for e in ev]


def build_data(cfg: RetrieverConfig, env: DistEnv, index: sources.IndexSource, tokenizer: Any,
               lm_loader: Any, lm_ident: dict[str, Any],
               evaluation: tuple[list[str], list[list[str]]] = ([], [])) -> RItData:
    """Retrieve (rank 0), then score with the frozen LM (sharded over processes) or read the cache.

    ``evaluation``: the evaluation queries and their provenance ids (see :func:`load_inputs`)."""
    items, n_task = main_then_broadcast(env, lambda: _items(cfg, index, tokenizer))
    for ex in items[:n_task]:
        if ex.context:
            log.debug("example %s has a gold context; R-IT scores retrieved chunks only", ex.id)

    def retrieve() -> np.ndarray:
        exclude = [()] * n_task + [it.exclude_rows for it in items[n_task:]]
        return index.retrieve_rows([it.input for it in items], cfg.k,
                                   exclude=exclude if len(items) > n_task else None)

    rows = main_then_broadcast(env, retrieve)
    if (rows >= 0).sum(axis=1).min() < 2:
        bad = int(np.argmin((rows >= 0).sum(axis=1)))
        raise RaditError(f"example {items[bad].id}: fewer than 2 chunks retrieved; LSR needs a distribution "
                         "over at least 2 (check the index)")
    key = lsr_cache.key_for(cfg, index, items, rows, lm_ident)
    cache_dir = lsr_cache.default_dir(cfg)
    cached = main_then_broadcast(env, lambda: lsr_cache.load(cache_dir, key))
    if cached is None:
        texts = index.texts(rows)
        lp, ln = lsr_cache.score_items(lm_loader, tokenizer, items, texts, cfg, env)
        if env.is_main:
            lsr_cache.save(cache_dir, key, rows=rows, lm_logprobs=lp, lengths=ln,
                           meta={"n": len(items), "k": rows.shape[1], "ids": [it.id for it in items]})
    else:
        lp, ln = cached
        log.info("LSR targets read from the cache %s", lsr_cache.entry(cache_dir, key))
    eval_q, eval_gold = evaluation
    return RItData([it.input for it in items], rows, lp, ln, n_task, str(lsr_cache.entry(cache_dir, key)),
                   list(eval_q), list(eval_gold))


class RetrieverStage:
    """The :class:`~radit_fast.training.loop.Stage` of R-IT."""

    shard_modules: tuple[type, ...] = ()
    find_unused_parameters = False  # the pooler (unused by CLS/mean pooling) is frozen below

    def __init__(self, cfg: RetrieverConfig, env: DistEnv, index: sources.IndexSource, data: RItData,
                 fingerprint: dict[str, Any]) -> None:
        self.cfg, self.env, self.index, self.data = cfg, env, index, data
        self.encoder = index.retriever.query_encoder
        self.encoder.requires_grad_(True)
        pooler = getattr(self.encoder.model, "pooler", None)
        if isinstance(pooler, nn.Module):  # BERT's pooler is not part of the CLS/mean embedding
            pooler.requires_grad_(False)
        self.module = LsrObjective(self.encoder, index.index, cfg)
        self._fingerprint = fingerprint
        self.plan = DataPlan(len(data.queries), cfg.batch_size, seed=cfg.seed)
        cfg.micro_batch_size(env.world_size)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint

    def micro_batches(self, step: int) -> list[dict[str, Any]]:
        d = self.data
        out = []
        for idx in self.plan.micro_batches(step, rank=self.env.rank, world_size=self.env.world_size,
                                           grad_accum=self.cfg.grad_accum):
            tokens = self.encoder.tokenizer([d.queries[i] for i in idx], padding=True, truncation=True,
                                            max_length=min(self.cfg.query_max_length, self.encoder.max_length),
                                            return_tensors="pt")
            dev = self.encoder.device
            out.append({"tokens": {k: v.to(dev) for k, v in tokens.items()},
                        "rows": torch.from_numpy(d.rows[idx]), "lm_logprobs": torch.from_numpy(d.lm_logprobs[idx]),
                        "lengths": torch.from_numpy(d.lengths[idx]), "norm": float(self.cfg.batch_size),
                        "world": self.env.world_size})
        return out

    def evaluate(self, module: nn.Module) -> dict[str, float] | None:
        """``eval_hit@k``: the share of evaluation examples with a gold document among the documents of their
        top-k passages with the current encoder (:func:`radit_fast.retrieval.metrics.hit_at_k`)."""
        d = self.data
        if not d.eval_queries:
            return None
        mine = range(self.env.rank, len(d.eval_queries), self.env.world_size)
        hits = total = 0.0
        q = self.encoder.encode([d.eval_queries[i] for i in mine]) if len(mine) else None
        if q is not None:
            _, rows = self.index.index.search(q, self.cfg.k)
            for i, row in zip(mine, rows):
                hit = hit_at_k([p.id for p in self.index.store.get(r for r in row if r >= 0)], d.eval_gold[i],
                               self.cfg.k)
                if hit is not None:
                    hits += hit
                    total += 1.0
        hits, total = self.env.all_reduce_sum([hits, total])
        return {f"eval_hit@{self.cfg.k}": hits / total if total else float("nan"), "eval_examples": total}

    def save_final(self, out: Path, gathered: dict[str, torch.Tensor] | None) -> None:
        self.encoder.save_pretrained(out)


FLAT_TEMPERATURE = 0.5  # tau_R at or above which normalised (cosine) scores give a nearly flat p_R


def _warn_flat_retriever(cfg: RetrieverConfig, index: sources.IndexSource, env: DistEnv) -> None:
    """Warn (once per run) when ``p_R = softmax(s / tau_R)`` is nearly uniform: with L2-normalised
    embeddings ``s`` is a cosine in [-1, 1], so two chunks' weights differ by at most ``exp(2 / tau_R)``
    (docs/training.md: with MiniLM the top of 10 chunks gets p_R = 0.13 at tau_R = 1, uniform is 0.10)."""
    normalized = getattr(index.retriever.query_encoder, "normalize", False)
    if env.is_main and normalized and cfg.retriever_temperature >= FLAT_TEMPERATURE:
        log.warning("--retriever-temperature %g with L2-normalised embeddings (cosine scores in [-1, 1]) makes "
                    "p_R nearly uniform, so the KL to p_LSR changes little with the query encoder; values "
                    "around 0.05-0.1 are usual for cosine scores (radit demo uses 0.1, as in evaluation)",
                    cfg.retriever_temperature)


def train_retriever(config: RetrieverConfig, *, callbacks: list[Callback] | None = None,
                    lm: nn.Module | None = None, tokenizer: Any = None) -> Path:
    """Run stage 2 and return ``config.out``: a query-encoder folder (``TextEncoder.save_pretrained``:
    safetensors, tokenizer, ``radit_encoder.json``) usable as ``radit retrieve --query-encoder OUT``,
    plus ``radit_config.yaml``, ``metrics.jsonl`` and ``checkpoints/``.

    ``lm``/``tokenizer``: an already loaded frozen LM for the LSR scoring (else ``config.lm``; it is
    loaded only when the targets are not cached).
    """
    with stage_run(config, tokenizer) as (env, tokenizer):
        evaluation = main_then_broadcast(env, lambda: load_inputs(config, tokenizer))  # input errors first
        index = sources.open_index(config.index, config.query_encoder, device=str(env.device), k=config.k)
        _warn_flat_retriever(config, index, env)

        def lm_loader() -> nn.Module:
            if lm is not None:
                return lm
            return models.load_lm(config.lm, device=env.device)[0]

        lm_ident = lsr_cache.lm_identity(config, lm)  # hashed once: the LSR cache key and the resume check
        data = build_data(config, env, index, tokenizer, lm_loader, lm_ident, evaluation)
        fingerprint = main_then_broadcast(env, lambda: identity.fingerprint(config, lm_ident=lm_ident, extra={
            "query_encoder": index.retriever.query_encoder.identity()["fingerprint"],
            "items": len(data.queries), "lsr_targets": Path(data.cache_path).name}))
        stage = RetrieverStage(config, env, index, data, fingerprint)
        Trainer(config, stage, env, callbacks=callbacks).fit()
    return Path(config.out)
