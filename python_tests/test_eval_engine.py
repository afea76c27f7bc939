"""Evaluation engine: shared-prefix scoring and mixture decoding equal full-sequence references."""
from __future__ import annotations

import pytest
import torch

from _eval_tiny import tiny_lm
from radit_fast.evaluation.engine import LMEngine


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _ref_logprob(model, prompt, cont):
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    return sum(float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(cont))


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("path", ["tree", "cached"])
def test_score_matches_full_sequence(lm, impl, path, monkeypatch):
    model, _ = lm
    if path == "cached":  # what flash-attention models use
        monkeypatch.setattr("radit_fast.models.attention_implementation", lambda m: "flash_attention_2")
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(n) for n in (7, 3, 12, 1, 5)]
    conts = [[rnd(1), rnd(3)], [rnd(2)], [rnd(4), rnd(1), rnd(2)], [rnd(3)], [rnd(1), rnd(1)]]
    # small batches and rows so that batching, sorting and row chunking are all exercised
    eng = LMEngine(model, pad_id=0, batch_size=2, max_rows=2, impl=impl)
    got = eng.score(prompts, conts)
    for p, cs, row in zip(prompts, conts, got):
        for c, v in zip(cs, row):
            assert v == pytest.approx(_ref_logprob(model, p, c), abs=1e-4)


def _ref_mixture_greedy(model, prompts, weights, steps, stop):
    w = torch.tensor(weights).log_softmax(0)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            per = torch.stack([model(input_ids=torch.tensor([p + out])).logits[0, -1].float().log_softmax(-1)
                               for p in prompts])
        nxt = int(torch.logsumexp(w[:, None] + per, 0).argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return out


def test_mixture_greedy_matches_reference(lm):
    model, _ = lm
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    examples = [[rnd(6), rnd(9), rnd(4)], [rnd(5)], [rnd(8), rnd(3)]]
    weights = [[0.5, -1.0, 2.0], [0.0], [1.0, 1.0]]
    eng = LMEngine(model, pad_id=0, batch_size=4)
    got = eng.generate(examples, weights, max_new_tokens=6, stop_ids={0})
    for ps, w, toks in zip(examples, weights, got):
        assert toks == _ref_mixture_greedy(model, ps, w, 6, {0})


def test_generate_stops_and_reweights(lm):
    model, _ = lm
    eng = LMEngine(model, pad_id=0, batch_size=8)
    prompts = [[[5, 6, 7], [8, 9]]]
    free = eng.generate(prompts, [[0.0, 0.0]], max_new_tokens=4, stop_ids=set())
    assert len(free[0]) == 4
    stopped = eng.generate(prompts, [[0.0, 0.0]], max_new_tokens=4, stop_ids={free[0][1]})
    assert stopped[0] == free[0][:1] or stopped[0] == []   # stops at the first occurrence of the stop id
    rew = eng.generate(prompts, [[0.0, 0.0]], max_new_tokens=4, stop_ids=set(), reweight=True)
    assert rew[0][0] == free[0][0]                          # same first step: nothing to reweight yet


def test_empty_inputs_refused(lm):
    model, _ = lm
    eng = LMEngine(model, pad_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.score([[]], [[[1]]])
    with pytest.raises(ValueError, match="empty continuation"):
        eng.score([[1]], [[[]]])
