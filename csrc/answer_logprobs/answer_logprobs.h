// answer_logprobs: log p(target | hidden) under softmax(hidden @ weight.T + bias), never materialising logits.
//
// The CPU backend splits the work between the Python launcher and these entry points: the launcher runs
// one optimised GEMM per vocabulary block (torch.mm into a preallocated [rows, cols] buffer) and these
// functions are the fused epilogues around it. Pointers travel as integers (tensor.data_ptr()); every
// 1-D array is contiguous; the logits block is row-major with row stride `ld` (elements).
// The math and the gradient are derived at the top of answer_logprobs_cpu.cpp.
#pragma once

#include <cstdint>

#include "common/checks.h"

namespace radit {
namespace answer_logprobs {

// One vocabulary block [rows, cols] of logits z = hidden[r0:r0+rows] @ weight[col0:col0+cols].T (bias not
// yet added) and the per-row arrays that belong to the same rows.
struct BlockParams {
  std::intptr_t logits = 0;   // [rows, cols] (row stride ld), dtype logits_dtype (float32 | bfloat16)
  int logits_dtype = 0;       // DType code
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;        // row stride of logits in elements (>= cols)
  std::int64_t col0 = 0;      // first vocabulary id of the block
  std::int64_t vocab = 0;     // V, the full vocabulary size (bias has V entries)
  std::intptr_t bias = 0;     // [V] or 0, dtype bias_dtype (float32 | bfloat16)
  int bias_dtype = 0;
  std::intptr_t targets = 0;  // [rows] int64 | int32
  int targets_dtype = 3;
  std::int64_t ignore_index = -100;
  int num_threads = 1;
};

// Forward epilogue: merges the block into the running online-logsumexp state of every row,
// (row_max[r], row_sum[r]) (float32 [rows]; start at (-inf, 0)), and stores the target logit
// z[r, t_r] + bias[t_r] into target_logit[r] (float32 [rows]) when t_r falls inside the block.
// Rows whose target is ignore_index are skipped.
void fwd_block(const BlockParams& p, std::intptr_t row_max, std::intptr_t row_sum, std::intptr_t target_logit);

// Forward finalize over all n rows: lse[r] = row_max[r] + log(row_sum[r]) and
// tok_logprob[r] = target_logit[r] - lse[r] (0 where t_r == ignore_index). When segment_ids != 0
// (int64 [n], values in [0, num_segments)), seg_logprob[s] (float32 [num_segments]) is overwritten with
// the sum of tok_logprob over the rows of segment s (0 for an empty segment). Checks every target is in
// [0, vocab) or ignore_index.
void fwd_finalize(std::int64_t n, std::int64_t vocab, std::intptr_t targets, int targets_dtype,
                  std::int64_t ignore_index, std::intptr_t row_max, std::intptr_t row_sum,
                  std::intptr_t target_logit, std::intptr_t lse, std::intptr_t tok_logprob,
                  std::intptr_t segment_ids, std::int64_t num_segments, std::intptr_t seg_logprob);

// Backward epilogue, in place: the block becomes dz[r, j] = g_r * ([col0+j == t_r] - exp(z[r, j] + bias - lse_r))
// (0 for ignored rows and rows with g_r == 0), in the block's dtype. lse and grad_tok are float32 [rows].
// When grad_bias != 0 (float32 [V]), adds the column sums of dz to grad_bias[col0 : col0+cols].
void bwd_block(const BlockParams& p, std::intptr_t lse, std::intptr_t grad_tok, std::intptr_t grad_bias);

}  // namespace answer_logprobs
}  // namespace radit
