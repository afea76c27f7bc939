"""radit run's step cache: skip done steps, rerun changed ones, leave nothing half-written."""
from __future__ import annotations

import pytest

from radit_fast.pipeline.steps import StepRunner, fingerprint


def test_fingerprint_stable():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_step_cached_and_rerun_on_change(tmp_path):
    calls = []

    def work(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"value": len(calls)}

    r = StepRunner(tmp_path)
    first = r.run("s", {"k": 1}, work)
    assert not first.cached and first.result == {"value": 1} and (tmp_path / "s" / "out.txt").exists()
    again = StepRunner(tmp_path).run("s", {"k": 1}, work)
    assert again.cached and again.result == {"value": 1} and len(calls) == 1
    assert again.seconds == pytest.approx(first.seconds)
    changed = StepRunner(tmp_path).run("s", {"k": 2}, work)
    assert not changed.cached and changed.result == {"value": 2}
    forced = StepRunner(tmp_path, force=True).run("s", {"k": 2}, work)
    assert not forced.cached and len(calls) == 3


def test_interrupted_atomic_step_leaves_nothing(tmp_path):
    def boom(d):
        (d / "half.txt").write_text("x")
        raise KeyboardInterrupt

    r = StepRunner(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        r.run("s", {}, boom)
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_in_place_step_keeps_partial_work_until_done(tmp_path):
    def interrupted(d):
        (d / "ckpt").write_text("step 5")
        raise KeyboardInterrupt

    r = StepRunner(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        r.run("train", {"lr": 1}, interrupted, atomic=False)
    assert (tmp_path / "train" / "ckpt").read_text() == "step 5"     # resumable
    res = r.run("train", {"lr": 1}, lambda d: (d / "ckpt").read_text(), atomic=False)
    assert res.result == "step 5" and not res.cached
    assert StepRunner(tmp_path).run("train", {"lr": 1}, lambda d: 1 / 0, atomic=False).cached


# --------------------------------------------------------------------------- radit run end to end
import json  # noqa: E402

from test_training_fixtures import CITIES, corpus_rows, tiny_encoder, tiny_lm, write_jsonl  # noqa: E402

from radit_fast.io import RaditError  # noqa: E402


def _tasks(idx, *, mc=False):
    rows = []
    for i in idx:
        city, country = CITIES[i]
        if mc:
            rows.append({"id": f"mc{i}", "input": f"Which city is the capital of {country}?",
                         "output": [{"answer": city, "provenance": [{"id": f"cap{i}"}]}],
                         "choices": sorted({city, CITIES[(i + 1) % len(CITIES)][0]})})
        else:
            rows.append({"id": f"q{i}", "input": f"What is the capital of {country}?",
                         "output": [{"answer": city, "provenance": [{"id": f"cap{i}"}]}]})
    return rows


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_inputs")
    return {"lm": tiny_lm(root / "lm"), "encoder": tiny_encoder(root / "encoder"),
            "corpus": write_jsonl(root / "corpus.jsonl", corpus_rows()),
            "train": write_jsonl(root / "train.jsonl", _tasks(range(0, 6)) + _tasks(range(0, 4), mc=True)),
            "dev": write_jsonl(root / "dev.jsonl", _tasks(range(6, 9)) + _tasks(range(6, 8), mc=True)),
            "test": write_jsonl(root / "test.jsonl", _tasks(range(9, 12)) + _tasks(range(9, 12), mc=True))}


TINY_FILE = {"run": {"chunk_words": 20, "select_every": 2},
             "eval": {"k": 2, "max_new_tokens": 3, "max_length": 96},
             "train_lm": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "k": 2, "max_length": 96,
                          "lr": 1e-3, "progress": False},
             "train_retriever": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "k": 3, "max_length": 96,
                                 "lr": 1e-3, "progress": False}}


