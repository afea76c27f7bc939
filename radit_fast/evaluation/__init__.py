"""Evaluation of retrieval-augmented LMs: metrics, ensemble scoring, mixture decoding and the report.

* :mod:`~radit_fast.evaluation.metrics`: ``exact_match``, ``token_f1`` (SQuAD normalisation, max over
  gold answers), ``accuracy``, ``aggregate`` (retrieval recall@k/hit@k: :mod:`radit_fast.retrieval.metrics`).
* :mod:`~radit_fast.evaluation.engine`: :class:`LMEngine` (answer scoring through the fused LM head,
  greedy decoding from the token mixture with a KV cache).
* :mod:`~radit_fast.evaluation.scoring`: parallel retrieval augmentation and the
  REPLUG ensemble, multiple choice by ensemble likelihood.
* :mod:`~radit_fast.evaluation.generation`: ``generate_answers`` (mixture or per-chunk + rescoring).
* :mod:`~radit_fast.evaluation.evaluate`: ``retrieve``, ``predict_examples`` (the one prediction path of
  ``radit eval``, ``radit run`` and :mod:`radit_fast.inference`) and ``evaluate_examples`` (+ metrics).
* :mod:`~radit_fast.evaluation.kilt`: KILT's R-precision, recall@k/success@k over evidence sets,
  KILT-EM/F1/accuracy/ROUGE-L, ``rouge_l``.
* :mod:`~radit_fast.evaluation.perplexity`: ``evaluate_lm`` (perplexity and bits per byte with retrieval).
* :mod:`~radit_fast.evaluation.report`: ``write_report`` (report.json / report.md / report.png).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "exact_match": "metrics", "token_f1": "metrics", "accuracy": "metrics",
    "normalize_answer": "metrics", "LMEngine": "engine",
    "generate_answers": "generation", "retrieve": "evaluate", "evaluate_examples": "evaluate",
    "predict_examples": "evaluate", "write_report": "report", "kilt_metrics": "kilt", "r_precision": "kilt",
    "rouge_l": "kilt", "evaluate_lm": "perplexity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: `import radit_fast.evaluation` stays light
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"radit_fast.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'radit_fast.evaluation' has no attribute {name!r}")
