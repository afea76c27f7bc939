// ensemble, CUDA kernels. Math and gradients derived in ensemble.h; in short, per row of k chunks:
//   REPLUG:  m = logsumexp_i(log p_i + l_i),  p = softmax(s / t)   ->  dm/dl_i = w_i,  dm/ds_i = (w_i - p_i) / t
//            with w_i = exp(log p_i + l_i - m) the posterior over chunks.
//   LSR:     q = softmax(lm_score / t_LSR) (constant).  KL(q || p): dKL/ds_j = (p_j sum(q) - q_j) / t
//            KL(p || q): dKL/ds_j = p_j (log p_j - log q_j - KL) / t
//   mixture: out_v = logsumexp_i(c_i + x_iv), c_i = w_i - logsumexp_v(x_iv)   (value only; grad in Python)
// Layout: [B, k] ops run one warp per row (lanes stride over k, online-logsumexp states merged with
// shuffles, lane 0's result broadcast so every lane uses bit-identical row constants); the grid is
// ceil(B / 4) blocks in x (no 65535 limit). The mixture spreads over the SMs at decode sizes too: pass 1 splits
// each [b, i] row's vocabulary over `splits` blocks (chosen from the SM count and the occupancy the runtime
// reports, so that B * k * splits blocks fill the device), each writing a partial (max, sum) state; a merge
// kernel folds the splits of each row in split order (deterministic) into c; pass 2 runs one thread per (b, v)
// looping over the k chunks (coalesced over v). Every launch runs under a guard for the tensors' device.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
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

// Pass 1a: block (split, row0 + y) computes the (max, sum) state of columns [split * span, (split + 1) * span)
// of the [b, i] row r = b * k + i into state[(r * splits + split) * 2 + {0, 1}].
template <class T>
__global__ void mixture_lse_split_kernel(MixtureParams p, std::int64_t row0, std::int64_t span, float* state) {
  const std::int64_t r = row0 + blockIdx.y, b = r / p.k, i = r % p.k, split = blockIdx.x;
  const T* row = static_cast<const T*>(p.logits) + b * p.logits_s0 + i * p.logits_s1;
  const std::int64_t v0 = split * span, v1 = v0 + span < p.V ? v0 + span : p.V;
  LseState st = lse_empty();
  for (std::int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) st = lse_push(st, to_float(row[v]));
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
    float* out = state + (r * gridDim.x + split) * 2;
    out[0] = all.m;
    out[1] = all.s;
  }
}

// Pass 1b: one thread per [b, i] row merges its splits in order: c = w_i - logsumexp_v x_iv.
template <class TW>
__global__ void mixture_lse_merge_kernel(MixtureParams p, std::int64_t splits, const float* state) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.B * p.k) return;
  LseState all = lse_empty();
  for (std::int64_t s = 0; s < splits; ++s)
    all = lse_merge(all, LseState{state[(r * splits + s) * 2], state[(r * splits + s) * 2 + 1]});
  const float lse = lse_value(all);
  p.c[r] = lse == -INFINITY ? -INFINITY : log_mul(load<TW>(p.log_weights, r / p.k, r % p.k), -lse);
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

