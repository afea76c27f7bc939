"""The two RA-DIT tuning stages. The training layer holds no math: it calls ``radit_fast.ops`` and
``radit_fast.retrieval``.

* :func:`train_lm` (stage 1, RA-IT) with :class:`~radit_fast.config.stages.RaItConfig`
* :func:`train_retriever` (stage 2, R-IT with LM-supervised retrieval) with
  :class:`~radit_fast.config.stages.RetrieverConfig`
"""
from __future__ import annotations

from radit_fast.config.stages import RaItConfig, RetrieverConfig

__all__ = ["train_lm", "train_retriever"]


def train_lm(config: RaItConfig, **kwargs):  # noqa: ANN201 - lazy import keeps `import radit_fast` light
    """Stage 1; see :func:`radit_fast.training.ra_it.train_lm`."""
    from radit_fast.training.ra_it import train_lm as _train_lm

    return _train_lm(config, **kwargs)


def train_retriever(config: RetrieverConfig, **kwargs):  # noqa: ANN201
    """Stage 2; see :func:`radit_fast.training.retriever.train_retriever`."""
    from radit_fast.training.retriever import train_retriever as _train_retriever

    return _train_retriever(config, **kwargs)
