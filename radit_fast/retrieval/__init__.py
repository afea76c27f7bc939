"""Retrieval layer: corpus chunking, dual encoders, FAISS index + float16 embeddings + passage store.

Main entry points (see docs/retrieval.md):

* :func:`build_index` / :class:`IndexBuildConfig`: corpus JSON lines -> index folder (also under torchrun);
* :class:`Retriever` (``Retriever.load(index_dir)``): top-k passages with differentiable scores;
* :class:`Index`, :class:`PassageStore`: the loaded folder (search, ``doc_embeddings(rows)``, passages);
* :class:`TextEncoder`, :class:`DualEncoder`: Hugging Face encoders with pooling and normalisation;
* :func:`retrieval_metrics`, :func:`recall_at_k`, :func:`hit_at_k`, :func:`mean_recall_at_k`,
  :func:`provenance_doc_ids`: document-level recall@k and hit@k against KILT provenance.
"""
from __future__ import annotations

from radit_fast.retrieval.build import IndexBuildConfig, build_index, build_index_from_embeddings, precomputed_identity
from radit_fast.retrieval.corpus import Passage, chunk_words, doc_id, iter_corpus
from radit_fast.retrieval.encoder import DualEncoder, TextEncoder
from radit_fast.retrieval.index import Index
from radit_fast.retrieval.metrics import hit_at_k, mean_recall_at_k, provenance_doc_ids, recall_at_k, retrieval_metrics
from radit_fast.retrieval.retriever import Retrieved, Retriever
from radit_fast.retrieval.store import PassageStore

__all__ = [
    "DualEncoder", "Index", "IndexBuildConfig", "Passage", "PassageStore", "Retrieved", "Retriever", "TextEncoder",
    "build_index", "build_index_from_embeddings", "chunk_words", "doc_id", "iter_corpus", "precomputed_identity", "provenance_doc_ids",
    "hit_at_k", "mean_recall_at_k", "recall_at_k", "retrieval_metrics",
]
