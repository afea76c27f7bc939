"""The fused epilogues of answer_logprobs' blocked driver, per device (the contract of the driver in
:mod:`radit_fast.ops.answer_logprobs` with the native code).

Per vocabulary block the driver computes the logits block ``z = hidden[rows] @ weight[col0:col0+cols].T`` with
the vendor GEMM (``torch.mm`` into a reused buffer) and calls these functions; they dispatch on
``z.device.type`` to the CPU epilogues (``radit_fast._C.answer_logprobs_*_cpu``: C++/OpenMP) or to their CUDA
twins (``*_cuda``: on the current stream of z's device, under a device guard, no host synchronisation). Both
run the math of ``csrc/common/radit_math.h``; the derivation is at the top of
``csrc/answer_logprobs/answer_logprobs_cpu.cpp``:

    forward   (m_r, s_r) <- merge((m_r, s_r), (max_j x_rj, sum_j exp(x_rj - max)))   x = z + bias[col0:]
              target_logit_r = x_{r, t_r - col0}      when t_r falls in the block
    finalize  lse_r = m_r + log s_r,   tok_r = target_logit_r - lse_r          (0 at ignored rows)
    backward  dz_rj = g_r ([col0 + j == t_r] - exp(x_rj - lse_r)),   grad_bias[col0 + j] += sum_r dz_rj

Shapes and dtypes (checked by the native entry points, which raise ValueError naming the argument):

* ``z``: [rows, cols] float32 | bfloat16 with ``z.stride(1) == 1`` (any row stride >= cols).
* ``bias``: None or [vocab] float32 | bfloat16, contiguous. ``targets``: int64 [rows] contiguous.
* ``row_max``, ``row_sum``, ``target_logit``, ``lse``, ``grad_tok``, ``tok``: float32, contiguous, one per row.
  The online state starts at ``(-inf, 0)``.
* ``grad_bias``: None or float32 [vocab]; column sums are added deterministically (the same bits on every run;
  on CUDA per-tile partial sums reduced in a fixed order, never float atomics).
"""
from __future__ import annotations

import torch

from radit_fast import _native
from radit_fast._native import cuda_stream, tensor_arg


def _native_module(op: str):
    if _native._C is None:
        raise ValueError(f"{op}: the native module radit_fast._C is not built")
    return _native._C


def _cuda_module(op: str, device: torch.device):
    c = _native_module(op)
    if not _native.HAS_NATIVE_CUDA:
        raise ValueError(f"{op}: {device} tensors need radit_fast._C built with CUDA (RADIT_CUDA=ON)")
    return c


def fwd_block(z: torch.Tensor, col0: int, vocab: int, bias: torch.Tensor | None, targets: torch.Tensor,
              ignore_index: int, row_max: torch.Tensor, row_sum: torch.Tensor, target_logit: torch.Tensor) -> None:
    """Merge the logits block ``z`` (columns ``[col0, col0 + cols)``, bias not yet added) into the online
    logsumexp state ``(row_max, row_sum)`` of its rows, in place, and store the target logits that fall in the
    block into ``target_logit``. Rows whose target is ``ignore_index`` are skipped."""
    args = (tensor_arg(z, "z"), int(col0), int(vocab), tensor_arg(bias, "bias"), tensor_arg(targets, "targets"),
            int(ignore_index), tensor_arg(row_max, "row_max"), tensor_arg(row_sum, "row_sum"),
            tensor_arg(target_logit, "target_logit"))
    if z.device.type == "cuda":
        _cuda_module("answer_logprobs", z.device).answer_logprobs_fwd_block_cuda(*args, cuda_stream(z))
    else:
        _native_module("answer_logprobs").answer_logprobs_fwd_block_cpu(*args, torch.get_num_threads())


def fwd_finalize(targets: torch.Tensor, vocab: int, ignore_index: int, row_max: torch.Tensor, row_sum: torch.Tensor,
                 target_logit: torch.Tensor, lse: torch.Tensor, tok: torch.Tensor,
                 segment_ids: torch.Tensor | None = None, seg: torch.Tensor | None = None,
                 error_flag: torch.Tensor | None = None) -> None:
    """Write ``lse = m + log s`` and ``tok = target_logit - lse`` (both 0 at ignored rows) for all n rows, and,
    with ``segment_ids`` (int64 [n] in [0, S)), overwrite ``seg`` (float32 [S]) with the per-segment sums of tok.

    A target outside ``[0, vocab)`` that is not ``ignore_index``: on the CPU a ValueError naming the row
    (``answer_logprobs: targets[i] = t is outside [0, V) and is not ignore_index = -100``); on CUDA, NaN in
    ``tok`` for that row and ``error_flag`` (int32 [1] on the device, may be None) set to 1, without a host
    synchronisation (a segment id outside [0, S) sets the flag too; the CPU raises)."""
    if (segment_ids is None) != (seg is None):
        raise ValueError("answer_logprobs: give segment_ids and seg together")
    args = (tensor_arg(targets, "targets"), int(vocab), int(ignore_index), tensor_arg(row_max, "row_max"),
            tensor_arg(row_sum, "row_sum"), tensor_arg(target_logit, "target_logit"), tensor_arg(lse, "lse"),
            tensor_arg(tok, "tok"), tensor_arg(segment_ids, "segment_ids"), tensor_arg(seg, "seg"))
    if targets.device.type == "cuda":
        _cuda_module("answer_logprobs", targets.device).answer_logprobs_fwd_finalize_cuda(
            *args, tensor_arg(error_flag, "error_flag"), cuda_stream(targets))
    else:
        _native_module("answer_logprobs").answer_logprobs_fwd_finalize_cpu(*args)


def bwd_block(z: torch.Tensor, col0: int, vocab: int, bias: torch.Tensor | None, targets: torch.Tensor,
              ignore_index: int, lse: torch.Tensor, grad_tok: torch.Tensor, grad_bias: torch.Tensor | None,
              out: torch.Tensor | None = None) -> None:
    """Turn the logits block ``z`` into ``dz = g (onehot(t) - softmax)`` (0 for ignored rows and rows with
    ``grad_tok == 0``): in place in z's dtype when ``out`` is None, else into ``out`` ([rows, cols],
    stride(1) == 1, float32 | bfloat16, possibly another dtype than z). The column sums of dz are added to
    ``grad_bias[col0:col0 + cols]`` when it is given."""
    args = (tensor_arg(z, "z"), int(col0), int(vocab), tensor_arg(bias, "bias"), tensor_arg(targets, "targets"),
            int(ignore_index), tensor_arg(lse, "lse"), tensor_arg(grad_tok, "grad_tok"),
            tensor_arg(grad_bias, "grad_bias"), tensor_arg(out, "out"))
    if z.device.type == "cuda":
        c = _cuda_module("answer_logprobs", z.device)
        ws = None
        if grad_bias is not None and z.dim() == 2:
            # Per-row-tile column sums of the deterministic bias reduction (stream-ordered: torch's allocator).
            rows = c.answer_logprobs_bwd_workspace_rows(z.shape[0]) * z.shape[1]
            ws = torch.empty(rows, dtype=torch.float32, device=z.device)
        c.answer_logprobs_bwd_block_cuda(*args, tensor_arg(ws, "workspace"), cuda_stream(z))
    else:
        _native_module("answer_logprobs").answer_logprobs_bwd_block_cpu(*args, torch.get_num_threads())
