"""Triton kernels of ``answer_logprobs``: log p(target | hidden) without materialising the N x V logits.

Math. For a row n with hidden h_n [d], target t_n and the logits z_nv = h_n . w_v + b_v over the vocabulary,

    lse_n = log sum_v exp(z_nv),        tok_n = z_{n t_n} - lse_n   (0 where t_n == ignore_index).

Gradient. With g_n = d loss / d tok_n (0 at ignored rows) and p_nv = exp(z_nv - lse_n),

    d tok_n / d z_nv = [v == t_n] - p_nv      so     dz_nv = g_n * ([v == t_n] - p_nv),
    grad_hidden = dz @ W   [N, d],     grad_weight = dz^T @ H   [V, d],     grad_bias = sum_n dz_n.   [V]

(For the negative log-likelihood, g = -1 and dz = p - onehot, the familiar cross-entropy gradient.)

Forward design (split V across programs + a tiny merge kernel). One program per (BLOCK_N rows, BLOCK_V
vocabulary) tile: tl.dot over d in BLOCK_D steps with fp32 accumulation (the logits never leave the
registers / shared memory), then the tile's row max and sum exp go to a partial buffer [n_vblocks, N] and
the target logit is stored by the one tile that holds the target. A merge kernel folds the partials with
the online-logsumexp rule. At N=8192, d=4096, V=128256 bf16 this gives 64 x 501 = 32k matmul-shaped tiles;
programs are ordered in groups of GROUP row blocks so a group's hidden rows stay in L2 while the weight
streams. The partial buffer is 8 bytes per row and vocabulary block (33 MB there), read once.

Backward design (split V into chunks, atomic-free). For each vocabulary chunk of width C (chosen so the
chunk's dz buffer holds at most ``DZ_CHUNK_ELEMENTS`` elements, 256 MB in bf16): a kernel recomputes the
logit tiles and writes dz in the input dtype (bf16 dz feeds the tensor cores; fp32 stays fp32) plus
per-row-block column sums for grad_bias; then one tiled matmul kernel does grad_hidden (+)= dz_c @ W_c
(fp32 [N, d] accumulator across chunks) and grad_weight_c = dz_c^T @ H. Each [BLOCK_V, BLOCK_D] tile of
grad_weight is owned by one program that loops over all N rows with an fp32 register accumulator and
stores it once, in the weight's dtype: no fp32 [V, d] buffer and no cast pass (at V=128256, d=4096 that
saved 2 GB of peak memory and ~5 GB of traffic). grad_bias = the sum over row blocks of the per-block
column sums, in a fixed order: no float atomics anywhere, so every gradient is bitwise deterministic.

Offsets. Every product of a program/loop index with a row length (pid_v*N, j*N, pid_n*V) or of a row
index with a stride (row*stride) is formed in int64 (``_partial_offsets``, ``_scaled``): N*V and V*d pass
2^31 at LLM scale. Indices themselves (< N, V, d) stay int32.

Out-of-range targets (neither in [0, V) nor ``ignore_index``) are not checked on the host (that would
synchronise every call and forbid CUDA graphs): their rows come out NaN in ``tok`` and the merge kernel
sets an int32 error flag on the device (``error_flag``), read lazily by ``raise_if_flagged`` or after
every call when RADIT_DEBUG_CHECKS=1.

Configs (``config_for``): no autotuning (it fails under the interpreter and costs start-up); one tile
config chosen from the dtype, the compute capability and the opt-in shared memory per block, so parts
with ~100 KB (L4, L40S, RTX 4090) get a pipeline that fits, and the 128x256x64 3-stage bf16 tile
(144 KB of pipeline buffers) runs only where about 228 KB are available (H100/H200 class). Under
``TRITON_INTERPRET=1`` (CPU tests) small tiles are used and tiles are cast to fp32 before tl.dot (the
interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from radit_fast.ops._dispatch import FLAG_TARGET_OUT_OF_RANGE, debug_checks, error_flag, raise_if_flagged  # noqa: F401

# Upper bound on the elements of the backward's dz chunk buffer [N, C] (tests lower it to force chunks).
DZ_CHUNK_ELEMENTS = 1 << 27
# Error-flag bits set by the kernels.
_KIB = 1024
# Shared memory the epilogue may need beside the pipeline buffers (layout conversions of the row
# reductions and of the dz store); a config is taken only when pipeline + this fits the device.
EPILOGUE_SMEM = 24 * _KIB
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int  # rows (tokens) per tile; the M block of the matmul kernel
    block_v: int  # vocabulary entries per tile; the N block of the matmul kernel
    block_d: int  # reduction step
    group: int  # row blocks per L2 group
    num_warps: int
    num_stages: int
    cast_f32: bool = False  # cast tiles to fp32 before tl.dot (interpreter; GPUs without bf16/fp16 MMA)

    def pipeline_smem(self, element_size: int) -> int:
        """Bytes of shared memory for the software pipeline: num_stages copies of an h and a w tile."""
        return self.num_stages * (self.block_n + self.block_v) * self.block_d * element_size


# Tiers by opt-in shared memory per block (bytes), best first: (minimum, 16-bit config, fp32 config).
# 228 KB: H100/H200 (227 KiB opt-in), B200. 163 KB: A100/A30. ~100 KB: L4, L40S, RTX 4090/3090, A10.
SMEM_TIERS = (
    (220 * _KIB, Config(128, 256, 64, 8, 8, 3), Config(128, 128, 32, 8, 8, 3)),  # 144 KiB / 96 KiB
    (160 * _KIB, Config(128, 128, 64, 8, 8, 4), Config(128, 128, 32, 8, 8, 3)),  # 128 KiB / 96 KiB
    (96 * _KIB, Config(128, 128, 32, 8, 4, 4), Config(64, 128, 32, 8, 4, 3)),  # 64 KiB / 72 KiB
    (0, Config(64, 64, 32, 8, 4, 2), Config(64, 64, 32, 8, 4, 2)),  # 16 KiB / 32 KiB
)
INTERPRETER_CONFIG = Config(16, 32, 16, 4, 1, 1, cast_f32=True)


def config_for(dtype: torch.dtype, capability: tuple[int, int], smem_per_block: int) -> Config:
    """The tile config for ``dtype`` on a GPU of compute ``capability`` with ``smem_per_block`` bytes of
    opt-in shared memory per block: the first tier whose pipeline plus EPILOGUE_SMEM fits."""
    elt = torch.empty((), dtype=dtype).element_size()
    for minimum, half, single in SMEM_TIERS:
        cfg = single if elt == 4 else half
        if smem_per_block >= minimum and cfg.pipeline_smem(elt) + EPILOGUE_SMEM <= smem_per_block:
            break
    else:  # below every tier (no CUDA GPU has under 48 KiB): the smallest config
        cfg = SMEM_TIERS[-1][2 if elt == 4 else 1]
    if capability < (8, 0):  # no bf16 tensor cores and no cp.async: fp32 dots, a 2-stage pipeline
        cfg = dataclasses.replace(SMEM_TIERS[-1][2], cast_f32=elt != 4)
    return cfg


def _smem_per_block(props) -> int:
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    # Older torch: the per-multiprocessor figure less the 1 KiB the driver reserves per block.
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    return int(per_sm) - _KIB if per_sm else int(props.shared_memory_per_block)


@functools.lru_cache(maxsize=None)
def _device_config(dtype: torch.dtype, index: int) -> Config:
    props = torch.cuda.get_device_properties(index)
    return config_for(dtype, (props.major, props.minor), _smem_per_block(props))


def _config(dtype: torch.dtype, device: torch.device) -> Config:
    """The config for tensors of ``dtype`` on ``device`` (the interpreter's on CPU tensors)."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    return _device_config(dtype, device.index if device.index is not None else torch.cuda.current_device())


def _device_guard(device: torch.device):
    """Make ``device`` current while launching: Triton launches on the current device and stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision: fp32 follows torch's TF32 switch; "tf32" is Triton's default and only
    affects fp32 operands (bf16/fp16 always run on the 16-bit tensor cores)."""
    if device.type != "cuda" or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------------------------
# Error flag (device-side checks, read lazily)
# ----------------------------------------------------------------------------------------------------------


def _debug_check_targets(targets: torch.Tensor, vocab: int, ignore_index: int, flag: torch.Tensor) -> None:
    """RADIT_DEBUG_CHECKS=1: synchronise and name the first offending target."""
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        flag.zero_()
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"answer_logprobs: targets[{i}] = {int(targets[i])} is outside [0, {vocab}) "
                         f"and is not ignore_index = {ignore_index}")


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _partial_offsets(block, row_len, offs):
    """block * row_len + offs in int64: the element offsets of row ``block`` of a [blocks, row_len] buffer
    (pid_v*N in the forward partials, j*N in the merge, pid_n*V in the bias partials)."""
    return tl.cast(block, tl.int64) * row_len + offs