def test_radit_run_end_to_end_and_resume(tiny_run_inputs, tmp_path, capsys):
    from radit_fast.cli.main import main

    cfg = tmp_path / "run.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(TINY_FILE))
    inp = {k: str(v) for k, v in tiny_run_inputs.items()}
    out = tmp_path / "run"
    argv = ["run", "--corpus", inp["corpus"], "--train", inp["train"], "--dev", inp["dev"], "--test", inp["test"],
            "--out", str(out), "--lm", inp["lm"], "--encoder", inp["encoder"], "--config", str(cfg),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| ra_dit |" in printed and "Expected ordering" in printed
    report = json.loads((out / "report.json").read_text())
    assert list(report["rows"]) == ["lm_only", "replug", "ra_it", "r_it", "ra_dit"]
    for name, row in report["rows"].items():
        assert {"em", "f1", "accuracy"} <= set(row)
        assert ("recall@1" in row) == (name != "lm_only")
        assert "recall@10" in row or name == "lm_only"
    assert report["rows"]["replug"]["recall@1"] == report["rows"]["ra_it"]["recall@1"]   # same retriever
    assert report["rows"]["r_it"]["recall@1"] == report["rows"]["ra_dit"]["recall@1"]
    sel = report["selection"]
    assert set(sel["train_lm"]["candidates"]) == {"2", "4"} and sel["train_lm"]["step"] in (2, 4)
    assert set(sel["train_retriever"]["candidates"]) == {"2", "4"}
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    assert (out / "train_lm" / "selected" / "config.json").is_file()
    assert len((out / "eval_ra_dit" / "predictions.jsonl").read_text().splitlines()) == 6
    # every step is cached: a rerun recomputes nothing and gives the same report
    first = {k: v for k, v in report.items() if k != "timings"}
    markers = {p: p.stat().st_mtime_ns for p in out.glob("*/step.json")}
    assert main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in again.items() if k != "timings"} == first
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/step.json")} == markers
    # an interrupted step (here: its marker removed) is the only one redone
    (out / "eval_r_it" / "step.json").unlink()
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/step.json") if p.parent.name != "eval_r_it"} == \
        {p: t for p, t in markers.items() if p.parent.name != "eval_r_it"}


def _broken(rows: list[dict], bad: str, inp: dict[str, str], tmp_path) -> list[dict]:
    """The bad inputs that radit run and radit eval share: a task file or --lm broken as ``bad`` names."""
    if bad == "no_answer":
        rows[1]["output"] = [{"provenance": [{"id": "cap1"}]}]
    elif bad == "unknown_field":
        rows[0]["question"] = "?"
    elif bad == "empty":
        rows = []
    elif bad == "bad_lm":
        inp["lm"] = str(tmp_path / "no_such_lm")
    return rows


