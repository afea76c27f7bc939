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
