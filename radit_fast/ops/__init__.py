"""Fused ops of radit-fast. Each op: launcher -> autograd.Function -> snake_case function, with ``impl=``."""
from __future__ import annotations

from radit_fast.ops.answer_logprobs import answer_logprobs, answer_logprobs_per_sequence  # noqa: E402,F401
from radit_fast.ops.replug import replug_logprob  # noqa: E402,F401
from radit_fast.ops.lsr import lsr_loss, lsr_scores  # noqa: E402,F401
from radit_fast.ops.mixture import mixture_logprobs  # noqa: E402,F401
from radit_fast.ops.scorer import (ScorerOptions, ScorerOutput, chunk_logprobs, ensemble_from_hidden,  # noqa: E402,F401
                                   lsr_loss_from_hidden, score_chunks)
