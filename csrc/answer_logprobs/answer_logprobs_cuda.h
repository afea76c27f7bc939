// answer_logprobs, CUDA backend: entry points bound in csrc/bindings.cpp (built when RADIT_WITH_CUDA).
//
// Pointers travel as integers (tensor.data_ptr(), 0 = absent) and are device pointers on the device that
// `stream` (a raw cudaStream_t, 0 = legacy default stream) belongs to. Strides are in elements.
// The math, the gradient and the kernel design are described at the top of answer_logprobs_cuda.cu;
// radit_fast/ops/_answer_logprobs_cuda.py is the Python launcher that allocates outputs and workspaces.
#pragma once

#include <cstdint>

#include "common/checks.h"

namespace radit {
namespace answer_logprobs {

// Rows and vocabulary entries per tile of the CUDA kernels (the launcher sizes workspaces with them).
constexpr std::int64_t kCudaTileRows = 64;
constexpr std::int64_t kCudaTileCols = 64;

// Forward. hidden [n, d] and weight [v, d] (strided, dtype code `dtype`: float32 or bfloat16), bias
// float32 [v] contiguous or 0, targets int64 [n] contiguous. Writes tok_logprob float32 [n] (0 where the
// target is ignore_index, NaN for a target outside [0, v)) and lse float32 [n]. workspace: float32
// [(2 * num_splits + 1) * n], contiguous; the vocabulary is split into at most num_splits ranges that
// run in parallel (partial logsumexp states merged at the end).
void fwd_cuda(std::uintptr_t hidden, std::int64_t hidden_stride0, std::int64_t hidden_stride1,
              std::uintptr_t weight, std::int64_t weight_stride0, std::int64_t weight_stride1, int dtype,
              std::uintptr_t bias, std::uintptr_t targets, std::int64_t n, std::int64_t v, std::int64_t d,
              std::int64_t ignore_index, std::uintptr_t tok_logprob, std::uintptr_t lse,
              std::uintptr_t workspace, std::int64_t num_splits, std::uintptr_t stream);

// Backward of sum_r grad_tok[r] * tok_logprob[r]. Inputs as in fwd_cuda plus lse float32 [n] (the forward's)
// and grad_tok float32 [n] (0 at ignored rows), all contiguous. Outputs (0 = not wanted), all float32
// contiguous: grad_hidden [n, d] and grad_weight [v, d] are overwritten; grad_bias [v] is accumulated into
// (pass zeros). dz_workspace: [n, chunk_v] contiguous, in the dtype of hidden; the vocabulary is processed
// in chunks of chunk_v entries.
void bwd_cuda(std::uintptr_t hidden, std::int64_t hidden_stride0, std::int64_t hidden_stride1,
              std::uintptr_t weight, std::int64_t weight_stride0, std::int64_t weight_stride1, int dtype,
              std::uintptr_t bias, std::uintptr_t targets, std::int64_t n, std::int64_t v, std::int64_t d,
              std::uintptr_t lse, std::uintptr_t grad_tok, std::uintptr_t grad_hidden,
              std::uintptr_t grad_weight, std::uintptr_t grad_bias, std::uintptr_t dz_workspace,
              std::int64_t chunk_v, std::uintptr_t stream);

}  // namespace answer_logprobs
}  // namespace radit
