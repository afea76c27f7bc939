"""Perplexity with retrieval (`radit eval --task lm`) against a float64 plain-transformers reference."""
from __future__ import annotations

import doctest
import json
import math

import pytest
import torch
from test_training_fixtures import cached_setup

from radit_fast.config.evaluation import LMEvalSettings
from radit_fast.evaluation import perplexity as P
from radit_fast.io import RaditError
from radit_fast.retrieval.corpus import passage_text

TEXT = ("Paris is the capital of France. Berlin is the capital of Germany. It has a long history, many "
        "museums and a busy river port. Rome is the capital of Italy and Madrid is in Spain.")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from radit_fast.models import load_lm
    from radit_fast.retrieval.retriever import Retriever

    p = cached_setup(tmp_path_factory.mktemp("ppl"))
    model, tok = load_lm(str(p["lm"]))
    return {"paths": p, "model": model, "tok": tok, "retriever": Retriever.load(p["index"])}


def test_doctests():
    assert doctest.testmod(P).failed == 0


def _ref(model, tok, text, s: LMEvalSettings, retriever):
    """Every window scored by a float64 copy of the model, full logits, the ensemble in float64."""
    ref = type(model)(model.config).double().eval()
    ref.load_state_dict(model.state_dict())
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def lp(prompt, y):
        seq = torch.tensor([prompt + y])
        with torch.no_grad():
            logp = ref(input_ids=seq).logits[0].double().log_softmax(-1)
        return sum(float(logp[len(prompt) + t - 1, y[t]]) for t in range(len(y)))

    plain = ens = 0.0
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    for w, start in enumerate(range(0, len(ids), s.stride)):
        y = ids[start:start + s.stride]
        ctx = ids[max(0, start - s.context):start] or [tok.eos_token_id]   # this tokenizer has no BOS
        plain += lp(ctx, y)
        query = tok.decode(ctx[-s.query_tokens:], skip_special_tokens=True).strip() or " "
        res = retriever.retrieve([query], s.k)
        body = [] if w == 0 else ctx
        terms = []
        for p, score in zip(res.passages[0], res.scores[0].double()):
            chunk = tok(passage_text(p.title, p.text), add_special_tokens=False)["input_ids"]
            chunk = chunk[:s.max_length - len(body) - len(y) - len(sep)]
            terms.append((score / s.retriever_temperature, lp(chunk + sep + body, y)))
        logw = torch.tensor([t[0] for t in terms], dtype=torch.float64).log_softmax(0)
        ens += float(torch.logsumexp(logw + torch.tensor([t[1] for t in terms], dtype=torch.float64), 0))
    return len(ids), plain, ens


@pytest.mark.parametrize("stride, context", [(8, 6), (16, 0), (24, 12)])
def test_matches_float64_reference(parts, stride, context):
    s = LMEvalSettings(stride=stride, context=context, k=3, max_length=48, retriever_temperature=0.5,
                         query_tokens=12, impl="torch" if stride == 24 else "auto")
    got = P.evaluate_lm(parts["model"], parts["tok"], TEXT, s, retriever=parts["retriever"])
    n, plain, ens = _ref(parts["model"], parts["tok"], TEXT, s, parts["retriever"])
    n_bytes = len(TEXT.encode("utf-8"))
    assert got["tokens"] == n and got["bytes"] == n_bytes and got["windows"] == math.ceil(n / stride)
    assert got["lm_only"]["logprob"] == pytest.approx(plain, rel=1e-4)
    assert got["retrieval"]["logprob"] == pytest.approx(ens, rel=1e-4)
    assert got["retrieval"]["perplexity"] == pytest.approx(math.exp(-ens / n), rel=1e-4)
    assert got["retrieval"]["bits_per_byte"] == pytest.approx(-ens / (math.log(2) * n_bytes), rel=1e-4)
    assert got["lm_only"]["bits_per_byte"] == pytest.approx(-plain / (math.log(2) * n_bytes), rel=1e-4)


def test_without_retriever_and_bad_settings(parts):
    s = LMEvalSettings(stride=8, context=4, k=0, max_length=32)
    got = P.evaluate_lm(parts["model"], parts["tok"], TEXT, s, retriever=parts["retriever"])
    assert got["retrieval"] is None and got["lm_only"]["perplexity"] > 1.0
    with pytest.raises(RaditError, match="do not fit"):
        P.evaluate_lm(parts["model"], parts["tok"], TEXT, LMEvalSettings(stride=30, context=30, max_length=32))
    with pytest.raises(RaditError, match="empty"):
        P.evaluate_lm(parts["model"], parts["tok"], "  \n", s)


def test_radit_eval_task_lm(parts, tmp_path, capsys):
    from radit_fast.cli.main import main

    p = parts["paths"]
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ppl"
    assert main(["eval", "--task", "lm", "--test", str(text), "--out", str(out), "--lm", str(p["lm"]),
                 "--index", str(p["index"]), "--k", "3", "--stride", "8", "--context", "6", "--max-length", "48",
                 "--retriever-temperature", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "LM alone: perplexity" in printed and "REPLUG k=3: perplexity" in printed
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    s = LMEvalSettings(stride=8, context=6, k=3, max_length=48, retriever_temperature=0.5)
    want = P.evaluate_lm(parts["model"], parts["tok"], TEXT, s, retriever=parts["retriever"])
    assert m["retrieval"]["bits_per_byte"] == pytest.approx(want["retrieval"]["bits_per_byte"], rel=1e-6)
    assert m["lm_only"]["bits_per_byte"] == pytest.approx(want["lm_only"]["bits_per_byte"], rel=1e-6)
    code = main(["eval", "--task", "lm", "--test", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")])
    assert code == 2 and "no such file" in capsys.readouterr().err
