// Numerics shared by the CPU and CUDA kernels of radit_fast.
//
// Every function here is HOST_DEVICE inline so that the CPU tests exercise exactly the math the GPU runs.
// Conventions: float accumulation; -INFINITY encodes "log 0" (a missing chunk, an empty sum); no function
// returns NaN for inputs that are finite or -inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RADIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RADIT_HOST_DEVICE inline
#endif
// Always inlined on the host too: exp_poly must be compiled inside each target_clones variant of the CPU row
// loops (AVX-512, AVX2, baseline); an out-of-line copy would be built for the baseline ISA only.
#if defined(__CUDACC__)
#define RADIT_HOST_DEVICE_ALWAYS __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RADIT_HOST_DEVICE_ALWAYS inline __attribute__((always_inline))
#else
#define RADIT_HOST_DEVICE_ALWAYS inline
#endif
// Unroll hint understood by nvcc (device code); nothing elsewhere (GCC would warn about an unknown pragma).
#if defined(__CUDA_ARCH__)
#define RADIT_UNROLL _Pragma("unroll")
#else
#define RADIT_UNROLL
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

// One term p (log p - log q) of KL(p || q), the only KL term of the CPU and CUDA kernels. p = exp(log p) is
// passed in (kernels that keep the exponentials reuse them; others pass exp_minus(log_p, 0)).
// 0 where log p = -inf (0 log 0 = 0); +inf where only log q = -inf (mass where the other distribution has
// none), also when p underflows to 0 there (so never 0 * inf = NaN).
RADIT_HOST_DEVICE float kl_term(float p, float log_p, float log_q) {
  if (log_p == -INFINITY) return 0.0f;
  if (log_q == -INFINITY) return INFINITY;
  return p * (log_p - log_q);
}

}  // namespace radit

namespace radit {

// ---- float32 exp without a libm call, so that loops over it vectorise ----
// Cephes expf: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (|r| <= ln(2)/2, ln 2 split in two
// constants for an exact product), exp(r) by a degree-6 polynomial, 2^n built from exponent bits. Max relative
// error ~1.4 ulp on [ln(FLT_MIN), 88].
// Contract (every caller relies on it): exactly 0 below ln(FLT_MIN) = -87.3365 and for -inf, so masked / -inf
// terms contribute nothing and subnormal results flush to 0; saturates at exp(88) ~ 1.65e38 above 88 (callers
// pass x - max <= 0); NaN in -> NaN out (comparisons with NaN are false, so the clamps pass it through).
// Branch-free (selects only). One template for a float (F = float, U = uint32) and for a GCC vector of floats
// (F = vector, U = vector of uint32, as the CPU answer_logprobs row loops use), so vector loops and their
// scalar tails cannot drift apart. In place: no vector is passed by value (keeps GCC's -Wpsabi notes away).
template <typename F, typename U>
RADIT_HOST_DEVICE_ALWAYS void exp_poly(F& x) {
  const F hi = F{} + 88.0f, lo = F{} - 87.33654475f, magic = F{} + 12582912.0f;  // 1.5 * 2^23
  const auto under = x < lo;
  x = x > hi ? hi : x;
  x = under ? lo : x;
  const F t = x * 1.44269504088896341f + magic;  // round(x / ln 2) sits in the low mantissa bits of t
  const F n = t - magic;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F y = F{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  U bits;
  memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4b400000u + 127u) << 23;  // 0x4b400000 = bits of magic: 2^n as a float (n in [-126, 127])
  F scale;
  memcpy(&scale, &bits, sizeof scale);
  x = under ? F{} : y * scale;
}

// Scalar exp_poly (the mixture's `omp simd` loops vectorise it).
RADIT_HOST_DEVICE_ALWAYS float exp_fast(float x) {
  exp_poly<float, std::uint32_t>(x);
  return x;
}

// ---- 2-byte float types as bit patterns (the same code on host and device; no vendor type) ----
// The one bfloat16 type of the native code (and float16, which the ensemble kernels read).
struct Bf16 {
  std::uint16_t x;
};
struct F16 {
  std::uint16_t x;
};

RADIT_HOST_DEVICE float bf16_to_float(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet bit set so the truncation cannot turn it into inf).
RADIT_HOST_DEVICE std::uint16_t float_to_bf16(float x) {
  std::uint32_t u;
  memcpy(&u, &x, sizeof u);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// IEEE half -> float (exact, subnormals included).
RADIT_HOST_DEVICE float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {        // subnormal: renormalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

RADIT_HOST_DEVICE_ALWAYS float to_float(float v) { return v; }
RADIT_HOST_DEVICE_ALWAYS float to_float(Bf16 v) { return bf16_to_float(v.x); }
RADIT_HOST_DEVICE_ALWAYS float to_float(F16 v) { return f16_to_float(v.x); }

// ---- the answer_logprobs epilogue math (CPU and CUDA) ----
// Merge N values x into an online-logsumexp state: one rescale of the running sum per call instead of one per
// value. Exactly lse_merge(st, (max x, sum exp(x - max x))); values -inf add nothing; a NaN poisons the sum
// (as on the CPU path, unless every other value of the state is -inf).
template <int N>
RADIT_HOST_DEVICE_ALWAYS LseState lse_push_n(LseState st, const float (&x)[N]) {
  float m = st.m;
  RADIT_UNROLL
  for (int i = 0; i < N; ++i) m = x[i] > m ? x[i] : m;
  if (m == -INFINITY) return st;
  float s = st.s * exp_fast(st.m - m);  // st.m = -inf: exp_fast gives exactly 0
  RADIT_UNROLL
  for (int i = 0; i < N; ++i) s += exp_fast(x[i] - m);
  return LseState{m, s};
}

// dlogit of one entry: g ([is_target] - exp(x - lse)), with x = z + bias (see answer_logprobs.h).
RADIT_HOST_DEVICE_ALWAYS float dlogit(float x, float lse, float g, bool is_target) {
  const float p = exp_fast(x - lse);
  return is_target ? g * (1.0f - p) : -g * p;
}

}  // namespace radit
