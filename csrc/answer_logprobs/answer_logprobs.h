// answer_logprobs: log p(target | hidden) under softmax(hidden @ weight.T + bias), never materialising logits.
//
// One blocked driver for every device (radit_fast/ops/_answer_logprobs_blocked.py) runs a GEMM per vocabulary
// block into a reused [rows, cols] buffer (gemm_cpu below on CPUs with AVX-512, else torch.mm; cuBLAS on GPU);
// the entry points here are the fused epilogues around it, one set for the CPU (answer_logprobs_cpu.cpp, OpenMP) and one for CUDA
// (answer_logprobs_cuda.cu), with the math shared in common/radit_math.h. The Python contract is
// radit_fast/ops/_answer_logprobs_epilogue.py. The math and the gradient are derived at the top of
// answer_logprobs_cpu.cpp; the CUDA kernel design at the top of answer_logprobs_cuda.cu.
//
// Arguments (common/tensor.h TensorArg; checked by every entry point, messages name the argument):
//   z            [rows, cols] float32 | bfloat16, stride(1) == 1, stride(0) >= cols: logits of the vocabulary
//                columns [col0, col0 + cols), bias not yet added.
//   bias         absent or [vocab] float32 | bfloat16, contiguous.
//   targets      [rows] int64 contiguous; ignore_index marks rows without a target.
//   row_max, row_sum, target_logit, lse, grad_tok: float32 [rows] contiguous.
//   grad_bias    absent or float32 [vocab] contiguous: the block's column sums of dz are ADDED to
//                grad_bias[col0 : col0 + cols], deterministically (fixed-order reductions, no float atomics).
//   out          absent (dz written in place into z) or [rows, cols] float32 | bfloat16 with stride(1) == 1.
#pragma once

#include <cstdint>
#include <string>

#include "common/tensor.h"

