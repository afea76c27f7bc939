"""`radit eval` on the paper's tasks in their native formats (KILT as released, MMLU's CSV folders): the
per-task templates and demonstrations, KILT's metrics in metrics.json, per-task means."""
from __future__ import annotations

import json

import pytest
from test_kilt_readers import _mmlu, _prov, _write
from test_training_fixtures import CITIES, cached_setup

from radit_fast.config.evaluation import EvalSettings
from radit_fast.data.prompts import TEMPLATES, format_instruction, render_template, resolve_template
from radit_fast.data.readers import load_examples
from radit_fast.evaluation.scoring import choice_candidates, pick_demonstrations, shots_for
from radit_fast.io import RaditError
from radit_fast.retrieval.corpus import doc_id

MMLU = {"geography": [[f"What is the capital of {c}?", CITIES[(i + 1) % 12][0], city, CITIES[(i + 2) % 12][0],
                       CITIES[(i + 3) % 12][0], "B"] for i, (city, c) in enumerate(CITIES[:4])],
        "history": [["Which city is older?", "Rome", "Berlin", "Oslo", "Bern", "A"]]}
DEV = {"geography": [["Capital of Norway?", "Oslo", "Bern", "Rome", "Paris", "A"],
                     ["Capital of Spain?", "Oslo", "Madrid", "Rome", "Paris", "B"]],
       "history": [["Oldest university?", "Bologna", "Oslo", "Bern", "Paris", "A"]]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return cached_setup(tmp_path_factory.mktemp("native"))


def test_templates_render_every_task_type():
    from radit_fast.data.tasks import Example

    ex = Example("1", "Jules Verne [SEP] place of birth", ["Nantes"])
    assert format_instruction(render_template("trex", ex)) == "Q: Jules Verne - place of birth?\nA:"
    claim = Example("2", "Soul Food is a film.", ["true"], choices=["true", "false"])
    assert format_instruction(render_template("fever", claim)) == \
        "Q: Is the following claim true or false? Soul Food is a film.\nA:"
    chat = Example("3", "Hi!\nHello, do you ride?", ["Yes."])
    assert format_instruction(render_template("wow", chat), ("Question:", "Answer:")) == "Hi!\nHello, do you ride?\nAnswer:"
    custom = "{Q} {question} (one word)\n{A}"
    brace = Example("4", "What is {x}?", ["y"])   # braces in the text are not fields
    assert format_instruction(render_template(custom, brace)) == "Q: What is {x}? (one word)\nA:"
    assert format_instruction(render_template("qa", brace)) == format_instruction(brace.input)
    for name in TEMPLATES:
        assert resolve_template(name) == TEMPLATES[name]
    with pytest.raises(RaditError, match="not a template name"):
        resolve_template("{question} without an answer marker")
    with pytest.raises(RaditError, match="not a template name"):
        EvalSettings(template="nope").validate()


def test_mmlu_shots_per_subject_and_letters(tmp_path):
    root = _mmlu(tmp_path / "mmlu", "test", MMLU)
    _mmlu(root, "dev", DEV)
    test, dev = load_examples(root), load_examples(root, split="dev")
    demos = pick_demonstrations(dev, 5, template="auto")
    geo = shots_for(demos, test[0])
    # the subject's dev questions, in file order (MMLU's own 5-shot protocol), answered with the letter
    assert [a for _, a in geo] == ["A", "B"]
    assert geo[0][0] == "{Q} Capital of Norway?\nA. Oslo\nB. Bern\nC. Rome\nD. Paris\n{A}"
    assert [a for _, a in shots_for(demos, test[-1])] == ["A"]
    assert choice_candidates(test[0], EvalSettings()) == ["A", "B", "C", "D"]
    assert choice_candidates(test[0], EvalSettings(template="qa")) == test[0].choices


def test_radit_eval_mmlu_5_shot(setup, tmp_path, capsys):
    from radit_fast.cli.main import main

    root = _mmlu(tmp_path / "mmlu", "test", MMLU)
    _mmlu(root, "dev", DEV)
    out = tmp_path / "e"
    assert main(["eval", "--test", str(root), "--train", str(root), "--shots", "5", "--k", "0", "--lm",
                 str(setup["lm"]), "--out", str(out), "--no-progress", "--max-length", "256"]) == 0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5
    for p, ex in zip(preds, load_examples(root)):
        assert p["prediction"] in ex.choices and len(p["choice_logprobs"]) == 4
        assert p["accuracy"] == float(p["prediction"] == ex.answer)
        best = max(range(4), key=lambda i: (p["choice_logprobs"][i], -i))
        assert p["prediction"] == ex.choices[best] and p["scored"] == ["A", "B", "C", "D"]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["by_task"]) == {"mmlu", "mmlu/geography", "mmlu/history"}
    assert m["by_task"]["mmlu/geography"]["n_examples"] == 4
    assert m["metrics"]["accuracy"] == pytest.approx(sum(p["accuracy"] for p in preds) / 5)


def _kilt_nq(n=4):
    return [{"id": f"nq{i}", "input": f"what is the capital of {country}",
             "output": [{"answer": city, "provenance": [_prov(f"cap{i}", city)]}, {"answer": city.upper()}],
             "meta": {}} for i, (city, country) in enumerate(CITIES[:n])]


def test_radit_eval_kilt_metrics(setup, tmp_path):
    from radit_fast.cli.main import main

    nq = _write(tmp_path / "nq-dev-kilt.jsonl", _kilt_nq())
    fever = _write(tmp_path / "fever-dev-kilt.jsonl", [
        {"id": 7, "input": f"{CITIES[0][0]} is the capital of {CITIES[0][1]}.",
         "output": [{"answer": "SUPPORTS", "provenance": [_prov("cap0", "Paris")]}]}])
    for path, task in ((nq, "nq"), (fever, "fever")):
        out = tmp_path / task
        assert main(["eval", "--test", str(path), "--out", str(out), "--lm", str(setup["lm"]), "--index",
                     str(setup["index"]), "--k", "2", "--max-new-tokens", "3", "--max-length", "128",
                     "--no-progress"]) == 0
        preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        exs = load_examples(path)
        for p, ex in zip(preds, exs):
            # R = 1 (one gold page): R-precision is whether the first retrieved page is the gold one
            first_ok = float(doc_id(p["passages"][0]) == ex.provenance[0])
            assert p["r_precision"] == first_ok
            if task == "nq":
                assert p["kilt_em"] == first_ok * p["em"] and p["kilt_f1"] == first_ok * p["f1"]
            else:
                assert p["prediction"] in ("true", "false")
                assert p["kilt_accuracy"] == first_ok * p["accuracy"]
        m = json.loads((out / "metrics.json").read_text())
        assert m["by_task"][task]["n_examples"] == len(exs)
        assert m["metrics"]["r_precision"] == pytest.approx(sum(p["r_precision"] for p in preds) / len(preds))
        assert {"kilt_recall@5", "success@5"} <= set(m["metrics"])
