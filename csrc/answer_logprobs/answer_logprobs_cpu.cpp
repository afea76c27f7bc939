// answer_logprobs, CPU epilogues (the GEMM per vocabulary block runs in torch.mm, driven from Python).
//
// Math. For a row h (one answer position), logits z_v = h . W_v + b_v over the vocabulary v in [0, V) and
// the target t:
//     log p(t | h) = z_t - lse(z),          lse(z) = log sum_v exp(z_v).
// The vocabulary is visited in blocks B_1..B_K. Each block contributes the online-logsumexp state
// (m_k, s_k) = (max_{v in B_k} z_v, sum_{v in B_k} exp(z_v - m_k)); states merge associatively
// (radit_math.h lse_merge), and lse = m + log s. The target logit is read from the block holding t.
// Only one [rows, cols] block of logits exists at any time: memory O(N d + V d + rows * cols).
//
// Gradient. With an upstream gradient g_n = dL/dlogp_n for row n (0 for ignored rows) and
// p_nv = exp(z_nv - lse_n), since dlogp_n/dz_nv = [v == t_n] - p_nv:
//     dL/dz_nv = g_n ([v == t_n] - p_nv)                             (the block epilogue of bwd_block)
//     dL/dh_n  = sum_v dL/dz_nv W_v        = dZ @ W                  (GEMM per block, accumulated)
//     dL/dW_v  = sum_n dL/dz_nv h_n        = dZ^T @ H                (GEMM per block, disjoint rows of dW)
//     dL/db_v  = sum_n dL/dz_nv                                       (column sums, fused here)
// The backward pass recomputes each block of z (one more GEMM) instead of storing N x V logits.
//
// Vectorisation: the row loops are written with GCC vector extensions (16 floats) around the branch-free
// polynomial exp of common/radit_math.h (exp_poly: Cephes expf, ~1 ulp, exactly 0 for -inf); target_clones
// compiles them for AVX-512, AVX2+FMA and baseline x86-64 and the loader picks one at run time (no hardware
// probing at build time). bfloat16 blocks are widened row by row into a float32 scratch row (and narrowed
// back after the backward epilogue).
// Threads: rows are handed out to OpenMP threads (num_threads from torch.get_num_threads(); the module
// shares torch's libgomp) in dynamic chunks; every result is independent of the schedule.
#include "answer_logprobs/answer_logprobs.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/radit_math.h"

// The 64-byte vector helpers are always inlined: the warning about their (never used) out-of-line ABI is noise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define RADIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RADIT_CLONES
#endif
#if defined(__GNUC__)
#define RADIT_INLINE inline __attribute__((always_inline))
#else
#define RADIT_INLINE inline
#endif

