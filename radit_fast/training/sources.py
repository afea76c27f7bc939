"""Inputs of the tuning stages: examples, the index and its retriever, self-supervised corpus items.
Thin adapters over ``radit_fast.data`` and ``radit_fast.retrieval``; the identities of models and data
(resume checks, cache keys) live in :mod:`radit_fast.training.identity`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radit_fast.data.prompts import build_instance
from radit_fast.data.tasks import load_tasks
from radit_fast.models import unwrap
from radit_fast.retrieval.corpus import doc_id, iter_corpus, passage_text
from radit_fast.retrieval.index import check_k
from radit_fast.retrieval.retriever import Retriever

log = logging.getLogger(__name__)

CORPUS_MIN_WORDS = 12      # passages shorter than this make no self-supervised item
CORPUS_ANSWER_WORDS = 24   # at most this many words of continuation as y
CORPUS_QUERY_WORDS = 48    # at most this many words of beginning as x


def load_examples(path: str | os.PathLike, limit: int | None = None, *,
                  require_answers: bool = True) -> list[Any]:
    """Task examples (``radit_fast.data.tasks.Example``, the first ``limit``); every one needs an answer
    unless ``require_answers`` is False (retrieval evaluation needs only the provenance)."""
    examples = load_tasks(path, require_answers=require_answers)
    return examples[:limit] if limit else examples


def check_fit(tokenizer: Any, examples: list[Any], max_length: int, *, append_eos: bool = False) -> None:
    """RaditError (naming the example) when a question and its answer (plus EOS with ``append_eos``) alone
    exceed ``max_length`` tokens — checked by tokenising only, before retrieval or any model runs."""
    for ex in examples:
        build_instance(tokenizer, None, ex.input, ex.answers[0], max_length=max_length, example_id=ex.id,
                       append_eos=append_eos)


class IndexSource:
    """The index folder plus a query encoder (default: the one its manifest records)."""

    def __init__(self, folder: str | os.PathLike, query_encoder: Any = None, *, device: str = "cpu",
                 verify: str = "sha256") -> None:
        self.folder = Path(folder)
        self.retriever = Retriever.load(folder, query_encoder, device=device, verify=verify)
        self.index = self.retriever.index
        self.store = self.index.store

    @property
    def manifest(self) -> dict[str, Any]:
        return self.index.manifest

    def retrieve_rows(self, queries: list[str], k: int, *, exclude: Sequence[Iterable[int]] | None = None,
                      batch: int = 256) -> np.ndarray:
        """Top-k passage rows ``[n, k]`` (int64, -1 = none) of each query, without gradient.

        ``exclude[i]``: rows never returned for query i (the passages of a corpus item's own document).
        """
        check_k(k, len(self.index))
        banned = None if exclude is None else [np.asarray(sorted(set(e)), dtype=np.int64) for e in exclude]
        out = np.full((len(queries), k), -1, dtype=np.int64)
        for s in range(0, len(queries), batch):
            extra = 0 if banned is None else max((len(b) for b in banned[s:s + batch]), default=0)
            want = min(k + extra, len(self.index))
            with torch.no_grad():
                q = self.retriever.encode_queries(queries[s:s + batch])
            _, rows = self.index.search(q, want)
            scores = self.retriever.score(q, torch.from_numpy(rows)).detach()
            order = scores.argsort(dim=1, descending=True, stable=True).numpy()
            rows = np.take_along_axis(rows, order, axis=1)
            for i, row in enumerate(rows):
                if banned is not None and len(banned[s + i]):
                    row = row[~np.isin(row, banned[s + i])]
                row = row[row >= 0][:k]
                out[s + i, :len(row)] = row
        return out

    def texts(self, rows: np.ndarray) -> list[list[str]]:
        """Background texts of a ``[n, k]`` row matrix (missing rows left out)."""
        return [[passage_text(p.title, p.text) for p in self.store.get(r for r in row if r >= 0)] for row in rows]

    def retrieve_texts(self, queries: list[str], k: int, *,
                       exclude: Sequence[Iterable[int]] | None = None) -> list[list[str]]:
        return self.texts(self.retrieve_rows(queries, k, exclude=exclude))


def open_index(folder: str | os.PathLike, query_encoder: Any = None, *, device: str = "cpu",
               k: int | None = None) -> IndexSource:
    """Open and verify an index folder (RaditError for a missing/corrupt index or a mismatched encoder, or
    when ``k`` is larger than the index: :func:`radit_fast.retrieval.index.check_k`)."""
    source = IndexSource(folder, query_encoder, device=device)
    if k is not None:
        check_k(k, len(source.index))
    return source


@dataclass(frozen=True)
class CorpusItem:
    """A self-supervised example: a passage's beginning (``input``) and its continuation (``answer``).

    ``passage_row``: the passage's row in the index's store (-1 when it is not there); ``exclude_rows``:
    the rows of every passage of its document (``"{doc}"`` or ``"{doc}#{n}"``), never its background —
    the passage holds the answer itself.
    """

    id: str
    input: str
    answer: str
    passage_row: int
    context: str | None = None
    exclude_rows: tuple[int, ...] = ()

    @property
    def answers(self) -> list[str]:
        return [self.answer]


def split_passage(text: str) -> tuple[str, str] | None:
    """``(beginning, continuation)`` of a passage: the first half of its words (at most
    ``CORPUS_QUERY_WORDS``) and up to ``CORPUS_ANSWER_WORDS`` following words; None when too short."""
    words = text.split()
    if len(words) < CORPUS_MIN_WORDS:
        return None
    cut = min(len(words) // 2, CORPUS_QUERY_WORDS)
    return " ".join(words[:cut]), " ".join(words[cut:cut + CORPUS_ANSWER_WORDS])


def _row_of(store: Any, passage_id: str) -> int:
    try:
        return store.row_of(passage_id)
    except KeyError:
        return -1


def document_rows(store: Any, passage_id: str) -> tuple[int, ...]:
    """Store rows of every passage of ``passage_id``'s document: ``doc`` itself and its chunks
    ``doc#0``, ``doc#1``, ... (numbered from 0 without gaps, see ``radit_fast.retrieval.corpus``)."""
    doc = doc_id(passage_id)
    rows = [r for r in (_row_of(store, doc), _row_of(store, passage_id)) if r >= 0]
    n = 0
    while (r := _row_of(store, f"{doc}#{n}")) >= 0:
        rows.append(r)
        n += 1
    return tuple(sorted(set(rows)))


def corpus_items(index: IndexSource, n: int, *, seed: int, corpus: str | None = None) -> list[CorpusItem]:
    """``n`` self-supervised items from distinct passages drawn with ``seed`` from the index's passage store
    (or from a corpus JSON-lines file). Each passage is looked up in the store on its own (one passage of
    a corpus file missing from the index leaves the others' rows intact)."""
    if n <= 0:
        return []
    if corpus is not None:
        passages = [p for _, p in iter_corpus(corpus)]
        get = passages.__getitem__
        total = len(passages)
    else:
        get = index.store.__getitem__
        total = len(index.store)
    rng = np.random.default_rng([seed, 0xC0])
    items: list[CorpusItem] = []
    for row in rng.permutation(total):
        p = get(int(row))
        split = split_passage(p.text)
        if split is None:
            continue
        store_row = int(row) if corpus is None else _row_of(index.store, p.id)
        own = tuple(sorted({*document_rows(index.store, p.id), *([store_row] if store_row >= 0 else [])}))
        items.append(CorpusItem(id=f"corpus:{p.id}", input=split[0], answer=split[1], passage_row=store_row,
                                exclude_rows=own))
        if len(items) == n:
            break
    if len(items) < n:
        log.warning("only %d of %d self-supervised corpus items (passages too short)", len(items), n)
    return items


def fit_corpus_item(item: CorpusItem, tokenizer: Any, budget: int) -> CorpusItem | None:
    """Shorten a corpus item until ``x`` and ``y`` take at most ``budget`` tokens together (the rest of
    ``max_length`` is left for the background): words are dropped from the front of ``x`` and the end of
    ``y``, keeping the two adjacent. None when nothing sensible is left."""
    def n_tok(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    x, y = item.input.split(), item.answer.split()
    while x and y:
        nx, ny = n_tok(" ".join(x)), n_tok(" " + " ".join(y))
        if nx + ny + 8 <= budget:  # 8: markers and separators
            return replace(item, input=" ".join(x), answer=" ".join(y))
        if ny > nx / 2 and len(y) > 1:
            y = y[:-1]
        elif len(x) > 1:
            x = x[1:]
        else:
            break
    return None


def decoder_layer_types(model: nn.Module) -> tuple[type, ...]:
    """Classes of the repeated blocks (FSDP units): those named in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    names |= set(getattr(unwrap(model), "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})

