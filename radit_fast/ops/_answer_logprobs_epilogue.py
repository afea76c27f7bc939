"""Tensor-level epilogues of answer_logprobs (the fused pass over one logit block), dispatched on the device.

Contract (shapes, dtypes, semantics): see the blocked driver radit_fast/ops/_answer_logprobs_blocked.py.
This version calls the CPU entry points of radit_fast._C; CUDA twins are added by the native backend.
"""
from __future__ import annotations

import torch

from radit_fast._native import _C, dtype_code


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _block_args(z, col0, vocab, bias, targets, ignore_index):
    return (z.data_ptr(), dtype_code(z, "logits"), z.shape[0], z.shape[1], z.stride(0), col0, vocab, _ptr(bias),
            0 if bias is None else dtype_code(bias, "bias"), targets.data_ptr(), dtype_code(targets, "targets"),
            ignore_index, torch.get_num_threads())


def _cpu_only(z: torch.Tensor) -> None:
    if z.device.type != "cpu":
        raise ValueError(f"answer_logprobs: no epilogue for {z.device} tensors in this build")


def fwd_block(z, col0, vocab, bias, targets, ignore_index, row_max, row_sum, target_logit) -> None:
    _cpu_only(z)
    _C.answer_logprobs_fwd_block(*_block_args(z, col0, vocab, bias, targets, ignore_index), row_max.data_ptr(),
                                 row_sum.data_ptr(), target_logit.data_ptr())


def fwd_finalize(targets, vocab, ignore_index, row_max, row_sum, target_logit, lse, tok, segment_ids=None, seg=None,
                 error_flag=None) -> None:
    _cpu_only(targets)
    _C.answer_logprobs_fwd_finalize(targets.shape[0], vocab, targets.data_ptr(), dtype_code(targets, "targets"),
                                    ignore_index, row_max.data_ptr(), row_sum.data_ptr(), target_logit.data_ptr(),
                                    lse.data_ptr(), tok.data_ptr(), _ptr(segment_ids),
                                    0 if seg is None else seg.shape[0], _ptr(seg))


def bwd_block(z, col0, vocab, bias, targets, ignore_index, lse, grad_tok, grad_bias, out=None) -> None:
    _cpu_only(z)
    if out is not None:
        raise ValueError("answer_logprobs: the CPU backward epilogue works in place (out must be None)")
    _C.answer_logprobs_bwd_block(*_block_args(z, col0, vocab, bias, targets, ignore_index), lse.data_ptr(),
                                 grad_tok.data_ptr(), _ptr(grad_bias))
