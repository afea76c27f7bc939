"""KILT's metrics against hand-computed cases, ROUGE-L against the rouge-score package, and their place in
radit eval's metrics and the report."""
from __future__ import annotations

import doctest
import json
import random

import pytest

from radit_fast.data.tasks import Example
from radit_fast.evaluation import kilt as K
from radit_fast.evaluation.metrics import exact_match, normalize_answer, token_f1


def test_doctests():
    assert doctest.testmod(K).failed == 0


def test_squad_normalisation_as_kilt():
    # lower-case, punctuation out, articles out, white space collapsed (SQuAD v1.1 / KILT order)
    assert normalize_answer("The  Beatles!") == "beatles"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("theory of everything") == "theory of everything"   # "the" inside a word stays
    assert exact_match("the Therefore-sign", ["therefore sign", "x"]) == 0.0       # hyphen removed, not split
    assert exact_match("the Therefore sign.", ["therefore sign"]) == 1.0
    # F1 by hand: pred {daft, punk, band}, gold {daft, punk}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Daft Punk band", ["the Daft Punk"]) == pytest.approx(0.8)


def test_r_precision_by_hand():
    assert K.r_precision(["A", "B", "C"], [{"A", "C"}]) == 0.5           # R = 2: A found in the top 2
    assert K.r_precision(["A", "B", "C"], [{"A"}, {"B", "C"}]) == 1.0    # max over evidence sets
    assert K.r_precision(["B", "C"], [{"A"}, {"B", "C"}]) == 1.0
    assert K.r_precision([], [{"A"}]) == 0.0
    assert K.r_precision(["X", "A"], [{"A"}]) == 0.0                     # R = 1: only the first guess counts


def test_recall_and_success_at_k_by_hand():
    # X misses; B half-completes set 0 (no point yet); A completes it (one point); C completes set 1
    guesses, sets = ["X", "B", "A", "C"], [{"A", "B"}, {"C"}]
    assert K.kilt_rank(guesses, sets) == [False, True, True]
    assert [K.kilt_recall_at_k(guesses, sets, k) for k in (1, 2, 3, 10)] == [0.0, 0.5, 1.0, 1.0]
    assert [K.success_at_k(guesses, sets, k) for k in (1, 2)] == [0.0, 1.0]
    with pytest.raises(ValueError):
        K.kilt_recall_at_k(guesses, sets, 0)


def test_passage_keys_and_ranking():
    assert K.ranked_keys(["12#0", "12#1", "7::3", "99", None]) == ["12", "7", "99"]     # chunks of a page: one guess
    assert K.ranked_keys(["12#0", "7::3", "7::3#1", "7::4"], "paragraph") == ["7+3", "7+4"]


def _kilt_example(evidence, answers=("Daft Punk",), choices=None, task="nq"):
    pages = list(dict.fromkeys(p["wikipedia_id"] for e in evidence for p in e))
    return Example("1", "who?", list(answers), provenance=pages, choices=choices,
                   meta={"task": task, "kilt": {}, "evidence": evidence})


def test_kilt_downstream_gated_by_r_precision():
    ev = [[{"wikipedia_id": "12", "start_paragraph_id": 2}],
          [{"wikipedia_id": "7", "start_paragraph_id": 3}, {"wikipedia_id": "8"}]]
    ex = _kilt_example(ev)
    m = K.kilt_metrics(ex, "daft punk", ["12#0", "12#1", "7::3", "99"])
    # page guesses [12, 7, 99]: set {12} is found at rank 1 -> R-precision 1; KILT scores = plain scores
    assert m["r_precision"] == 1.0 and m["kilt_em"] == 1.0 and m["kilt_f1"] == 1.0
    # recall@5: set {12} complete, set {7, 8} missing 8 -> 1 / 2
    assert m["kilt_recall@5"] == 0.5 and m["success@5"] == 1.0
    # paragraph level: {12+2} and {7+3} (8 names no paragraph); guesses [7+3]: the set {7+3} at rank 1
    assert m["r_precision_paragraph"] == 1.0
    miss = K.kilt_metrics(ex, "daft punk", ["99", "12#0"])          # right answer, wrong first page
    assert miss["r_precision"] == 0.0 and miss["kilt_em"] == 0.0 and miss["kilt_f1"] == 0.0
    assert "rougel" not in miss                                        # not a long-form task
    assert K.kilt_metrics(ex, "daft punk", None) == {}                 # no retrieval: no KILT scores


