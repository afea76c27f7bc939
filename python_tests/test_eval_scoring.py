"""Scoring and generation with parallel retrieval augmentation: REPLUG ensemble over k prompts, multiple
choice by ensemble likelihood, mixture/rescore decoding, k=0, gold context, demonstrations, metrics."""
from __future__ import annotations

import math

import pytest
import torch

from test_training_fixtures import tiny_setup
from radit_fast.config.evaluation import EvalSettings
from radit_fast.data.prompts import format_prompt
from radit_fast.data.tasks import Example, load_tasks
from radit_fast.evaluation.engine import LMEngine
from radit_fast.retrieval.corpus import doc_id
from radit_fast.evaluation.evaluate import evaluate_examples, retrieve
from radit_fast.evaluation.scoring import Augmentation, augmentation_for, pick_demonstrations, score_multiple_choice


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from radit_fast.retrieval.retriever import Retriever

    paths = tiny_setup(tmp_path_factory.mktemp("eval_tiny"))
    model = AutoModelForCausalLM.from_pretrained(paths["lm"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(paths["lm"])
    return {"paths": paths, "model": model, "tok": tok, "retriever": Retriever.load(paths["index"])}


def _seq_logprob(model, tok, text, answer):
    p = tok(text, add_special_tokens=False)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + a])).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(p) - 1 + t, c]) for t, c in enumerate(a))


def test_multiple_choice_is_replug_ensemble(setup):
    model, tok = setup["model"], setup["tok"]
    ex = Example(id="m1", input="What is the capital of France?", answers=["Paris"], choices=["Rome", "Paris", "Oslo"])
    chunks = ["Paris is the capital of France.", "Rome is in Italy.", "Oslo is in Norway."]
    scores = [0.9, 0.2, -0.4]
    settings = EvalSettings(k=3, retriever_temperature=0.5, impl="torch")
    eng = LMEngine(model, pad_id=tok.pad_token_id, batch_size=2, max_rows=2)
    res = score_multiple_choice(eng, tok, [ex], [Augmentation(chunks, scores)], settings, {False: [], True: []})[0]
    prior = torch.tensor(scores).div(0.5).log_softmax(0)
    want = []
    for c in ex.choices:
        lm = torch.tensor([_seq_logprob(model, tok, format_prompt(ch, ex.input), c) for ch in chunks])
        want.append(float(torch.logsumexp(prior + lm, 0)))
    assert res["logprobs"] == pytest.approx(want, abs=1e-4)
    assert res["prediction"] == ex.choices[max(range(3), key=lambda i: want[i])]