namespace radit {
namespace answer_logprobs {
namespace {

using bf16_t = std::uint16_t;

// bfloat16 conversions and the polynomial exp come from common/radit_math.h (shared with the ensemble kernels).
RADIT_INLINE float load(const float* p) { return *p; }
RADIT_INLINE float load(const bf16_t* p) { return bf16_to_float(*p); }
RADIT_INLINE void store(float* p, float x) { *p = x; }
RADIT_INLINE void store(bf16_t* p, float x) { *p = float_to_bf16(x); }

constexpr std::int64_t kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef std::uint32_t vuint __attribute__((vector_size(kLanes * 4)));

RADIT_INLINE void loadv(vfloat& v, const float* p) { std::memcpy(&v, p, sizeof v); }
RADIT_INLINE void storev(float* p, const vfloat& v) { std::memcpy(p, &v, sizeof v); }
// x = z[j:j+16] (+ b[j:j+16])
template <bool HasBias>
RADIT_INLINE void load_logits(vfloat& x, const float* z, const float* b, std::int64_t j) {
  loadv(x, z + j);
  if (HasBias) {
    vfloat bv;
    loadv(bv, b + j);
    x += bv;
  }
}

// (max, sum exp(x - max)) of one float32 row x_j = z_j (+ b_j).
template <bool HasBias>
RADIT_INLINE LseState row_lse_impl(const float* z, const float* b, std::int64_t n) {
  const std::int64_t nv = n / kLanes * kLanes;
  vfloat mv = vfloat{} - INFINITY;
  for (std::int64_t j = 0; j < nv; j += kLanes) {
    vfloat x;
    load_logits<HasBias>(x, z, b, j);
    mv = x > mv ? x : mv;
  }
  float m = -INFINITY;
  for (std::int64_t k = 0; k < kLanes; ++k) m = mv[k] > m ? mv[k] : m;
  for (std::int64_t j = nv; j < n; ++j) {
    const float x = HasBias ? z[j] + b[j] : z[j];
    m = x > m ? x : m;
  }
  if (m == -INFINITY) return lse_empty();
  vfloat sv = vfloat{};
  for (std::int64_t j = 0; j < nv; j += kLanes) {
    vfloat x;
    load_logits<HasBias>(x, z, b, j);
    x -= m;
    exp_poly<vfloat, vuint>(x);
    sv += x;
  }
  float s = 0.0f;
  for (std::int64_t k = 0; k < kLanes; ++k) s += sv[k];
  for (std::int64_t j = nv; j < n; ++j) s += exp_fast((HasBias ? z[j] + b[j] : z[j]) - m);
  return LseState{m, s};
}

// In place z_j <- scale * exp(z_j (+ b_j) - lse) on a float32 row; adds the values to gb when given.
template <bool HasBias, bool GradBias>
RADIT_INLINE void row_bwd_impl(float* z, const float* b, std::int64_t n, float lse, float scale, float* gb) {
  const std::int64_t nv = n / kLanes * kLanes;
  for (std::int64_t j = 0; j < nv; j += kLanes) {
    vfloat x;
    load_logits<HasBias>(x, z, b, j);
    x -= lse;
    exp_poly<vfloat, vuint>(x);
    x *= scale;
    storev(z + j, x);
    if (GradBias) {
      vfloat g;
      loadv(g, gb + j);
      g += x;
      storev(gb + j, g);
    }
  }
  for (std::int64_t j = nv; j < n; ++j) {
    const float d = scale * exp_fast((HasBias ? z[j] + b[j] : z[j]) - lse);
    z[j] = d;
    if (GradBias) gb[j] += d;
  }
}

// The row kernels below are compiled once per instruction set (target_clones). bfloat16 rows are widened
// into a float32 scratch row first (and narrowed back in the backward pass): simple loops vectorise.
RADIT_CLONES LseState row_lse(const float* z, const float* b, std::int64_t n) {
  return b ? row_lse_impl<true>(z, b, n) : row_lse_impl<false>(z, b, n);
}
RADIT_CLONES void row_bwd(float* z, const float* b, std::int64_t n, float lse, float scale, float* gb) {
  if (b) {
    gb ? row_bwd_impl<true, true>(z, b, n, lse, scale, gb) : row_bwd_impl<true, false>(z, b, n, lse, scale, gb);
  } else {
    gb ? row_bwd_impl<false, true>(z, b, n, lse, scale, gb) : row_bwd_impl<false, false>(z, b, n, lse, scale, gb);
  }
}
RADIT_CLONES void widen_row(const bf16_t* in, float* out, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) out[j] = load(in + j);
}
RADIT_CLONES void narrow_row(const float* in, bf16_t* out, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) store(out + j, in[j]);
}

std::int64_t target_at(std::intptr_t targets, int dtype, std::int64_t r) {
  return dtype == static_cast<int>(DType::kInt64) ? reinterpret_cast<const std::int64_t*>(targets)[r]
                                                  : reinterpret_cast<const std::int32_t*>(targets)[r];
}

int threads_for(std::int64_t rows, std::int64_t cols, int requested) {
  if (requested < 1 || rows * cols < (std::int64_t(1) << 15)) return 1;
  return static_cast<int>(rows < requested ? rows : requested);
}

void check_targets_dtype(int dtype, const char* fn) {
  RADIT_CHECK(dtype == static_cast<int>(DType::kInt64) || dtype == static_cast<int>(DType::kInt32),
              fn << ": targets must be int64 or int32 (dtype code 3 or 4), got code " << dtype);
}

void check_block(const BlockParams& p, const char* fn) {
  RADIT_CHECK(p.rows >= 0, fn << ": rows must be >= 0, got " << p.rows);
  RADIT_CHECK(p.cols >= 1, fn << ": cols must be >= 1, got " << p.cols);
  RADIT_CHECK(p.ld >= p.cols, fn << ": logits row stride ld must be >= cols = " << p.cols << ", got " << p.ld);
  RADIT_CHECK(p.col0 >= 0 && p.col0 + p.cols <= p.vocab,
              fn << ": block [" << p.col0 << ", " << p.col0 + p.cols << ") must lie inside the vocabulary [0, "
                 << p.vocab << ")");
  RADIT_CHECK(p.logits_dtype == static_cast<int>(DType::kFloat32) ||
                  p.logits_dtype == static_cast<int>(DType::kBFloat16),
              fn << ": logits must be float32 or bfloat16 (dtype code 0 or 1), got code " << p.logits_dtype);
  RADIT_CHECK(p.bias == 0 || p.bias_dtype == static_cast<int>(DType::kFloat32) ||
                  p.bias_dtype == static_cast<int>(DType::kBFloat16),
              fn << ": bias must be float32 or bfloat16 (dtype code 0 or 1), got code " << p.bias_dtype);
  check_targets_dtype(p.targets_dtype, fn);
  RADIT_CHECK(p.rows == 0 || (p.logits != 0 && p.targets != 0), fn << ": null logits or targets pointer");
}

// The block's bias entries as float32 (empty when there is no bias).
std::vector<float> bias_block(const BlockParams& p) {
  std::vector<float> out;
  if (p.bias == 0) return out;
  out.resize(static_cast<std::size_t>(p.cols));
  if (p.bias_dtype == static_cast<int>(DType::kFloat32)) {
    const float* b = reinterpret_cast<const float*>(p.bias) + p.col0;
    for (std::int64_t j = 0; j < p.cols; ++j) out[j] = b[j];
  } else {
    const bf16_t* b = reinterpret_cast<const bf16_t*>(p.bias) + p.col0;
    for (std::int64_t j = 0; j < p.cols; ++j) out[j] = load(b + j);
  }
  return out;
}

}  // namespace

