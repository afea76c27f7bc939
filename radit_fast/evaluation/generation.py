"""Greedy answer generation with parallel retrieval augmentation.

Two decoders (docs/method.md, "Parallel retrieval augmentation"):

* ``"mixture"`` (default): decode token by token from the token-level ensemble of the k augmented prompts,
  ``p(y_t | x, y_<t) = sum_i w_i p_LM(y_t | c_i o x, y_<t)`` with ``w = softmax(s / tau_R)`` (optionally
  re-weighted by each chunk's running likelihood); one KV cache per augmented prompt, all examples of a
  batch decoded together.
* ``"rescore"`` (the paper's alternative): decode each augmented prompt greedily on its own, then score
  every distinct candidate with the REPLUG ensemble over all k prompts and keep the best. Candidates are
  scored behind the very prompts they were decoded from (chunks truncated to keep ``max_new_tokens``
  free), so a chunk is never cut differently between decoding and rescoring.

Generation stops at the end-of-sequence token or at the first newline after the answer has begun
(answers are one line; leading blank lines are skipped).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from radit_fast.config.evaluation import EvalSettings
from radit_fast.data.tasks import Example
from radit_fast.evaluation.engine import LMEngine
from radit_fast.evaluation.scoring import Augmentation, prompt_ids, score_candidates, shots_for

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _vocab_classes(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """(ids whose text contains a newline, ids whose text is only white space)."""
    newline, blank = set(), set()
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if "\n" in text:
            newline.add(i)
        if not text.strip():
            blank.add(i)
    return frozenset(newline), frozenset(blank)


def stop_ids(tokenizer: Any) -> dict[str, frozenset[int]]:
    """Decoding stops: ``eos_ids`` (end of sequence) always; ``stop_ids`` (a newline) once the answer has
    begun, i.e. after a token outside ``blank_ids`` (leading blank lines are skipped)."""
    newline, blank = _vocab_classes(tokenizer)
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    return {"stop_ids": newline, "eos_ids": frozenset(eos_ids), "blank_ids": blank | frozenset(eos_ids)}


def clean_answer(text: str) -> str:
    """The first non-empty line of a generated text, stripped."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def generate_answers(engine: LMEngine, tokenizer: Any, examples: Sequence[Example], augs: Sequence[Augmentation],
                     settings: EvalSettings, demos: dict[bool, list[tuple[str, str]]], *,
                     progress: Any = None) -> list[dict[str, Any]]:
    """Generate one answer per example; returns ``{"prediction": str, ...}`` per example.

    ``"rescore"`` also returns the per-chunk ``"candidates"`` and their ensemble ``"logprobs"``.
    """
    stops = stop_ids(tokenizer)
    prompts = [[prompt_ids(tokenizer, ex, chunk, settings, shots_for(demos, ex),
                           settings.max_new_tokens) for chunk in aug.chunks]
               for ex, aug in zip(examples, augs)]
    if settings.decode == "mixture":
        weights = [[s / settings.retriever_temperature for s in aug.scores] for aug in augs]
        tokens = engine.generate(prompts, weights, max_new_tokens=settings.max_new_tokens, **stops,
                                 reweight=settings.reweight, progress=progress)
        return [{"prediction": clean_answer(tokenizer.decode(t, skip_special_tokens=True))} for t in tokens]
    # rescore: each augmented prompt decoded alone (a mixture of one), candidates rescored by the ensemble
    flat = [[p] for ps in prompts for p in ps]
    tokens = engine.generate(flat, [[0.0]] * len(flat), max_new_tokens=settings.max_new_tokens, **stops,
                             progress=progress)
    candidates, i = [], 0
    for ps in prompts:
        texts = [clean_answer(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens[i:i + len(ps)]]
        i += len(ps)
        uniq = list(dict.fromkeys(t for t in texts if t)) or [""]
        candidates.append(uniq)
    # Empty candidates (the model stopped at once) cannot be scored; they only win when nothing else exists.
    scorable = [b for b, c in enumerate(candidates) if c != [""]]
    out: list[dict[str, Any]] = [{"prediction": "", "candidates": [], "logprobs": []} for _ in examples]
    if scorable:
        scored = score_candidates(engine, tokenizer, [examples[b] for b in scorable], [augs[b] for b in scorable],
                                  [candidates[b] for b in scorable], settings, demos,
                                  prompts=[prompts[b] for b in scorable])
        for b, s in zip(scorable, scored):
            out[b] = {"prediction": s["prediction"], "candidates": s["candidates"], "logprobs": s["logprobs"]}
    return out
