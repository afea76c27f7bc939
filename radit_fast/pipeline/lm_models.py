"""The models of one ``radit run``: the base LM (loaded once, kept for the whole run), its frozen copies in
the evaluation dtype, the copy stage 1 trains, and the LM and retrievers of the finished steps.
"""
from __future__ import annotations

from typing import Any

import torch

from radit_fast import models
from radit_fast.config.run import RunConfig
from radit_fast.pipeline.steps import StepRunner
from radit_fast.retrieval.retriever import Retriever


class RunModels:
    """Model handling for :class:`~radit_fast.pipeline.run.Pipeline`; the tuned models come from the
    ``selected/`` folders of the finished ``train_lm`` / ``train_retriever`` steps."""

    def __init__(self, cfg: RunConfig, device: torch.device, steps: StepRunner) -> None:
        self.cfg, self.device, self.steps = cfg, device, steps
        self._base_lm: tuple[Any, Any] | None = None

    @property
    def eval_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.run.eval_dtype == "bf16" else torch.float32

    def base_lm(self) -> tuple[Any, Any]:
        """The base LM (fp32, kept for the whole run) and its tokenizer."""
        if self._base_lm is None:
            self._base_lm = models.load_lm(self.cfg.lm, device=self.device)
        return self._base_lm

    def eval_copy(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A frozen plain copy of ``model`` (LoRA adapters merged) in the evaluation dtype; the original
        keeps training unchanged."""
        return models.plain_copy(model, dtype=dtype or self.eval_dtype).eval().requires_grad_(False)

    def frozen_base(self) -> tuple[Any, Any]:
        """The base LM in the evaluation dtype (itself in fp32, else an evaluation copy) and its tokenizer."""
        model, tok = self.base_lm()
        return (model if self.eval_dtype == torch.float32 else self.eval_copy(model)), tok

    def train_copy(self) -> tuple[Any, Any]:
        """A copy of the base LM for stage 1 to train in place (``run.train_dtype`` bf16: frozen bf16 base
        weights, fp32 LoRA adapters - validated) and its tokenizer."""
        base, tok = self.base_lm()
        return models.plain_copy(base, dtype=torch.bfloat16 if self.cfg.run.train_dtype == "bf16" else None), tok

    def lm_for(self, which: str) -> tuple[Any, Any]:
        """The ``base`` LM or the ``tuned`` one (stage 1's selected candidate), in the evaluation dtype."""
        if which == "base":
            return self.frozen_base()
        path = self.steps.require("train_lm").dir / "selected"
        return models.load_lm(str(path), dtype=self.eval_dtype, device=self.device)

    def retriever_for(self, which: str) -> Retriever:
        """The run's index with the ``base`` query encoder or the ``tuned`` one (stage 2's selected)."""
        index = self.steps.require("index").dir / "index"
        enc = None if which == "base" else str(self.steps.require("train_retriever").dir / "selected")
        return Retriever.load(index, enc, device=str(self.device))
