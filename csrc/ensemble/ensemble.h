// ensemble: REPLUG marginal, LSR distillation loss and token mixture over k retrieved chunks.
//
// All three are small reductions over the k chunks of one query (one row of a [B, k] matrix), fused with
// their closed-form gradients so that one kernel pass produces value and gradient.
//
// Notation per row: s_i retriever scores, t retriever temperature, z_i = s_i / t, present chunks P (mask),
// p_i = softmax_P(z)_i (the retriever prior, 0 outside P), log p_i = z_i - logsumexp_P(z).
//
// 1. REPLUG marginal (replug_forward_*):
//      m = logsumexp_{i in P}(log p_i + l_i)            l_i = log p_LM(y | c_i o x)
//    posterior w_i = exp(log p_i + l_i - m) (sums to 1). Gradients:
//      dm/dl_i = w_i
//      dm/dz_j = sum_i w_i d(log p_i)/dz_j = sum_i w_i (delta_ij - p_j) = w_j - p_j
//      dm/ds_j = (w_j - p_j) / t
//    When m = -inf (every present chunk has l_i = -inf or p_i = 0) m does not depend on s or l: grads 0.
//
// 2. LSR loss (lsr_forward_*): q_i = softmax_P(u)_i with u_i = lm_score_i / t_LSR (constants, no grad).
//    lsr_to_retriever (default, Atlas/REPLUG code):  KL(q || p) = sum_i q_i (log q_i - log p_i)
//      dKL/dz_j = -sum_i q_i (delta_ij - p_j) = p_j * sum(q) - q_j       (= p_j - q_j since sum q = 1)
//    retriever_to_lsr (the paper's notation):           KL(p || q) = sum_i p_i r_i,  r_i = log p_i - log q_i
//      dKL/dz_j = sum_i p_i (delta_ij - p_j) r_i + sum_i p_i (delta_ij - p_j) * 1
//               = p_j r_j - p_j KL + p_j - p_j = p_j (r_j - KL)
//    and dKL/ds_j = dKL/dz_j / t. The per-row gradient is written next to the per-row loss; the caller
//    scales it by the upstream gradient (and 1/B for reduction="mean"). A row whose KL is +inf (mass on a
//    chunk the other distribution gives probability exactly 0) gets gradient 0, never NaN.
//
// 3. Token mixture (mixture_forward_*): logits x[b, i, v], log-weights w[b, i]:
//      out[b, v] = logsumexp_i(w_i + x_iv - lse_i),   lse_i = logsumexp_v x_iv
//    computed as c_i = w_i - lse_i (pass 1, one online logsumexp per [b, i] row) and
//    out[b, v] = logsumexp_i(c_i + x_iv) (pass 2): no [B, k, V] intermediate. w_i = -inf drops chunk i.
//    Gradient (applied in Python from the saved lse and out): pi_iv = exp(c_i + x_iv - out_v),
//      d out_v / d x_iu = pi_iv (delta_uv - softmax(x_i)_u),   d out_v / d w_i = pi_iv.
//
// Shared per-element math lives in common/radit_math.h (log_softmax_entry, log_mul, replug_grad_score,
// kl_grad_first_logit, kl_grad_second_logit, kl_term, exp_fast, bf16_to_float): the CPU and CUDA kernels
// call the same functions. Accumulation is float32; values are float32.
#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>

#include "common/checks.h"
#include "common/radit_math.h"

