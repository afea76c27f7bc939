"""Inputs of the tuning stages: model identities (LSR cache keys, resume), input errors before any compute,
self-supervised corpus items that never see their own document, seeded LoRA initialisation."""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from radit_fast.io import RaditError
from radit_fast.config.stages import RaItConfig
from radit_fast.distributed import DistEnv
from radit_fast.training import identity, sources, train_lm, train_retriever
from test_training_fixtures import (Crash, cached_setup, corpus_rows, crash_at, lm_config, retriever_config, tiny_lm,
                                    write_jsonl)

torch.set_num_threads(1)


@pytest.fixture
def tiny(tmp_path):
    return cached_setup(tmp_path / "tiny")


def _lm_cfg(p, out, **kw):
    return lm_config(p, out, **{"max_steps": 2, **kw})


def _r_cfg(p, out, **kw):
    return retriever_config(p, out, **{"max_steps": 1, **kw})


def _rewrite_weights(lm_dir: Path, tmp: Path, seed: int) -> None:
    """Replace the LM folder's weights by another random LM of identical shapes (file size unchanged)."""
    other = tiny_lm(tmp / f"other-{seed}", seed=seed)
    before = (lm_dir / "model.safetensors").stat().st_size
    shutil.copyfile(other / "model.safetensors", lm_dir / "model.safetensors")
    assert (lm_dir / "model.safetensors").stat().st_size == before


# ------------------------------------------------------------------------------------ identities
def test_lsr_cache_key_follows_the_lm_weights(tiny, tmp_path):
    cfg = _r_cfg(tiny, tmp_path / "a")
    train_retriever(cfg)
    assert len(list(Path(cfg.cache_dir).glob("lsr-*"))) == 1
    _rewrite_weights(tiny["lm"], tmp_path, seed=1)
    train_retriever(_r_cfg(tiny, tmp_path / "b", cache_dir=cfg.cache_dir))
    assert len(list(Path(cfg.cache_dir).glob("lsr-*"))) == 2, "other weights of the same shapes reused the cache"


def test_resume_refused_after_the_lm_weights_change(tiny, tmp_path):
    from radit_fast.training.checkpoint import CheckpointError

    out = tmp_path / "run"
    with pytest.raises(Crash):
        train_lm(_lm_cfg(tiny, out, save_every=1), callbacks=[crash_at("step_end", 1)])
    _rewrite_weights(tiny["lm"], tmp_path, seed=2)
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        train_lm(_lm_cfg(tiny, out, save_every=1, resume=True))


def test_in_memory_lm_differing_in_a_late_layer(tiny):
    from radit_fast.models import load_lm
    from radit_fast.training import lsr_cache

    lm, _ = load_lm(tiny["lm"])
    twin = copy.deepcopy(lm)
    cfg = _r_cfg(tiny, "unused")
    assert lsr_cache.lm_identity(cfg, lm) == lsr_cache.lm_identity(cfg, twin)
    with torch.no_grad():
        twin.model.layers[-1].mlp.down_proj.weight[0, 0] += 1e-3
    assert lsr_cache.lm_identity(cfg, lm) != lsr_cache.lm_identity(cfg, twin)
    assert identity.fingerprint(cfg, lm=lm) != identity.fingerprint(cfg, lm=twin)


def test_file_digest_memoised_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv("RADIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "MEMO_MIN_BYTES", 0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = identity.file_sha256(f)
    assert len(list((tmp_path / "cache" / identity.MEMO_DIR).glob("*.json"))) == 1
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: pytest.fail("memoised digest not used"))
    assert identity.file_sha256(f) == first
    monkeypatch.setattr(identity, "sha256_file", real)
    f.write_bytes(b"b" * 1000)  # same size, rewritten in place
    assert identity.file_sha256(f) != first


# ------------------------------------------------------------------------ errors before compute
def _no_models(monkeypatch):
    import radit_fast.models as models
    from radit_fast.training import lsr_cache

    monkeypatch.setattr(models, "load_lm", lambda *a, **k: pytest.fail("LM loaded before the check"))
    monkeypatch.setattr(lsr_cache, "score_items", lambda *a, **k: pytest.fail("LSR scoring before the check"))


