"""Issue 12, class 9: `radit run` states its plan before any work, warns when the paper's GPU-sized settings
meet a CPU, and offers `--preset cpu` (the demo's sizing) by name."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from radit_fast.config.run import (
    DEMO_FILE, load_run_file, make_config, merge_sections, preset_sections, run_defaults,
)
from radit_fast.io import RaditError
from test_training_fixtures import cached_setup, task_rows, write_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    p = cached_setup(root / "tiny")
    rows = task_rows(12)
    p["train"] = write_jsonl(root / "train.jsonl", rows[:8])
    p["dev"] = write_jsonl(root / "dev.jsonl", rows[8:10])
    p["test"] = write_jsonl(root / "test.jsonl", rows[10:])
    return p


def _config(p, out, file):
    return make_config(corpus=str(p["corpus"]), train=str(p["train"]), dev=str(p["dev"]), test=str(p["test"]),
                       out=str(out), file=file, lm=str(p["lm"]), encoder=str(p["encoder"]), progress=False)


def test_presets_by_name():
    demo = load_run_file(DEMO_FILE, extra_sections=("data",))
    cpu = preset_sections("cpu")
    assert "data" not in cpu and cpu["train_lm"] == demo["train_lm"] and cpu["eval"] == demo["eval"]
    assert preset_sections("paper") == {}
    with pytest.raises(RaditError, match="--preset must be one of paper, cpu"):
        preset_sections("gpu")
    # a run file overrides the preset key by key, flags (overrides) override both
    merged = merge_sections(cpu, {"train_lm": {"max_steps": 7}})
    assert merged["train_lm"]["max_steps"] == 7 and merged["train_lm"]["k"] == demo["train_lm"]["k"]


def test_plan_is_logged_before_any_work_and_warns_on_cpu(inputs, tmp_path, caplog, monkeypatch):
    import radit_fast.pipeline.run as run_mod
    from radit_fast.pipeline.run import Pipeline

    real = run_mod.StepRunner
    first_output = []

    def step_runner(out, **kw):  # the first thing that writes into OUT
        first_output.append((Path(out).exists(), any("plan (" in r.getMessage() for r in caplog.records)))
        return real(out, **kw)

    monkeypatch.setattr(run_mod, "StepRunner", step_runner)
    caplog.set_level(logging.INFO, logger="radit_fast")
    paper = _config(inputs, tmp_path / "paper", {"run": {"device": "cpu"}})
    Pipeline(paper)
    assert first_output == [(False, True)]  # nothing written before the plan was stated
    text = "\n".join(r.getMessage() for r in caplog.records)
    lm = run_defaults()["train_lm"]
    assert "plan (cpu): index of 24 documents" in text
    assert (f"train_lm: 8 examples x k={lm['k']} = {8 * lm['k']} instances; {lm['max_steps']} steps x "
            f"{lm['batch_size']} sequences of <= {lm['max_length']} tokens") in text
    assert f"{lm['max_steps'] * lm['batch_size']:,} forward+backward passes" in text
    assert "evaluation: 5 rows x 2 test examples x k=10 passages" in text
    assert any(r.levelno == logging.WARNING and "--preset cpu" in r.getMessage() for r in caplog.records)

    caplog.clear()
    cpu = _config(inputs, tmp_path / "cpu", merge_sections(preset_sections("cpu"), {"run": {"device": "cpu"}}))
    Pipeline(cpu)
    text = "\n".join(r.getMessage() for r in caplog.records)
    demo_lm = preset_sections("cpu")["train_lm"]
    assert f"{demo_lm['max_steps']} steps x {demo_lm['batch_size']} sequences" in text
    assert not any(r.levelno == logging.WARNING and "--preset cpu" in r.getMessage() for r in caplog.records)


def test_preset_flag_reaches_the_run(inputs, tmp_path, monkeypatch, capsys):
    import radit_fast.pipeline.run as run_mod
    from radit_fast.cli.main import main

    seen = {}

    def fake_run(cfg, force=False):
        seen["cfg"] = cfg
        raise RaditError("stop before the run")

    monkeypatch.setattr(run_mod, "run_pipeline", fake_run)
    argv = ["run", "--corpus", inputs["corpus"], "--train", inputs["train"], "--dev", inputs["dev"], "--test",
            inputs["test"], "--out", tmp_path / "o", "--lm", inputs["lm"], "--encoder", inputs["encoder"]]
    assert main([str(a) for a in argv + ["--preset", "cpu", "--lm-steps", "5"]]) == 2
    cfg = seen["cfg"]
    demo = preset_sections("cpu")
    assert cfg.train_lm["max_steps"] == 5 and cfg.train_lm["batch_size"] == demo["train_lm"]["batch_size"]
    assert cfg.eval.k == demo["eval"]["k"] and cfg.run.chunk_words == demo["run"]["chunk_words"]
    assert main([str(a) for a in argv]) == 2
    assert seen["cfg"].train_lm["max_steps"] == run_defaults()["train_lm"]["max_steps"]
    capsys.readouterr()


def test_first_step_is_timed_into_an_estimate(inputs, tmp_path, caplog):
    from radit_fast.training import train_lm
    from test_training_fixtures import lm_config

    caplog.set_level(logging.INFO, logger="radit_fast")
    train_lm(lm_config(inputs, tmp_path / "lm", max_steps=3))
    msgs = [r.getMessage() for r in caplog.records if "the first step took" in r.getMessage()]
    assert len(msgs) == 1 and "for the other 2 steps" in msgs[0]
    seconds = float(msgs[0].split("took ")[1].split(" s")[0])
    estimate = msgs[0].split("about ")[1].split(" for")[0]
    assert estimate.endswith(" s") and abs(float(estimate.split()[0]) - 2 * seconds) <= 1  # rounded to 1 s