void fwd_block(const BlockParams& p, std::intptr_t row_max, std::intptr_t row_sum, std::intptr_t target_logit) {
  check_block(p, "answer_logprobs_fwd_block");
  RADIT_CHECK(p.rows == 0 || (row_max != 0 && row_sum != 0 && target_logit != 0),
              "answer_logprobs_fwd_block: null row_max, row_sum or target_logit pointer");
  const std::vector<float> bias = bias_block(p);
  const float* b = bias.empty() ? nullptr : bias.data();
  const bool bf16 = p.logits_dtype == static_cast<int>(DType::kBFloat16);
  const std::size_t elt = bf16 ? 2 : 4;
  float* mx = reinterpret_cast<float*>(row_max);
  float* sm = reinterpret_cast<float*>(row_sum);
  float* tl = reinterpret_cast<float*>(target_logit);
  const int nt = threads_for(p.rows, p.cols, p.num_threads);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> scratch(bf16 ? static_cast<std::size_t>(p.cols) : 0);
#pragma omp for schedule(dynamic, 16)  // dynamic: see bwd_block
    for (std::int64_t r = 0; r < p.rows; ++r) {
      const std::int64_t t = target_at(p.targets, p.targets_dtype, r);
      if (t == p.ignore_index) continue;
      const char* raw = reinterpret_cast<const char*>(p.logits) + static_cast<std::size_t>(r * p.ld) * elt;
      const float* row = reinterpret_cast<const float*>(raw);
      if (bf16) {
        widen_row(reinterpret_cast<const bf16_t*>(raw), scratch.data(), p.cols);
        row = scratch.data();
      }
      const LseState st = lse_merge(LseState{mx[r], sm[r]}, row_lse(row, b, p.cols));
      mx[r] = st.m;
      sm[r] = st.s;
      const std::int64_t j = t - p.col0;
      if (j >= 0 && j < p.cols) tl[r] = b ? row[j] + b[j] : row[j];
    }
  }
}

void fwd_finalize(std::int64_t n, std::int64_t vocab, std::intptr_t targets, int targets_dtype,
                  std::int64_t ignore_index, std::intptr_t row_max, std::intptr_t row_sum,
                  std::intptr_t target_logit, std::intptr_t lse, std::intptr_t tok_logprob,
                  std::intptr_t segment_ids, std::int64_t num_segments, std::intptr_t seg_logprob) {
  const char* fn = "answer_logprobs_fwd_finalize";
  RADIT_CHECK(n >= 0, fn << ": n must be >= 0, got " << n);
  RADIT_CHECK(vocab >= 1, fn << ": vocab must be >= 1, got " << vocab);
  check_targets_dtype(targets_dtype, fn);
  RADIT_CHECK(n == 0 || (targets && row_max && row_sum && target_logit && lse && tok_logprob),
              fn << ": null pointer argument");
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int64_t t = target_at(targets, targets_dtype, r);
    RADIT_CHECK(t == ignore_index || (t >= 0 && t < vocab),
                fn << ": targets[" << r << "] = " << t << " is outside [0, " << vocab << ") and is not ignore_index = "
                   << ignore_index);
  }
  const float* mx = reinterpret_cast<const float*>(row_max);
  const float* sm = reinterpret_cast<const float*>(row_sum);
  const float* tl = reinterpret_cast<const float*>(target_logit);
  float* out_lse = reinterpret_cast<float*>(lse);
  float* tok = reinterpret_cast<float*>(tok_logprob);
  for (std::int64_t r = 0; r < n; ++r) {
    const bool ignored = target_at(targets, targets_dtype, r) == ignore_index;
    const float l = ignored ? 0.0f : lse_value(LseState{mx[r], sm[r]});
    out_lse[r] = l;
    tok[r] = ignored ? 0.0f : tl[r] - l;
  }
  if (segment_ids == 0) return;
  RADIT_CHECK(num_segments >= 0, fn << ": num_segments must be >= 0, got " << num_segments);
  RADIT_CHECK(num_segments == 0 || seg_logprob != 0, fn << ": null seg_logprob pointer");
  const std::int64_t* seg = reinterpret_cast<const std::int64_t*>(segment_ids);
  for (std::int64_t r = 0; r < n; ++r) {
    RADIT_CHECK(seg[r] >= 0 && seg[r] < num_segments,
                fn << ": segment_ids[" << r << "] = " << seg[r] << " is outside [0, " << num_segments << ")");
  }
  float* out = reinterpret_cast<float*>(seg_logprob);
  for (std::int64_t s = 0; s < num_segments; ++s) out[s] = 0.0f;
  for (std::int64_t r = 0; r < n; ++r) out[seg[r]] += tok[r];
}

