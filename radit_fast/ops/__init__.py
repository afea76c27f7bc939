"""Fused ops of radit-fast. Each op: launcher -> autograd.Function -> snake_case function, with ``impl=``."""
from __future__ import annotations

from radit_fast.ops.answer_logprobs import answer_logprobs, answer_logprobs_per_sequence  # noqa: E402,F401