def test_choice_score_mean_divides_by_length(setup):
    model, tok = setup["model"], setup["tok"]
    ex = Example(id="m", input="Which country?", answers=["Czechia"], choices=["Czechia", "Italy"])
    eng = LMEngine(model, pad_id=tok.pad_token_id)
    aug = [Augmentation([None], [0.0])]
    s = score_multiple_choice(eng, tok, [ex], aug, EvalSettings(k=0), {})[0]
    m = score_multiple_choice(eng, tok, [ex], aug, EvalSettings(k=0, choice_score="mean"), {})[0]
    n_tok = [len(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in ex.choices]
    assert [a / n for a, n in zip(s["logprobs"], n_tok)] == pytest.approx(m["logprobs"], abs=1e-5)


def test_augmentation_rules():
    ret = [("a#0", "A text", 0.5), ("b", "B text", 0.4), ("c", "C text", 0.1)]
    plain = Example(id="1", input="q", answers=["x"])
    assert augmentation_for(plain, ret, 2).chunks == ["A text", "B text"]
    assert augmentation_for(plain, ret, 2).passage_ids == ["a#0", "b"]
    assert augmentation_for(plain, ret, 0).chunks == [None]
    gold = Example(id="2", input="q", answers=["x"], context="gold")
    assert augmentation_for(gold, ret, 3).chunks == ["gold"]


def test_demonstrations_fixed_and_per_kind():
    train = [Example(id=f"g{i}", input=f"q{i}", answers=[f"a{i}"]) for i in range(5)]
    train += [Example(id=f"m{i}", input=f"mq{i}", answers=["x"], choices=["x", "y"]) for i in range(3)]
    d = pick_demonstrations(train, 2, seed=3)
    assert len(d[False]) == 2 and len(d[True]) == 2
    assert all(q.startswith("q") for q, _ in d[False]) and all(q.startswith("mq") for q, _ in d[True])
    assert d == pick_demonstrations(train, 2, seed=3)
    assert pick_demonstrations(train, 0) == {False: [], True: []}


@pytest.mark.parametrize("decode", ["mixture", "rescore"])
def test_evaluate_end_to_end(setup, decode):
    examples = load_tasks(setup["paths"]["train"])[:6]
    mc = Example(id="mc", input="What is the capital of Italy?", answers=["Rome"], choices=["Rome", "Oslo"],
                 provenance=["cap2"])
    examples = examples + [mc]
    retrieved = retrieve(setup["retriever"], examples, 3, progress=False)
    assert all(len(r) == 10 for r in retrieved)           # max(k, 10) for recall@10
    settings = EvalSettings(k=3, max_new_tokens=4, decode=decode, batch_size=4, max_length=96)
    preds, metrics = evaluate_examples(setup["model"], setup["tok"], examples, retrieved, settings,
                                       train=examples[:2], progress=False)
    assert [p["id"] for p in preds] == [e.id for e in examples]
    assert set(metrics) >= {"em", "f1", "accuracy", "recall@1", "recall@3", "recall@10", "n_examples"}
    assert metrics["n_generation"] == 6 and metrics["n_multiple_choice"] == 1
    assert preds[-1]["prediction"] in mc.choices and len(preds[-1]["choice_logprobs"]) == 2
    assert all(len(p["passages"]) == 3 for p in preds)
    for name in ("em", "f1", "accuracy", "recall@1"):
        assert 0.0 <= metrics[name] <= 1.0
    # recall@1 from the ranked ids
    hit = [float(doc_id(r[0][0]) in e.provenance) for r, e in zip(retrieved, examples)]
    assert metrics["recall@1"] == pytest.approx(sum(hit) / len(hit))


def test_lm_only_has_no_recall(setup):
    examples = load_tasks(setup["paths"]["train"])[:3]
    preds, metrics = evaluate_examples(setup["model"], setup["tok"], examples, None,
                                       EvalSettings(k=0, max_new_tokens=3), progress=False)
    assert "recall@1" not in metrics and "em" in metrics
    assert all(p["passages"] == [] for p in preds)
    with pytest.raises(ValueError, match="needs retrieval"):
        evaluate_examples(setup["model"], setup["tok"], examples, None, EvalSettings(k=2), progress=False)


def test_greedy_mixture_with_one_chunk_is_plain_greedy(setup):
    """k = 1: the mixture is the LM itself, so decoding equals HF greedy generation."""
    model, tok = setup["model"], setup["tok"]
    ex = load_tasks(setup["paths"]["train"])[0]
    settings = EvalSettings(k=1, max_new_tokens=5)
    preds, _ = evaluate_examples(model, tok, [ex], [[("x", "Paris is nice.", 1.0)]], settings, progress=False)
    ids = tok(format_prompt("Paris is nice.", ex.input), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
    assert preds[0]["prediction"] == text
    assert not math.isnan(preds[0]["f1"])


def _ensemble_ref(model, tok, question, chunks, scores, answer, temperature):
    """float64 REPLUG ensemble of one answer from full-sequence forward passes (plain transformers)."""
    prior = torch.tensor(scores, dtype=torch.float64).div(temperature).log_softmax(0)
    lm = torch.tensor([_seq_logprob(model, tok, format_prompt(c, question), answer) for c in chunks],
                      dtype=torch.float64)
    return float(torch.logsumexp(prior + lm, 0))


def test_multiple_choice_ragged_chunk_counts(setup):
    """One batch: an example with a gold context (1 chunk), one with 3 retrieved chunks, one with 2: the
    padded grid's missing chunks must not enter any ensemble."""
    model, tok = setup["model"], setup["tok"]
    exs = [Example(id="g", input="What is the capital of Italy?", answers=["Rome"], choices=["Rome", "Oslo"],
                   context="Rome is the capital of Italy."),
           Example(id="r3", input="What is the capital of France?", answers=["Paris"],
                   choices=["Rome", "Paris", "Oslo"]),
           Example(id="r2", input="What is the capital of Norway?", answers=["Oslo"], choices=["Oslo", "Paris"])]
    augs = [Augmentation(["Rome is the capital of Italy."], [0.0]),
            Augmentation(["Paris is the capital of France.", "Rome is in Italy.", "Oslo is in Norway."],
                         [0.9, 0.2, -0.4]),
            Augmentation(["Oslo is in Norway.", "Paris is in France."], [0.3, 0.5])]
    settings = EvalSettings(k=3, retriever_temperature=0.5, impl="cpu")
    eng = LMEngine(model, pad_id=tok.pad_token_id, batch_size=3, max_rows=4)
    got = score_multiple_choice(eng, tok, exs, augs, settings, {False: [], True: []})
    for ex, aug, res in zip(exs, augs, got):
        want = [_ensemble_ref(model, tok, ex.input, aug.chunks, aug.scores, c, 0.5) for c in ex.choices]
        assert res["logprobs"] == pytest.approx(want, abs=1e-4), ex.id
        assert res["prediction"] == ex.choices[max(range(len(want)), key=want.__getitem__)]
        assert [len(c) for c in res["chunk_logprobs"]] == [len(aug.chunks)] * len(ex.choices)


def test_rescore_picks_the_best_ensemble_candidate(setup):
    """decode="rescore": each chunk's greedy answer becomes a candidate, rescored by the REPLUG ensemble
    over all chunks; the prediction is the candidate with the highest ensemble log-likelihood, computed
    here independently from full-sequence forward passes."""
    from radit_fast.evaluation.generation import generate_answers

    model, tok = setup["model"], setup["tok"]
    ex = Example(id="q", input="What is the capital of France?", answers=["Paris"])
    aug = Augmentation(["Paris is the capital of France.", "Rome is in Italy.", "Oslo is in Norway."],
                       [0.9, 0.2, -0.4])
    settings = EvalSettings(k=3, max_new_tokens=4, decode="rescore", retriever_temperature=0.5)
    eng = LMEngine(model, pad_id=tok.pad_token_id)
    res = generate_answers(eng, tok, [ex], [aug], settings, {False: [], True: []})[0]
    assert res["candidates"], "the tiny LM decoded nothing scorable"
    want = [_ensemble_ref(model, tok, ex.input, aug.chunks, aug.scores, c, 0.5) for c in res["candidates"]]
    assert res["logprobs"] == pytest.approx(want, abs=1e-4)
    assert res["prediction"] == res["candidates"][max(range(len(want)), key=want.__getitem__)]


def test_too_few_demonstrations_warn(setup, caplog):
    examples = load_tasks(setup["paths"]["train"])[:2]
    with caplog.at_level("WARNING", logger="radit_fast.evaluation.evaluate"):
        evaluate_examples(setup["model"], setup["tok"], examples[1:], None,
                          EvalSettings(k=0, shots=3, max_new_tokens=2, max_length=96), train=examples[:1],
                          progress=False)
    assert any("only 1 generation example" in r.getMessage() for r in caplog.records)


def _ids_logprob(model, prompt, cont):
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([list(prompt) + list(cont)])).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(cont))