namespace radit {
namespace answer_logprobs {

// One checked [rows, cols] logits block and the arrays of its rows.
struct Block {
  TensorArg z, bias, targets;
  std::int64_t col0 = 0, vocab = 0, ignore_index = -100;
  std::int64_t rows() const { return z.size[0]; }
  std::int64_t cols() const { return z.size[1]; }
  std::int64_t ld() const { return z.stride[0]; }
};

// Checks shared by the CPU and CUDA entry points (device: -1 for the CPU, else the CUDA index of z).
Block make_block(const char* fn, const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                 const TensorArg& targets, std::int64_t ignore_index, int device);
void check_finalize(const char* fn, const TensorArg& targets, std::int64_t vocab, const TensorArg& row_max,
                    const TensorArg& row_sum, const TensorArg& target_logit, const TensorArg& lse,
                    const TensorArg& tok, const TensorArg& segment_ids, const TensorArg& seg, int device);
void check_bwd(const char* fn, const Block& b, const TensorArg& lse, const TensorArg& grad_tok,
               const TensorArg& grad_bias, const TensorArg& out, int device);

// ---- CPU (OpenMP over rows; num_threads from torch.get_num_threads()) ----

// Forward epilogue: merges the block (+ bias) into each row's online-logsumexp state (row_max, row_sum; start at
// (-inf, 0)) and stores z[r, t_r - col0] + bias[t_r] into target_logit[r] when t_r falls inside the block.
// Rows whose target is ignore_index are skipped.
void fwd_block_cpu(const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                   const TensorArg& targets, std::int64_t ignore_index, const TensorArg& row_max,
                   const TensorArg& row_sum, const TensorArg& target_logit, int num_threads);

// Forward finalize over all n rows: lse = row_max + log(row_sum), tok = target_logit - lse (both 0 at ignored
// rows); with segment_ids (int64 [n] in [0, S)), seg (float32 [S]) is overwritten with the per-segment sums of tok.
// A target outside [0, vocab) that is not ignore_index raises ValueError naming the row.
void fwd_finalize_cpu(const TensorArg& targets, std::int64_t vocab, std::int64_t ignore_index,
                      const TensorArg& row_max, const TensorArg& row_sum, const TensorArg& target_logit,
                      const TensorArg& lse, const TensorArg& tok, const TensorArg& segment_ids, const TensorArg& seg);

// Backward epilogue: dz[r, j] = g_r ([col0 + j == t_r] - exp(z[r, j] + bias[col0 + j] - lse_r)), 0 for ignored rows
// and rows with g_r == 0, written into out (or in place into z); column sums added to grad_bias when present.
void bwd_block_cpu(const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                   const TensorArg& targets, std::int64_t ignore_index, const TensorArg& lse, const TensorArg& grad_tok,
                   const TensorArg& grad_bias, const TensorArg& out, int num_threads);

// The driver's GEMMs on CPUs with AVX-512 (gemm_cpu.cpp) or AVX2 + FMA (gemm_avx2_cpu.cpp): c (+)= a @ b with
// a [M, K] and b [K, N] of one dtype, float32 or bfloat16 (any strides), c [M, N] float32 with stride(1) == 1,
// float32 accumulation; accumulate adds the product to c instead of overwriting it. The result does not depend on
// num_threads. gemm_cpu_isa(bf16) names the kernel that runs for the dtype: "avx512" (float32: AVX-512F/BW/VL/DQ;
// bfloat16: also AVX512-BF16), "avx2" (AVX2 + FMA), or "" (gemm_cpu raises; gemm_cpu_supported is false).
const char* gemm_cpu_isa(bool bf16);
bool gemm_cpu_supported(bool bf16);
// isa: "" runs gemm_cpu_isa's kernel; "avx2" / "avx512" ask for that one (raises where the CPU lacks it: tests
// run both kernels on AVX-512 CPUs).
void gemm_cpu(const TensorArg& a, const TensorArg& b, const TensorArg& c, bool accumulate, int num_threads,
              const std::string& isa = "");
// dst = src^T for a float32 src [R, C] (any strides) into dst [C, R] float32 | bfloat16 (round to nearest even),
// stride(1) == 1: the driver's transposed grad_weight accumulator into the gradient, in cache-sized tiles.
void transpose_cpu(const TensorArg& src, const TensorArg& dst, int num_threads);

// ---- CUDA (on `stream`, a raw cudaStream_t of z's device; under a device guard; no host synchronisation) ----

// Rows of the float32 grad_bias workspace bwd_block_cuda needs (workspace: [bwd_workspace_rows(rows), cols]).
inline std::int64_t bwd_workspace_rows(std::int64_t rows) {
  constexpr std::int64_t kMaxRowTiles = 64, kMinTileRows = 8;
  const std::int64_t tiles = (rows + kMinTileRows - 1) / kMinTileRows;
  return tiles < kMaxRowTiles ? (tiles > 0 ? tiles : 1) : kMaxRowTiles;
}

#ifdef RADIT_WITH_CUDA
void fwd_block_cuda(const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                    const TensorArg& targets, std::int64_t ignore_index, const TensorArg& row_max,
                    const TensorArg& row_sum, const TensorArg& target_logit, std::uint64_t stream);
// As fwd_finalize_cpu, except that an out-of-range target gives tok = NaN for its row and sets error_flag
// (int32 [1], may be absent) to 1; a segment id outside [0, S) sets it too (the row is left out of seg).
void fwd_finalize_cuda(const TensorArg& targets, std::int64_t vocab, std::int64_t ignore_index,
                       const TensorArg& row_max, const TensorArg& row_sum, const TensorArg& target_logit,
                       const TensorArg& lse, const TensorArg& tok, const TensorArg& segment_ids, const TensorArg& seg,
                       const TensorArg& error_flag, std::uint64_t stream);
// workspace: float32 [bwd_workspace_rows(rows) * cols] contiguous when grad_bias is present (else absent).
void bwd_block_cuda(const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                    const TensorArg& targets, std::int64_t ignore_index, const TensorArg& lse,
                    const TensorArg& grad_tok, const TensorArg& grad_bias, const TensorArg& out,
                    const TensorArg& workspace, std::uint64_t stream);
#endif

}  // namespace answer_logprobs
}  // namespace radit