def test_kilt_accuracy_and_rouge_for_long_form():
    fever = _kilt_example([[{"wikipedia_id": "5"}]], answers=("true",), choices=["true", "false"], task="fever")
    assert K.kilt_metrics(fever, "true", ["5"])["kilt_accuracy"] == 1.0
    assert K.kilt_metrics(fever, "false", ["5"])["kilt_accuracy"] == 0.0
    assert K.kilt_metrics(fever, "true", ["6"])["kilt_accuracy"] == 0.0
    eli5 = _kilt_example([[{"wikipedia_id": "5"}]], answers=("the cat is on the mat", "dogs bark"), task="eli5")
    m = K.kilt_metrics(eli5, "the cat sat on the mat", ["5"])
    # LCS(the cat sat on the mat, the cat is on the mat) = 5 of 6 tokens each: F = 5/6
    assert m["rougel"] == pytest.approx(5 / 6) and m["kilt_rougel"] == pytest.approx(5 / 6)
    assert K.kilt_metrics(eli5, "the cat sat on the mat", ["4"])["kilt_rougel"] == 0.0


def test_rouge_l_matches_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = ["The", "cat", "sat", "on", "mat", "dog's", "BARK", "a", "1999", "café", "x-ray", "...", "on,"]
    cases = [("", "a b"), ("a b", ""), ("!!!", "a"), ("Hello, World!", "hello world"), ("a a a", "a")]
    for _ in range(200):
        cases.append((" ".join(rng.choices(words, k=rng.randint(1, 12))),
                      " ".join(rng.choices(words, k=rng.randint(1, 12)))))
    for pred, ref in cases:
        want = scorer.score(ref, pred)["rougeL"].fmeasure
        assert K.rouge_l(pred, ref) == pytest.approx(want, abs=1e-12), (pred, ref)


def test_evidence_sets_of_plain_examples():
    ex = Example("1", "q", ["a"], provenance=["d1", "d2#3"])
    assert K.evidence_sets(ex) == [frozenset({"d1", "d2"})]
    assert K.evidence_sets(ex, "paragraph") == []
    assert K.evidence_sets(Example("2", "q", ["a"])) == []


def test_example_metrics_and_report_carry_kilt_metrics(tmp_path):
    from radit_fast.evaluation.evaluate import example_metrics, per_task_metrics
    from radit_fast.evaluation.report import write_report

    ex = _kilt_example([[{"wikipedia_id": "12"}]])
    m = example_metrics(ex, "Daft Punk", ["12#0", "3"], k=2)
    assert m["em"] == 1.0 and m["r_precision"] == 1.0 and m["kilt_em"] == 1.0 and m["recall@1"] == 1.0
    by_task = per_task_metrics([ex], [{"id": "1", **m}])
    assert by_task["nq"]["kilt_em"] == 1.0 and by_task["nq"]["n_examples"] == 1
    rows = {"replug": {**m, "n_examples": 1}, "lm_only": {"em": 0.0, "f1": 0.0}}
    write_report(tmp_path, rows)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"]["replug"]["kilt_em"] == 1.0
    header = (tmp_path / "report.md").read_text().split("| row |")[1].split("\n")[0]
    cols = [c.strip() for c in header.split("|") if c.strip()]
    assert {"r_precision", "kilt_em", "kilt_f1", "kilt_recall@5"} <= set(cols)
    assert cols.index("kilt_em") < cols.index("r_precision") < cols.index("recall@1")
