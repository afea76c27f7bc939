"""sentence-transformers integration: the LSR loss equals radit's stage-2 objective (value and query-encoder
gradients), a SentenceTransformerTrainer run trains with it, and encoder folders saved by radit load in
``SentenceTransformer(path)`` with the same embeddings (mean/CLS pooling, normalised or not)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radit_fast.integrations.sentence_transformers import LSRLoss, lsr_label
from radit_fast.retrieval.encoder import TextEncoder, default_encoder_path
from radit_fast.config.stages import RetrieverConfig
from radit_fast.training.retriever import LsrObjective

st = pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["who wrote Hamlet?", "capital city of France", "largest planet of the solar system"]
PASSAGES = [
    ["Hamlet is a tragedy by William Shakespeare.", "Paris is the capital of France.",
     "Jupiter is the largest planet.", "The Nile is a river in Africa."],
    ["Lyon is a city in France.", "Paris is the capital and largest city of France.",
     "Berlin is the capital of Germany.", "(missing chunk)"],
    ["Saturn has rings.", "Jupiter is the largest planet in the Solar System.",
     "Mars is red.", "Mercury is closest to the Sun."],
]
# answer log-prob totals and token counts; query 1's last chunk is missing (length 0, -inf)
LOGPROBS = [[-3.0, -9.0, -8.0, -7.5], [-4.0, -1.2, -6.0, float("-inf")], [-5.0, -2.0, -7.0, -6.5]]
LENGTHS = [[2, 3, 3, 2], [2, 2, 3, 0], [3, 2, 2, 3]]


class _TableIndex:
    """What LsrObjective reads of a radit Index: stored document embeddings by row (-1 = zero vector)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def doc_embeddings(self, rows, device=None):
        r = torch.as_tensor(rows, dtype=torch.long)
        out = self.table[r.clamp(min=0)].clone()
        out[r < 0] = 0.0
        return out.to(device) if device is not None else out


@pytest.fixture(scope="module")
def minilm() -> str:
    return str(default_encoder_path())


def _radit_step(enc: TextEncoder, table: torch.Tensor, rows: torch.Tensor, cfg: RetrieverConfig):
    """Loss and query-encoder gradients of radit's stage-2 objective on one batch (the whole batch)."""
    obj = LsrObjective(enc, _TableIndex(table), cfg)
    tokens = enc.tokenizer(QUERIES, padding=True, truncation=True,
                           max_length=min(cfg.query_max_length, enc.max_length), return_tensors="pt")
    mb = {"tokens": dict(tokens), "rows": rows, "lm_logprobs": torch.tensor(LOGPROBS),
          "lengths": torch.tensor(LENGTHS), "norm": float(len(QUERIES)), "world": 1}
    enc.zero_grad()
    out = obj(mb)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in enc.model.named_parameters() if p.grad is not None}


def _st_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model[0].auto_model.named_parameters() if p.grad is not None}


def _assert_grads_equal(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert ref and set(ref) == set(got)
    scale = max(float(g.abs().max()) for g in ref.values())
    assert scale > 0
    worst = max(float((ref[n] - got[n]).abs().max()) for n in ref)
    assert worst <= 1e-4 * scale + 1e-7, f"max |grad difference| {worst} (largest gradient {scale})"


OPTIONS = [
    {},  # radit train-retriever's defaults
    {"retriever_temperature": 0.1, "lm_temperature": 0.5, "score_kind": "sum", "direction": "retriever_to_lsr",
     "e2e_weight": 0.5},
    {"retriever_temperature": 0.05, "score_kind": "prob", "impl": "torch"},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=["defaults", "paper-kl-e2e", "prob-torch"])
def test_lsr_loss_equals_radit_objective_with_stored_embeddings(minilm, opts):
    from sentence_transformers import SentenceTransformer

    cfg = RetrieverConfig(train="-", index="-", out="-", **opts)
    enc = TextEncoder.from_pretrained(minilm).configure(max_length=256)
    flat = [p for ps in PASSAGES for p in ps]
    table = enc.encode(flat, precision="fp32")
    rows = torch.arange(len(flat)).reshape(len(QUERIES), -1)
    rows[1, 3] = -1
    ref_loss, ref_grads = _radit_step(enc, table, rows, cfg)

    model = SentenceTransformer(minilm, device="cpu")
    loss_fn = LSRLoss.from_config(model, cfg, passage_embeddings=table)
    labels = torch.tensor([lsr_label(lp, ln, r.tolist()) for lp, ln, r in zip(LOGPROBS, LENGTHS, rows)])
    model.zero_grad()
    loss = loss_fn([model.preprocess(QUERIES)], labels)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-7)
    _assert_grads_equal(ref_grads, _st_grads(model))


