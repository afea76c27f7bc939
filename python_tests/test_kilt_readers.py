"""Readers of the paper's tasks in their native formats, on small fixtures written in the released layouts:
KILT JSON lines (the nine tasks RA-DIT evaluates) and MMLU's CSV folders."""
from __future__ import annotations

import json

import pytest

from radit_fast.data.readers import detect_format, load_examples
from radit_fast.data.readers.kilt import kilt_task_of, load_kilt
from radit_fast.data.readers.mmlu import load_mmlu
from radit_fast.io import RaditError


def _prov(wid, title, para=1, **extra):
    """A provenance entry with every field KILT releases."""
    return {"wikipedia_id": wid, "title": title, "section": "Section::::Abstract.", "start_paragraph_id": para,
            "start_character": 0, "end_paragraph_id": para, "end_character": 120, "bleu_score": 0.92, **extra}


# One line per task, in the field layout of the released {task}-dev-kilt.jsonl files.
KILT_LINES = {
    "nq-dev-kilt.jsonl": {"id": "-4043744468329470345", "input": "who sings i feel it coming with the weeknd",
                          "output": [{"answer": "Daft Punk", "provenance": [_prov("50738566", "I Feel It Coming")]},
                                     {"answer": "Daft Punk"}, {"answer": "the French duo Daft Punk"}],
                          "meta": {}},
    "triviaqa-dev-kilt.jsonl": {"id": "qw_3512", "input": "Which element has the symbol W?",
                                "output": [{"answer": "Tungsten"}, {"answer": "Wolfram"},
                                           {"provenance": [_prov("30038", "Tungsten", 2)]}]},
    "hotpotqa-dev-kilt.jsonl": {"id": "5a8b57f25542995d1e6f1371", "input": "Were Scott Derrickson and Ed Wood "
                                "of the same nationality?",
                                "output": [{"answer": "yes", "provenance": [_prov("2834961", "Scott Derrickson"),
                                                                            _prov("10137", "Ed Wood", 2)]}]},
    "fever-dev-kilt.jsonl": {"id": 137334, "input": "Fox 2000 Pictures released the film Soul Food.",
                             "output": [{"answer": "SUPPORTS", "provenance": [_prov(
                                 "1580826", "Soul Food (film)", 1,
                                 meta={"fever_page_id": "Soul_Food_-LRB-film-RRB-", "fever_sentence_id": 0})]}]},
    "structured_zeroshot-dev-kilt.jsonl": {"id": "c5fb2ad2-2fc5-4b7a-a64c-56efc63d1e8b",
                                           "input": "Kate Sullivan [SEP] country of citizenship",
                                           "output": [{"answer": "United States of America",
                                                       "provenance": [_prov("23564553", "Kate Sullivan")]}],
                                           "meta": {"template_questions": ["What country is Kate Sullivan from?"]}},
    "trex-dev-kilt.jsonl": {"id": "b15ddb2f-b0ca-41c6-ac3b-b2d6ba8f2b5e",
                            "input": "Jules Verne [SEP] place of birth",
                            "output": [{"answer": "Nantes", "provenance": [_prov("15887", "Jules Verne")]}],
                            "meta": {"template_questions": ["Where was Jules Verne born?"]}},
    "wow-dev-kilt.jsonl": {"id": "50d8ac35-aea5-4a2d-a5fa-3bf8ab4d0c6d",
                           "input": "I love cycling.\nMe too! Do you ride on roads?\nMostly on trails.",
                           "output": [{"answer": "Mountain biking on trails is a great workout.",
                                       "provenance": [_prov("19008", "Mountain biking", 3)]}]},
    "eli5-dev-kilt.jsonl": {"id": "1oy5tc", "input": "why do we yawn when we see others yawn",
                            "output": [{"answer": "Contagious yawning is linked to empathy in social animals.",
                                        "meta": {"score": 7}},
                                       {"answer": "Nobody knows for sure."},
                                       {"provenance": [_prov("305585", "Yawn", 4)]}],
                            "meta": {"partial_evidence": [{"wikipedia_id": "305585", "title": "Yawn"}]}},
    "aidayago2-dev-kilt.jsonl": {"id": "1009testb:0", "input": "EU rejects [START_ENT] German [END_ENT] call to "
                                 "boycott British lamb .",
                                 "output": [{"answer": "Germany", "provenance": [{"wikipedia_id": "11867",
                                                                                   "title": "Germany"}]}],
                                 "meta": {"left_context": "EU rejects", "mention": "German",
                                          "right_context": "call to boycott British lamb ."}},
}
TASKS = {"nq-dev-kilt.jsonl": "nq", "triviaqa-dev-kilt.jsonl": "triviaqa", "hotpotqa-dev-kilt.jsonl": "hotpotqa",
         "fever-dev-kilt.jsonl": "fever", "structured_zeroshot-dev-kilt.jsonl": "zsre", "trex-dev-kilt.jsonl": "trex",
         "wow-dev-kilt.jsonl": "wow", "eli5-dev-kilt.jsonl": "eli5", "aidayago2-dev-kilt.jsonl": "aida"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(KILT_LINES))