def test_rescore_scores_behind_the_truncated_prompt_it_decoded_from(setup):
    """k = 1 with a chunk far longer than max_length: decoding keeps max_new_tokens free, so its chunk is cut
    shorter than a prompt that kept only the candidate's length free would be. The rescored log-prob must be
    the candidate's log-prob behind the prompt decoding used (checked here to reproduce the decoded text with
    plain transformers greedy generation), not behind a differently truncated chunk."""
    from radit_fast.data.prompts import build_prompt
    from radit_fast.evaluation.generation import clean_answer, generate_answers
    from radit_fast.evaluation.scoring import answer_ids

    model, tok = setup["model"], setup["tok"]
    ex = Example(id="q", input="What is the capital of France?", answers=["Paris"])
    chunk = " ".join(["Paris is the capital of France and Rome is the capital of Italy."] * 40)
    settings = EvalSettings(k=1, max_new_tokens=8, max_length=64, decode="rescore")
    eng = LMEngine(model, pad_id=tok.pad_token_id)
    res = generate_answers(eng, tok, [ex], [Augmentation([chunk], [0.3])], settings, {False: [], True: []})[0]
    assert len(res["candidates"]) == 1 and res["candidates"][0], "the tiny LM decoded nothing scorable"
    cand = res["candidates"][0]
    decoded_from = build_prompt(tok, chunk, ex.input, max_length=64, reserve=8).input_ids
    assert len(decoded_from) == 64 - 8                                      # the chunk was truncated
    with torch.no_grad():
        out = model.generate(torch.tensor([decoded_from]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert clean_answer(tok.decode(out[0, len(decoded_from):], skip_special_tokens=True)) == cand
    cont = answer_ids(tok, cand)
    want = _ids_logprob(model, decoded_from, cont)
    assert res["logprobs"] == pytest.approx([want], abs=1e-4)
    # The test tells the difference: the decoded text, tokenised again as an answer, need not have the
    # decoded length (here it is longer), so a prompt that keeps the candidate's length free (or the larger
    # of it and max_new_tokens) cuts the chunk elsewhere and scores another number.
    assert len(cont) != 8
    for reserve in {len(cont), max(8, len(cont))}:
        other = build_prompt(tok, chunk, ex.input, max_length=64, reserve=reserve).input_ids
        assert other != decoded_from and abs(_ids_logprob(model, other, cont) - want) > 1e-4
