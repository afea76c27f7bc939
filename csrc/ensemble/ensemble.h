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
// kl_grad_first_logit, kl_grad_second_logit, kl_term, exp_fast, to_float): the CPU and CUDA kernels call the
// same functions. Accumulation is float32; values are float32. Tensors cross the binding as common/tensor.h
// TensorArgs; element types come from its one dtype switch (dispatch_dtype).
#pragma once

#include <cstdint>

#include "common/checks.h"
#include "common/radit_math.h"
#include "common/tensor.h"

namespace radit {
namespace ensemble {

// A read-only strided [rows, cols] view of float32 / bfloat16 / float16 data (or bool for masks).
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
  View mask;    // [B, k] bool, ptr = nullptr when every chunk is present
  float temperature;
  float* out;          // [B]
  float* grad_lm;      // [B, k] contiguous dm/dl, or nullptr
  float* grad_scores;  // [B, k] contiguous dm/ds, or nullptr
};

struct LsrParams {
  std::int64_t B, k;
  View scores;     // [B, k] retriever scores s
  View lm_scores;  // [B, k] LSR scores (constants)
  View mask;       // [B, k] bool or nullptr
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

template <class T>
RADIT_HOST_DEVICE float load(const View& v, std::int64_t r, std::int64_t c) {
  return to_float(static_cast<const T*>(v.ptr)[r * v.s0 + c * v.s1]);
}

RADIT_HOST_DEVICE bool present(const View& mask, std::int64_t r, std::int64_t c) {
  return mask.ptr == nullptr || static_cast<const std::uint8_t*>(mask.ptr)[r * mask.s0 + c * mask.s1] != 0;
}

// ---- argument checks shared by the CPU and CUDA entry points (device: -1 = CPU, else the CUDA index) ----
inline View make_view(const TensorArg& a, const char* fn, const char* name, int device, std::int64_t B,
                      std::int64_t k) {
  check_tensor<RADIT_FLOAT_TYPES>(a, fn, name, device, {B, k});
  return View{a.data, a.stride[0], a.stride[1], a.dtype};
}

inline View make_mask(const TensorArg& a, const char* fn, int device, std::int64_t B, std::int64_t k) {
  if (!a.present()) return View{nullptr, 0, 0, DType::kBool};
  check_tensor<bool>(a, fn, "mask", device, {B, k});
  return View{a.data, a.stride[0], a.stride[1], a.dtype};
}

// A contiguous float32 output of the given shape (absent allowed when optional).
inline float* out_f32(const TensorArg& a, const char* fn, const char* name, int device,
                      std::initializer_list<std::int64_t> shape, bool optional) {
  if (optional && !a.present()) return nullptr;
  check_tensor<float>(a, fn, name, device, shape);
  RADIT_CHECK(a.contiguous(), fn << ": " << name << " must be contiguous");
  return a.ptr<float>();
}

inline void check_temperature(double t, const char* name) {
  RADIT_CHECK(t > 0.0 && t < 1e30, name << " must be a finite positive number, got " << t);
}

inline void check_bk(const TensorArg& first, const char* fn, const char* name) {
  RADIT_CHECK(first.ndim == 2, fn << ": " << name << " must have shape [B, k], got " << first.describe());
  RADIT_CHECK(first.size[1] >= 1, fn << ": k (chunks per query) must be >= 1, got " << first.size[1]);
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

inline ReplugParams make_replug_params(const char* fn, int device, const TensorArg& lm, const TensorArg& scores,
                                       const TensorArg& mask, double temperature, const TensorArg& out,
                                       const TensorArg& grad_lm, const TensorArg& grad_scores) {
  check_bk(lm, fn, "lm_logprobs");
  const std::int64_t B = lm.size[0], k = lm.size[1];
  check_temperature(temperature, "temperature");
  ReplugParams p{B, k, make_view(lm, fn, "lm_logprobs", device, B, k),
                 make_view(scores, fn, "retriever_scores", device, B, k), make_mask(mask, fn, device, B, k),
                 static_cast<float>(temperature), out_f32(out, fn, "out", device, {B}, false),
                 out_f32(grad_lm, fn, "grad_lm", device, {B, k}, true),
                 out_f32(grad_scores, fn, "grad_scores", device, {B, k}, true)};
  RADIT_CHECK((p.grad_lm == nullptr) == (p.grad_scores == nullptr),
              fn << ": grad_lm and grad_scores: give both [B, k] float32 outputs or neither");
  return p;
}

inline LsrParams make_lsr_params(const char* fn, int device, const TensorArg& scores, const TensorArg& lm_scores,
                                 const TensorArg& mask, double retriever_temperature, double lm_temperature,
                                 int direction, const TensorArg& loss, const TensorArg& grad_scores) {
  check_bk(scores, fn, "retriever_scores");
  const std::int64_t B = scores.size[0], k = scores.size[1];
  check_temperature(retriever_temperature, "retriever_temperature");
  check_temperature(lm_temperature, "lm_temperature");
  RADIT_CHECK(direction == 0 || direction == 1,
              fn << ": direction: expected 0 (lsr_to_retriever) or 1 (retriever_to_lsr), got " << direction);
  return LsrParams{B, k, make_view(scores, fn, "retriever_scores", device, B, k),
                   make_view(lm_scores, fn, "lm_scores", device, B, k), make_mask(mask, fn, device, B, k),
                   static_cast<float>(retriever_temperature), static_cast<float>(lm_temperature),
                   static_cast<KlDirection>(direction), out_f32(loss, fn, "loss", device, {B}, false),
                   out_f32(grad_scores, fn, "grad_scores", device, {B, k}, true)};
}

inline MixtureParams make_mixture_params(const char* fn, int device, const TensorArg& logits,
                                         const TensorArg& log_weights, const TensorArg& c, const TensorArg& out) {
  check_tensor<RADIT_FLOAT_TYPES>(logits, fn, "logits", device, {-1, -1, -1});
  const std::int64_t B = logits.size[0], k = logits.size[1], V = logits.size[2];
  RADIT_CHECK(k >= 1 && V >= 1, fn << ": logits must have k >= 1 and V >= 1, got " << logits.describe());
  RADIT_CHECK(logits.stride[2] == 1 || V == 1, fn << ": logits must have stride(2) == 1");
  return MixtureParams{B, k, V, logits.data, logits.stride[0], logits.stride[1], logits.dtype,
                       make_view(log_weights, fn, "log_weights", device, B, k),
                       out_f32(c, fn, "c", device, {B, k}, false), out_f32(out, fn, "out", device, {B, V}, false)};
}

// The mixture's first pass splits each [b, i] row's vocabulary over at most this many blocks (CUDA); its
// workspace holds a (max, sum) logsumexp state per split: float32 [B * k * kMixtureMaxSplits * 2].
constexpr std::int64_t kMixtureMaxSplits = 64;

// ---- entry points (bound in csrc/bindings.cpp) ----
void replug_forward_cpu(const TensorArg& lm, const TensorArg& scores, const TensorArg& mask, double temperature,
                        const TensorArg& out, const TensorArg& grad_lm, const TensorArg& grad_scores);
void lsr_forward_cpu(const TensorArg& scores, const TensorArg& lm_scores, const TensorArg& mask,
                     double retriever_temperature, double lm_temperature, int direction, const TensorArg& loss,
                     const TensorArg& grad_scores);
void mixture_forward_cpu(const TensorArg& logits, const TensorArg& log_weights, const TensorArg& c,
                         const TensorArg& out);

#ifdef RADIT_WITH_CUDA
// CUDA variants: the same arguments (device tensors of one GPU, launched under its device guard) plus the raw
// stream; the mask rows are checked by Python. The mixture takes its split workspace (see kMixtureMaxSplits).
void replug_forward_cuda(const TensorArg& lm, const TensorArg& scores, const TensorArg& mask, double temperature,
                         const TensorArg& out, const TensorArg& grad_lm, const TensorArg& grad_scores,
                         std::uint64_t stream);
void lsr_forward_cuda(const TensorArg& scores, const TensorArg& lm_scores, const TensorArg& mask,
                      double retriever_temperature, double lm_temperature, int direction, const TensorArg& loss,
                      const TensorArg& grad_scores, std::uint64_t stream);
void mixture_forward_cuda(const TensorArg& logits, const TensorArg& log_weights, const TensorArg& c,
                          const TensorArg& out, const TensorArg& workspace, std::uint64_t stream);
#endif

}  // namespace ensemble
}  // namespace radit
