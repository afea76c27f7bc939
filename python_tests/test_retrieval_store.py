"""Corpus chunking, the passage store (random access, id map, duplicates) and the recall metrics."""
from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import radit_fast.distributed as dist_mod
import radit_fast.retrieval.corpus as corpus_mod
import radit_fast.retrieval.metrics as metrics_mod
import radit_fast.retrieval.store as store_mod
from radit_fast.distributed import shard_range
from radit_fast.io import RaditError
from radit_fast.retrieval.corpus import Passage, chunk_words, doc_id, iter_corpus
from radit_fast.retrieval.metrics import mean_recall_at_k, provenance_doc_ids, retrieval_metrics
from radit_fast.retrieval.store import PassageStore, PassageStoreWriter


@pytest.mark.parametrize("module", [corpus_mod, metrics_mod, dist_mod])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@settings(max_examples=200, deadline=None)
@given(n_words=st.integers(0, 60), max_words=st.integers(1, 25))
def test_chunks_cover_the_words_in_order_and_respect_the_limit(n_words, max_words):
    words = [f"w{i}" for i in range(n_words)]
    chunks = chunk_words(" ".join(words), max_words)
    assert " ".join(c for c in chunks if c).split() == words
    sizes = [len(c.split()) for c in chunks]
    assert max(sizes) <= max_words
    assert len(chunks) == max(1, -(-n_words // max_words))
    assert max(sizes) - min(sizes) <= 1  # near-equal: no tiny tail chunk


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_short_documents_keep_their_id_long_ones_get_chunk_ids(tmp_path):
    f = _write(tmp_path / "c.jsonl", [
        {"id": "a", "title": "A", "text": "one two three"},
        {"id": 7, "title": "B", "text": " ".join(["x"] * 7)},
        {"id": "c", "text": "no title here"},
    ])
    got = [(line, p) for line, p in iter_corpus(f, chunk_size=3)]
    assert [p.id for _, p in got] == ["a", "7#0", "7#1", "7#2", "c"]
    assert [line for line, _ in got] == [1, 2, 2, 2, 3]
    assert all(len(p.text.split()) <= 3 for _, p in got)
    assert got[1][1].title == "B" and got[4][1].title == ""
    assert {doc_id(p.id) for _, p in got} == {"a", "7", "c"}


@pytest.mark.parametrize("row, message", [
    ('{"id": "a", "title": "t"}', "c.jsonl:2: missing field 'text'"),
    ('{"title": "t", "text": "x"}', "c.jsonl:2: missing field 'id'"),
    ('{"id": "a", "text": "   "}', "c.jsonl:2: empty text"),
    ('{"id": "a#1", "text": "x"}', "c.jsonl:2: document id 'a#1' ends with '#' and digits"),
    ('{"id": "C##12", "text": "x"}', "c.jsonl:2: document id 'C##12' ends with '#' and digits"),
    ('{"id": "a", "text": 5}', "c.jsonl:2: field 'text' must be a string"),
    ('{"id": "a", "text": "x"', "c.jsonl:2: malformed JSON"),
])
def test_bad_corpus_lines_name_file_and_line(tmp_path, row, message):
    f = _write(tmp_path / "c.jsonl", ['{"id": "ok", "text": "fine"}', row])
    with pytest.raises(RaditError, match=message.replace("(", r"\(")):
        list(iter_corpus(f))


def test_non_utf8_line_names_file_and_line(tmp_path):
    f = tmp_path / "c.jsonl"
    # far past the first 8 KB block: a text-mode reader would report the error without a usable position
    good = "".join(f'{{"id": "d{i}", "text": "word {i}"}}\n' for i in range(2000)).encode()
    f.write_bytes(good + b'{"id": "x", "text": "caf\xe9"}\n')
    with pytest.raises(RaditError, match=r"c.jsonl:2001: not valid UTF-8 \(byte 0xe9 at byte 25 of the line\)"):
        list(iter_corpus(f))
    f.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "with a byte-order mark"}\n')
    assert [p.id for _, p in iter_corpus(f)] == ["a"]


def test_ids_may_contain_hash_except_a_chunk_like_suffix(tmp_path):
    """'#' is allowed in document ids (titles such as "C#"); only a trailing '#' + digits is reserved, so a passage
    id always maps back to its document and chunk ids never collide with document ids."""
    docs = [("C#", "short"), ("C", "one two three four five"), ("C#", None), ("F# (language)", "a b c d e"),
            ("#hashtag", "x"), ("a#b", "y"), ("3#x#", "p q r s")]
    rows = [json.dumps({"id": d, "text": t}) for d, t in docs if t is not None]
    got = [p for _, p in iter_corpus(_write(tmp_path / "c.jsonl", rows), chunk_size=3)]
    ids = [p.id for p in got]
    assert ids == ["C#", "C#0", "C#1", "F# (language)#0", "F# (language)#1", "#hashtag", "a#b", "3#x##0", "3#x##1"]
    assert [doc_id(i) for i in ids] == ["C#", "C", "C", "F# (language)", "F# (language)", "#hashtag", "a#b",
                                        "3#x#", "3#x#"]
    assert len(set(ids)) == len(ids)
    gold = [{"C#"}, {"F# (language)"}, {"3#x#"}]
    ranked = [["C#0", "C#"], ["F# (language)#1"], ["3#x##1"]]
    assert retrieval_metrics(ranked, gold, ks=(1, 2))["recall@1"] == 2 / 3
    assert retrieval_metrics(ranked, gold, ks=(1, 2))["recall@2"] == 1.0
    assert doc_id("a#0x") == "a#0x" and doc_id("a#") == "a#" and doc_id("a#\u0663") == "a#\u0663"  # ASCII digits only


def _store(folder, passages):
    w = PassageStoreWriter(folder, source="c.jsonl")
    for i, p in enumerate(passages):
        w.add(p, i + 1)
    assert w.close() == len(passages)
    return PassageStore.open(folder)


def test_store_random_access_and_id_map(tmp_path):
    passages = [Passage(f"d{i}#{j}" if i % 3 == 0 else f"d{i}", f"Title {i}", f"text ünïcödé {i} {j}")
                for i in range(50) for j in range(2 if i % 3 == 0 else 1)]
    store = _store(tmp_path, passages)
    assert len(store) == len(passages)
    order = np.random.default_rng(0).permutation(len(passages))
    assert store.get(order) == [passages[i] for i in order]
    assert store[-1] == passages[-1] and store[2:5] == passages[2:5]
    assert all(store.row_of(p.id) == i for i, p in enumerate(passages))
    assert store.rows_of([passages[3].id, passages[1].id]).tolist() == [3, 1]
    with pytest.raises(KeyError):
        store.row_of("nope")
    with pytest.raises(IndexError):
        store[len(passages)]
    import pickle

    assert pickle.loads(pickle.dumps(store))[7] == passages[7]


def test_hash_collisions_are_resolved_by_reading_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "id_hash", lambda pid: 42)  # every id collides
    passages = [Passage(f"p{i}", "", f"t{i}") for i in range(6)]
    store = _store(tmp_path, passages)
    assert [store.row_of(f"p{i}") for i in range(6)] == list(range(6))