def test_each_kilt_task_reads(tmp_path, name):
    path = _write(tmp_path / name, [KILT_LINES[name]])
    assert kilt_task_of(path) == TASKS[name] and detect_format(path) == "kilt"
    [ex] = load_examples(path)
    line = KILT_LINES[name]
    assert ex.id == str(line["id"]) and ex.input == line["input"].strip()
    assert ex.meta["task"] == TASKS[name] and ex.meta["kilt"] == line.get("meta")
    gold = [o["answer"] for o in line["output"] if "answer" in o]
    evidence = [o["provenance"] for o in line["output"] if "provenance" in o]
    assert len(ex.meta["evidence"]) == len(evidence)
    assert ex.provenance == list(dict.fromkeys(p["wikipedia_id"] for e in evidence for p in e))
    if TASKS[name] == "fever":
        assert ex.choices == ["true", "false"] and ex.answers == ["true"]
    else:
        assert ex.choices is None and ex.answers == list(dict.fromkeys(gold))
    kept = ex.meta["evidence"][0][0]
    assert set(kept) <= {"wikipedia_id", "title", "start_paragraph_id", "end_paragraph_id"}


def test_kilt_evidence_sets_and_paragraphs(tmp_path):
    from radit_fast.evaluation.kilt import evidence_sets

    [hotpot] = load_kilt(_write(tmp_path / "hotpotqa-dev-kilt.jsonl", [KILT_LINES["hotpotqa-dev-kilt.jsonl"]]))
    assert evidence_sets(hotpot) == [frozenset({"2834961", "10137"})]          # both pages needed: one set
    assert evidence_sets(hotpot, "paragraph") == [frozenset({"2834961+1", "10137+2"})]


def test_kilt_errors_and_test_input(tmp_path):
    ids_only = {"id": "qw_1", "output": [{"answer": "x"}]}        # TriviaQA as released: ids without questions
    with pytest.raises(RaditError, match="get_triviaqa_input"):
        load_kilt(_write(tmp_path / "triviaqa-dev_id-kilt.jsonl", [ids_only]))
    with pytest.raises(RaditError, match="unknown field"):
        load_kilt(_write(tmp_path / "nq-dev-kilt.jsonl", [{**KILT_LINES["nq-dev-kilt.jsonl"], "question": "?"}]))
    with pytest.raises(RaditError, match="REFUTES"):
        load_kilt(_write(tmp_path / "fever-dev-kilt.jsonl", [{"id": 1, "input": "c", "output": [{"answer": "NEI"}]}]))
    test_input = _write(tmp_path / "nq-test_input-kilt.jsonl", [{"id": "9", "input": "who?"}])
    with pytest.raises(RaditError, match="no answer"):
        load_kilt(test_input)
    [ex] = load_kilt(test_input, require_answers=False)
    assert ex.answers == [] and ex.meta["task"] == "nq"
    plain = _write(tmp_path / "mine.jsonl", [{"id": "a", "input": "q", "output": [{"answer": "x"}]}])
    assert detect_format(plain) == "radit" and load_examples(plain)[0].meta is None
    custom = _write(tmp_path / "mine2.jsonl", [KILT_LINES["nq-dev-kilt.jsonl"]])  # not named as released
    assert detect_format(custom) == "kilt" and load_kilt(custom, task="nq")[0].meta["task"] == "nq"


MMLU = {
    "abstract_algebra": [["Find the degree of Q(sqrt(2)) over Q.", "0", "2", "4", "6", "B"],
                         ["Is Z_4 cyclic?", "yes", "no", "only mod 2", "undefined", "A"]],
    "world_religions": [["Which is a holy text of Hinduism?", "Quran", "Torah", "Vedas", "Bible", "C"]],
}


def _mmlu(root, split, subjects=MMLU):
    import csv

    (root / split).mkdir(parents=True, exist_ok=True)
    for subject, rows in subjects.items():
        with (root / split / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)      # no header, as released; quoting where a field has a comma
    return root


def test_mmlu_csv_layout(tmp_path):
    root = _mmlu(tmp_path / "data", "test")
    _mmlu(root, "dev", {"abstract_algebra": [["Dev q, with a comma", "1", "2", "3", "4", "D"]]})
    assert detect_format(root) == "mmlu"
    test = load_examples(root)
    assert [ex.id for ex in test] == ["abstract_algebra-test-1", "abstract_algebra-test-2", "world_religions-test-1"]
    ex = test[0]
    assert ex.choices == ["0", "2", "4", "6"] and ex.answers == ["2"]
    assert ex.meta == {"task": "mmlu", "subject": "abstract_algebra", "answer_index": 1}
    [dev] = load_mmlu(root, split="dev")
    assert dev.input == "Dev q, with a comma" and dev.answers == ["4"]
    assert load_mmlu(root / "test" / "world_religions_test.csv")[0].answers == ["Vedas"]
    (root / "test" / "bad_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(RaditError, match="A, B, C, D"):
        load_mmlu(root)
    with pytest.raises(RaditError, match="no MMLU files"):
        load_mmlu(tmp_path / "empty_dir_that_is_missing", split="val")