@triton.jit
def _scaled(offs, stride):
    """offs * stride in int64 (row * stride of the tensors' rows: N * d and V * d pass 2^31). The indices
    themselves (pid * BLOCK + arange < N, V) stay int32: int64 index vectors cost registers (at 128x256 on
    sm_90 they pushed the dz kernel from 36 to 168 bytes of spills)."""
    return offs.to(tl.int64) * stride


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP: tl.constexpr):
    """Map a linear program id to (m block, n block) in groups of GROUP m blocks (L2 reuse)."""
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = h[offs_n] @ w[offs_v]^T + b[offs_v] in fp32; -inf in columns v >= V."""
    n_mask = offs_n < N
    v_mask = offs_v < V
    h_rows = h_ptr + _scaled(offs_n, stride_hn)[:, None]
    w_cols = w_ptr + _scaled(offs_v, stride_wv)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_cols + offs_d[:, None] * stride_wd, mask=d_mask[:, None] & v_mask[None, :], other=0.0)
        if CAST_F32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(v_mask[None, :], acc, float("-inf"))


@triton.jit
def _fwd_tile_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_m_ptr, part_s_ptr, tgt_ptr,
                     N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CAST_F32: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, CAST_F32, PRECISION)
    n_mask = offs_n < N
    # A tile can be all -inf (a -inf bias over a whole vocabulary block): shift by a safe max so that
    # exp(-inf - -inf) = NaN never happens; such a tile stores (m, s) = (-inf, 0), the empty merge state.
    m = tl.max(z, axis=1)
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(z - safe_m[:, None]), axis=1)
    part = _partial_offsets(pid_v, N, offs_n)
    tl.store(part_m_ptr + part, m, mask=n_mask)
    tl.store(part_s_ptr + part, s, mask=n_mask)
    # The target logit: stored only by the tile whose vocabulary range holds the target (a target outside
    # [0, V) is stored by none and keeps the NaN the launcher filled in).
    t = tl.load(t_ptr + offs_n, mask=n_mask, other=-1)
    hit = offs_v[None, :] == t[:, None]
    z_t = tl.sum(tl.where(hit, z, 0.0), axis=1)
    in_tile = (t >= pid_v * BLOCK_V) & (t < pid_v * BLOCK_V + BLOCK_V) & (t < V)
    tl.store(tgt_ptr + offs_n, z_t, mask=n_mask & in_tile)


@triton.jit
def _fwd_merge_kernel(part_m_ptr, part_s_ptr, tgt_ptr, t_ptr, tok_ptr, lse_ptr, flag_ptr, N, V, num_vblocks,
                      ignore_index, BLOCK: tl.constexpr, FLAG_BIT: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    run_m = tl.full((BLOCK,), float("-inf"), tl.float32)
    run_s = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, num_vblocks):  # online logsumexp merge, as radit::lse_merge
        part = _partial_offsets(j, N, offs)
        m = tl.load(part_m_ptr + part, mask=mask, other=float("-inf"))
        s = tl.load(part_s_ptr + part, mask=mask, other=0.0)
        new_m = tl.maximum(run_m, m)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        run_s = run_s * tl.exp(run_m - safe_m) + s * tl.exp(m - safe_m)
        run_m = new_m
    empty = run_m == float("-inf")
    lse = tl.where(empty, float("-inf"), run_m + tl.log(tl.where(empty, 1.0, run_s)))
    t = tl.load(t_ptr + offs, mask=mask, other=ignore_index)
    z_t = tl.load(tgt_ptr + offs, mask=mask, other=0.0)
    tok = tl.where(t == ignore_index, 0.0, z_t - lse)
    tl.store(lse_ptr + offs, lse, mask=mask)
    tl.store(tok_ptr + offs, tok, mask=mask)
    # Device-side target check: every offending lane writes the same bit (no read-modify-write race
    # matters: the flag only ever gains this bit until the host clears it).
    bad = mask & (t != ignore_index) & ((t < 0) | (t >= V))
    tl.store(flag_ptr + tl.zeros((BLOCK,), tl.int32), tl.full((BLOCK,), FLAG_BIT, tl.int32), mask=bad)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dz_ptr, gb_part_ptr,
                    N, V, D, v_start, chunk_width, stride_hn, stride_hd, stride_wv, stride_wd, stride_dz,
                    HAS_BIAS: tl.constexpr, NEED_BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CAST_F32: tl.constexpr,
                    PRECISION: tl.constexpr):
    """dz[n, v - v_start] = g_n ([v == t_n] - exp(z_nv - lse_n)) for v in [v_start, v_start + chunk_width)."""
    pid_n, pid_c = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(chunk_width, BLOCK_V), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    offs_v = v_start + offs_c
    c_mask = (offs_c < chunk_width) & (offs_v < V)
    n_mask = offs_n < N
    z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, CAST_F32, PRECISION)
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0)
    t = tl.load(t_ptr + offs_n, mask=n_mask, other=-1)
    # 0 in the -inf columns (beyond V or a -inf bias); lse = -inf only when the whole row is -inf, then the
    # safe shift keeps p = exp(-inf) = 0 instead of NaN.
    safe_lse = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.exp(z - safe_lse[:, None])
    onehot = tl.where(offs_v[None, :] == t[:, None], 1.0, 0.0)
    keep = n_mask[:, None] & c_mask[None, :] & (g != 0.0)[:, None]
    dz = tl.where(keep, g[:, None] * (onehot - p), 0.0)
    dz_ptrs = dz_ptr + _scaled(offs_n, stride_dz)[:, None] + offs_c[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])
    if NEED_BIAS_GRAD:  # per-row-block column sums, added up by the launcher (deterministic, no atomics)
        tl.store(gb_part_ptr + _partial_offsets(pid_n, V, offs_v), tl.sum(dz, axis=0), mask=c_mask)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, NC, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_NC: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                   CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """c[M, NC] (+)= a[M, K] @ b[K, NC]; transposes are strides. Each program owns one c tile, loops over
    all of K with an fp32 register accumulator and stores it once in c's dtype (ACCUMULATE: c is fp32)."""
    pid_m, pid_c = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(NC, BLOCK_NC), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_NC + tl.arange(0, BLOCK_NC)
    m_mask = offs_m < M
    c_mask = offs_c < NC
    a_rows = a_ptr + _scaled(offs_m, stride_am)[:, None]
    b_cols = b_ptr + _scaled(offs_c, stride_bn)[None, :]
    c_ptrs = c_ptr + _scaled(offs_m, stride_cm)[:, None] + _scaled(offs_c, stride_cn)[None, :]
    mask = m_mask[:, None] & c_mask[None, :]
    if ACCUMULATE:  # start from c (one fp32 tile live, not two: no register spills at 128x256 on sm_90)
        acc = tl.load(c_ptrs, mask=mask, other=0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_NC), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + _scaled(offs_k, stride_ak)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + _scaled(offs_k, stride_bk)[:, None], mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers (no autograd; radit_fast.ops.answer_logprobs owns it)
