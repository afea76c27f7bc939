"""The examples/ scripts run end to end on the embedded default LM (SmolLM2-135M), one training step each, so
they cannot rot. Each checks a real result, not only that the script finishes."""
from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="radit_example")


def test_hf_trainer_example_first_step_equals_the_unpatched_loss(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    from radit_fast.models import load_lm

    ns = _example("hf_trainer.py")
    logs = ns["main"](["--max-steps", "1", "--output-dir", str(tmp_path)])
    assert len(logs) == 1
    # One batch holds every example, so step 1's loss is the untouched model's mean answer-token NLL over all of
    # them: recompute it with transformers' own forward (full logits) on a fresh, unpatched copy.
    model, tok = load_lm()
    rows = ns["build_rows"](tok)
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(rows)
    with torch.no_grad():
        want = model(**batch).loss.item()
    assert logs[0]["loss"] == pytest.approx(want, rel=1e-4)


def test_trl_sft_example_trains_through_the_fused_op(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from radit_fast.integrations import transformers as integ

    rows = []
    real = integ.answer_logprobs
    monkeypatch.setattr(integ, "answer_logprobs", lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k))
    ns = _example("trl_sft.py")
    logs = ns["main"](["--max-steps", "1", "--output-dir", str(tmp_path)])
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]) and 0 < logs[0]["loss"] < 20
    assert 0.0 <= logs[0]["mean_token_accuracy"] <= 1.0 and logs[0]["entropy"] > 0
    # completion-only: one call scores the completions (+ EOS) of the 4 examples, a handful of tokens, no prompt
    assert len(rows) == 1 and len(ns["DATA"]) + 1 <= rows[0] <= 4 * len(ns["DATA"])
