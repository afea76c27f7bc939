"""KILT-style task files: parsing and the one-line errors."""
from __future__ import annotations

import json

import pytest

from radit_fast.data.tasks import Example, check_disjoint, load_tasks, write_tasks
from radit_fast.io import RaditError


def _write(tmp_path, rows, name="tasks.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _ex(i, answer="a", **kw):
    return {"id": f"q{i}", "input": f"question {i}", "output": [{"answer": answer, "provenance": [{"id": "p1"}]}], **kw}


def test_load_full_example(tmp_path):
    row = {"id": 7, "input": "Which?", "choices": ["x", "y", "z"], "context": "gold text", "meta": {"src": 1},
           "output": [{"answer": "y", "provenance": [{"id": "d1", "title": "T", "start_paragraph_id": 3}]},
                      {"answer": "y", "provenance": [{"id": "d2"}, {"id": "d1"}]},
                      {"provenance": [{"id": 9}]}]}
    (ex,) = load_tasks(_write(tmp_path, [row, ""]))
    assert ex == Example(id="7", input="Which?", answers=["y"], provenance=["d1", "d2", "9"],
                         choices=["x", "y", "z"], context="gold text", meta={"src": 1})
    assert ex.answer == "y"


def test_round_trip(tmp_path):
    exs = [Example("a", "in a", ["x", "x2"], ["p"]), Example("b", "in b", ["c1"], [], choices=["c1", "c2"]),
           Example("c", "in c", ["z"], ["p", "q"], context="ctx")]
    path = tmp_path / "out.jsonl"
    assert write_tasks(path, exs) == 3
    assert load_tasks(path) == exs


@pytest.mark.parametrize("row, message", [
    ('{"id": "q1", "input": ', r"tasks.jsonl:2: malformed JSON"),
    ('[1, 2]', r"tasks.jsonl:2: expected a JSON object"),
    ({"input": "x", "output": [{"answer": "a"}]}, r"tasks.jsonl:2: missing field 'id'"),
    ({"id": "", "input": "x", "output": [{"answer": "a"}]}, r"tasks.jsonl:2: 'id' must be a non-empty string"),
    ({"id": True, "input": "x", "output": [{"answer": "a"}]}, r"'id' must be a non-empty string or an integer"),
    ({"id": "z", "output": [{"answer": "a"}]}, r"tasks.jsonl:2 \(id 'z'\): missing field 'input'"),
    ({"id": "z", "input": "  ", "output": [{"answer": "a"}]}, r"empty field 'input'"),
    ({"id": "z", "input": "x"}, r"missing field 'output'"),
    ({"id": "z", "input": "x", "output": "a"}, r"'output' must be a list"),
    ({"id": "z", "input": "x", "output": []}, r"tasks.jsonl:2 \(id 'z'\): no answer"),
    ({"id": "z", "input": "x", "output": [{"provenance": [{"id": "p"}]}]}, r"no answer"),
    ({"id": "z", "input": "x", "output": [{"answer": ""}]}, r"output\[0\].answer must be a non-empty string"),
    ({"id": "z", "input": "x", "output": [{"answer": 3}]}, r"output\[0\].answer must be a non-empty string"),
    ({"id": "z", "input": "x", "output": [{"answer": "a", "score": 1}]}, r"output\[0\] has unknown field\(s\) 'score'"),
    ({"id": "z", "input": "x", "output": [{"answer": "a", "provenance": [{"title": "t"}]}]},
     r"output\[0\].provenance\[0\] must be an object with a non-empty 'id'"),
    ({"id": "z", "input": "x", "output": [{"answer": "a", "provenance": "p"}]}, r"provenance must be a list"),
    ({"id": "z", "input": "x", "question": "?", "output": [{"answer": "a"}]}, r"unknown field\(s\) 'question'"),
    ({"id": "z", "input": "x", "output": [{"answer": "a"}], "choices": ["b", "c"]},
     r"answer 'a' is not one of the choices"),
    ({"id": "z", "input": "x", "output": [{"answer": "a"}], "choices": ["a"]}, r"at least 2 non-empty strings"),
    ({"id": "z", "input": "x", "output": [{"answer": "a"}], "choices": ["a", "a"]}, r"'choices' has duplicates"),
    ({"id": "z", "input": "x", "output": [{"answer": "a"}], "context": ""}, r"'context' must be a non-empty string"),
    (_ex(1), r"tasks.jsonl:2: duplicate id 'q1' \(first on line 1\)"),
])
def test_errors_name_file_and_line(tmp_path, row, message):
    with pytest.raises(RaditError, match=message) as info:
        load_tasks(_write(tmp_path, [_ex(1), row]))
    assert "\n" not in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(RaditError, match="no examples"):
        load_tasks(_write(tmp_path, ["", "  "]))
    with pytest.raises(RaditError, match="no such file"):
        load_tasks(tmp_path / "absent.jsonl")


def test_inputs_without_answers(tmp_path):
    path = _write(tmp_path, [{"id": "u", "input": "unlabelled"}, {"id": "v", "input": "x", "output": []}])
    exs = load_tasks(path, require_answers=False)
    assert [e.answers for e in exs] == [[], []]
    with pytest.raises(RaditError, match="missing field 'output'"):
        load_tasks(path)


def test_check_disjoint(tmp_path):
    train = load_tasks(_write(tmp_path, [_ex(i) for i in range(10)], "train.jsonl"))
    test = load_tasks(_write(tmp_path, [_ex(i) for i in range(8, 20)], "test.jsonl"))
    check_disjoint(train, train[:0])
    check_disjoint(train[:5], test)
    with pytest.raises(RaditError, match=r"the train and test splits share 2 example id\(s\): 'q8', 'q9'"):
        check_disjoint(train, test)
    with pytest.raises(RaditError, match=r"the dev and test splits share"):
        check_disjoint(test, test, names=("dev", "test"))
