// Numerics shared by the CPU and CUDA kernels of radit_fast.
//
// Every function here is HOST_DEVICE inline so that the CPU tests exercise exactly the math the GPU runs.
// Conventions: float accumulation; -INFINITY encodes "log 0" (a missing chunk, an empty sum); no function
// returns NaN for inputs that are finite or -inf.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RADIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RADIT_HOST_DEVICE inline
#endif

namespace radit {

// Online logsumexp state: the running maximum m and the sum s = sum_j exp(x_j - m).
// lse = m + log(s). The empty state is (m = -inf, s = 0) and its lse is -inf.
struct LseState {
  float m;
  float s;
};

RADIT_HOST_DEVICE LseState lse_empty() { return LseState{-INFINITY, 0.0f}; }

// Merge two online-logsumexp states (associative and commutative).
RADIT_HOST_DEVICE LseState lse_merge(LseState a, LseState b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  if (a.m >= b.m) return LseState{a.m, a.s + b.s * expf(b.m - a.m)};
  return LseState{b.m, b.s + a.s * expf(a.m - b.m)};
}

// Add one value x to the state.
RADIT_HOST_DEVICE LseState lse_push(LseState a, float x) { return lse_merge(a, LseState{x, 1.0f}); }

RADIT_HOST_DEVICE float lse_value(LseState a) {
  return a.m == -INFINITY ? -INFINITY : a.m + logf(a.s);
}

// exp(x - lse) that is exactly 0 for x = -inf (also when lse = -inf: an empty distribution has no mass).
RADIT_HOST_DEVICE float exp_minus(float x, float lse) {
  return (x == -INFINITY || lse == -INFINITY) ? 0.0f : expf(x - lse);
}

// One term p * (log p - log q) of KL(p || q) given log p and log q; 0 where p = 0 (0 log 0 = 0).
RADIT_HOST_DEVICE float kl_term(float log_p, float log_q) {
  if (log_p == -INFINITY) return 0.0f;
  return expf(log_p) * (log_p - log_q);
}

}  // namespace radit

// ---- ensemble numerics (csrc/ensemble): masked log-softmax over k chunks, REPLUG and KL gradients ----
// Notation: z = s / t are logits over the k chunks of one query, lse = logsumexp of the present z,
// log p = z - lse. A chunk with z = -inf (or a masked chunk) has p = 0 and never contributes NaN.
namespace radit {

// log-softmax entry x - lse; -inf for x = -inf or for an empty distribution (lse = -inf), never NaN.
RADIT_HOST_DEVICE float log_softmax_entry(float x, float lse) {
  return (x == -INFINITY || lse == -INFINITY) ? -INFINITY : x - lse;
}

// log(a * b) = log a + log b for log-probabilities; -inf absorbs (so -inf + -inf stays -inf).
RADIT_HOST_DEVICE float log_mul(float log_a, float log_b) {
  return (log_a == -INFINITY || log_b == -INFINITY) ? -INFINITY : log_a + log_b;
}

// REPLUG marginal m = logsumexp_i(log p_i + l_i), p = softmax(s / t). With the posterior
// w_i = exp(log p_i + l_i - m):  dm/dl_i = w_i,  dm/ds_i = (w_i - p_i) / t.
// A marginal of -inf is a constant (every chunk has zero mass): its gradient is 0.
RADIT_HOST_DEVICE float replug_grad_score(float posterior, float prior, float t, float marginal) {
  return marginal == -INFINITY ? 0.0f : (posterior - prior) / t;
}

// KL(p || q) = sum_i p_i (log p_i - log q_i) with q = softmax(z) and p fixed (need not sum to 1):
//   dKL/dz_j = -sum_i p_i (delta_ij - q_j) = q_j * sum(p) - p_j.
RADIT_HOST_DEVICE float kl_grad_second_logit(float p, float q, float sum_p) { return q * sum_p - p; }

// KL(p || q) with p = softmax(z) and q fixed, r_i = log p_i - log q_i:
//   dKL/dz_j = sum_i p_i (delta_ij - p_j) r_i + sum_i p_i (delta_ij - p_j) = p_j (r_j - KL).
// p_j = exp(log p_j) is passed in (kernels that keep the exponentials reuse them). 0 where p_j = 0; the caller
// zeroes rows whose KL is +inf (gradient undefined there).
RADIT_HOST_DEVICE float kl_grad_first_logit(float p, float log_p, float log_q, float kl) {
  if (log_p == -INFINITY) return 0.0f;
  return p * ((log_p - log_q) - kl);
}

// One term p (log p - log q) of KL(p || q) with p = exp(log p) passed in: 0 where log p = -inf (0 log 0 = 0),
// +inf where only log q = -inf (mass where the other distribution has none).
RADIT_HOST_DEVICE float kl_term_p(float p, float log_p, float log_q) {
  if (log_p == -INFINITY) return 0.0f;
  if (log_q == -INFINITY) return INFINITY;
  return p * (log_p - log_q);
}

}  // namespace radit

namespace radit {

// exp(x) in float32 without a libm call, so that loops over it vectorise (Cephes expf: range reduction
// x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n from the exponent bits). Max relative error 1.4 ulp
// on [-87, 88]; exactly 0 for x <= -87 (and for -inf), so masked / -inf terms contribute nothing; NaN -> 0.
// Only for arguments <= 88 (every caller passes x - max <= 0). Branch-free: selects only.
RADIT_HOST_DEVICE float exp_fast(float x) {
  float xc = x > -87.0f ? x : -87.0f;
  xc = xc < 88.0f ? xc : 88.0f;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union {
    std::int32_t i;
    float f;
  } scale;
  scale.i = (static_cast<std::int32_t>(n) + 127) << 23;
  return x > -87.0f ? p * scale.f : 0.0f;
}

}  // namespace radit