@pytest.mark.parametrize("bad, msg", [
    ("no_answer", "no answer"),
    ("unknown_field", "unknown field"),
    ("empty", "no examples"),
    ("shared_id", "share 1 example id"),
    ("bad_lm", "not a local folder"),
    ("not_causal_lm", "cannot load a model"),
    ("seq2seq_lm", "not a causal LM"),
    ("lm_without_weights", "no model weights"),
    ("bad_encoder", "--encoder"),
    ("encoder_not_a_model", "--encoder"),
    ("encoder_without_weights", "no model weights"),
    ("too_long", "question and answer alone take"),
    ("too_long_for_r_it", "train_retriever.max_length 12: example q0: question and answer alone take"),
])
def test_radit_run_rejects_bad_input_before_compute(tiny_run_inputs, tmp_path, capsys, monkeypatch, bad, msg):
    import radit_fast.models
    import radit_fast.retrieval.build
    from radit_fast.cli.main import main

    def never(*a, **k):
        raise AssertionError("compute started before the input check")

    monkeypatch.setattr(radit_fast.retrieval.build, "build_index", never)
    monkeypatch.setattr(radit_fast.models, "load_lm", never)
    test = tmp_path / "test.jsonl"
    rows = _tasks(range(9, 12))
    inp = {k: str(v) for k, v in tiny_run_inputs.items()}
    extra: list[str] = []
    rows = _broken(rows, bad, inp, tmp_path)
    if bad == "shared_id":
        rows[0]["id"] = "q0"  # also in train
    elif bad == "not_causal_lm":
        (tmp_path / "empty_lm").mkdir()
        inp["lm"] = str(tmp_path / "empty_lm")        # a folder without a config
    elif bad == "seq2seq_lm":
        (tmp_path / "t5").mkdir()
        (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
        inp["lm"] = str(tmp_path / "t5")
    elif bad == "lm_without_weights":              # a causal-LM config and tokenizer, no weights
        import shutil

        shutil.copytree(inp["lm"], tmp_path / "lm", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        inp["lm"] = str(tmp_path / "lm")
    elif bad == "bad_encoder":
        inp["encoder"] = str(tmp_path / "no_such_encoder")
    elif bad == "encoder_without_weights":
        import shutil

        shutil.copytree(inp["encoder"], tmp_path / "enc",
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        inp["encoder"] = str(tmp_path / "enc")
    elif bad == "encoder_not_a_model":
        (tmp_path / "enc").mkdir()                     # a folder without a config
        inp["encoder"] = str(tmp_path / "enc")
    elif bad == "too_long":
        rows[2]["input"] = "Where is it? " * 2000      # beyond every max_length, even without a background
    elif bad == "too_long_for_r_it":                   # fits RA-IT and evaluation, not R-IT's LSR scoring
        cfg = tmp_path / "run.yaml"
        cfg.write_text(json.dumps({"train_retriever": {"max_length": 12}}))
        extra = ["--config", str(cfg)]
    write_jsonl(test, rows)
    out = tmp_path / "run"
    code = main(["run", "--corpus", inp["corpus"], "--train", inp["train"], "--dev", inp["dev"],
                 "--test", str(test), "--out", str(out), "--lm", inp["lm"], "--encoder", inp["encoder"], *extra])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1
    assert not out.exists()          # nothing computed, nothing written


def test_radit_eval_checks(tiny_run_inputs, tmp_path, capsys):
    from radit_fast.cli.main import main

    inp = {k: str(v) for k, v in tiny_run_inputs.items()}
    code = main(["eval", "--test", inp["test"], "--out", str(tmp_path / "e"), "--lm", inp["lm"]])
    assert code == 2 and "--k > 0 needs --index" in capsys.readouterr().err
    code = main(["eval", "--test", inp["test"], "--out", str(tmp_path / "e"), "--shots", "1", "--k", "0"])
    assert code == 2 and "--shots needs --train" in capsys.readouterr().err
    code = main(["eval", "--test", inp["train"], "--train", inp["train"], "--out", str(tmp_path / "e"), "--k", "0"])
    assert code == 2 and "share" in capsys.readouterr().err
    code = main(["eval", "--test", inp["test"], "--out", str(tmp_path / "e"), "--k", "0", "--lm", inp["lm"],
                 "--max-new-tokens", "2", "--no-progress", "--limit", "2"])
    assert code == 0
    preds = (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 2 and "em" in json.loads(preds[0])
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]["n_examples"] == 2


@pytest.mark.parametrize("bad, msg", [
    ("no_answer", "no answer"),
    ("unknown_field", "unknown field"),
    ("empty", "no examples"),
    ("bad_lm", "not a local folder"),
    ("bad_query_encoder", "--query-encoder"),
    ("too_long", "question and answer alone take"),
    ("shots_too_long", "question and answer alone take"),
])
def test_radit_eval_rejects_bad_input_before_compute(tiny_run_inputs, tmp_path, capsys, monkeypatch, bad, msg):
    """radit eval's own input checks (the same loader as radit run's), before any model or retrieval runs."""
    import radit_fast.cli.eval as cli_eval
    from radit_fast.cli.main import main
    from radit_fast.retrieval.retriever import Retriever

    def never(*a, **k):
        raise AssertionError("a model was loaded before the input check")

    monkeypatch.setattr(cli_eval, "load_eval_lm", never)
    monkeypatch.setattr(Retriever, "load", never)
    inp = {k: str(v) for k, v in tiny_run_inputs.items()}
    rows = _tasks(range(9, 12)) + _tasks(range(9, 11), mc=True)
    extra: list[str] = []
    rows = _broken(rows, bad, inp, tmp_path)
    if bad == "bad_query_encoder":
        extra = ["--query-encoder", str(tmp_path / "no_such_encoder")]
    elif bad == "too_long":
        rows[3]["input"] = "Which one? " * 2000       # a multiple-choice question
    elif bad == "shots_too_long":                     # each question fits; with 2 long demonstrations it does not
        train = _tasks(range(0, 4))
        for r in train:
            r["input"] = "Where? " * 30
        extra = ["--train", str(write_jsonl(tmp_path / "train.jsonl", train)), "--shots", "2",
                 "--max-length", "100", "--max-new-tokens", "4"]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "e"
    code = main(["eval", "--test", str(test), "--out", str(out), "--k", "0", "--lm", inp["lm"], *extra])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1, err
    assert not out.exists()


def test_file_fingerprint_follows_content(tmp_path):
    from radit_fast.pipeline.steps import file_fingerprint

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("x\n")
    b.write_text("x\n")
    assert file_fingerprint(a) == file_fingerprint(b)
    b.write_text("y\n")
    assert file_fingerprint(a) != file_fingerprint(b)


def test_demo_data_merged_splits_and_corpus_subset(tmp_path):
    from radit_fast.data.tasks import check_disjoint, load_tasks
    from radit_fast.records import read_jsonl
    from radit_fast.pipeline.demo import prepare_demo_data

    settings = {"n_train": 5, "n_dev": 3, "n_test": 4, "corpus_articles": 60}
    paths = prepare_demo_data(tmp_path / "data", seed=1, settings=settings)
    splits = {s: load_tasks(paths[s]) for s in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [10, 6, 8]       # two tasks each
    for s, exs in splits.items():
        assert sum(ex.choices is not None for ex in exs) == len(exs) // 2, s
    check_disjoint(splits["train"], splits["test"])
    corpus = {r["id"] for r in read_jsonl(paths["corpus"])}
    assert len(corpus) == 60
    assert all(p in corpus for exs in splits.values() for ex in exs for p in ex.provenance)
    mtime = paths["test"].stat().st_mtime_ns
    assert prepare_demo_data(tmp_path / "data", seed=1, settings=settings) == paths
    assert paths["test"].stat().st_mtime_ns == mtime                                # reused, not rewritten
    with pytest.raises(RaditError, match="unknown option"):
        prepare_demo_data(tmp_path / "other", settings={"n_tests": 3})


def test_demo_config_is_valid(tmp_path):
    from radit_fast.config.run import DEMO_FILE, load_run_file, make_config

    file = load_run_file(DEMO_FILE, extra_sections=("data",))
    file.pop("data")
    cfg = make_config(corpus="c", train="t", dev="d", test="e", out=str(tmp_path / "o"), file=file)
    assert cfg.eval.k >= 1 and cfg.run.eval_dtype == "bf16"
    assert cfg.lm_config(tmp_path / "x").max_steps == file["train_lm"]["max_steps"]
    with pytest.raises(RaditError, match="unknown option"):
        make_config(corpus="c", train="t", dev="d", test="e", out="o", file={"eval": {"kk": 1}})
    with pytest.raises(RaditError, match="set by radit run"):
        make_config(corpus="c", train="t", dev="d", test="e", out="o", file={"train_lm": {"out": "x"}})


def test_plain_copy_merges_lora(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from radit_fast.models import plain_copy

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm(tmp_path / "lm"))
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.tensor([[3, 5, 7, 9]])
    want = peft_model(input_ids=ids).logits
    plain = plain_copy(lm)            # the inner model, as the pipeline holds it
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    plain.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    assert any("lora" in n for n, _ in lm.named_parameters())   # the live model is untouched


def test_radit_run_lora_bf16_and_retriever_subset(tiny_run_inputs, tmp_path):
    import yaml
    from safetensors import safe_open

    from radit_fast.cli.main import main
    from radit_fast.data.tasks import load_tasks

    file = {**TINY_FILE, "run": {**TINY_FILE["run"], "train_dtype": "bf16", "retriever_train_kind": "generation",
                                 "retriever_train_examples": 4, "eval_dtype": "bf16"},
            "train_lm": {**TINY_FILE["train_lm"], "lora": True, "lora_r": 4, "lora_alpha": 8}}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(file))
    inp = {k: str(v) for k, v in tiny_run_inputs.items()}
    out = tmp_path / "run"
    assert main(["run", "--corpus", inp["corpus"], "--train", inp["train"], "--dev", inp["dev"], "--test", inp["test"],
                 "--out", str(out), "--lm", inp["lm"], "--encoder", inp["encoder"], "--config", str(cfg),
                 "--no-progress", "--threads", "auto"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["selection"]["train_lm"]["candidates"]) == {"2", "4"}
    with safe_open(str(out / "train_lm" / "selected" / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())             # adapters merged into plain weights
    subset = load_tasks(out / "train_retriever" / "train_subset.jsonl")
    assert len(subset) == 4 and all(ex.choices is None for ex in subset)
    with pytest.raises(RaditError, match="needs train_lm.lora|set train_lm.lora"):
        from radit_fast.config.run import make_config

        make_config(corpus="c", train="t", dev="d", test="e", out="o", file={"run": {"train_dtype": "bf16"}})


def test_threads_auto(monkeypatch):
    import os

    from radit_fast.cli.run import resolve_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    import radit_fast.cli.run as cli_run

    busy = cli_run._busy_cores(0.05)                                # the real reading, on Linux
    assert busy is None or 0.0 <= busy <= os.cpu_count() + 1e-9
    monkeypatch.setattr(cli_run, "_busy_cores", lambda: 0.1)       # what the CPUs do now decides ...
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 0.0, 0.0))  # ... not a lagging load average
    assert resolve_threads("auto") == 2
    monkeypatch.setattr(cli_run, "_busy_cores", lambda: 1.7)
    assert resolve_threads("auto") == 1
    monkeypatch.setattr(cli_run, "_busy_cores", lambda: None)       # no /proc/stat: the load average
    assert resolve_threads("auto") == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert resolve_threads("auto") == 2
    assert resolve_threads(3) == 3 and resolve_threads(None) is None


def test_stage_keys_follow_resolved_defaults(tmp_path):
    """A tuning step is keyed by its resolved settings, defaults included: a default that no run file
    states (append_eos, from RaItConfig) is in the key, so changing it retrains, while the run folder's
    own paths do not enter the key."""
    import dataclasses

    from radit_fast.config.run import make_config, run_defaults
    from radit_fast.pipeline.tuning import _NOT_IN_STAGE_KEY, stage_key

    def key(out, **overrides):
        cfg = make_config(corpus="c", train="t", dev="d", test="e", out=str(out), overrides=overrides)
        return stage_key(cfg.lm_config(out / "train_lm")), stage_key(cfg.retriever_config(out / "train_retriever"))

    lm_key, r_key = key(tmp_path / "a")
    assert "append_eos" not in run_defaults()["train_lm"] and lm_key["append_eos"] is True
    assert "out" not in lm_key and "index" not in lm_key and "cache_dir" not in r_key
    assert r_key["lm_temperature"] == 0.01 and r_key["score_kind"] == "mean"
    assert key(tmp_path / "b") == (lm_key, r_key)          # another run folder: same keys
    changed, same_r = key(tmp_path / "a", train_lm={"append_eos": False})
    assert changed == {**lm_key, "append_eos": False} and same_r == r_key
    # every resolved default of both stages is in the keys (a changed default retrains) ...
    from radit_fast.config.stages import RaItConfig, RetrieverConfig

    assert set(lm_key) == {f.name for f in dataclasses.fields(RaItConfig)} - set(_NOT_IN_STAGE_KEY)
    assert set(r_key) == {f.name for f in dataclasses.fields(RetrieverConfig)} - set(_NOT_IN_STAGE_KEY)
    _, r_changed = key(tmp_path / "a", train_retriever={"direction": "retriever_to_lsr"})
    assert r_changed == {**r_key, "direction": "retriever_to_lsr"}
    # ... but display and bookkeeping settings are not
    assert key(tmp_path / "a", train_lm={"log_every": 7, "progress": False},
               train_retriever={"log_every": 3}) == (lm_key, r_key)


def test_flags_override_the_run_file_only_when_given():
    from radit_fast.cli.main import build_parser
    from radit_fast.cli.run import _overrides

    base = ["run", "--corpus", "c", "--train", "t", "--dev", "d", "--test", "e", "--out", "o"]
    quiet = _overrides(build_parser().parse_args(base))
    assert quiet["eval"] == {} and "threads" not in quiet["run"]   # eval.seed, eval.k ... stay the file's
    loud = _overrides(build_parser().parse_args(base + ["--seed", "3", "--k", "2"]))
    assert loud["eval"] == {"seed": 3, "k": 2}
    demo = build_parser().parse_args(["demo"])
    assert demo.k is None and demo.seed is None                      # demo.yaml decides


def test_demo_help_states_the_demo_yaml_defaults():
    """`radit demo --help` states the defaults the demo runs with (demo.yaml's), not radit run's."""
    import argparse

    import yaml

    from radit_fast.cli.main import build_parser
    from radit_fast.cli.run import _DEMO_KEYS
    from radit_fast.config.run import DEMO_FILE

    data = yaml.safe_load(DEMO_FILE.read_text())
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["demo"]._actions}
    checked = set()
    for dest, (section, key) in _DEMO_KEYS.items():
        if key in data.get(section, {}):
            v = data[section][key]
            assert f"default {('on' if v else 'off') if isinstance(v, bool) else v} from demo.yaml" in helps[dest], dest
            checked.add(dest)
    assert {"k", "shots", "max_length", "max_new_tokens", "retriever_temperature", "dtype", "lm_steps"} <= checked
    assert helps["threads"].endswith("default auto)") and "default demo.yaml" in helps["config"]
    run_helps = {a.dest: a.help for a in sub.choices["run"]._actions}
    assert "default 10)" in run_helps["k"] and "default 0)" in run_helps["shots"]   # radit run: the defaults
