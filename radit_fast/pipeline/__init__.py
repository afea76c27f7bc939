"""``radit run``: index, evaluate, tune the LM (RA-IT) and the retriever (LSR), evaluate again, report.

:func:`run_pipeline` with a :class:`~radit_fast.config.run.RunConfig` (built by
:func:`~radit_fast.config.run.make_config`); steps are cached by
:class:`~radit_fast.pipeline.steps.StepRunner`. :func:`~radit_fast.pipeline.paper.paper_table`: the paper's
Table 2 layout from a finished run (``radit eval --task paper``).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"run_pipeline": "run", "StepRunner": "steps", "prepare_demo_data": "demo", "paper_table": "paper"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"radit_fast.pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'radit_fast.pipeline' has no attribute {name!r}")
