"""The retriever the training and evaluation layers call: query encoder + frozen index.

    s(x, c) = E_q(x) . E_d(c)         E_d(c) read from the index's float16 matrix (never re-encoded)

:meth:`Retriever.retrieve` searches FAISS with the detached query embeddings, then rescores the top-k
exactly as ``q @ d`` with the stored document embeddings and sorts by that score. With ``grad=True`` the
scores carry the autograd graph of the query encoder (the R-IT / LSR stage trains it); missing results
(approximate indexes may return fewer than k) are masked: ``mask`` False, score ``-inf``, row -1.
:meth:`Retriever.score` rescores fixed rows (e.g. top-k cached before LSR training) differentiably.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radit_fast.io import RaditError
from radit_fast.retrieval.corpus import Passage
from radit_fast.retrieval.encoder import META_FILE, TextEncoder, check_device
from radit_fast.retrieval.index import Index, same_lineage

logger = logging.getLogger(__name__)


@dataclass
class Retrieved:
    """Top-k results of a batch of B queries (sorted by descending score)."""

    rows: torch.Tensor       # int64 [B, k], -1 where FAISS returned no result
    scores: torch.Tensor     # float32 [B, k], differentiable w.r.t. the query encoder when grad=True; -inf masked
    mask: torch.Tensor       # bool [B, k], True for real results
    passages: list[list[Passage | None]]  # [B][k], None where masked

    @property
    def ids(self) -> list[list[str | None]]:
        return [[p.id if p is not None else None for p in row] for row in self.passages]


def stored_scores(q: torch.Tensor, index: Index, rows: torch.Tensor) -> torch.Tensor:
    """``s[b, i] = q[b] . E_d(rows[b, i])`` float32 ``[B, k]`` with ``E_d`` the index's stored document
    embeddings; ``-inf`` where ``rows`` is -1. Differentiable w.r.t. ``q`` ``[B, d]`` (the document side is
    a constant). Used by :meth:`Retriever.score` and by the R-IT training objective."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    if rows.ndim != 2 or rows.shape[0] != q.shape[0]:
        raise RaditError(f"rows must be [B={q.shape[0]}, k], got {list(rows.shape)}")
    d = index.doc_embeddings(rows, device=q.device)
    s = torch.einsum("bd,bkd->bk", q, d)
    return s.masked_fill(rows.to(q.device) < 0, float("-inf"))


class Retriever:
    """Query encoder + :class:`Index`.

    >>> r = Retriever.load("runs/wiki-index")  # query encoder from the manifest  # doctest: +SKIP
    >>> res = r.retrieve(["who wrote Hamlet?"], k=10, grad=True)  # doctest: +SKIP
    >>> res.scores.sum().backward()  # gradients reach r.query_encoder  # doctest: +SKIP
    """

    def __init__(self, index: Index, query_encoder: TextEncoder, *, batch_size: int = 64, precision: str = "auto",
                 strict: bool = True):
        index.check_query_encoder(query_encoder.identity(), strict=strict)
        self.index = index
        self.query_encoder = query_encoder
        self.batch_size = batch_size
        self.precision = precision

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike,
        query_encoder: str | os.PathLike | TextEncoder | None = None,
        *,
        device: str = "cpu",
        verify: str = "sha256",
        search_params: str | None = None,
        strict: bool = True,
        batch_size: int = 64,
        precision: str = "auto",
        trust_remote_code: bool = False,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
    ) -> Retriever:
        """Load an index and a query encoder (default: the one recorded in the manifest, with its settings).

        Pooling, normalisation and max length of a loaded encoder: the arguments when given; else its own
        ``radit_encoder.json`` (a fine-tuned encoder saved by :meth:`TextEncoder.save_pretrained`); else,
        when it is the index's query encoder or of its lineage, the settings the index was built with (so
        ``radit index build --encoder X --pooling mean`` is retrieved with ``--query-encoder X``); else the
        model's defaults. They do not apply to a :class:`TextEncoder` instance.
        Raises RaditError when the device is missing, the encoder's dim differs, or (``strict``) its
        lineage/pooling differ.
        """
        check_device(device)
        index = Index.load(index_dir, device=device, verify=verify, search_params=search_params)
        if isinstance(query_encoder, TextEncoder):
            return cls(index, query_encoder, batch_size=batch_size, precision=precision, strict=strict)
        expected = index.manifest["query_encoder"]
        given = {"pooling": pooling, "normalize": normalize, "max_length": max_length}
        recorded = {key: expected.get(key) for key in given}
        kw = dict(given)
        if query_encoder is None:  # the manifest's encoder, with its settings
            kw = {key: value if value is not None else recorded[key] for key, value in given.items()}
        enc = TextEncoder.from_pretrained(query_encoder or expected["name"], device=device,
                                          trust_remote_code=trust_remote_code, **kw)
        if query_encoder is not None and not enc.has_own_settings and same_lineage(enc.identity(), expected):
            inherit = {key: value for key, value in recorded.items()
                       if given[key] is None and value is not None and getattr(enc, key) != value}
            if inherit:  # e.g. --pooling given at build time: the model's own default would be refused
                logger.info("query encoder %s: no %s, using the index's settings %s", enc.name, META_FILE, inherit)
                enc.configure(**inherit)
        return cls(index, enc, batch_size=batch_size, precision=precision, strict=strict)

    def encode_queries(self, texts: Sequence[str], *, grad: bool = False) -> torch.Tensor:
        """Query embeddings float32 [B, d]; differentiable when ``grad=True``."""
        return self.query_encoder.encode(texts, batch_size=self.batch_size, grad=grad, precision=self.precision)

    def score(self, queries: Sequence[str] | torch.Tensor, rows: torch.Tensor, *, grad: bool = True) -> torch.Tensor:
        """Scores float32 [B, k] of fixed rows [B, k] (-1 = missing -> -inf); differentiable when ``grad``.

        ``queries`` is a list of texts or already computed query embeddings [B, d].
        """
        q = queries if isinstance(queries, torch.Tensor) else self.encode_queries(queries, grad=grad)
        return stored_scores(q, self.index, rows)

    def retrieve(self, queries: Sequence[str], k: int, *, grad: bool = False) -> Retrieved:
        """Top-k passages of each query, sorted by descending exact score (see the module docstring)."""
        queries = list(queries)
        if not queries:
            raise RaditError("no queries to retrieve for")
        q = self.encode_queries(queries, grad=grad)
        _, rows_np = self.index.search(q, k)
        rows = torch.from_numpy(rows_np)
        scores = self.score(q, rows)
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        rows = rows.gather(1, order.cpu())
        mask = rows >= 0
        flat = self.index.store.get(r for r in rows[mask].tolist())
        it = iter(flat)
        passages = [[next(it) if ok else None for ok in row] for row in mask.tolist()]
        return Retrieved(rows=rows, scores=scores, mask=mask.to(scores.device), passages=passages)
