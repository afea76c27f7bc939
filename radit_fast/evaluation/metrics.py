"""Task metrics: exact match and token F1 with SQuAD answer normalisation, accuracy, their aggregation.

Conventions (those of the SQuAD v1.1 evaluation script and KILT):

* ``normalize_answer``: lower-case, drop punctuation, drop the articles "a", "an", "the", collapse spaces.
* ``exact_match`` / ``token_f1`` of one prediction take the maximum over the gold answers.
* Retrieval metrics (document-level ``recall@k``, ``hit@k``) are :mod:`radit_fast.retrieval.metrics`;
  KILT's evidence-set metrics are :mod:`radit_fast.evaluation.kilt`. A per-example metric that does not
  apply is ``None`` (an example without provenance has no ``recall@k``) and is left out of the mean.

Every per-example function returns a float in [0, 1]; ``mean`` of an empty list is ``None``, not 0, so a
missing metric is never mistaken for a zero score.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, remove punctuation and articles, collapse white space.

    >>> normalize_answer("  The Eiffel-Tower!  ")
    'eiffeltower'
    >>> normalize_answer("A  cat, an owl")
    'cat owl'
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _check_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str):
        raise TypeError("gold answers must be a sequence of strings, not one string")
    if len(golds) == 0:
        raise ValueError("at least one gold answer is needed")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer.

    >>> exact_match("the Beatles", ["Beatles", "The Fab Four"])
    1.0
    """
    _check_golds(golds)
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1_one(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD v2 convention: two empty answers agree, one empty answer scores 0.
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Bag-of-tokens F1 between normalised prediction and gold, maximum over the gold answers.

    >>> round(token_f1("Paris France", ["Paris"]), 4)
    0.6667
    """
    _check_golds(golds)
    p = normalize_answer(prediction).split()
    return max(_f1_one(p, normalize_answer(g).split()) for g in golds)


def accuracy(prediction: str, golds: Sequence[str]) -> float:
    """Multiple choice: 1.0 when the chosen option is one of the gold answers (normalised comparison)."""
    return exact_match(prediction, golds)


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def aggregate(per_example: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over examples (None entries ignored); a metric absent everywhere is dropped.

    >>> aggregate([{"em": 1.0, "recall@1": None}, {"em": 0.0, "recall@1": None}])
    {'em': 0.5}
    """
    names: list[str] = []
    for row in per_example:
        for name in row:
            if name not in names:
                names.append(name)
    out: dict[str, float | None] = {}
    for name in names:
        m = mean(row.get(name) for row in per_example)
        if m is not None:
            out[name] = m
    return out