# ----------------------------------------------------------------------------------------------------------
def _prepare(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"answer_logprobs: hidden must be [N, d] and weight [V, d], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in _DTYPES:
        raise ValueError(f"answer_logprobs: hidden and weight must both be float32, bfloat16 or float16, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"answer_logprobs: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"answer_logprobs: bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    h = hidden.contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    t = targets.to(torch.int64).contiguous()
    return h, w, b, t


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, cfg: Config,
            precision: str) -> None:
    """c (+)= a @ b with the strides of the given views (c fp32 when accumulating)."""
    (M, K), NC = a.shape, b.shape[1]
    if M == 0 or NC == 0:
        return
    grid = (triton.cdiv(M, cfg.block_n) * triton.cdiv(NC, cfg.block_v),)
    _matmul_kernel[grid](a, b, c, M, NC, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         c.stride(0), c.stride(1), ACCUMULATE=accumulate, BLOCK_M=cfg.block_n,
                         BLOCK_NC=cfg.block_v, BLOCK_K=cfg.block_d, GROUP=cfg.group, CAST_F32=cfg.cast_f32,
                         PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def triton_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
               ignore_index: int, *, flag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``tok [N]`` (fp32, 0 at ignored rows) and ``lse [N]`` (fp32).

    hidden [N, d] and weight [V, d] share one dtype (float32, bfloat16 or float16); bias is None or [V];
    targets [N] with values in [0, V) or ``ignore_index``. A target outside both gives NaN in ``tok`` and
    sets FLAG_TARGET_OUT_OF_RANGE in ``flag`` (default ``error_flag(device)``), checked without a host
    sync; ``raise_if_flagged`` reads it. With RADIT_DEBUG_CHECKS=1 the check runs (and syncs) every call.
    """
    h, w, b, t = _prepare(hidden, weight, bias, targets)
    N, D = h.shape
    V = w.shape[0]
    dev = h.device
    flag = error_flag(dev) if flag is None else flag
    tok = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return tok, lse
    cfg = _config(h.dtype, dev)
    num_nb, num_vb = triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v)
    part_m = torch.empty(num_vb, N, dtype=torch.float32, device=dev)
    part_s = torch.empty(num_vb, N, dtype=torch.float32, device=dev)
    tgt = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
    block = 128 if dev.type == "cuda" else 16
    with _device_guard(dev):
        _fwd_tile_kernel[(num_nb * num_vb,)](
            h, w, h if b is None else b, t, part_m, part_s, tgt, N, V, D, h.stride(0), h.stride(1),
            w.stride(0), w.stride(1), HAS_BIAS=b is not None, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
            BLOCK_D=cfg.block_d, GROUP=cfg.group, CAST_F32=cfg.cast_f32, PRECISION=_precision(h.dtype, dev),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _fwd_merge_kernel[(triton.cdiv(N, block),)](part_m, part_s, tgt, t, tok, lse, flag, N, V, num_vb,
                                                    ignore_index, BLOCK=block,
                                                    FLAG_BIT=FLAG_TARGET_OUT_OF_RANGE, num_warps=4)
    if debug_checks():
        _debug_check_targets(t, V, ignore_index, flag)
    return tok, lse


def dz_chunk_width(N: int, V: int, block_v: int) -> int:
    """Vocabulary columns per backward chunk: a multiple of block_v with N * width <= DZ_CHUNK_ELEMENTS."""
    width = (DZ_CHUNK_ELEMENTS // max(N, 1)) // block_v * block_v
    return max(block_v, min(width, triton.cdiv(V, block_v) * block_v))


def chunk_starts(N: int, V: int, block_v: int) -> range:
    """First vocabulary column of every backward chunk."""
    return range(0, V, dz_chunk_width(N, V, block_v))


def triton_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
               lse: torch.Tensor, grad_tok: torch.Tensor, ignore_index: int, need_hidden: bool,
               need_weight: bool, need_bias: bool
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_n grad_tok[n] * tok[n] w.r.t. hidden [N, d] (fp32), weight [V, d] (weight's
    dtype, accumulated in fp32 registers and rounded once) and bias [V] (fp32).

    ``lse`` is the forward's [N] output; ``grad_tok`` [N] fp32 must be 0 at ignored rows. A gradient
    that is not needed (or bias None) comes back as None.
    """
    del ignore_index  # ignored rows carry grad_tok = 0, which zeroes their dz
    h, w, b, t = _prepare(hidden, weight, bias, targets)
    N, D = h.shape
    V = w.shape[0]
    dev = h.device
    need_bias = need_bias and b is not None
    lse = lse.to(torch.float32).contiguous()
    g = grad_tok.to(torch.float32).contiguous()
    # Every element of grad_w and grad_b is written exactly once below (zeros only when N == 0).
    alloc = torch.zeros if N == 0 else torch.empty
    grad_h = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_hidden else None
    grad_w = alloc(V, D, dtype=w.dtype, device=dev) if need_weight else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None
    if N == 0 or not (need_hidden or need_weight or need_bias):
        return grad_h, grad_w, grad_b
    cfg = _config(h.dtype, dev)
    precision = _precision(h.dtype, dev)
    num_nb = triton.cdiv(N, cfg.block_n)
    starts = chunk_starts(N, V, cfg.block_v)
    dz = torch.empty(N, starts.step, dtype=h.dtype, device=dev)
    gb_part = torch.empty(num_nb, V, dtype=torch.float32, device=dev) if need_bias else None
    with _device_guard(dev):
        for v0 in starts:
            cw = min(starts.step, V - v0)
            _dlogits_kernel[(num_nb * triton.cdiv(cw, cfg.block_v),)](
                h, w, h if b is None else b, t, lse, g, dz, g if gb_part is None else gb_part,
                N, V, D, v0, cw, h.stride(0), h.stride(1), w.stride(0), w.stride(1), dz.stride(0),
                HAS_BIAS=b is not None, NEED_BIAS_GRAD=need_bias, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                BLOCK_D=cfg.block_d, GROUP=cfg.group, CAST_F32=cfg.cast_f32, PRECISION=precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            dz_c = dz[:, :cw]
            if need_hidden:  # grad_hidden += dz_c @ W[v0:v0+cw]
                _matmul(dz_c, w[v0:v0 + cw], grad_h, v0 > 0, cfg, precision)
            if need_weight:  # grad_weight[v0:v0+cw] = dz_c^T @ H, stored in the weight's dtype
                _matmul(dz_c.t(), h, grad_w[v0:v0 + cw], False, cfg, precision)
    if need_bias:  # fixed-order sum over row blocks: deterministic
        torch.sum(gb_part, 0, out=grad_b)
    return grad_h, grad_w, grad_b
