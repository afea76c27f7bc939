"""Tiny offline models and data for the training tests (no tests here; imported by test_training_*.py and
by the subprocess scripts of the distributed and kill -9 tests).

* a random 2-layer Llama (d=32) with a small byte-level BPE tokenizer,
* a random 1-layer BERT query/document encoder (mean pooling, normalised) with the MiniLM vocabulary,
* a 24-passage corpus, an index built from it with ``radit_fast.retrieval.build.build_index``, and a
  KILT-style task file whose answers appear in the passages.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from radit_fast._util import file_lock

from _eval_tiny import save_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CITIES = [("Paris", "France"), ("Berlin", "Germany"), ("Rome", "Italy"), ("Madrid", "Spain"),
          ("Lisbon", "Portugal"), ("Vienna", "Austria"), ("Prague", "Czechia"), ("Warsaw", "Poland"),
          ("Oslo", "Norway"), ("Dublin", "Ireland"), ("Athens", "Greece"), ("Bern", "Switzerland")]
FILLER = ("It has a long history, many museums and a busy river port where old boats carry goods and "
          "people between the districts of the region every single day of the year")


class Crash(Exception):
    """A run killed at a chosen point (raised by :func:`crash_at`)."""


def crash_at(event: str, step: int):
    """A training callback raising :class:`Crash` at ``event`` (``step_end``, ``checkpoint``...) of ``step``."""
    def crash(ev: str, st: int, info) -> None:
        if ev == event and st == step:
            raise Crash
    return crash


def corpus_rows() -> list[dict[str, str]]:
    rows = []
    for i, (city, country) in enumerate(CITIES):
        rows.append({"id": f"cap{i}", "title": city, "text": f"{city} is the capital of {country}. {FILLER}."})
        rows.append({"id": f"geo{i}", "title": country, "text": f"{country} is a country in Europe whose "
                     f"largest city is {city}. {FILLER}."})
    return rows


def task_rows(n: int = 12, *, context_every: int = 0) -> list[dict]:
    rows = []
    for i, (city, country) in enumerate(CITIES[:n]):
        row = {"id": f"q{i}", "input": f"What is the capital of {country}?",
               "output": [{"answer": city, "provenance": [{"id": f"cap{i}"}]}]}
        if context_every and i % context_every == 0:
            row["context"] = f"{city} is the capital of {country}."
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_lm(folder: Path, *, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (2 layers, d=32, tied head) and a BPE tokenizer in ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    texts = [r["text"] for r in corpus_rows()] + [r["input"] for r in task_rows()]
    texts += ["Background: Q: A: Question: Answer:"] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 2, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return save_tiny_llama(folder, tok, seed=seed)


def tiny_encoder(folder: Path, *, seed: int = 0) -> Path:
    """A random 1-layer BERT (d=32) with the all-MiniLM vocabulary, mean pooling, L2-normalised."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    from radit_fast.retrieval.encoder import default_encoder_path

    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(default_encoder_path()))
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # deterministic: 1 vs 2 processes compare exactly
    BertModel(cfg).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                     {"type": "sentence_transformers.models.Pooling"},
                                                     {"type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def tiny_setup(root: Path, *, n_tasks: int = 12, context_every: int = 0) -> dict[str, Path]:
    """Everything a stage needs under ``root``: lm/, encoder/, corpus.jsonl, index/, train.jsonl."""
    from radit_fast.retrieval.build import IndexBuildConfig, build_index

    root.mkdir(parents=True, exist_ok=True)
    paths = {"lm": tiny_lm(root / "lm"), "encoder": tiny_encoder(root / "encoder"),
             "corpus": write_jsonl(root / "corpus.jsonl", corpus_rows()),
             "train": write_jsonl(root / "train.jsonl", task_rows(n_tasks, context_every=context_every))}
    index = root / "index"
    if not (index / "manifest.json").is_file():
        build_index(paths["corpus"], index, IndexBuildConfig(encoder=str(paths["encoder"])))
    paths["index"] = index
    return paths


def cached_setup(root: Path) -> dict[str, Path]:
    """:func:`tiny_setup` copied from a per-machine cache (built once, under a lock). The index records its
    encoder by path, so the cache is built in place and the copies keep pointing at its encoder."""
    cache = Path(os.environ.get("RADIT_TEST_TINY", "/tmp/radit-training-tiny-v2"))
    with file_lock(Path(str(cache) + ".lock")):
        if not (cache / "index" / "manifest.json").is_file():
            shutil.rmtree(cache, ignore_errors=True)
            tiny_setup(cache)
    shutil.copytree(cache, root, dirs_exist_ok=True)
    return {k: root / v for k, v in {"lm": "lm", "encoder": "encoder", "corpus": "corpus.jsonl",
                                     "train": "train.jsonl", "index": "index"}.items()}


def lm_config(p: dict[str, Path], out: Path, **kw):
    """A small, fast RaItConfig over a :func:`tiny_setup` (``kw`` overrides any field)."""
    from radit_fast.config.stages import RaItConfig

    base = dict(train=str(p["train"]), index=str(p["index"]), lm=str(p["lm"]), out=str(out), max_steps=3,
                batch_size=4, lr=5e-3, warmup_steps=1, save_every=0, progress=False, max_length=64, threads=1)
    return RaItConfig(**{**base, **kw})


def retriever_config(p: dict[str, Path], out: Path, **kw):
    """A small, fast RetrieverConfig over a :func:`tiny_setup` (``kw`` overrides any field)."""
    from radit_fast.config.stages import RetrieverConfig

    base = dict(train=str(p["train"]), index=str(p["index"]), lm=str(p["lm"]), out=str(out), max_steps=2,
                batch_size=4, k=4, lr=1e-2, warmup_steps=0, save_every=0, progress=False, max_length=64,
                threads=1, cache_dir=str(out) + ".lsr")
    return RetrieverConfig(**{**base, **kw})