def test_lsr_loss_text_mode_uses_a_frozen_document_encoder(minilm):
    from sentence_transformers import SentenceTransformer

    cfg = RetrieverConfig(train="-", index="-", out="-", retriever_temperature=0.1)
    enc = TextEncoder.from_pretrained(minilm)
    flat = [p for ps in PASSAGES for p in ps]
    table = enc.encode(flat, precision="fp32")  # the initial encoder = the frozen document side
    rows = torch.arange(len(flat)).reshape(len(QUERIES), -1)
    ref_loss, ref_grads = _radit_step(enc, table, rows, cfg)

    model = SentenceTransformer(minilm, device="cpu")
    loss_fn = LSRLoss(model, retriever_temperature=0.1)
    features = [model.preprocess(QUERIES)] + [model.preprocess([ps[j] for ps in PASSAGES]) for j in range(4)]
    labels = torch.tensor([lsr_label(lp, ln) for lp, ln in zip(LOGPROBS, LENGTHS)])
    model.zero_grad()
    loss = loss_fn(features, labels)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-7)
    _assert_grads_equal(ref_grads, _st_grads(model))
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.document_model.parameters())
    # the document side stays the initial encoder when the query encoder changes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    again = loss_fn(features, labels)
    assert float(again.detach()) != pytest.approx(float(loss.detach()), rel=1e-4)
    docs = loss_fn.document_model.encode(flat, convert_to_tensor=True)
    torch.testing.assert_close(docs, table, atol=1e-5, rtol=0)


def test_lsr_loss_refuses_bad_inputs(minilm):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm, device="cpu")
    with pytest.raises(ValueError, match="lm_temperature|temperature"):
        LSRLoss(model, lm_temperature=0.0)
    with pytest.raises(ValueError, match="direction"):
        LSRLoss(model, direction="sideways")
    loss_fn = LSRLoss(model)
    features = [model.preprocess(QUERIES)] + [model.preprocess([ps[j] for ps in PASSAGES]) for j in range(4)]
    with pytest.raises(ValueError, match=r"labels must be \[B=3, 4\]"):
        loss_fn(features, torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="k >= 2"):
        loss_fn(features[:2], torch.zeros(3, 1))
    table = torch.randn(12, 384)
    emb_loss = LSRLoss(model, passage_embeddings=table)
    with pytest.raises(ValueError, match=r"\[B, 3, k\]"):
        emb_loss(features[:1], torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="out of range"):
        emb_loss(features[:1], torch.tensor([lsr_label([-1.0, -2.0], [1, 1], [0, 99])] * 3))


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("mean", False), ("cls", True), ("cls", False)])
def test_saved_encoder_loads_in_sentence_transformers(minilm, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    enc = TextEncoder.from_pretrained(minilm).configure(pooling=pooling, normalize=normalize)
    with torch.no_grad():  # a "tuned" encoder: weights that differ from the package's
        enc.model.embeddings.word_embeddings.weight.mul_(1.01)
    out = tmp_path / "query_encoder"
    enc.save_pretrained(out)
    texts = QUERIES + [p for ps in PASSAGES for p in ps] + ["a much longer sentence " * 20]
    ref = enc.encode(texts, precision="fp32")

    model = SentenceTransformer(str(out), device="cpu")
    got = model.encode(texts, convert_to_tensor=True, batch_size=4)
    assert got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref, atol=1e-5, rtol=0)
    norms = got.norm(dim=-1)
    assert bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5)) == normalize
    assert (out / "2_Normalize").is_dir() == normalize
    pool_cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool_cfg["pooling_mode_cls_token"] == (pooling == "cls")
    assert pool_cfg["pooling_mode_mean_tokens"] == (pooling == "mean")

    # radit reads it back, from its own metadata and from the sentence-transformers files alone
    back = TextEncoder.from_pretrained(out)
    assert (back.pooling, back.normalize, back.max_length) == (pooling, normalize, enc.max_length)
    torch.testing.assert_close(back.encode(texts, precision="fp32"), ref, atol=1e-6, rtol=0)
    os.remove(out / "radit_encoder.json")
    bare = TextEncoder.from_pretrained(out)
    assert (bare.pooling, bare.normalize, bare.max_length) == (pooling, normalize, enc.max_length)


def test_resave_without_normalisation_drops_the_normalize_module(minilm, tmp_path):
    enc = TextEncoder.from_pretrained(minilm)
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "2_Normalize").is_dir()
    enc.configure(normalize=False).save_pretrained(tmp_path)
    assert not (tmp_path / "2_Normalize").exists()
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"]


def test_example_trains_with_sentence_transformer_trainer(tmp_path):
    """examples/st_lsr.py: LM-scored labels, 2 SentenceTransformerTrainer steps on MiniLM, saved model."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "st_lsr.py"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["steps"] == 2
    assert res["loss_after"] < res["loss_before"], res
    assert res["max_weight_change"] > 0
    assert res["saved_matches"] is True


@pytest.mark.parametrize("config,want", [
    ({"embedding_dimension": 4, "pooling_mode": "mean"}, "mean"),  # sentence-transformers >= 6
    ({"embedding_dimension": 4, "pooling_mode": "cls"}, "cls"),
    ({"word_embedding_dimension": 4, "pooling_mode_cls_token": True}, "cls"),  # earlier versions
    ({"word_embedding_dimension": 4, "pooling_mode_mean_tokens": True}, "mean"),
    ({"embedding_dimension": 4, "pooling_mode": "max"}, "max"),
])
def test_pooling_read_from_both_sentence_transformers_formats(tmp_path, config, want):
    from radit_fast.retrieval.encoder import _sentence_transformers_defaults

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "x.Transformer"}]))
    got = _sentence_transformers_defaults(tmp_path)
    assert got["pooling"] == want and got["normalize"] is False


def test_docstring_examples():
    import doctest

    import radit_fast.integrations.sentence_transformers as mod

    result = doctest.testmod(mod)
    assert result.attempted >= 1 and result.failed == 0
