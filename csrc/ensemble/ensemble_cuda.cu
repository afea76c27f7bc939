// ensemble, CUDA kernels. Math and gradients derived in ensemble.h; in short, per row of k chunks:
//   REPLUG:  m = logsumexp_i(log p_i + l_i),  p = softmax(s / t)   ->  dm/dl_i = w_i,  dm/ds_i = (w_i - p_i) / t
//            with w_i = exp(log p_i + l_i - m) the posterior over chunks.
//   LSR:     q = softmax(lm_score / t_LSR) (constant).  KL(q || p): dKL/ds_j = (p_j sum(q) - q_j) / t
//            KL(p || q): dKL/ds_j = p_j (log p_j - log q_j - KL) / t
//   mixture: out_v = logsumexp_i(c_i + x_iv), c_i = w_i - logsumexp_v(x_iv)   (value only; grad in Python)
// Layout: [B, k] ops run one warp per row (lanes stride over k, online-logsumexp states merged with
// shuffles, lane 0's result broadcast so every lane uses bit-identical row constants). The mixture runs one
// block per [b, i] row for lse_i, then one thread per (b, v) looping over the k chunks (coalesced over v).
#include <cuda_runtime.h>

#include "ensemble/ensemble.h"

namespace radit {
namespace ensemble {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // warps per block for the [B, k] kernels
constexpr int kThreads = 256;     // mixture kernels
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ LseState warp_lse(LseState st) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    LseState o{__shfl_xor_sync(kFull, st.m, off), __shfl_xor_sync(kFull, st.s, off)};
    st = lse_merge(st, o);
  }
  return LseState{__shfl_sync(kFull, st.m, 0), __shfl_sync(kFull, st.s, 0)};
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = kWarp / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFull, x, off);
  return __shfl_sync(kFull, x, 0);
}

template <class TL, class TS>
__global__ void replug_kernel(ReplugParams p) {
  const int lane = threadIdx.x;
  const std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (b >= p.B) return;  // warp-uniform
  const float t = p.temperature;
  LseState prior = lse_empty();
  for (std::int64_t i = lane; i < p.k; i += kWarp)
    if (present(p.mask, b, i)) prior = lse_push(prior, load<TS>(p.scores, b, i) / t);
  const float lse_z = lse_value(warp_lse(prior));
  LseState joint = lse_empty();
  for (std::int64_t i = lane; i < p.k; i += kWarp) {
    if (!present(p.mask, b, i)) continue;
    joint = lse_push(joint, log_mul(log_softmax_entry(load<TS>(p.scores, b, i) / t, lse_z), load<TL>(p.lm, b, i)));
  }
  const float m = lse_value(warp_lse(joint));
  if (lane == 0) p.out[b] = m;
  if (p.grad_lm == nullptr) return;
  for (std::int64_t i = lane; i < p.k; i += kWarp) {
    float gl = 0.0f, gs = 0.0f;
    if (present(p.mask, b, i)) {
      const float log_p = log_softmax_entry(load<TS>(p.scores, b, i) / t, lse_z);
      const float post = exp_minus(log_mul(log_p, load<TL>(p.lm, b, i)), m);
      gl = post;
      gs = replug_grad_score(post, exp_minus(log_p, 0.0f), t, m);
    }
    p.grad_lm[b * p.k + i] = gl;
    p.grad_scores[b * p.k + i] = gs;
  }
}

template <class TS, class TL>
__global__ void lsr_kernel(LsrParams p) {
  const int lane = threadIdx.x;
  const std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (b >= p.B) return;  // warp-uniform
  const float tr = p.retriever_temperature, tl = p.lm_temperature;
  const bool forward_kl = p.direction == KlDirection::kLsrToRetriever;
  LseState zs = lse_empty(), us = lse_empty();
  for (std::int64_t i = lane; i < p.k; i += kWarp) {
    if (!present(p.mask, b, i)) continue;
    zs = lse_push(zs, load<TS>(p.scores, b, i) / tr);
    us = lse_push(us, load<TL>(p.lm_scores, b, i) / tl);
  }
  const float lse_z = lse_value(warp_lse(zs)), lse_u = lse_value(warp_lse(us));
  float kl = 0.0f, sum_q = 0.0f;
  for (std::int64_t i = lane; i < p.k; i += kWarp) {
    if (!present(p.mask, b, i)) continue;
    const float log_p = log_softmax_entry(load<TS>(p.scores, b, i) / tr, lse_z);
    const float log_q = log_softmax_entry(load<TL>(p.lm_scores, b, i) / tl, lse_u);
    const float q = exp_minus(log_q, 0.0f);
    kl += forward_kl ? kl_term(q, log_q, log_p) : kl_term(exp_minus(log_p, 0.0f), log_p, log_q);
    sum_q += q;
  }
  kl = warp_sum(kl);
  sum_q = warp_sum(sum_q);
  if (lane == 0) p.loss[b] = kl;
  if (p.grad_scores == nullptr) return;
  const bool finite = kl < INFINITY;
  for (std::int64_t i = lane; i < p.k; i += kWarp) {
    float g = 0.0f;
    if (finite && present(p.mask, b, i)) {
      const float log_p = log_softmax_entry(load<TS>(p.scores, b, i) / tr, lse_z);
      const float log_q = log_softmax_entry(load<TL>(p.lm_scores, b, i) / tl, lse_u);
      g = forward_kl ? kl_grad_second_logit(exp_minus(log_q, 0.0f), exp_minus(log_p, 0.0f), sum_q)
                     : kl_grad_first_logit(exp_minus(log_p, 0.0f), log_p, log_q, kl);
      g /= tr;
    }
    p.grad_scores[b * p.k + i] = g;
  }
}