void bwd_block(const BlockParams& p, std::intptr_t lse, std::intptr_t grad_tok, std::intptr_t grad_bias) {
  check_block(p, "answer_logprobs_bwd_block");
  RADIT_CHECK(p.rows == 0 || (lse != 0 && grad_tok != 0), "answer_logprobs_bwd_block: null lse or grad_tok pointer");
  const std::vector<float> bias = bias_block(p);
  const float* b = bias.empty() ? nullptr : bias.data();
  const bool bf16 = p.logits_dtype == static_cast<int>(DType::kBFloat16);
  const std::size_t elt = bf16 ? 2 : 4;
  const float* l = reinterpret_cast<const float*>(lse);
  const float* g = reinterpret_cast<const float*>(grad_tok);
  const int nt = threads_for(p.rows, p.cols, p.num_threads);
  // Rows are handed out in fixed chunks, dynamically (a thread that loses its core on a shared machine does
  // not hold the others up at the barrier). Each chunk has its own column sums for the bias gradient,
  // reduced in chunk order afterwards: the result does not depend on which thread ran which chunk.
  const std::int64_t chunks = p.rows < 16 * nt ? (p.rows > 0 ? p.rows : 1) : 16 * nt;
  const std::int64_t chunk_rows = (p.rows + chunks - 1) / chunks;
  std::vector<float> acc(grad_bias ? static_cast<std::size_t>(chunks) * static_cast<std::size_t>(p.cols) : 0, 0.0f);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> scratch(bf16 ? static_cast<std::size_t>(p.cols) : 0);
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t k = 0; k < chunks; ++k) {
      float* gb = grad_bias ? acc.data() + static_cast<std::size_t>(k) * static_cast<std::size_t>(p.cols) : nullptr;
      const std::int64_t r_end = (k + 1) * chunk_rows < p.rows ? (k + 1) * chunk_rows : p.rows;
      for (std::int64_t r = k * chunk_rows; r < r_end; ++r) {
        char* raw = reinterpret_cast<char*>(p.logits) + static_cast<std::size_t>(r * p.ld) * elt;
        const std::int64_t t = target_at(p.targets, p.targets_dtype, r);
        const float gr = g[r];
        if (t == p.ignore_index || gr == 0.0f) {
          std::memset(raw, 0, static_cast<std::size_t>(p.cols) * elt);
          continue;
        }
        float* row = reinterpret_cast<float*>(raw);
        if (bf16) {
          widen_row(reinterpret_cast<const bf16_t*>(raw), scratch.data(), p.cols);
          row = scratch.data();
        }
        const std::int64_t j = t - p.col0;
        const bool has_t = j >= 0 && j < p.cols;
        const float xt = has_t ? (b ? row[j] + b[j] : row[j]) : 0.0f;
        row_bwd(row, b, p.cols, l[r], -gr, gb);
        if (has_t) {  // the one-hot term: dz_t = g (1 - p_t); the loop above added -g p_t to gb
          row[j] = gr * (1.0f - exp_fast(xt - l[r]));
          if (gb) gb[j] += gr;
        }
        if (bf16) narrow_row(row, reinterpret_cast<bf16_t*>(raw), p.cols);
      }
    }
  }
  if (grad_bias) {
    float* out = reinterpret_cast<float*>(grad_bias) + p.col0;
    for (std::int64_t k = 0; k < chunks; ++k) {
      const float* a = acc.data() + static_cast<std::size_t>(k) * static_cast<std::size_t>(p.cols);
      for (std::int64_t j = 0; j < p.cols; ++j) out[j] += a[j];
    }
  }
}

}  // namespace answer_logprobs
}  // namespace radit