namespace radit {
namespace ensemble {

// A tensor argument as Python passes it: (data_ptr, stride0, stride1, dtype code). Strides in elements.
// data_ptr = 0 means "absent" (only allowed for the mask).
using TensorArg = std::tuple<std::uint64_t, std::int64_t, std::int64_t, int>;

// A read-only strided [rows, cols] view of float32 / bfloat16 / float16 data (or uint8 for masks).
struct View {
  const void* ptr;
  std::int64_t s0;
  std::int64_t s1;
  DType dtype;
};

enum class KlDirection : int { kLsrToRetriever = 0, kRetrieverToLsr = 1 };

struct ReplugParams {
  std::int64_t B, k;
  View lm;      // [B, k] answer log-likelihoods l
  View scores;  // [B, k] retriever scores s
  View mask;    // [B, k] uint8 (bool), ptr = nullptr when every chunk is present
  float temperature;
  float* out;          // [B]
  float* grad_lm;      // [B, k] contiguous dm/dl, or nullptr
  float* grad_scores;  // [B, k] contiguous dm/ds, or nullptr
};

struct LsrParams {
  std::int64_t B, k;
  View scores;     // [B, k] retriever scores s
  View lm_scores;  // [B, k] LSR scores (constants)
  View mask;       // [B, k] uint8 (bool) or nullptr
  float retriever_temperature, lm_temperature;
  KlDirection direction;
  float* loss;         // [B] per-row KL
  float* grad_scores;  // [B, k] contiguous dKL_b/ds, or nullptr
};

struct MixtureParams {
  std::int64_t B, k, V;
  const void* logits;  // [B, k, V], last dimension contiguous
  std::int64_t logits_s0, logits_s1;
  DType logits_dtype;
  View log_weights;  // [B, k]
  float* c;          // [B, k] contiguous: w_i - lse_i (-inf for a dropped chunk)
  float* out;        // [B, V] contiguous
};

// ---- element loads (host and device; bfloat16 decoding is radit::bf16_to_float of radit_math.h) ----
RADIT_HOST_DEVICE float f16_bits_to_float(std::uint16_t h) {
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
  memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Bf16 {
  std::uint16_t x;
};
struct F16 {
  std::uint16_t x;
};
RADIT_HOST_DEVICE float to_float(float v) { return v; }
RADIT_HOST_DEVICE float to_float(Bf16 v) { return bf16_to_float(v.x); }
RADIT_HOST_DEVICE float to_float(F16 v) { return f16_bits_to_float(v.x); }

template <class T>
RADIT_HOST_DEVICE float load(const View& v, std::int64_t r, std::int64_t c) {
  return to_float(static_cast<const T*>(v.ptr)[r * v.s0 + c * v.s1]);
}

RADIT_HOST_DEVICE bool present(const View& mask, std::int64_t r, std::int64_t c) {
  return mask.ptr == nullptr || static_cast<const std::uint8_t*>(mask.ptr)[r * mask.s0 + c * mask.s1] != 0;
}

// Calls f.template operator()<T>() with T the C++ type of a float dtype code (a static switch).
template <class F>
void dispatch_float(DType dt, const char* name, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(Bf16{}); break;
    case DType::kFloat16: f(F16{}); break;
    default: RADIT_CHECK(false, name << ": expected float32, bfloat16 or float16, got dtype code "
                                      << static_cast<int>(dt));
  }
}

// ---- argument checks shared by the CPU and CUDA entry points ----
inline View make_view(const TensorArg& a, const char* name, bool optional) {
  const auto ptr = std::get<0>(a);
  RADIT_CHECK(optional || ptr != 0, name << ": missing tensor (null data pointer)");
  RADIT_CHECK(std::get<1>(a) >= 0 && std::get<2>(a) >= 0, name << ": strides must be non-negative");
  const int code = std::get<3>(a);
  RADIT_CHECK(code >= 0 && code <= static_cast<int>(DType::kBool), name << ": unknown dtype code " << code);
  return View{reinterpret_cast<const void*>(static_cast<std::uintptr_t>(ptr)), std::get<1>(a), std::get<2>(a),
              static_cast<DType>(code)};
}

inline void check_float_view(const View& v, const char* name) {
  RADIT_CHECK(v.dtype == DType::kFloat32 || v.dtype == DType::kBFloat16 || v.dtype == DType::kFloat16,
              name << ": expected a float32, bfloat16 or float16 [B, k] tensor");
}

inline View make_mask(const TensorArg& a) {
  View m = make_view(a, "mask", /*optional=*/true);
  RADIT_CHECK(m.ptr == nullptr || m.dtype == DType::kBool, "mask: expected a bool [B, k] tensor");
  return m;
}

inline void check_temperature(double t, const char* name) {
  RADIT_CHECK(t > 0.0 && t < 1e30, name << " must be a finite positive number, got " << t);
}

inline void check_bk(std::int64_t B, std::int64_t k) {
  RADIT_CHECK(B >= 0, "B (number of queries) must be >= 0, got " << B);
  RADIT_CHECK(k >= 1, "k (chunks per query) must be >= 1, got " << k);
}

template <class T>
inline T* out_ptr(std::uint64_t p) {
  return reinterpret_cast<T*>(static_cast<std::uintptr_t>(p));
}

// Host-side check that every row of a host-resident mask has a present chunk.
inline void check_rows_nonempty_host(const View& mask, std::int64_t B, std::int64_t k) {
  if (mask.ptr == nullptr) return;
  for (std::int64_t b = 0; b < B; ++b) {
    bool any = false;
    for (std::int64_t i = 0; i < k && !any; ++i) any = present(mask, b, i);
    RADIT_CHECK(any, "mask row " << b << " has no present chunk (all k entries are False)");
  }
}

inline ReplugParams make_replug_params(std::int64_t B, std::int64_t k, const TensorArg& lm, const TensorArg& scores,
                                       const TensorArg& mask, double temperature, std::uint64_t out,
                                       std::uint64_t grad_lm, std::uint64_t grad_scores) {
  check_bk(B, k);
  check_temperature(temperature, "temperature");
  ReplugParams p{B, k, make_view(lm, "lm_logprobs", false), make_view(scores, "retriever_scores", false),
                 make_mask(mask), static_cast<float>(temperature), out_ptr<float>(out),
                 out_ptr<float>(grad_lm), out_ptr<float>(grad_scores)};
  check_float_view(p.lm, "lm_logprobs");
  check_float_view(p.scores, "retriever_scores");
  RADIT_CHECK(p.out != nullptr, "out: missing [B] float32 output");
  RADIT_CHECK((p.grad_lm == nullptr) == (p.grad_scores == nullptr),
              "grad_lm and grad_scores: give both [B, k] float32 outputs or neither");
  return p;
}

inline LsrParams make_lsr_params(std::int64_t B, std::int64_t k, const TensorArg& scores, const TensorArg& lm_scores,
                                 const TensorArg& mask, double retriever_temperature, double lm_temperature,
                                 int direction, std::uint64_t loss, std::uint64_t grad_scores) {
  check_bk(B, k);
  check_temperature(retriever_temperature, "retriever_temperature");
  check_temperature(lm_temperature, "lm_temperature");
  RADIT_CHECK(direction == 0 || direction == 1,
              "direction: expected 0 (lsr_to_retriever) or 1 (retriever_to_lsr), got " << direction);
  LsrParams p{B, k, make_view(scores, "retriever_scores", false), make_view(lm_scores, "lm_scores", false),
              make_mask(mask), static_cast<float>(retriever_temperature), static_cast<float>(lm_temperature),
              static_cast<KlDirection>(direction), out_ptr<float>(loss), out_ptr<float>(grad_scores)};
  check_float_view(p.scores, "retriever_scores");
  check_float_view(p.lm_scores, "lm_scores");
  RADIT_CHECK(p.loss != nullptr, "loss: missing [B] float32 output");
  return p;
}

inline MixtureParams make_mixture_params(std::int64_t B, std::int64_t k, std::int64_t V, const TensorArg& logits,
                                         const TensorArg& log_weights, std::uint64_t c, std::uint64_t out) {
  check_bk(B, k);
  RADIT_CHECK(V >= 1, "logits: vocabulary size V must be >= 1, got " << V);
  const View lg = make_view(logits, "logits", false);
  check_float_view(lg, "logits");
  MixtureParams p{B, k, V, lg.ptr, lg.s0, lg.s1, lg.dtype, make_view(log_weights, "log_weights", false),
                  out_ptr<float>(c), out_ptr<float>(out)};
  check_float_view(p.log_weights, "log_weights");
  RADIT_CHECK(p.c != nullptr && p.out != nullptr, "mixture: missing [B, k] or [B, V] float32 output");
  return p;
}

// ---- entry points (bound in csrc/bindings.cpp) ----
void replug_forward_cpu(std::int64_t B, std::int64_t k, TensorArg lm, TensorArg scores, TensorArg mask,
                        double temperature, std::uint64_t out, std::uint64_t grad_lm, std::uint64_t grad_scores);
void lsr_forward_cpu(std::int64_t B, std::int64_t k, TensorArg scores, TensorArg lm_scores, TensorArg mask,
                     double retriever_temperature, double lm_temperature, int direction, std::uint64_t loss,
                     std::uint64_t grad_scores);
void mixture_forward_cpu(std::int64_t B, std::int64_t k, std::int64_t V, TensorArg logits, TensorArg log_weights,
                         std::uint64_t c, std::uint64_t out);

#ifdef RADIT_WITH_CUDA
// CUDA variants: same arguments plus the raw stream; device pointers; the mask rows are checked by Python.
void replug_forward_cuda(std::int64_t B, std::int64_t k, TensorArg lm, TensorArg scores, TensorArg mask,
                         double temperature, std::uint64_t out, std::uint64_t grad_lm, std::uint64_t grad_scores,
                         std::uint64_t stream);
void lsr_forward_cuda(std::int64_t B, std::int64_t k, TensorArg scores, TensorArg lm_scores, TensorArg mask,
                      double retriever_temperature, double lm_temperature, int direction, std::uint64_t loss,
                      std::uint64_t grad_scores, std::uint64_t stream);
void mixture_forward_cuda(std::int64_t B, std::int64_t k, std::int64_t V, TensorArg logits, TensorArg log_weights,
                          std::uint64_t c, std::uint64_t out, std::uint64_t stream);
#endif

}  // namespace ensemble
}  // namespace radit
