"""The input phase of ``radit run``: every split, model reference and prompt length is checked before any
index is built, any model loaded or any output written; and the examples stage 2 (R-IT) trains on.
"""
from __future__ import annotations

import random
from pathlib import Path

from radit_fast.config.run import RunConfig
from radit_fast.data.tasks import check_disjoint, load_tasks
from radit_fast.evaluation.scoring import check_prompts_fit
from radit_fast.io import RaditError
from radit_fast.pipeline.checks import check_encoder, check_lm_reference
from radit_fast.retrieval.build import check_corpus
from radit_fast.training.sources import check_fit


def load_splits(cfg: RunConfig) -> tuple[dict[str, list], int]:
    """Read and check the corpus (returns its document count) and train/dev/test: answers, known fields,
    non-empty, pairwise disjoint ids."""
    documents = check_corpus(cfg.corpus, cfg.run.chunk_words)  # lines and ids, before run_config.json or output
    splits = {name: load_tasks(getattr(cfg, name), require_answers=True) for name in ("train", "dev", "test")}
    for a, b in (("train", "test"), ("dev", "test"), ("train", "dev")):
        check_disjoint(splits[a], splits[b], names=(a, b))
    check_models_and_lengths(cfg, splits)
    return splits, documents


def check_models_and_lengths(cfg: RunConfig, splits: dict[str, list]) -> None:
    """The LM is a loadable causal LM and the encoders loadable encoders (configs and tokenizers only) and,
    with the LM's tokenizer, every prompt fits: RA-IT instances (question + answer, EOS included) within
    ``train_lm.max_length``, R-IT's LSR scoring instances within ``train_retriever.max_length``, evaluation
    prompts (question, demonstrations and room for the answer) within ``eval.max_length`` - before any
    index is built or model loaded."""
    tok = check_lm_reference(cfg.lm, "--lm")
    check_encoder(cfg.encoder, "--encoder")
    r_cfg = cfg.retriever_config(Path(cfg.out) / "train_retriever")
    if r_cfg.query_encoder is not None:
        check_encoder(r_cfg.query_encoder, "train_retriever.query_encoder")
    lm_cfg = cfg.lm_config(Path(cfg.out) / "train_lm")
    # the examples each stage reads: its train file (R-IT: maybe a subset), the first max_examples of it
    r_train = retriever_train_subset(cfg, splits["train"])
    for stage, stage_cfg, exs, eos in (
            ("train_lm", lm_cfg, splits["train"], lm_cfg.append_eos),
            ("train_retriever", r_cfg, splits["train"] if r_train is None else r_train, False)):
        try:
            check_fit(tok, exs[: stage_cfg.max_examples], stage_cfg.max_length, append_eos=eos)
        except RaditError as e:
            raise RaditError(f"{stage}.max_length {stage_cfg.max_length}: {e}") from None
    for name in ("dev", "test"):
        check_prompts_fit(tok, splits[name], cfg.eval, splits["train"])


def retriever_train_subset(cfg: RunConfig, train: list) -> list | None:
    """Stage 2's examples when not the whole train split (None): one kind of task (``run.retriever_train_kind``)
    and/or a seeded subset of ``run.retriever_train_examples``."""
    train = list(train)
    kind = cfg.run.retriever_train_kind
    n = cfg.run.retriever_train_examples
    if kind == "all" and (not n or n >= len(train)):
        return None
    if kind != "all":
        train = [ex for ex in train if (ex.choices is not None) == (kind == "multiple_choice")]
        if not train:
            raise RaditError(f"run.retriever_train_kind {kind}: the train split has no such example")
    random.Random(f"retriever-subset-{cfg.seed}").shuffle(train)
    return train[:n] if n else train