def test_batch_larger_than_data_fails_before_the_lm(tiny, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    with pytest.raises(RaditError, match="--batch-size 64 is larger than the 36 training instances"):
        train_lm(_lm_cfg(tiny, tmp_path / "lm", batch_size=64))
    with pytest.raises(RaditError, match="--batch-size 16 is larger than the 12 training examples"):
        train_retriever(_r_cfg(tiny, tmp_path / "r", batch_size=16))


def test_batch_not_divisible_fails_first(tiny, tmp_path, monkeypatch):
    import radit_fast.training.loop as loop

    with pytest.raises(RaditError, match="multiple of --grad-accum 4"):
        RaItConfig(train="t", index="i", out="o", batch_size=6, grad_accum=4).validate()
    _no_models(monkeypatch)
    monkeypatch.setattr(loop, "init_distributed", lambda device=None: DistEnv(world_size=3))
    with pytest.raises(RaditError, match="multiple of processes x --grad-accum = 3 x 1"):
        train_lm(_lm_cfg(tiny, tmp_path / "lm"))
    with pytest.raises(RaditError, match="multiple of processes x --grad-accum = 3 x 1"):
        train_retriever(_r_cfg(tiny, tmp_path / "r"))
    assert not (tmp_path / "lm").exists() and not (tmp_path / "r").exists()


def test_retriever_eval_needs_only_provenance(tiny, tmp_path, monkeypatch):
    rows = [{"id": f"e{i}", "input": f"Which city is the capital of {c}?", "output": [{"provenance": [{"id": f"cap{i}"}]}]}
            for i, c in enumerate(["France", "Germany", "Italy"])]
    ev = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = train_retriever(_r_cfg(tiny, tmp_path / "r", eval_file=str(ev), eval_every=1))
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals and evals[0]["eval_examples"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "input": "q?"\n')
    _no_models(monkeypatch)
    with pytest.raises(RaditError, match="bad.jsonl"):
        train_retriever(_r_cfg(tiny, tmp_path / "r2", eval_file=str(bad), eval_every=1))


# ---------------------------------------------------------------------------------- corpus items
def test_corpus_items_keep_their_rows_when_one_passage_is_missing(tiny, tmp_path):
    index = sources.open_index(tiny["index"])
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows() + [
        {"id": "extra", "title": "Nowhere", "text": " ".join(["word"] * 30)}])
    items = sources.corpus_items(index, 25, seed=0, corpus=str(corpus))
    assert len(items) == 25
    for it in items:
        pid = it.id.removeprefix("corpus:")
        want = -1 if pid == "extra" else index.store.row_of(pid)
        assert it.passage_row == want
        assert it.exclude_rows == ((want,) if want >= 0 else ())
    rows = index.retrieve_rows([it.input for it in items], 3, exclude=[it.exclude_rows for it in items])
    for it, row in zip(items, rows):
        assert it.passage_row not in row.tolist() or it.passage_row < 0


def test_corpus_items_never_see_their_own_document(tiny, tmp_path):
    """Index chunked into doc#n passages; the corpus file's whole documents are not in the store, yet
    no chunk of an item's own document is retrieved as its background."""
    from radit_fast.retrieval.build import IndexBuildConfig, build_index
    from radit_fast.retrieval.corpus import doc_id

    folder = tmp_path / "chunked"
    build_index(tiny["corpus"], folder, IndexBuildConfig(encoder=str(tiny["encoder"]), chunk_words=12))
    index = sources.open_index(folder)
    assert index.store[0].id.endswith("#0")
    items = sources.corpus_items(index, 12, seed=0, corpus=str(tiny["corpus"]))
    own = [{r for r in range(len(index.store)) if doc_id(index.store[r].id) == it.id.removeprefix("corpus:")}
           for it in items]
    assert all(it.passage_row == -1 and set(it.exclude_rows) == o and len(o) >= 3 for it, o in zip(items, own))
    queries = [it.input for it in items]
    plain = index.retrieve_rows(queries, 3)
    assert any(set(r.tolist()) & o for r, o in zip(plain, own)), "the test needs own-document hits to exclude"
    rows = index.retrieve_rows(queries, 3, exclude=[it.exclude_rows for it in items])
    for r, o in zip(rows, own):
        assert not set(r.tolist()) & o and (r >= 0).sum() == 3
    # from the store itself: the item's own chunk and its siblings are excluded as well
    for it in sources.corpus_items(index, 6, seed=1):
        pid = index.store[it.passage_row].id
        assert it.passage_row in it.exclude_rows
        assert {index.store[r].id for r in it.exclude_rows} == {
            index.store[r].id for r in range(len(index.store)) if doc_id(index.store[r].id) == doc_id(pid)}


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_initialisation_follows_the_seed(tiny):
    pytest.importorskip("peft")
    from radit_fast.models import load_lm
    from radit_fast.training.ra_it import _apply_lora

    def adapters(seed):
        lm, _ = load_lm(tiny["lm"])
        torch.rand(1000)  # the global RNG state before the call must not matter
        peft = _apply_lora(lm, _lm_cfg(tiny, "unused", lora=True, lora_r=4, seed=seed))
        return {n: p.detach().clone() for n, p in peft.named_parameters() if "lora_A" in n}

    a, b, c = adapters(0), adapters(0), adapters(1)
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_flat_retriever_temperature_warns(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="radit_fast.training.retriever"):
        train_retriever(_r_cfg(tiny, tmp_path / "r", retriever_temperature=1.0))
    assert sum("nearly uniform" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radit_fast.training.retriever"):
        train_retriever(_r_cfg(tiny, tmp_path / "r2"))  # the default (0.1)
    assert not any("nearly uniform" in r.message for r in caplog.records)
    assert np.isfinite(json.loads((tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()[0])["loss"])
