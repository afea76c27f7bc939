"""Parallel retrieval augmentation and the REPLUG ensemble for evaluation (docs/method.md).

For an example x with retrieved chunks c_1..c_k (scores s_i), each chunk is prepended to x *separately*
(``Background: c_i\\n\\n[demonstrations]Q: x\\nA:``); the k augmented prompts are scored by the LM and
ensembled:

    log p(y | x) = logsumexp_i( log_softmax(s / tau_R)_i + log p_LM(y | c_i o x) )

``k = 0`` is the LM alone (one prompt, no background); an example carrying a gold ``context`` uses it as
its only background (reading comprehension), whatever k. Answer log-likelihoods come from the engine's
fused LM-head path (no ``N x V`` logits); the ensemble is :func:`radit_fast.ops.replug.replug_logprob`
over a ``[B, k]`` grid with a mask for examples that have fewer than k chunks.

Multiple choice: every option ``o`` is scored as ``log p(" o" | x)`` by the ensemble (the option's
token log-probs summed, or averaged with ``choice_score="mean"``); the prediction is the argmax.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from radit_fast.config.evaluation import EvalSettings
from radit_fast.data.prompts import LETTERS, build_prompt, lettered, question_text, resolve_template
from radit_fast.data.tasks import Example
from radit_fast.evaluation.engine import LMEngine
from radit_fast.ops.replug import replug_logprob

log = logging.getLogger(__name__)


@dataclass
class Augmentation:
    """The backgrounds of one example and their retriever scores (``chunks == [None]``: no background)."""

    chunks: list[str | None]
    scores: list[float]
    passage_ids: list[str] = field(default_factory=list)


def augmentation_for(example: Example, retrieved: Sequence[tuple[str, str, float]] | None, k: int) -> Augmentation:
    """Backgrounds of ``example``: its gold context, else its top-k ``(passage_id, text, score)``, else none."""
    if example.context:
        return Augmentation([example.context], [0.0])
    if k == 0 or not retrieved:
        return Augmentation([None], [0.0])
    top = list(retrieved)[:k]
    return Augmentation([t for _, t, _ in top], [float(s) for _, _, s in top], [p for p, _, _ in top])


def example_task(example: Example) -> str | None:
    """The task an example belongs to (``meta["task"]``, set by the native-format readers), else None."""
    return example.meta.get("task") if isinstance(example.meta, dict) else None


def template_for(example: Example, template: str = "auto") -> str | None:
    """The resolved prompt template of ``example`` (None: the plain ``Q:``/``A:`` layout)."""
    return resolve_template(template, example_task(example))


def gold_text(example: Example, template: str | None) -> str:
    """The answer a demonstration shows: the option's letter under a lettered template, else the answer."""
    if lettered(template) and example.choices:
        meta = example.meta if isinstance(example.meta, dict) else {}
        idx = meta.get("answer_index")  # MMLU may repeat an option's text; its letter is in the file
        return LETTERS[idx if isinstance(idx, int) else example.choices.index(example.answer)]
    return example.answer


def _group(example: Example) -> tuple[bool, str | None]:
    """Demonstrations are drawn per task kind (multiple choice or not) and per task/subject when known."""
    meta = example.meta if isinstance(example.meta, dict) else {}
    return example.choices is not None, meta.get("subject") or meta.get("task")


