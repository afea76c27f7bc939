"""Language modelling with retrieval (REPLUG's perplexity setting): bits per byte and perplexity of a text.

The text is tokenised once and cut into consecutive *windows* of ``stride`` tokens; every token is
scored exactly once. Window w's continuation ``y_w`` is scored after its *context* ``x_w``, the (at most)
``context`` tokens before it (the first window's context is the tokenizer's BOS, or EOS when it has no BOS):

    without retrieval:  log p(y_w | x_w)
    with retrieval:     log sum_i softmax(s / tau_R)_i p_LM(y_w | c_i o x_w)      (REPLUG ensemble)

where c_1..c_k are the top-k passages for the query ``decode(x_w)`` (its last ``query_tokens`` tokens),
each prepended as ``"{title} {text}\\n\\n"`` (replacing the first window's BOS) and cut so that the
sequence fits ``max_length`` tokens. Continuations are
scored by :meth:`radit_fast.evaluation.engine.LMEngine.score` (the fused LM-head op: no ``N x V`` logits)
and ensembled by :func:`radit_fast.evaluation.scoring.ensemble_logprobs` (the REPLUG op with masks).

    perplexity    = exp(-sum_w log p(y_w) / number of tokens)
    bits per byte = -sum_w log p(y_w) / (ln 2 * UTF-8 bytes of the text)

Bits per byte does not depend on the tokenizer, so LMs with different vocabularies compare. A corpus that
contains the evaluated text itself makes retrieval trivially perfect: evaluate on held-out text.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from radit_fast.config.evaluation import LMEvalSettings
from radit_fast.data.prompts import special_prefix
from radit_fast.evaluation.engine import LMEngine
from radit_fast.evaluation.scoring import ensemble_logprobs
from radit_fast.io import RaditError
from radit_fast.retrieval.corpus import passage_text

log = logging.getLogger(__name__)


def windows(ids: Sequence[int], stride: int, context: int, start_ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """``(context ids, continuation ids)`` per window; the continuations partition ``ids``.

    >>> windows([1, 2, 3, 4, 5], 2, 1, [0])
    [([0], [1, 2]), ([2], [3, 4]), ([4], [5])]
    """
    out = []
    for s in range(0, len(ids), stride):
        ctx = list(ids[max(0, s - context):s]) if context else []
        out.append((ctx or list(start_ids), list(ids[s:s + stride])))
    return out


def _summary(total: float, n_tokens: int, n_bytes: int) -> dict[str, float]:
    return {"logprob": total, "nll_per_token": -total / n_tokens, "perplexity": math.exp(-total / n_tokens),
            "bits_per_byte": -total / (math.log(2) * n_bytes)}


def evaluate_lm(model: torch.nn.Module, tokenizer: Any, text: str, settings: LMEvalSettings, *,
                retriever: Any = None, progress: Any = None) -> dict[str, Any]:
    """Perplexity and bits per byte of ``text`` without and (with a retriever and ``k > 0``) with retrieval.

    Returns ``{"tokens", "bytes", "windows", "lm_only": {...}, "retrieval": {...} | None}``, each summary
    holding ``logprob`` (natural log, summed), ``nll_per_token``, ``perplexity`` and ``bits_per_byte``.
    """
    settings.validate()
    if not text.strip():
        raise RaditError("the text to evaluate is empty")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    start = special_prefix(tokenizer) or [tokenizer.eos_token_id]
    wins = windows(ids, settings.stride, settings.context, start)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = LMEngine(model, pad_id=int(pad), batch_size=settings.batch_size, impl=settings.impl)
    plain = engine.score([bos_ctx for bos_ctx, _ in wins], [[y] for _, y in wins], progress=progress)
    out: dict[str, Any] = {"tokens": len(ids), "bytes": len(text.encode("utf-8")), "windows": len(wins),
                           "lm_only": _summary(sum(v[0] for v in plain), len(ids), len(text.encode("utf-8"))),
                           "retrieval": None}
    if retriever is None or settings.k == 0:
        return out
    queries = [tokenizer.decode(ctx[-settings.query_tokens:], skip_special_tokens=True).strip() or " "
               for ctx, _ in wins]
    res = retriever.retrieve(queries, min(settings.k, len(retriever.index)))
    scores = res.scores.detach().float().cpu()
    prompts, conts, owner, slot = [], [], [], []
    sep = list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    for w, (ctx, y) in enumerate(wins):
        for i, p in enumerate(res.passages[w]):
            if p is None:
                continue
            body = [] if w == 0 else ctx  # the first window has no text before it: the passage replaces BOS
            room = settings.max_length - len(body) - len(y) - len(sep)
            chunk = list(tokenizer(passage_text(p.title, p.text), add_special_tokens=False)["input_ids"])[:max(0, room)]
            prompts.append(chunk + sep + body if chunk else list(ctx))
            conts.append([y])
            owner.append(w)
            slot.append(i)
    flat = engine.score(prompts, conts, progress=progress)
    k = scores.shape[1]
    lm = torch.zeros(len(wins), k)
    mask = torch.zeros(len(wins), k, dtype=torch.bool)
    for (w, i), v in zip(zip(owner, slot), flat):
        lm[w, i] = v[0]
        mask[w, i] = True
    ens = ensemble_logprobs(lm, scores.masked_fill(~mask, 0.0), mask,
                            temperature=settings.retriever_temperature, impl=settings.impl)
    out["retrieval"] = _summary(float(ens.double().sum()), len(ids), len(text.encode("utf-8")))
    out["retrieval"]["k"] = k
    return out
