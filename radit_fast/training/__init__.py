"""The two RA-DIT tuning stages. The training layer holds no math: it calls ``radit_fast.ops`` and
``radit_fast.retrieval``.

* :func:`train_lm` (stage 1, RA-IT) with :class:`~radit_fast.config.stages.RaItConfig`
* :func:`train_retriever` (stage 2, R-IT with LM-supervised retrieval) with
  :class:`~radit_fast.config.stages.RetrieverConfig`
"""
from __future__ import annotations

from radit_fast.training.ra_it import train_lm
from radit_fast.training.retriever import train_retriever

__all__ = ["train_lm", "train_retriever"]
