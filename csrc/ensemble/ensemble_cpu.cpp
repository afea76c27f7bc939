// ensemble, CPU kernels (OpenMP over rows). Math and gradients derived in ensemble.h; in short, per row:
//   REPLUG:  m = logsumexp_i(log p_i + l_i),  p = softmax(s / t)   ->  dm/dl_i = w_i,  dm/ds_i = (w_i - p_i) / t
//            with w_i = exp(log p_i + l_i - m) the posterior over chunks.
//   LSR:     q = softmax(lm_score / t_LSR) (constant).  KL(q || p): dKL/ds_j = (p_j sum(q) - q_j) / t
//            KL(p || q): dKL/ds_j = p_j (log p_j - log q_j - KL) / t
//   mixture: out_v = logsumexp_i(c_i + x_iv), c_i = w_i - logsumexp_v(x_iv)   (value only; grad in Python)
// Each row reads its k entries twice (one online logsumexp, then the terms) and writes value + gradient.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ensemble/ensemble.h"

namespace radit {
namespace ensemble {
namespace {

// Rows per OpenMP task are tiny (k ~ 10): only go parallel for enough rows to pay for the fork.
constexpr std::int64_t kParallelRows = 512;

template <class TL, class TS>
void replug_rows(const ReplugParams& p) {
  const float t = p.temperature;
#pragma omp parallel for schedule(static) if (p.B >= kParallelRows)
  for (std::int64_t b = 0; b < p.B; ++b) {
    LseState prior = lse_empty();
    for (std::int64_t i = 0; i < p.k; ++i)
      if (present(p.mask, b, i)) prior = lse_push(prior, load<TS>(p.scores, b, i) / t);
    const float lse_z = lse_value(prior);
    LseState joint = lse_empty();
    for (std::int64_t i = 0; i < p.k; ++i) {
      if (!present(p.mask, b, i)) continue;
      const float log_p = log_softmax_entry(load<TS>(p.scores, b, i) / t, lse_z);
      joint = lse_push(joint, log_mul(log_p, load<TL>(p.lm, b, i)));
    }
    const float m = lse_value(joint);
    p.out[b] = m;
    if (p.grad_lm == nullptr) continue;
    for (std::int64_t i = 0; i < p.k; ++i) {
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
}

template <class TS, class TL>
void lsr_rows(const LsrParams& p) {
  const float tr = p.retriever_temperature, tl = p.lm_temperature;
  const bool forward_kl = p.direction == KlDirection::kLsrToRetriever;  // KL(q || p)
#pragma omp parallel for schedule(static) if (p.B >= kParallelRows)
  for (std::int64_t b = 0; b < p.B; ++b) {
    LseState zs = lse_empty(), us = lse_empty();
    for (std::int64_t i = 0; i < p.k; ++i) {
      if (!present(p.mask, b, i)) continue;
      zs = lse_push(zs, load<TS>(p.scores, b, i) / tr);
      us = lse_push(us, load<TL>(p.lm_scores, b, i) / tl);
    }
    const float lse_z = lse_value(zs), lse_u = lse_value(us);
    float kl = 0.0f, sum_q = 0.0f;
    for (std::int64_t i = 0; i < p.k; ++i) {
      if (!present(p.mask, b, i)) continue;
      const float log_p = log_softmax_entry(load<TS>(p.scores, b, i) / tr, lse_z);
      const float log_q = log_softmax_entry(load<TL>(p.lm_scores, b, i) / tl, lse_u);
      kl += forward_kl ? kl_term(log_q, log_p) : kl_term(log_p, log_q);
      sum_q += exp_minus(log_q, 0.0f);
    }
    p.loss[b] = kl;
    if (p.grad_scores == nullptr) continue;
    const bool finite = kl < INFINITY;
    for (std::int64_t i = 0; i < p.k; ++i) {
      float g = 0.0f;
      if (finite && present(p.mask, b, i)) {
        const float log_p = log_softmax_entry(load<TS>(p.scores, b, i) / tr, lse_z);
        const float log_q = log_softmax_entry(load<TL>(p.lm_scores, b, i) / tl, lse_u);
        g = forward_kl ? kl_grad_second_logit(exp_minus(log_q, 0.0f), exp_minus(log_p, 0.0f), sum_q)
                       : kl_grad_first_logit(log_p, log_q, kl);
        g /= tr;
      }
      p.grad_scores[b * p.k + i] = g;
    }
  }
}

template <class T, class TW>
void mixture_impl(const MixtureParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  // Pass 1: c[b, i] = w_i - logsumexp_v x_iv (two sweeps over the row: max, then sum of exp; vectorises).
#pragma omp parallel for schedule(static) if (p.B * p.k * p.V >= (1 << 16))
  for (std::int64_t r = 0; r < p.B * p.k; ++r) {
    const std::int64_t b = r / p.k, i = r % p.k;
    const T* row = logits + b * p.logits_s0 + i * p.logits_s1;
    float mx = -INFINITY;
    for (std::int64_t v = 0; v < p.V; ++v) mx = std::max(mx, to_float(row[v]));
    float s = 0.0f;
    if (mx != -INFINITY)
      for (std::int64_t v = 0; v < p.V; ++v) s += std::exp(to_float(row[v]) - mx);
    const float lse = lse_value(LseState{mx, s});
    const float wi = load<TW>(p.log_weights, b, i);
    p.c[r] = (lse == -INFINITY) ? -INFINITY : log_mul(wi, -lse);
  }
  // Pass 2: out[b, v] = logsumexp_i(c_i + x_iv) over vocabulary blocks (max sweep, then exp-sum sweep).
  constexpr std::int64_t kBlock = 512;
  const std::int64_t nblk = (p.V + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (p.B * p.k * p.V >= (1 << 16))
  for (std::int64_t job = 0; job < p.B * nblk; ++job) {
    const std::int64_t b = job / nblk, v0 = (job % nblk) * kBlock, n = std::min(kBlock, p.V - v0);
    float mx[kBlock], sm[kBlock];
    std::fill(mx, mx + n, -INFINITY);
    std::fill(sm, sm + n, 0.0f);
    for (std::int64_t i = 0; i < p.k; ++i) {
      const float ci = p.c[b * p.k + i];
      if (ci == -INFINITY) continue;
      const T* row = logits + b * p.logits_s0 + i * p.logits_s1 + v0;
      for (std::int64_t j = 0; j < n; ++j) mx[j] = std::max(mx[j], ci + to_float(row[j]));
    }
    for (std::int64_t i = 0; i < p.k; ++i) {
      const float ci = p.c[b * p.k + i];
      if (ci == -INFINITY) continue;
      const T* row = logits + b * p.logits_s0 + i * p.logits_s1 + v0;
      for (std::int64_t j = 0; j < n; ++j) {
        const float safe_m = mx[j] == -INFINITY ? 0.0f : mx[j];
        sm[j] += std::exp(ci + to_float(row[j]) - safe_m);
      }
    }
    float* o = p.out + b * p.V + v0;
    for (std::int64_t j = 0; j < n; ++j) o[j] = lse_value(LseState{mx[j], sm[j]});
  }
}

}  // namespace

void replug_forward_cpu(std::int64_t B, std::int64_t k, TensorArg lm, TensorArg scores, TensorArg mask,
                        double temperature, std::uint64_t out, std::uint64_t grad_lm, std::uint64_t grad_scores) {
  const ReplugParams p = make_replug_params(B, k, lm, scores, mask, temperature, out, grad_lm, grad_scores);
  check_rows_nonempty_host(p.mask, B, k);
  dispatch_float(p.lm.dtype, "lm_logprobs", [&](auto tl) {
    dispatch_float(p.scores.dtype, "retriever_scores", [&](auto ts) { replug_rows<decltype(tl), decltype(ts)>(p); });
  });
}

void lsr_forward_cpu(std::int64_t B, std::int64_t k, TensorArg scores, TensorArg lm_scores, TensorArg mask,
                     double retriever_temperature, double lm_temperature, int direction, std::uint64_t loss,
                     std::uint64_t grad_scores) {
  const LsrParams p = make_lsr_params(B, k, scores, lm_scores, mask, retriever_temperature, lm_temperature,
                                      direction, loss, grad_scores);
  check_rows_nonempty_host(p.mask, B, k);
  dispatch_float(p.scores.dtype, "retriever_scores", [&](auto ts) {
    dispatch_float(p.lm_scores.dtype, "lm_scores", [&](auto tl) { lsr_rows<decltype(ts), decltype(tl)>(p); });
  });
}

void mixture_forward_cpu(std::int64_t B, std::int64_t k, std::int64_t V, TensorArg logits, TensorArg log_weights,
                         std::uint64_t c, std::uint64_t out) {
  const MixtureParams p = make_mixture_params(B, k, V, logits, log_weights, c, out);
  dispatch_float(p.logits_dtype, "logits", [&](auto tx) {
    dispatch_float(p.log_weights.dtype, "log_weights", [&](auto tw) { mixture_impl<decltype(tx), decltype(tw)>(p); });
  });
}

}  // namespace ensemble
}  // namespace radit
