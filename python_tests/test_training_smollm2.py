"""Both stages for one step on the embedded SmolLM2-135M-Instruct (slow: loads the real model)."""
from __future__ import annotations

import json

import pytest

from test_training_fixtures import cached_setup

pytestmark = pytest.mark.slow


def test_both_stages_one_step_on_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    from radit_fast.config.stages import RaItConfig, RetrieverConfig
    from radit_fast.training import train_lm, train_retriever

    p = cached_setup(tmp_path / "tiny")
    common = dict(train=str(p["train"]), index=str(p["index"]), lm=None, max_steps=1, batch_size=2,
                  warmup_steps=0, save_every=0, progress=False, max_length=96, max_examples=4)
    out = train_lm(RaItConfig(**common, out=str(tmp_path / "lm"), k=2))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[0]["loss"] < 20
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 49152
    out_r = train_retriever(RetrieverConfig(**common, out=str(tmp_path / "r"), k=3,
                                            cache_dir=str(tmp_path / "lsr")))
    assert (out_r / "radit_encoder.json").is_file()