// Pass 1: one block per [b, i] row: c = w_i - logsumexp_v x_iv.
template <class T, class TW>
__global__ void mixture_lse_kernel(MixtureParams p) {
  const std::int64_t r = blockIdx.x, b = r / p.k, i = r % p.k;
  const T* row = static_cast<const T*>(p.logits) + b * p.logits_s0 + i * p.logits_s1;
  LseState st = lse_empty();
  for (std::int64_t v = threadIdx.x; v < p.V; v += blockDim.x) st = lse_push(st, to_float(row[v]));
  for (int off = kWarp / 2; off > 0; off /= 2) {
    LseState o{__shfl_xor_sync(kFull, st.m, off), __shfl_xor_sync(kFull, st.s, off)};
    st = lse_merge(st, o);
  }
  __shared__ LseState part[kThreads / kWarp];
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    LseState all = lse_empty();
    for (int w = 0; w < kThreads / kWarp; ++w) all = lse_merge(all, part[w]);
    const float lse = lse_value(all);
    p.c[r] = lse == -INFINITY ? -INFINITY : log_mul(load<TW>(p.log_weights, b, i), -lse);
  }
}

// Pass 2: one thread per (b, v): out = logsumexp_i(c_i + x_iv).
template <class T>
__global__ void mixture_combine_kernel(MixtureParams p) {
  const std::int64_t v = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= p.V) return;
  for (std::int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const T* base = static_cast<const T*>(p.logits) + b * p.logits_s0 + v;
    LseState st = lse_empty();
    for (std::int64_t i = 0; i < p.k; ++i) {
      const float ci = p.c[b * p.k + i];
      if (ci != -INFINITY) st = lse_push(st, log_mul(ci, to_float(base[i * p.logits_s1])));
    }
    p.out[b * p.V + v] = lse_value(st);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  RADIT_CHECK(err == cudaSuccess, what << ": CUDA launch failed: " << cudaGetErrorString(err));
}

unsigned row_blocks(std::int64_t B) { return static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

void replug_forward_cuda(std::int64_t B, std::int64_t k, TensorArg lm, TensorArg scores, TensorArg mask,
                         double temperature, std::uint64_t out, std::uint64_t grad_lm, std::uint64_t grad_scores,
                         std::uint64_t stream) {
  const ReplugParams p = make_replug_params(B, k, lm, scores, mask, temperature, out, grad_lm, grad_scores);
  if (B == 0) return;
  const auto st = reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(stream));
  dispatch_float(p.lm.dtype, "lm_logprobs", [&](auto tl) {
    dispatch_float(p.scores.dtype, "retriever_scores", [&](auto ts) {
      replug_kernel<decltype(tl), decltype(ts)><<<row_blocks(B), dim3(kWarp, kRowsPerBlock), 0, st>>>(p);
    });
  });
  check_launch("replug_forward_cuda");
}

void lsr_forward_cuda(std::int64_t B, std::int64_t k, TensorArg scores, TensorArg lm_scores, TensorArg mask,
                      double retriever_temperature, double lm_temperature, int direction, std::uint64_t loss,
                      std::uint64_t grad_scores, std::uint64_t stream) {
  const LsrParams p = make_lsr_params(B, k, scores, lm_scores, mask, retriever_temperature, lm_temperature,
                                      direction, loss, grad_scores);
  if (B == 0) return;
  const auto st = reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(stream));
  dispatch_float(p.scores.dtype, "retriever_scores", [&](auto ts) {
    dispatch_float(p.lm_scores.dtype, "lm_scores", [&](auto tl) {
      lsr_kernel<decltype(ts), decltype(tl)><<<row_blocks(B), dim3(kWarp, kRowsPerBlock), 0, st>>>(p);
    });
  });
  check_launch("lsr_forward_cuda");
}

void mixture_forward_cuda(std::int64_t B, std::int64_t k, std::int64_t V, TensorArg logits, TensorArg log_weights,
                          std::uint64_t c, std::uint64_t out, std::uint64_t stream) {
  const MixtureParams p = make_mixture_params(B, k, V, logits, log_weights, c, out);
  if (B == 0) return;
  RADIT_CHECK(B * k < (std::int64_t{1} << 31), "logits: B * k must be < 2^31 rows, got " << B * k);
  const auto st = reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(stream));
  const dim3 grid2(static_cast<unsigned>((V + kThreads - 1) / kThreads),
                   static_cast<unsigned>(B < 65535 ? B : 65535));
  dispatch_float(p.logits_dtype, "logits", [&](auto tx) {
    using T = decltype(tx);
    dispatch_float(p.log_weights.dtype, "log_weights", [&](auto tw) {
      mixture_lse_kernel<T, decltype(tw)><<<static_cast<unsigned>(B * k), kThreads, 0, st>>>(p);
    });
    mixture_combine_kernel<T><<<grid2, kThreads, 0, st>>>(p);
  });
  check_launch("mixture_forward_cuda");
}

}  // namespace ensemble
}  // namespace radit
