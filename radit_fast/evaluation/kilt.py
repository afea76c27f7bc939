"""KILT's metrics: R-precision and recall@k over evidence sets, KILT-EM/F1/accuracy/ROUGE-L, ROUGE-L.

Definitions follow the KILT evaluation scripts (Petroni et al., 2021, ``kilt/eval_retrieval.py`` and
``kilt/eval_downstream.py``):

* **Provenance keys.** A gold ``output`` entry's provenance list is one *evidence set*; identical sets
  count once. At the *page* level a key is the Wikipedia id (here: a document id); at the *paragraph*
  level it is ``"{wikipedia_id}+{start_paragraph_id}"`` (KILT's ``rank_keys``). A retrieved passage id
  ``"{doc}#{n}"`` (a chunk) counts as the page ``doc``; a passage of a paragraph-level corpus carries its
  paragraph as ``"{wikipedia_id}::{paragraph_id}"`` (optionally followed by ``#n``). The ranking of an
  example is its retrieved keys in rank order with repeats dropped (two chunks of one page are one guess).
* **R-precision.** For an evidence set E of size R: ``|top-R guesses ∩ E| / R``; an example's R-precision is
  the maximum over its evidence sets (0 without guesses).
* **recall@k / success@k** (keys ``kilt_recall@k``, ``success@k``; functions :func:`kilt_recall_at_k`,
  :func:`success_at_k`). Each evidence set is one point of the ranking, placed where its last key is
  found; ``recall@k`` = complete sets within the first k points / number of sets, ``success@k`` = 1 when
  one set is complete within them.
* **Downstream.** ``em``/``f1`` with SQuAD normalisation (max over gold answers), ``accuracy`` as the
  exact (unnormalised) string match, ROUGE-L F-measure for long answers; the *KILT* versions count an
  example's score only when its page-level R-precision is 1 (else 0), averaged over all examples.

ROUGE-L here is the LCS F-measure with ``rouge-score``'s tokenisation (lower-case, runs of characters other
than ``a-z0-9`` split tokens, no stemming) and is tested against that package; KILT's script calls the
``rouge`` package, whose tokenisation differs slightly (it keeps non-ASCII letters).

>>> r_precision(["7", "3", "9"], [{"7", "9"}]), r_precision(["7", "9"], [{"7", "9"}, {"3"}])
(0.5, 1.0)
>>> kilt_recall_at_k(["1", "7", "9"], [{"7", "9"}, {"4"}], 1), kilt_recall_at_k(["1", "7", "9"], [{"7", "9"}, {"4"}], 2)
(0.0, 0.5)
>>> round(rouge_l("the cat sat on the mat", "the cat is on the mat"), 4)
0.8333
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from radit_fast.evaluation.metrics import exact_match, token_f1
from radit_fast.retrieval.corpus import doc_id

PARAGRAPH_SEP = "::"
LONG_FORM_TASKS = frozenset({"eli5", "wow", "long_form"})
_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")


# ---------------------------------------------------------------------------------------- keys
def passage_key(passage_id: str, level: str = "page") -> str | None:
    """The provenance key of a retrieved passage id at ``level`` (``"page"`` | ``"paragraph"``); None when a
    paragraph is asked of a passage that does not name one.

    >>> passage_key("123#4"), passage_key("123::5#0"), passage_key("123::5", "paragraph"), passage_key("123", "paragraph")
    ('123', '123', '123+5', None)
    """
    base = doc_id(str(passage_id))
    page, sep, para = base.rpartition(PARAGRAPH_SEP)
    has_para = bool(sep) and para.isdigit()
    if level == "page":
        return page if has_para else base
    if level == "paragraph":
        return f"{page}+{int(para)}" if has_para else None
    raise ValueError(f"level must be page or paragraph, got {level!r}")


def ranked_keys(passage_ids: Iterable[str | None], level: str = "page") -> list[str]:
    """Keys of the ranked passages, in order, repeats and unknown keys dropped (KILT's guess list)."""
    out: list[str] = []
    for pid in passage_ids:
        if pid is None:
            continue
        key = passage_key(pid, level)
        if key is not None and key not in out:
            out.append(key)
    return out


def _prov_key(prov: dict[str, Any], level: str) -> str | None:
    page = prov.get("wikipedia_id", prov.get("id"))
    if page is None or str(page).strip() == "":
        return None
    page = passage_key(str(page).strip(), "page")
    if level == "page":
        return page
    start = prov.get("start_paragraph_id")
    return None if start is None else f"{page}+{int(start)}"


def evidence_sets(example: Any, level: str = "page") -> list[frozenset[str]]:
    """The distinct evidence sets of an example at ``level``.

    KILT examples read by :mod:`radit_fast.data.readers.kilt` carry their per-output provenance in
    ``meta["evidence"]`` (a list of lists of provenance dicts); other examples have one set, their
    ``provenance`` ids (no paragraph level)."""
    meta = example.meta if isinstance(getattr(example, "meta", None), dict) else {}
    raw = meta.get("evidence")
    if raw is None:
        if level != "page" or not example.provenance:
            return []
        raw = [[{"id": p} for p in example.provenance]]
    out: list[frozenset[str]] = []
    for entry in raw:
        keys = frozenset(k for k in (_prov_key(p, level) for p in entry) if k is not None)
        if keys and keys not in out:
            out.append(keys)
    return out


# ---------------------------------------------------------------------------------- retrieval
def r_precision(guesses: Sequence[str], sets: Sequence[Iterable[str]]) -> float:
    """Maximum over the evidence sets E of ``|guesses[:|E|] ∩ E| / |E|`` (0 without guesses)."""
    best = 0.0
    for e in sets:
        e = set(e)
        if e:
            best = max(best, sum(g in e for g in guesses[: len(e)]) / len(e))
    return best


def kilt_rank(guesses: Sequence[str], sets: Sequence[Iterable[str]]) -> list[bool]:
    """KILT's ranking with each evidence set as one point: True where a set is completed (at its last
    key), False for a guess outside every set; a partly found set holds no point until completed."""
    remaining = [set(e) for e in sets]
    points: list[object] = []
    for g in guesses:
        found = False
        for i, e in enumerate(remaining):
            if g in e:
                found = True
                marker = ("set", i)
                if marker in points:
                    points.remove(marker)
                e.discard(g)
                points.append(True if not e else marker)
        if not found:
            points.append(False)
    return [p is True for p in points]


def kilt_recall_at_k(guesses: Sequence[str], sets: Sequence[Iterable[str]], k: int) -> float:
    """Complete evidence sets among the first k points of :func:`kilt_rank`, over the number of sets."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sets = [e for e in sets if e]
    return sum(kilt_rank(guesses, sets)[:k]) / len(sets) if sets else 0.0


def success_at_k(guesses: Sequence[str], sets: Sequence[Iterable[str]], k: int) -> float:
    """1.0 when an evidence set is complete among the first k points of :func:`kilt_rank`."""
    return float(any(kilt_rank(guesses, [e for e in sets if e])[:k]))


# --------------------------------------------------------------------------------- downstream
def rouge_tokens(text: str) -> list[str]:
    """``rouge-score``'s default tokens: lower-case, split on anything but ``a-z0-9``."""
    return [t for t in _ROUGE_SPLIT.split(text.lower()) if t]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``2PR / (P + R)`` with ``P = LCS / |prediction|``, ``R = LCS / |reference|``."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def max_rouge_l(prediction: str, golds: Sequence[str]) -> float:
    return max(rouge_l(prediction, g) for g in golds)


def strict_accuracy(prediction: str, golds: Sequence[str]) -> float:
    """KILT's accuracy: the stripped prediction equals a gold answer exactly."""
    return float(prediction.strip() in golds)


def is_long_form(example: Any) -> bool:
    """Long-form answers (ROUGE-L): examples whose ``meta["task"]`` is ELI5, WoW or ``long_form``."""
    meta = example.meta if isinstance(getattr(example, "meta", None), dict) else {}
    return str(meta.get("task", "")).lower() in LONG_FORM_TASKS


def kilt_metrics(example: Any, prediction: str, passage_ids: Sequence[str | None] | None,
                 ks: Sequence[int] = (5,)) -> dict[str, float | None]:
    """The KILT metrics of one example (None where one does not apply).

    Always: ``rougel`` for long-form examples. With retrieval results and provenance: ``r_precision`` and
    ``kilt_recall@k`` / ``success@k`` (page level; ``r_precision_paragraph`` where paragraph provenance
    and paragraph-level passages exist) and the KILT downstream scores ``kilt_em``, ``kilt_f1``
    (generation), ``kilt_accuracy`` (multiple choice: the chosen option matches exactly) and
    ``kilt_rougel`` (long-form): the plain score when the page-level R-precision is 1, else 0.
    """
    out: dict[str, float | None] = {}
    long_form = example.choices is None and is_long_form(example)
    if long_form:
        out["rougel"] = max_rouge_l(prediction, example.answers)
    sets = evidence_sets(example, "page")
    if passage_ids is None or not sets:
        return out
    guesses = ranked_keys(passage_ids, "page")
    rp = r_precision(guesses, sets)
    out["r_precision"] = rp
    for k in ks:
        out[f"kilt_recall@{k}"] = kilt_recall_at_k(guesses, sets, k)
        out[f"success@{k}"] = success_at_k(guesses, sets, k)
    para_sets = evidence_sets(example, "paragraph")
    para_guesses = ranked_keys(passage_ids, "paragraph")
    if para_sets and para_guesses:
        out["r_precision_paragraph"] = r_precision(para_guesses, para_sets)
    gate = 1.0 if rp == 1.0 else 0.0
    if example.choices is not None:
        out["kilt_accuracy"] = gate * strict_accuracy(prediction, example.answers)
    else:
        out["kilt_em"] = gate * exact_match(prediction, example.answers)
        out["kilt_f1"] = gate * token_f1(prediction, example.answers)
        if long_form:
            out["kilt_rougel"] = gate * out["rougel"]
    return out
