"""Metrics: SQuAD normalisation, EM/F1 max over gold answers, accuracy, document-level recall@k, aggregation."""
from __future__ import annotations

import doctest

import pytest

from radit_fast.evaluation import metrics
from radit_fast.evaluation.metrics import aggregate, exact_match, normalize_answer, token_f1
from radit_fast.retrieval.metrics import recall_at_k


def test_doctests():
    res = doctest.testmod(metrics)
    assert res.failed == 0 and res.attempted > 0


@pytest.mark.parametrize("raw,norm", [
    ("The Beatles", "beatles"),
    ("  an  Apple,  a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),            # "the" inside a word stays
    ("", ""),
    ("Ölgemälde - the Art", "ölgemälde art"),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_em_and_f1_max_over_golds():
    golds = ["Barack Obama", "Obama"]
    assert exact_match("obama.", golds) == 1.0
    assert exact_match("Michelle Obama", golds) == 0.0
    # F1 against "Barack Obama": p=1/2 r=1/2 -> 0.5; against "Obama": p=1/2 r=1 -> 2/3 (the max)
    assert token_f1("Michelle Obama", golds) == pytest.approx(2 / 3)
    assert token_f1("nothing shared", golds) == 0.0
    assert token_f1("the", ["a"]) == 1.0          # both empty after normalisation
    assert token_f1("x", ["the"]) == 0.0


def test_f1_counts_repeated_tokens():
    # pred "a a b" vs gold "a b b": common = {a:1, b:1} -> p = r = 2/3
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)


def test_gold_must_be_a_list():
    with pytest.raises(TypeError):
        exact_match("a", "a")
    with pytest.raises(ValueError):
        token_f1("a", [])


def test_recall_document_level():
    assert recall_at_k(["A#0", "B#2", "C#1"], ["C"], 2) == 0.0
    assert recall_at_k(["A#0", "B#2", "C#1"], ["C"], 3) == 1.0
    assert recall_at_k(["A#0"], ["A#5"], 1) == 1.0      # provenance given as another chunk of A
    assert recall_at_k(["A#0"], [], 1) is None
    assert recall_at_k(["A#0", "B"], ["A", "C"], 2) == 0.5      # half of the gold documents found
    with pytest.raises(ValueError):
        recall_at_k(["A"], ["A"], 0)


def test_aggregate_skips_missing():
    rows = [{"em": 1.0, "f1": 1.0, "recall@1": None}, {"em": 0.0, "f1": 0.5, "recall@1": 1.0},
            {"accuracy": 1.0}]
    assert aggregate(rows) == {"em": 0.5, "f1": 0.75, "recall@1": 1.0, "accuracy": 1.0}
    assert aggregate([]) == {}