unsigned row_blocks(std::int64_t B) { return static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

void replug_forward_cuda(const TensorArg& lm, const TensorArg& scores, const TensorArg& mask, double temperature,
                         const TensorArg& out, const TensorArg& grad_lm, const TensorArg& grad_scores,
                         std::uint64_t stream) {
  const char* fn = "replug_logprob";
  const int dev = cuda::common_device(fn, {{"lm_logprobs", &lm}, {"retriever_scores", &scores}, {"mask", &mask},
                                           {"out", &out}, {"grad_lm", &grad_lm}, {"grad_scores", &grad_scores}});
  const ReplugParams p = make_replug_params(fn, dev, lm, scores, mask, temperature, out, grad_lm, grad_scores);
  if (p.B == 0) return;
  RADIT_CHECK(row_blocks(p.B) < (1u << 31), fn << ": too many rows");
  cuda::DeviceGuard guard(dev);
  const cudaStream_t st = cuda::as_stream(stream);
  dispatch_dtype<RADIT_FLOAT_TYPES>(p.lm.dtype, "lm_logprobs", [&](auto tl) {
    dispatch_dtype<RADIT_FLOAT_TYPES>(p.scores.dtype, "retriever_scores", [&](auto ts) {
      replug_kernel<decltype(tl), decltype(ts)><<<row_blocks(p.B), dim3(kWarp, kRowsPerBlock), 0, st>>>(p);
    });
  });
  cuda::check_launch(fn);
}

void lsr_forward_cuda(const TensorArg& scores, const TensorArg& lm_scores, const TensorArg& mask,
                      double retriever_temperature, double lm_temperature, int direction, const TensorArg& loss,
                      const TensorArg& grad_scores, std::uint64_t stream) {
  const char* fn = "lsr_loss";
  const int dev = cuda::common_device(fn, {{"retriever_scores", &scores}, {"lm_scores", &lm_scores},
                                           {"mask", &mask}, {"loss", &loss}, {"grad_scores", &grad_scores}});
  const LsrParams p = make_lsr_params(fn, dev, scores, lm_scores, mask, retriever_temperature, lm_temperature,
                                      direction, loss, grad_scores);
  if (p.B == 0) return;
  RADIT_CHECK(row_blocks(p.B) < (1u << 31), fn << ": too many rows");
  cuda::DeviceGuard guard(dev);
  const cudaStream_t st = cuda::as_stream(stream);
  dispatch_dtype<RADIT_FLOAT_TYPES>(p.scores.dtype, "retriever_scores", [&](auto ts) {
    dispatch_dtype<RADIT_FLOAT_TYPES>(p.lm_scores.dtype, "lm_scores", [&](auto tl) {
      lsr_kernel<decltype(ts), decltype(tl)><<<row_blocks(p.B), dim3(kWarp, kRowsPerBlock), 0, st>>>(p);
    });
  });
  cuda::check_launch(fn);
}

void mixture_forward_cuda(const TensorArg& logits, const TensorArg& log_weights, const TensorArg& c,
                          const TensorArg& out, const TensorArg& workspace, std::uint64_t stream) {
  const char* fn = "mixture_logprobs";
  const int dev = cuda::common_device(fn, {{"logits", &logits}, {"log_weights", &log_weights}, {"c", &c},
                                           {"out", &out}, {"workspace", &workspace}});
  const MixtureParams p = make_mixture_params(fn, dev, logits, log_weights, c, out);
  const std::int64_t rows = p.B * p.k;
  check_tensor<float>(workspace, fn, "workspace", dev, {-1});
  RADIT_CHECK(workspace.size[0] >= rows * kMixtureMaxSplits * 2 && workspace.contiguous(),
              fn << ": workspace must be a contiguous float32 [" << rows * kMixtureMaxSplits * 2 << "], got "
                 << workspace.describe());
  if (p.B == 0) return;
  cuda::DeviceGuard guard(dev);
  const cudaStream_t st = cuda::as_stream(stream);
  const dim3 grid2(static_cast<unsigned>((p.V + kThreads - 1) / kThreads),
                   static_cast<unsigned>(p.B < 65535 ? p.B : 65535));
  dispatch_dtype<RADIT_FLOAT_TYPES>(p.logits_dtype, "logits", [&](auto tx) {
    using T = decltype(tx);
    // Splits per row: enough blocks to fill every resident slot, each split at least 1024 columns, at most
    // kMixtureMaxSplits. Rows beyond 65535 go to further launches of the same kernel (grid.y limit).
    const std::int64_t resident = cuda::resident_blocks(mixture_lse_split_kernel<T>, kThreads);
    std::int64_t splits = (resident + rows - 1) / rows;
    const std::int64_t by_width = (p.V + 1023) / 1024;
    splits = splits < by_width ? splits : by_width;
    splits = splits < kMixtureMaxSplits ? (splits > 0 ? splits : 1) : kMixtureMaxSplits;
    const std::int64_t span = (p.V + splits - 1) / splits;
    splits = (p.V + span - 1) / span;
    float* state = workspace.ptr<float>();
    for (std::int64_t r0 = 0; r0 < rows; r0 += 65535) {
      const std::int64_t nr = rows - r0 < 65535 ? rows - r0 : 65535;
      mixture_lse_split_kernel<T><<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(nr)), kThreads, 0,
                                    st>>>(p, r0, span, state);
    }
    cuda::check_launch(fn);
    dispatch_dtype<RADIT_FLOAT_TYPES>(p.log_weights.dtype, "log_weights", [&](auto tw) {
      mixture_lse_merge_kernel<decltype(tw)>
          <<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0, st>>>(p, splits, state);
    });
    cuda::check_launch(fn);
    mixture_combine_kernel<T><<<grid2, kThreads, 0, st>>>(p);
  });
  cuda::check_launch(fn);
}

}  // namespace ensemble
}  // namespace radit