def pick_demonstrations(train: Sequence[Example] | None, shots: int, *, seed: int = 0,
                        show_choices: bool = False, template: str = "auto") -> dict[Any, list[tuple[str, str]]]:
    """``shots`` fixed (question, answer) demonstrations per task kind (key True: multiple choice) and,
    for examples whose meta names a task or an MMLU subject, per ``(kind, task or subject)``.

    Per kind: drawn once with ``seed`` from the train split, so every evaluated example of a kind sees the
    same ones. Per subject (MMLU): the first ``shots`` examples of the subject's pool in file order, as
    MMLU's own evaluation takes them from its dev split. Look them up with :func:`shots_for`.
    """
    out: dict[Any, list[tuple[str, str]]] = {False: [], True: []}
    if not shots or not train:
        return out

    def demo(ex: Example) -> tuple[str, str]:
        t = template_for(ex, template)
        return question_text(ex, show_choices=show_choices, template=t), gold_text(ex, t)

    order = list(train)
    random.Random(seed).shuffle(order)
    for mc in (False, True):
        pool = [ex for ex in order if (ex.choices is not None) == mc]
        out[mc] = [demo(ex) for ex in pool[:shots]]
    groups: dict[tuple[bool, str], list[Example]] = {}
    for ex in train:  # file order
        key = _group(ex)
        if key[1] is not None:
            groups.setdefault(key, []).append(ex)
    for key, pool in groups.items():
        is_subject = isinstance(pool[0].meta, dict) and pool[0].meta.get("subject")
        chosen = pool[:shots] if is_subject else [ex for ex in order if _group(ex) == key][:shots]
        out[key] = [demo(ex) for ex in chosen]
    return out


def shots_for(demos: dict[Any, list[tuple[str, str]]], example: Example) -> list[tuple[str, str]]:
    """The demonstrations of ``example``: those of its task/subject when drawn, else of its kind."""
    key = _group(example)
    if key[1] is not None and key in demos:
        return demos[key]
    return demos.get(example.choices is not None, [])


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of ``" " + answer`` as :func:`radit_fast.data.prompts.build_instance` appends them with
    ``append_eos=False`` (its default, as in LSR scoring): candidates are scored without the EOS token that
    RA-IT training may append, so base and tuned LMs are compared on the answer's own tokens."""
    return list(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, example: Example, chunk: str | None, settings: EvalSettings,
               shots: Sequence[tuple[str, str]], reserve: int) -> list[int]:
    q = question_text(example, show_choices=settings.show_choices, template=template_for(example, settings.template))
    return build_prompt(tokenizer, chunk, q, max_length=settings.max_length, shots=shots, reserve=reserve,
                        example_id=example.id).input_ids


def reserve_for(example: Example, tokenizer: Any, settings: EvalSettings) -> int:
    """Tokens an example's prompts keep free: its longest option (multiple choice) or ``max_new_tokens``."""
    if example.choices is not None:
        return max(len(answer_ids(tokenizer, c)) for c in choice_candidates(example, settings))
    return settings.max_new_tokens


def check_prompts_fit(tokenizer: Any, examples: Sequence[Example], settings: EvalSettings,
                      train: Sequence[Example] | None = None) -> None:
    """RaditError (naming the example) when an example's question, its demonstrations and the room for its
    answer do not fit ``settings.max_length`` even without a background: the prompts of
    :func:`score_multiple_choice` and ``generate_answers`` built with no chunk, before any model runs."""
    demos = pick_demonstrations(train, settings.shots, seed=settings.seed, show_choices=settings.show_choices,
                                template=settings.template)
    for ex in examples:
        prompt_ids(tokenizer, ex, None, settings, shots_for(demos, ex),
                   reserve_for(ex, tokenizer, settings))


def ensemble_logprobs(lm_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *,
                      temperature: float, impl: str = "auto") -> torch.Tensor:
    """REPLUG ensemble ``[B]`` of per-chunk answer log-likelihoods ``[B, k]`` (missing chunks masked)."""
    return replug_logprob(lm_logprobs, scores, temperature=temperature, mask=mask, impl=impl)


