// ensemble, CPU kernels (OpenMP over rows). Math and gradients derived in ensemble.h; in short, per row:
//   REPLUG:  m = logsumexp_i(log p_i + l_i),  p = softmax(s / t)   ->  dm/dl_i = w_i,  dm/ds_i = (w_i - p_i) / t
//            with w_i = exp(log p_i + l_i - m) the posterior over chunks.
//   LSR:     q = softmax(lm_score / t_LSR) (constant).  KL(q || p): dKL/ds_j = (p_j sum(q) - q_j) / t
//            KL(p || q): dKL/ds_j = p_j (log p_j - log q_j - KL) / t
//   mixture: out_v = logsumexp_i(c_i + x_iv), c_i = w_i - logsumexp_v(x_iv)   (value only; grad in Python)
// [B, k] rows: two passes in thread-local buffers (max, then exponentials reused for the gradients).
// Mixture: vocabulary loops over float blocks with exp_fast (vectorisable; AVX-512 clones chosen at run time).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ensemble/ensemble.h"

namespace radit {
namespace ensemble {
namespace {

// Rows per OpenMP task are tiny (k ~ 10): only go parallel for enough rows to pay for the fork.
constexpr std::int64_t kParallelRows = 512;

// Row buffers of one thread: masked-in logits, their max-shifted exponentials and the log-probabilities.
struct RowBuf {
  std::vector<float> x, y, ex, ey;
  explicit RowBuf(std::int64_t k) : x(k), y(k), ex(k), ey(k) {}
};

inline float row_max(const float* v, std::int64_t k) {
  float m = -INFINITY;
  for (std::int64_t i = 0; i < k; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// e[i] = exp(v[i] - m) (0 for v[i] = -inf) and returns logsumexp(v) = m + log(sum e); -inf when m = -inf.
inline float row_exp_lse(const float* v, float m, float* e, std::int64_t k) {
  if (m == -INFINITY) {
    std::fill(e, e + k, 0.0f);
    return -INFINITY;
  }
  float s = 0.0f;
  for (std::int64_t i = 0; i < k; ++i) {
    e[i] = exp_minus(v[i], m);
    s += e[i];
  }
  return lse_value(LseState{m, s});
}

// Two passes over each row held in thread-local buffers (max, then exponentials): no data-dependent merges,
// and the exponentials of the forward pass are reused for the gradients.
template <class TL, class TS>
void replug_rows(const ReplugParams& p) {
  const float t = p.temperature;
  const std::int64_t k = p.k;
#pragma omp parallel if (p.B >= kParallelRows)
  {
    RowBuf buf(k);
    float *z = buf.x.data(), *a = buf.y.data(), *ez = buf.ex.data(), *ea = buf.ey.data();
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < p.B; ++b) {
      for (std::int64_t i = 0; i < k; ++i) z[i] = present(p.mask, b, i) ? load<TS>(p.scores, b, i) / t : -INFINITY;
      const float lse_z = row_exp_lse(z, row_max(z, k), ez, k);
      for (std::int64_t i = 0; i < k; ++i)
        a[i] = z[i] == -INFINITY ? -INFINITY : log_mul(log_softmax_entry(z[i], lse_z), load<TL>(p.lm, b, i));
      const float m = row_exp_lse(a, row_max(a, k), ea, k);
      p.out[b] = m;
      if (p.grad_lm == nullptr) continue;
      // prior_i = ez_i / sum(ez) = exp(z_i - lse_z); posterior_i = ea_i / sum(ea) = exp(a_i - m).
      float sz = 0.0f, sa = 0.0f;
      for (std::int64_t i = 0; i < k; ++i) {
        sz += ez[i];
        sa += ea[i];
      }
      const float inv_sz = sz > 0.0f ? 1.0f / sz : 0.0f, inv_sa = sa > 0.0f ? 1.0f / sa : 0.0f;
      for (std::int64_t i = 0; i < k; ++i) {
        const float post = ea[i] * inv_sa;  // masked and -inf entries: ea = ez = 0
        p.grad_lm[b * k + i] = post;
        p.grad_scores[b * k + i] = z[i] == -INFINITY ? 0.0f : replug_grad_score(post, ez[i] * inv_sz, t, m);
      }
    }
  }
}

template <class TS, class TL>
void lsr_rows(const LsrParams& p) {
  const float tr = p.retriever_temperature, tl = p.lm_temperature;
  const bool forward_kl = p.direction == KlDirection::kLsrToRetriever;  // KL(q || p)
  const std::int64_t k = p.k;
#pragma omp parallel if (p.B >= kParallelRows)
  {
    RowBuf buf(k);
    float *z = buf.x.data(), *u = buf.y.data(), *ez = buf.ex.data(), *eu = buf.ey.data();
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < p.B; ++b) {
      for (std::int64_t i = 0; i < k; ++i) {
        const bool on = present(p.mask, b, i);
        z[i] = on ? load<TS>(p.scores, b, i) / tr : -INFINITY;
        u[i] = on ? load<TL>(p.lm_scores, b, i) / tl : -INFINITY;
      }
      const float lse_z = row_exp_lse(z, row_max(z, k), ez, k);
      const float lse_u = row_exp_lse(u, row_max(u, k), eu, k);
      float sz = 0.0f, su = 0.0f;
      for (std::int64_t i = 0; i < k; ++i) {
        sz += ez[i];
        su += eu[i];
      }
      const float inv_sz = sz > 0.0f ? 1.0f / sz : 0.0f, inv_su = su > 0.0f ? 1.0f / su : 0.0f;
      float kl = 0.0f, sum_q = 0.0f;
      for (std::int64_t i = 0; i < k; ++i) {
        ez[i] *= inv_sz;  // p_i
        eu[i] *= inv_su;  // q_i
        z[i] = log_softmax_entry(z[i], lse_z);  // log p_i
        u[i] = log_softmax_entry(u[i], lse_u);  // log q_i
        kl += forward_kl ? kl_term(eu[i], u[i], z[i]) : kl_term(ez[i], z[i], u[i]);
        sum_q += eu[i];
      }
      p.loss[b] = kl;
      if (p.grad_scores == nullptr) continue;
      const bool finite = kl < INFINITY;
      for (std::int64_t i = 0; i < k; ++i) {
        float g = 0.0f;
        if (finite && present(p.mask, b, i))
          g = (forward_kl ? kl_grad_second_logit(eu[i], ez[i], sum_q) : kl_grad_first_logit(ez[i], z[i], u[i], kl)) /
              tr;
        p.grad_scores[b * k + i] = g;
      }
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Runtime-dispatched clones (ifunc) of the long vocabulary loops: AVX-512 where the CPU has it, AVX2 + FMA where
// it has that, baseline x86-64 (SSE2) otherwise. No build-time hardware probing; exp_fast (radit_math.h) makes the
// loops vectorisable.
#define RADIT_SIMD_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define RADIT_SIMD_CLONES
#endif

RADIT_SIMD_CLONES float span_max(const float* x, std::int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (std::int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// sum_j exp(x_j - m) for a finite m.
RADIT_SIMD_CLONES float span_sum_exp(const float* x, std::int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (std::int64_t j = 0; j < n; ++j) s += exp_fast(x[j] - m);
  return s;
}

// mx_j = max(mx_j, c + x_j)
RADIT_SIMD_CLONES void block_max(float* mx, const float* x, float c, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) {
    const float a = c + x[j];
    mx[j] = a > mx[j] ? a : mx[j];
  }
}

// sm_j += exp(c + x_j - mx_j); 0 where mx_j = -inf (then every term is -inf).
RADIT_SIMD_CLONES void block_sum_exp(float* sm, const float* mx, const float* x, float c, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) {
    const float m = mx[j] == -INFINITY ? 0.0f : mx[j];
    sm[j] += exp_fast(c + x[j] - m);
  }
}

// A float view of n logits: the data itself for float32, else converted into tmp.
template <class T>
const float* as_float(const T* x, std::int64_t n, float* tmp) {
  if constexpr (std::is_same_v<T, float>) {
    (void)n;
    (void)tmp;
    return x;
  } else {
    for (std::int64_t j = 0; j < n; ++j) tmp[j] = to_float(x[j]);
    return tmp;
  }
}

template <class T, class TW>
void mixture_impl(const MixtureParams& p) {
  constexpr std::int64_t kBlock = 1024;
  const T* logits = static_cast<const T*>(p.logits);
  const bool par = p.B * p.k * p.V >= (1 << 16);
  // Pass 1: c[b, i] = w_i - logsumexp_v x_iv (two sweeps over the row: max, then sum of exp).
#pragma omp parallel if (par)
  {
    std::vector<float> tmp(kBlock);
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < p.B * p.k; ++r) {
      const std::int64_t b = r / p.k, i = r % p.k;
      const T* row = logits + b * p.logits_s0 + i * p.logits_s1;
      float mx = -INFINITY, s = 0.0f;
      for (std::int64_t v0 = 0; v0 < p.V; v0 += kBlock) {
        const std::int64_t n = std::min(kBlock, p.V - v0);
        mx = std::max(mx, span_max(as_float(row + v0, n, tmp.data()), n));
      }
      if (mx != -INFINITY)
        for (std::int64_t v0 = 0; v0 < p.V; v0 += kBlock) {
          const std::int64_t n = std::min(kBlock, p.V - v0);
          s += span_sum_exp(as_float(row + v0, n, tmp.data()), n, mx);
        }
      const float lse = lse_value(LseState{mx, s});
      p.c[r] = (lse == -INFINITY) ? -INFINITY : log_mul(load<TW>(p.log_weights, b, i), -lse);
    }
  }
  // Pass 2: out[b, v] = logsumexp_i(c_i + x_iv) over vocabulary blocks (max sweep, then exp-sum sweep).
  const std::int64_t nblk = (p.V + kBlock - 1) / kBlock;
#pragma omp parallel if (par)
  {
    std::vector<float> mx(kBlock), sm(kBlock), tmp(kBlock);
#pragma omp for schedule(static)
    for (std::int64_t job = 0; job < p.B * nblk; ++job) {
      const std::int64_t b = job / nblk, v0 = (job % nblk) * kBlock, n = std::min(kBlock, p.V - v0);
      std::fill(mx.begin(), mx.begin() + n, -INFINITY);
      std::fill(sm.begin(), sm.begin() + n, 0.0f);
      for (std::int64_t i = 0; i < p.k; ++i) {
        const float ci = p.c[b * p.k + i];
        if (ci != -INFINITY)
          block_max(mx.data(), as_float(logits + b * p.logits_s0 + i * p.logits_s1 + v0, n, tmp.data()), ci, n);
      }
      for (std::int64_t i = 0; i < p.k; ++i) {
        const float ci = p.c[b * p.k + i];
        if (ci != -INFINITY)
          block_sum_exp(sm.data(), mx.data(),
                        as_float(logits + b * p.logits_s0 + i * p.logits_s1 + v0, n, tmp.data()), ci, n);
      }
      float* o = p.out + b * p.V + v0;
      for (std::int64_t j = 0; j < n; ++j) o[j] = lse_value(LseState{mx[j], sm[j]});
    }
  }
}

}  // namespace

void replug_forward_cpu(const TensorArg& lm, const TensorArg& scores, const TensorArg& mask, double temperature,
                        const TensorArg& out, const TensorArg& grad_lm, const TensorArg& grad_scores) {
  const ReplugParams p =
      make_replug_params("replug_logprob", -1, lm, scores, mask, temperature, out, grad_lm, grad_scores);
  check_rows_nonempty_host(p.mask, p.B, p.k);
  dispatch_dtype<RADIT_FLOAT_TYPES>(p.lm.dtype, "lm_logprobs", [&](auto tl) {
    dispatch_dtype<RADIT_FLOAT_TYPES>(p.scores.dtype, "retriever_scores",
                                      [&](auto ts) { replug_rows<decltype(tl), decltype(ts)>(p); });
  });
}

void lsr_forward_cpu(const TensorArg& scores, const TensorArg& lm_scores, const TensorArg& mask,
                     double retriever_temperature, double lm_temperature, int direction, const TensorArg& loss,
                     const TensorArg& grad_scores) {
  const LsrParams p = make_lsr_params("lsr_loss", -1, scores, lm_scores, mask, retriever_temperature, lm_temperature,
                                      direction, loss, grad_scores);
  check_rows_nonempty_host(p.mask, p.B, p.k);
  dispatch_dtype<RADIT_FLOAT_TYPES>(p.scores.dtype, "retriever_scores", [&](auto ts) {
    dispatch_dtype<RADIT_FLOAT_TYPES>(p.lm_scores.dtype, "lm_scores",
                                      [&](auto tl) { lsr_rows<decltype(ts), decltype(tl)>(p); });
  });
}

void mixture_forward_cpu(const TensorArg& logits, const TensorArg& log_weights, const TensorArg& c,
                         const TensorArg& out) {
  const MixtureParams p = make_mixture_params("mixture_logprobs", -1, logits, log_weights, c, out);
  dispatch_dtype<RADIT_FLOAT_TYPES>(p.logits_dtype, "logits", [&](auto tx) {
    dispatch_dtype<RADIT_FLOAT_TYPES>(p.log_weights.dtype, "log_weights",
                                      [&](auto tw) { mixture_impl<decltype(tx), decltype(tw)>(p); });
  });
}

}  // namespace ensemble
}  // namespace radit
