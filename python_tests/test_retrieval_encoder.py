"""The real all-MiniLM-L6-v2 encoder on a tiny corpus: pooling, differentiable query scores, stored document
embeddings, save/load of a fine-tuned query encoder, encoder/index mismatches."""
from __future__ import annotations

import doctest
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import radit_fast.retrieval.encoder as encoder_mod  # noqa: E402
from radit_fast.io import RaditError  # noqa: E402
from radit_fast.retrieval import (  # noqa: E402
    Index, IndexBuildConfig, Passage, Retriever, TextEncoder, build_index, build_index_from_embeddings,
    precomputed_identity,
)

pytestmark = pytest.mark.slow

TOPICS = [
    ("Paris", "Paris is the capital and largest city of France, on the river Seine."),
    ("Photosynthesis", "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar."),
    ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest planet in the Solar System."),
    ("Violin", "The violin is a wooden string instrument played with a bow, the smallest of its family."),
    ("Python (language)", "Python is a high-level programming language known for readable code and indentation."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Penicillin", "Penicillin is an antibiotic discovered by Alexander Fleming in 1928 from a mould."),
    ("Chess", "Chess is a board game for two players with sixteen pieces each on an eight by eight board."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare about the prince of Denmark."),
    ("Volcano", "A volcano is a rupture in the crust of a planet through which lava and gases escape."),
    ("Honey bee", "Honey bees are flying insects that make honey and wax and live in large colonies."),
    ("Bicycle", "A bicycle is a pedal-driven, two-wheeled vehicle steered with handlebars."),
]
LONG = " ".join(f"The Amazon rainforest covers much of the Amazon basin in South America, sentence {i}."
                for i in range(30))


def corpus_rows():
    rows = [{"id": f"d{i}", "title": t, "text": x} for i, (t, x) in enumerate(TOPICS)]
    rows.append({"id": "amazon", "title": "Amazon rainforest", "text": LONG})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enc")
    corpus = write_jsonl(tmp / "corpus.jsonl", corpus_rows())
    folder = build_index(corpus, tmp / "idx", IndexBuildConfig(chunk_words=40, batch_size=8, precision="fp32"))
    return tmp, Retriever.load(folder, precision="fp32")


def test_docstring_examples():
    result = doctest.testmod(encoder_mod)
    assert result.failed == 0 and result.attempted > 0


def test_default_encoder_is_minilm_mean_pooled_and_normalised(built):
    _, r = built
    enc = r.query_encoder
    assert (enc.name, enc.pooling, enc.normalize, enc.dim, enc.max_length) == (
        "sentence-transformers/all-MiniLM-L6-v2", "mean", True, 384, 256)
    texts = ["short", "a much longer sentence with many more tokens in it"]
    emb = enc.encode(texts, precision="fp32")
    # reference: mean of the unpadded token states of each text separately, then L2-normalised
    for i, t in enumerate(texts):
        b = enc.tokenizer([t], return_tensors="pt")
        with torch.no_grad():
            h = enc.model(**b).last_hidden_state[0].double()
        ref = torch.nn.functional.normalize(h.mean(0), dim=0)
        assert torch.allclose(emb[i].double(), ref, atol=1e-5), (emb[i][:4], ref[:4])
    cls = TextEncoder(enc.model, enc.tokenizer, name="x", pooling="cls", normalize=False, base_fingerprint="f")
    with torch.no_grad():
        h = enc.model(**enc.tokenizer(texts[:1], return_tensors="pt")).last_hidden_state
    assert torch.allclose(cls.encode(texts[:1], precision="fp32")[0], h[0, 0], atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32(built):
    _, r = built
    texts = [t for _, t in TOPICS]
    a = r.query_encoder.encode(texts, precision="fp32")
    b = r.query_encoder.encode(texts, precision="bf16")
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.98


def test_retrieval_finds_the_right_documents_with_chunk_ids(built):
    _, r = built
    res = r.retrieve(["Who wrote Hamlet?", "largest planet in the solar system", "rainforest in South America"], k=3)
    assert res.scores.shape == (3, 3) and res.mask.all()
    assert [ids[0] for ids in res.ids][:2] == ["d8", "d2"]
    assert res.ids[2][0].startswith("amazon#")
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()
    assert len(r.index) == len(TOPICS) + -(-len(LONG.split()) // 40)  # the long document is chunked


def test_scores_are_differentiable_wrt_the_query_encoder_and_use_stored_doc_embeddings(built):
    _, r = built
    enc = r.query_encoder
    enc.zero_grad()
    res = r.retrieve(["Who discovered penicillin?", "a game with a board"], k=4, grad=True)
    assert res.scores.requires_grad
    # the doc side is the stored float16 matrix: recompute the scores from it by hand
    q = enc.encode(["Who discovered penicillin?", "a game with a board"], precision="fp32")
    stored = np.load(r.index.folder / "embeddings.f16.npy").astype(np.float32)
    manual = torch.einsum("bd,bkd->bk", q, torch.from_numpy(stored[res.rows.numpy()]))
    assert torch.allclose(res.scores.detach(), manual, atol=1e-5)
    # and they agree with FAISS' own (exact, Flat) scores
    faiss_scores, faiss_rows = r.index.search(q, 4)
    assert torch.allclose(res.scores.detach(), torch.from_numpy(faiss_scores), atol=1e-5)
    # gradient reaches the query encoder's weights, and the doc side has no parameters in the graph
    torch.log_softmax(res.scores / 0.1, dim=1)[:, 0].sum().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    fixed = r.score(["Who discovered penicillin?"], torch.tensor([[res.rows[0, 0], -1]]))
    assert fixed.requires_grad and torch.isinf(fixed[0, 1]) and fixed[0, 0] > 0


def test_fine_tuned_query_encoder_saves_and_loads_by_path(built, tmp_path):
    tmp, r = built
    enc = r.query_encoder
    with torch.no_grad():
        next(p for p in enc.parameters() if p.ndim == 2).add_(0.01)  # pretend a training step
    enc.save_pretrained(tmp_path / "qenc")
    assert (tmp_path / "qenc" / "model.safetensors").is_file()
    again = TextEncoder.from_pretrained(tmp_path / "qenc")
    assert (again.pooling, again.normalize, again.name) == ("mean", True, enc.name)
    assert again.base_fingerprint == enc.base_fingerprint != again.fingerprint()
    texts = ["Who discovered penicillin?"]
    assert torch.allclose(again.encode(texts, precision="fp32"), enc.encode(texts, precision="fp32"), atol=1e-6)
    r2 = Retriever.load(r.index.folder, tmp_path / "qenc")  # lineage matches the index's query encoder
    assert r2.retrieve(texts, k=1).ids == [["d6"]]


def test_mismatched_encoders_are_refused(built, tmp_path):
    tmp, r = built
    enc = r.query_encoder
    with pytest.raises(RaditError, match="query encoder does not match index .*someone/else"):
        Retriever(r.index, _renamed(enc, "someone/else"))
    cls = _renamed(enc, enc.name)
    cls.pooling = "cls"
    with pytest.raises(RaditError, match="pooling 'cls' != 'mean'"):
        Retriever(r.index, cls)
    Retriever(r.index, cls, strict=False)  # allowed with a warning
    small = build_index_from_embeddings(tmp_path / "small", [Passage("a", "", "x")], np.ones((1, 8), np.float32),
                                        doc_encoder=precomputed_identity(enc.name, 8))
    with pytest.raises(RaditError, match="has dim 384 but index .* has dim 8"):
        Retriever(Index.load(small), enc, strict=False)


def _renamed(enc, name):
    e = TextEncoder(enc.model, enc.tokenizer, name=name, pooling=enc.pooling, normalize=enc.normalize,
                    base_fingerprint="sha256:unrelated")
    e.fingerprint = lambda: "sha256:unrelated"  # type: ignore[method-assign]
    return e


def test_unknown_encoder_is_a_one_line_error(tmp_path):
    with pytest.raises(RaditError, match="cannot load encoder"):
        TextEncoder.from_pretrained(tmp_path)  # an empty folder is not a model


def _tiny_bert(folder, hidden, source):
    """A random 1-layer BERT with the MiniLM tokenizer: a second, different HF encoder (no sentence-transformers files)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=source.tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    return folder


def test_asymmetric_pair_and_build_time_dim_check(built, tmp_path):
    tmp, r = built
    corpus = tmp / "corpus.jsonl"
    q384 = _tiny_bert(tmp_path / "q384", 384, r.query_encoder)
    folder = build_index(corpus, tmp_path / "asym", IndexBuildConfig(query_encoder=str(q384), chunk_words=40))
    m = Index.load(folder).manifest
    assert m["doc_encoder"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert m["query_encoder"]["name"] == str(q384) and m["query_encoder"]["pooling"] == "cls"  # a plain HF model
    r2 = Retriever.load(folder)  # loads the manifest's query encoder with its own pooling
    assert r2.query_encoder.name == str(q384) and r2.query_encoder.pooling == "cls"
    assert r2.retrieve(["anything"], k=2).scores.shape == (1, 2)
    q32 = _tiny_bert(tmp_path / "q32", 32, r.query_encoder)
    with pytest.raises(RaditError, match="has dim 32 but the document encoder .* has dim 384"):
        build_index(corpus, tmp_path / "bad", IndexBuildConfig(query_encoder=str(q32)))
    assert not (tmp_path / "bad").exists()