def _grid(values: Sequence[Sequence[float]], width: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.full((len(values), max(1, width)), fill, dtype=torch.float32)
    mask = torch.zeros_like(grid, dtype=torch.bool)
    for b, row in enumerate(values):
        grid[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.float32)
        mask[b, : len(row)] = True
    return grid, mask


def score_candidates(engine: LMEngine, tokenizer: Any, examples: Sequence[Example],
                     augs: Sequence[Augmentation], candidates: Sequence[Sequence[str]],
                     settings: EvalSettings, demos: dict[bool, list[tuple[str, str]]],
                     *, progress: Any = None,
                     prompts: Sequence[Sequence[Sequence[int]]] | None = None) -> list[dict[str, Any]]:
    """Ensemble log-likelihood of every candidate answer of every example.

    Each augmented prompt keeps room for the example's longest candidate (its chunk truncated to fit
    ``settings.max_length``). ``prompts`` (per example, one token list per chunk) replaces them: rescoring
    passes the prompts it decoded from, so every candidate is scored behind exactly the truncated
    background that produced it, whatever its length.

    Returns per example ``{"candidates": [...], "logprobs": [ensemble per candidate],
    "chunk_logprobs": [[per chunk] per candidate], "prediction": argmax candidate}``; with
    ``choice_score="mean"`` the per-chunk scores are divided by the candidate's token count first.
    """
    rows: list[list[int]] = []
    conts: list[list[list[int]]] = []
    owner: list[int] = []
    cand_ids = [[answer_ids(tokenizer, c) for c in cands] for cands in candidates]
    if prompts is not None and len(prompts) != len(examples):
        raise ValueError(f"{len(examples)} examples but prompts for {len(prompts)}")
    for b, (ex, aug) in enumerate(zip(examples, augs)):
        if not candidates[b]:
            raise ValueError(f"example {ex.id}: no candidate to score")
        if prompts is not None:
            if len(prompts[b]) != len(aug.chunks):
                raise ValueError(f"example {ex.id}: {len(aug.chunks)} chunks but {len(prompts[b])} prompts")
            given = [list(p) for p in prompts[b]]
        else:
            reserve = max(len(c) for c in cand_ids[b])
            shots = shots_for(demos, ex)
            given = [prompt_ids(tokenizer, ex, chunk, settings, shots, reserve) for chunk in aug.chunks]
        for p in given:
            rows.append(p)
            conts.append(cand_ids[b])
            owner.append(b)
    flat = engine.score(rows, conts, progress=progress)
    # per example: [n_cand][k] log-likelihoods
    per_ex: list[list[list[float]]] = [[[] for _ in candidates[b]] for b in range(len(examples))]
    for row, b in zip(flat, owner):
        for c, v in enumerate(row):
            n_tok = len(cand_ids[b][c]) if settings.choice_score == "mean" else 1
            per_ex[b][c].append(v / n_tok)
    # One [sum_b n_cand_b, k] grid through the ensemble op.
    lm_rows = [chunks for b in range(len(examples)) for chunks in per_ex[b]]
    score_rows = [augs[b].scores for b in range(len(examples)) for _ in candidates[b]]
    width = max(len(r) for r in lm_rows)
    lm, mask = _grid(lm_rows, width)
    sc, _ = _grid(score_rows, width)
    ens = ensemble_logprobs(lm, sc, mask, temperature=settings.retriever_temperature, impl=settings.impl).tolist()
    out, i = [], 0
    for b in range(len(examples)):
        n = len(candidates[b])
        vals = ens[i:i + n]
        i += n
        best = max(range(n), key=lambda c: (vals[c], -c))
        out.append({"candidates": list(candidates[b]), "logprobs": vals, "chunk_logprobs": per_ex[b],
                    "prediction": candidates[b][best]})
    return out


def choice_candidates(example: Example, settings: EvalSettings) -> list[str]:
    """What the LM scores for each option: the option itself, or its letter under a lettered template."""
    if lettered(template_for(example, settings.template)):
        return list(LETTERS[: len(example.choices)])
    return list(example.choices)


def score_multiple_choice(engine: LMEngine, tokenizer: Any, examples: Sequence[Example],
                          augs: Sequence[Augmentation], settings: EvalSettings,
                          demos: dict[Any, list[tuple[str, str]]], *, progress: Any = None) -> list[dict[str, Any]]:
    """Predict each multiple-choice example's option by ensemble likelihood (argmax over its choices; under
    a lettered template the letters are scored and the prediction is the option of the best letter)."""
    for ex in examples:
        if not ex.choices:
            raise ValueError(f"example {ex.id} has no choices")
    res = score_candidates(engine, tokenizer, examples, augs, [choice_candidates(ex, settings) for ex in examples],
                           settings, demos, progress=progress)
    for ex, r in zip(examples, res):
        best = r["candidates"].index(r["prediction"])
        r["scored"], r["candidates"], r["prediction"] = r["candidates"], list(ex.choices), ex.choices[best]
    return res