def test_duplicate_ids_are_refused_with_both_lines(tmp_path):
    w = PassageStoreWriter(tmp_path, source="c.jsonl")
    for i, pid in enumerate(["a", "b", "c", "b"]):
        w.add(Passage(pid, "", "x"), i + 1)
    with pytest.raises(RaditError, match=r"c.jsonl:4: duplicate id 'b' \(first at line 2\)"):
        w.close()


def test_store_refuses_an_incomplete_folder(tmp_path):
    _store(tmp_path, [Passage("a", "", "x")])
    (tmp_path / "offsets.npy").unlink()
    with pytest.raises(RaditError, match="not a readable passage store"):
        PassageStore(tmp_path)


def test_shard_ranges_partition_the_rows():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_recall_is_document_level_and_skips_queries_without_provenance():
    ex = {"id": "q", "input": "?", "output": [{"answer": "x", "provenance": [{"id": "12#3"}, {"wikipedia_id": "9"}]},
                                              {"answer": "y"}]}
    assert provenance_doc_ids(ex) == {"12", "9"}
    assert provenance_doc_ids({"id": "q", "input": "?"}) == set()
    ranked = [["5", "12#0", "9#2"], ["1"]]
    gold = [{"12", "9"}, set()]
    m = retrieval_metrics(ranked, gold, ks=(1, 2, 3))
    assert m == {"recall@1": 0.0, "hit@1": 0.0, "recall@2": 0.5, "hit@2": 1.0, "recall@3": 1.0, "hit@3": 1.0,
                 "queries": 1}
    assert mean_recall_at_k(ranked, gold, 2) == 0.5
    assert np.isnan(mean_recall_at_k([["1"]], [set()], 1))
