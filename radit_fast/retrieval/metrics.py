"""Retrieval metrics against KILT provenance, at the document level.

A passage id ``"{doc}#{n}"`` counts as its document ``doc`` (:func:`radit_fast.retrieval.corpus.doc_id`:
without the chunk suffix, the last ``'#'`` followed by digits), and so does a gold provenance id. For a
query with gold documents G and top-k passages P_k (in rank order):

    recall@k = |G ∩ doc(P_k)| / |G|          hit@k = [G ∩ doc(P_k) ≠ ∅]

hit@k is DPR's top-k accuracy, and KILT's success@k when every evidence set is one page (KILT's own
evidence-set definitions are :mod:`radit_fast.evaluation.kilt`). :func:`recall_at_k` and :func:`hit_at_k`
score one query (None without gold documents); :func:`retrieval_metrics` averages both over the queries
that have gold documents (queries without any are skipped and counted).

>>> gold = [{"7"}, {"1", "2"}, set()]
>>> ranked = [["7#0", "3"], ["2#1", "9"], ["5"]]
>>> retrieval_metrics(ranked, gold, ks=(1, 2))
{'recall@1': 0.75, 'hit@1': 1.0, 'recall@2': 0.75, 'hit@2': 1.0, 'queries': 2}
>>> recall_at_k(["d1#0", "d2#3"], ["d2", "d3"], 2), hit_at_k(["d1#0", "d2#3"], ["d2", "d3"], 2)
(0.5, 1.0)
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np

from radit_fast.retrieval.corpus import doc_id


def provenance_doc_ids(example: dict[str, Any]) -> set[str]:
    """Gold document ids of a KILT example: ``output[*].provenance[*].id`` (or ``wikipedia_id``)."""
    out: set[str] = set()
    outputs = example.get("output") or []
    if isinstance(outputs, dict):
        outputs = [outputs]
    for o in outputs if isinstance(outputs, list) else []:
        for prov in (o.get("provenance") or []) if isinstance(o, dict) else []:
            if isinstance(prov, dict):
                pid = prov.get("id", prov.get("wikipedia_id"))
                if pid is not None and str(pid) != "":
                    out.add(doc_id(str(pid)))
    return out


def _gold_docs(gold: Iterable[str]) -> set[str]:
    return {doc_id(str(x)) for x in gold}


def _found(ranked_ids: Sequence[str | None], gold_docs: set[str], k: int) -> set[str]:
    """The gold documents among the documents of the top-k passages."""
    return gold_docs.intersection(doc_id(p) if p is not None else None for p in ranked_ids[:k])


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recall_at_k(retrieved_ids: Sequence[str | None], gold: Iterable[str], k: int) -> float | None:
    """Document-level recall@k of one query: the fraction of its gold documents among the documents of its
    top-k passages; None when it has no gold document.

    >>> recall_at_k(["d1#0", "d2#3"], ["d2"], 1), recall_at_k(["d1#0", "d2#3"], ["d2"], 2)
    (0.0, 1.0)
    """
    _check_k(k)
    g = _gold_docs(gold)
    return len(_found(list(retrieved_ids), g, k)) / len(g) if g else None


def hit_at_k(retrieved_ids: Sequence[str | None], gold: Iterable[str], k: int) -> float | None:
    """Document-level hit@k of one query: 1.0 when any gold document is among the documents of its top-k
    passages; None when it has no gold document."""
    _check_k(k)
    g = _gold_docs(gold)
    return (1.0 if _found(list(retrieved_ids), g, k) else 0.0) if g else None


def mean_recall_at_k(ranked_ids: Sequence[Sequence[str | None]], gold: Sequence[Collection[str]], k: int) -> float:
    """:func:`recall_at_k` averaged over the queries with gold ids (nan when none has any)."""
    return retrieval_metrics(ranked_ids, gold, ks=(k,))[f"recall@{k}"]


def retrieval_metrics(ranked_ids: Sequence[Sequence[str | None]], gold: Sequence[Collection[str]],
                      ks: Iterable[int] = (1, 5, 10, 20, 100)) -> dict[str, float | int]:
    """``{"recall@k", "hit@k" for each k, "queries": number of queries with gold ids}``: the means of
    :func:`recall_at_k` and :func:`hit_at_k` over the queries with gold ids (nan when none has any)."""
    if len(ranked_ids) != len(gold):
        raise ValueError(f"{len(ranked_ids)} rankings but {len(gold)} gold sets")
    ks = sorted(set(int(k) for k in ks))
    sums = {k: [0.0, 0.0] for k in ks}
    n = 0
    for ranked, g in zip(ranked_ids, gold):
        g = _gold_docs(g)
        if not g:
            continue
        n += 1
        for k in ks:
            found = _found(list(ranked), g, k)
            sums[k][0] += len(found) / len(g)
            sums[k][1] += 1.0 if found else 0.0
    out: dict[str, float | int] = {}
    for k in ks:
        out[f"recall@{k}"] = sums[k][0] / n if n else float("nan")
        out[f"hit@{k}"] = sums[k][1] / n if n else float("nan")
    out["queries"] = n
    return out


def topk_mismatches(data: np.ndarray, queries: np.ndarray, scores: np.ndarray, rows: np.ndarray,
                    ref_scores: np.ndarray, atol: float = 1e-4) -> list[int]:
    """Queries whose top-k result (scores, rows) differs from a reference top-k beyond permutations of ties.

    In the spirit of faiss ``contrib/evaluation.py::check_ref_knn_with_draws``, but checked against the data:
    a query's result is correct when its rows are distinct, their true float64 scores ``data[row] . query``
    equal the reported scores, the scores are sorted descending and equal the reference top-k scores as a
    sorted list (all within ``atol``). So rows with equal scores may be swapped or exchanged at the k-th
    place, and nothing else.
    """
    bad = []
    for i in range(len(queries)):
        r = rows[i]
        true = data[r].astype(np.float64) @ queries[i].astype(np.float64)
        ok = (
            len(set(r.tolist())) == len(r)
            and np.allclose(true, scores[i], atol=atol)
            and bool(np.all(np.diff(scores[i]) <= atol))
            and np.allclose(np.sort(scores[i]), np.sort(ref_scores[i]), atol=atol)
        )
        if not ok:
            bad.append(i)
    return bad
