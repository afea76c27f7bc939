"""CUDA launchers of ``answer_logprobs`` (no autograd): allocate outputs and workspaces with torch and call
the native entry points ``_C.answer_logprobs_fwd_cuda`` / ``_C.answer_logprobs_bwd_cuda`` on the current
stream. Kernel design and math: csrc/answer_logprobs/answer_logprobs_cuda.cu.
"""
from __future__ import annotations

import functools

import torch

from radit_fast._native import _C, HAS_NATIVE_CUDA, cuda_stream, dtype_code

# Tile of the CUDA kernels (kCudaTileRows / kCudaTileCols in csrc/answer_logprobs/answer_logprobs_cuda.h).
TILE_ROWS = 64
TILE_COLS = 64
# Upper bound on the elements of the backward's dz chunk buffer [N, C] (256 MB in bf16).
DZ_CHUNK_ELEMENTS = 1 << 27
# Forward: aim for this many thread blocks per multiprocessor when splitting the vocabulary.
_BLOCKS_PER_SM = 8


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    if not HAS_NATIVE_CUDA:
        raise ValueError("answer_logprobs: impl='cuda' needs radit_fast._C built with CUDA (RADIT_CUDA=ON)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"answer_logprobs: hidden must be [N, d] and weight [V, d], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"answer_logprobs: hidden and weight must have one dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"answer_logprobs: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"answer_logprobs: bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"answer_logprobs: impl='cuda' needs CUDA tensors, {name} is on {t.device}")
    b = None if bias is None else bias.to(torch.float32).contiguous()
    return b, targets.to(torch.int64).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def num_vocab_splits(n: int, v: int, device: torch.device) -> int:
    """Vocabulary splits of the forward: enough blocks to fill the GPU, at most one per 64-column block."""
    row_blocks = -(-n // TILE_ROWS)
    want = -(-_BLOCKS_PER_SM * _sm_count(device.index or 0) // max(row_blocks, 1))
    return max(1, min(want, -(-v // TILE_COLS), 65535))


def dz_chunk_width(n: int, v: int) -> int:
    """Vocabulary columns per backward chunk: a multiple of TILE_COLS with n * width <= DZ_CHUNK_ELEMENTS."""
    width = (DZ_CHUNK_ELEMENTS // max(n, 1)) // TILE_COLS * TILE_COLS
    return max(TILE_COLS, min(width, -(-v // TILE_COLS) * TILE_COLS))


def cuda_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``tok [N]`` (fp32, 0 at ignored rows, NaN for a target outside [0, V)) and
    ``lse [N]`` (fp32). hidden [N, d] / weight [V, d] fp32 or bf16 (any strides), bias None or [V]."""
    b, t = _check(hidden, weight, bias, targets)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    tok = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return tok, lse
    splits = num_vocab_splits(n, v, dev)
    workspace = torch.empty((2 * splits + 1) * n, dtype=torch.float32, device=dev)
    _C.answer_logprobs_fwd_cuda(
        hidden.data_ptr(), hidden.stride(0), hidden.stride(1), weight.data_ptr(), weight.stride(0),
        weight.stride(1), dtype_code(hidden, "hidden"), _ptr(b), t.data_ptr(), n, v, d, int(ignore_index),
        tok.data_ptr(), lse.data_ptr(), workspace.data_ptr(), splits, cuda_stream(hidden))
    return tok, lse


def cuda_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             lse: torch.Tensor, grad_tok: torch.Tensor, ignore_index: int, need_hidden: bool, need_weight: bool,
             need_bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (fp32) of sum_n grad_tok[n] * tok[n] w.r.t. hidden [N, d], weight [V, d] and bias [V]
    (None where not needed or bias is None). ``grad_tok`` [N] must be 0 at ignored rows."""
    del ignore_index  # ignored rows carry grad_tok = 0
    b, t = _check(hidden, weight, bias, targets)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    need_bias = need_bias and b is not None
    grad_h = torch.empty(n, d, dtype=torch.float32, device=dev) if need_hidden else None
    grad_w = torch.empty(v, d, dtype=torch.float32, device=dev) if need_weight else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=dev) if need_bias else None
    if n == 0:  # nothing flows back; the kernels would not run
        return (None if grad_h is None else grad_h.zero_(), None if grad_w is None else grad_w.zero_(), grad_b)
    if not (need_hidden or need_weight or need_bias):
        return grad_h, grad_w, grad_b
    lse = lse.to(torch.float32).contiguous()
    g = grad_tok.to(torch.float32).contiguous()
    chunk = dz_chunk_width(n, v)
    dz = torch.empty(n, chunk, dtype=hidden.dtype, device=dev)
    _C.answer_logprobs_bwd_cuda(
        hidden.data_ptr(), hidden.stride(0), hidden.stride(1), weight.data_ptr(), weight.stride(0),
        weight.stride(1), dtype_code(hidden, "hidden"), _ptr(b), t.data_ptr(), n, v, d, lse.data_ptr(),
        g.data_ptr(), _ptr(grad_h), _ptr(grad_w), _ptr(grad_b), dz.data_ptr(), chunk, cuda_stream(hidden))
    return grad_h, grad_w, grad_b
