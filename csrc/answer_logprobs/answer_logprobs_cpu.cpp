// answer_logprobs, CPU epilogues (the GEMM per vocabulary block runs in torch.mm, driven from Python), and the
// argument checks the CPU and CUDA entry points share.
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
// Vectorisation: the row loops are written with GCC vector extensions around the branch-free polynomial exp of
// common/radit_math.h (exp_poly: Cephes expf, ~1 ulp, exactly 0 for -inf), compiled for AVX-512 (16 floats per
// vector), AVX2 + FMA (8) and baseline x86-64 (4) and picked at run time (no hardware probing at build time);
// the simple widening loops use target_clones. bfloat16 blocks are widened row by row into a float32 scratch row (and narrowed
// into the destination after the backward epilogue: z itself, or `out`, whose dtype may differ from z's).
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
#define RADIT_HAVE_ISA_TARGETS 1
#define RADIT_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define RADIT_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define RADIT_CLONES
#define RADIT_HAVE_ISA_TARGETS 0
#endif
#if defined(__GNUC__)
#define RADIT_INLINE inline __attribute__((always_inline))
#else
#define RADIT_INLINE inline
#endif

namespace radit {
namespace answer_logprobs {
namespace {

// bfloat16 (radit::Bf16) conversions and the polynomial exp come from common/radit_math.h (shared with CUDA).

// L floats per GCC vector: one register of the instruction set the row kernel is compiled for (16 with AVX-512,
// 8 with AVX2, 4 with SSE2). A vector wider than the target's registers is not split into registers by GCC but
// lowered element by element: 16-float vectors ran the AVX2 clone at 4.5 ns per logit instead of 0.5.
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(L * 4)));
  typedef std::uint32_t u __attribute__((vector_size(L * 4)));
};

template <typename V>
RADIT_INLINE void loadv(V& v, const float* p) { std::memcpy(&v, p, sizeof v); }
template <typename V>
RADIT_INLINE void storev(float* p, const V& v) { std::memcpy(p, &v, sizeof v); }
// x = z[j:j+L] (+ b[j:j+L])
template <bool HasBias, typename V>
RADIT_INLINE void load_logits(V& x, const float* z, const float* b, std::int64_t j) {
  loadv(x, z + j);
  if (HasBias) {
    V bv;
    loadv(bv, b + j);
    x += bv;
  }
}

// (max, sum exp(x - max)) of one float32 row x_j = z_j (+ b_j).
template <bool HasBias, int L>
RADIT_INLINE LseState row_lse_impl(const float* z, const float* b, std::int64_t n) {
  using vfloat = typename Vec<L>::f;
  const std::int64_t nv = n / L * L;
  vfloat mv = vfloat{} - INFINITY;
  for (std::int64_t j = 0; j < nv; j += L) {
    vfloat x;
    load_logits<HasBias>(x, z, b, j);
    mv = x > mv ? x : mv;
  }
  float m = -INFINITY;
  for (std::int64_t k = 0; k < L; ++k) m = mv[k] > m ? mv[k] : m;
  for (std::int64_t j = nv; j < n; ++j) {
    const float x = HasBias ? z[j] + b[j] : z[j];
    m = x > m ? x : m;
  }
  if (m == -INFINITY) return lse_empty();
  vfloat sv = vfloat{};
  for (std::int64_t j = 0; j < nv; j += L) {
    vfloat x;
    load_logits<HasBias>(x, z, b, j);
    x -= m;
    exp_poly<vfloat, typename Vec<L>::u>(x);
    sv += x;
  }
  float s = 0.0f;
  for (std::int64_t k = 0; k < L; ++k) s += sv[k];
  for (std::int64_t j = nv; j < n; ++j) s += exp_fast((HasBias ? z[j] + b[j] : z[j]) - m);
  return LseState{m, s};
}

// In place z_j <- scale * exp(z_j (+ b_j) - lse) on a float32 row; adds the values to gb when given.
template <bool HasBias, bool GradBias, int L>
RADIT_INLINE void row_bwd_impl(float* z, const float* b, std::int64_t n, float lse, float scale, float* gb) {
  using vfloat = typename Vec<L>::f;
  const std::int64_t nv = n / L * L;
  for (std::int64_t j = 0; j < nv; j += L) {
    vfloat x;
    load_logits<HasBias>(x, z, b, j);
    x -= lse;
    exp_poly<vfloat, typename Vec<L>::u>(x);
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

// The row kernels are compiled once per instruction set, each with its own vector width, and picked at run time
// (isa_level: no hardware probing at build time). bfloat16 rows are widened into a float32 scratch row first (and
// narrowed back in the backward pass): simple loops vectorise.
template <int L>
RADIT_INLINE LseState row_lse_any(const float* z, const float* b, std::int64_t n) {
  return b ? row_lse_impl<true, L>(z, b, n) : row_lse_impl<false, L>(z, b, n);
}
template <int L>
RADIT_INLINE void row_bwd_any(float* z, const float* b, std::int64_t n, float lse, float scale, float* gb) {
  if (b) {
    gb ? row_bwd_impl<true, true, L>(z, b, n, lse, scale, gb) : row_bwd_impl<true, false, L>(z, b, n, lse, scale, gb);
  } else {
    gb ? row_bwd_impl<false, true, L>(z, b, n, lse, scale, gb) : row_bwd_impl<false, false, L>(z, b, n, lse, scale, gb);
  }
}
#if RADIT_HAVE_ISA_TARGETS
RADIT_TARGET_V4 LseState row_lse_v4(const float* z, const float* b, std::int64_t n) { return row_lse_any<16>(z, b, n); }
RADIT_TARGET_V3 LseState row_lse_v3(const float* z, const float* b, std::int64_t n) { return row_lse_any<8>(z, b, n); }
RADIT_TARGET_V4 void row_bwd_v4(float* z, const float* b, std::int64_t n, float lse, float scale, float* gb) {
  row_bwd_any<16>(z, b, n, lse, scale, gb);
}
RADIT_TARGET_V3 void row_bwd_v3(float* z, const float* b, std::int64_t n, float lse, float scale, float* gb) {
  row_bwd_any<8>(z, b, n, lse, scale, gb);
}
// 2: x86-64-v4 (AVX-512), 1: x86-64-v3 (AVX2 + FMA), 0: baseline; probed once.
int isa_level() {
  static const int level = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") ? 2 : (__builtin_cpu_supports("x86-64-v3") ? 1 : 0);
  }();
  return level;
}
#endif
LseState row_lse(const float* z, const float* b, std::int64_t n) {
#if RADIT_HAVE_ISA_TARGETS
  const int level = isa_level();
  if (level == 2) return row_lse_v4(z, b, n);
  if (level == 1) return row_lse_v3(z, b, n);
#endif
  return row_lse_any<4>(z, b, n);
}
void row_bwd(float* z, const float* b, std::int64_t n, float lse, float scale, float* gb) {
#if RADIT_HAVE_ISA_TARGETS
  const int level = isa_level();
  if (level == 2) return row_bwd_v4(z, b, n, lse, scale, gb);
  if (level == 1) return row_bwd_v3(z, b, n, lse, scale, gb);
#endif
  row_bwd_any<4>(z, b, n, lse, scale, gb);
}
RADIT_CLONES void widen_row(const Bf16* in, float* out, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) out[j] = bf16_to_float(in[j].x);
}
RADIT_CLONES void narrow_row(const float* in, Bf16* out, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) out[j].x = float_to_bf16(in[j]);
}

// A float32 view of a row of n entries of dtype dt at raw: the row itself (float32) or its widening into scratch.
RADIT_INLINE const float* row_as_float(const void* raw, DType dt, std::int64_t n, float* scratch) {
  if (dt == DType::kFloat32) return static_cast<const float*>(raw);
  widen_row(static_cast<const Bf16*>(raw), scratch, n);
  return scratch;
}

int threads_for(std::int64_t rows, std::int64_t cols, int requested) {
  if (requested < 1 || rows * cols < (std::int64_t(1) << 15)) return 1;
  return static_cast<int>(rows < requested ? rows : requested);
}

// The block's bias entries as float32 (empty when there is no bias).
std::vector<float> bias_block(const Block& p) {
  std::vector<float> out;
  if (!p.bias.present()) return out;
  out.resize(static_cast<std::size_t>(p.cols()));
  dispatch_dtype<float, Bf16>(p.bias.dtype, "bias", [&](auto tag) {
    const auto* b = p.bias.ptr<const decltype(tag)>() + p.col0;
    for (std::int64_t j = 0; j < p.cols(); ++j) out[j] = to_float(b[j]);
  });
  return out;
}

std::size_t elt_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

}  // namespace

// ---- argument checks (shared with answer_logprobs_cuda.cu) ----
Block make_block(const char* fn, const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                 const TensorArg& targets, std::int64_t ignore_index, int device) {
  check_tensor<float, Bf16>(z, fn, "z", device, {-1, -1});
  const std::int64_t rows = z.size[0], cols = z.size[1];
  RADIT_CHECK(cols >= 1, fn << ": z must have at least one column, got " << z.describe());
  RADIT_CHECK(z.stride[1] == 1 || rows == 0, fn << ": z must have stride(1) == 1, got " << z.stride[1]);
  RADIT_CHECK(z.stride[0] >= cols || rows <= 1,
              fn << ": z row stride must be >= cols = " << cols << ", got " << z.stride[0]);
  RADIT_CHECK(vocab >= 1, fn << ": vocab must be >= 1, got " << vocab);
  RADIT_CHECK(col0 >= 0 && col0 + cols <= vocab, fn << ": block columns [" << col0 << ", " << col0 + cols
                                                    << ") must lie inside the vocabulary [0, " << vocab << ")");
  if (bias.present()) {
    check_tensor<float, Bf16>(bias, fn, "bias", device, {vocab});
    RADIT_CHECK(bias.stride[0] == 1 || vocab == 1, fn << ": bias must be contiguous");
  }
  check_tensor<std::int64_t>(targets, fn, "targets", device, {rows});
  RADIT_CHECK(targets.stride[0] == 1 || rows <= 1, fn << ": targets must be contiguous");
  Block b;
  b.z = z;
  b.bias = bias;
  b.targets = targets;
  b.col0 = col0;
  b.vocab = vocab;
  b.ignore_index = ignore_index;
  if (rows <= 1) b.z.stride[0] = cols > b.z.stride[0] ? cols : b.z.stride[0];  // a 1-row view may report any stride
  return b;
}

void check_finalize(const char* fn, const TensorArg& targets, std::int64_t vocab, const TensorArg& row_max,
                    const TensorArg& row_sum, const TensorArg& target_logit, const TensorArg& lse,
                    const TensorArg& tok, const TensorArg& segment_ids, const TensorArg& seg, int device) {
  RADIT_CHECK(vocab >= 1, fn << ": vocab must be >= 1, got " << vocab);
  check_tensor<std::int64_t>(targets, fn, "targets", device, {-1});
  const std::int64_t n = targets.size[0];
  RADIT_CHECK(targets.stride[0] == 1 || n <= 1, fn << ": targets must be contiguous");
  check_vector_f32(row_max, fn, "row_max", device, n);
  check_vector_f32(row_sum, fn, "row_sum", device, n);
  check_vector_f32(target_logit, fn, "target_logit", device, n);
  check_vector_f32(lse, fn, "lse", device, n);
  check_vector_f32(tok, fn, "tok", device, n);
  if (segment_ids.present()) {
    check_tensor<std::int64_t>(segment_ids, fn, "segment_ids", device, {n});
    RADIT_CHECK(segment_ids.stride[0] == 1 || n <= 1, fn << ": segment_ids must be contiguous");
    check_tensor<float>(seg, fn, "seg", device, {-1});
    RADIT_CHECK(seg.stride[0] == 1 || seg.size[0] <= 1, fn << ": seg must be contiguous");
  }
}

void check_bwd(const char* fn, const Block& b, const TensorArg& lse, const TensorArg& grad_tok,
               const TensorArg& grad_bias, const TensorArg& out, int device) {
  check_vector_f32(lse, fn, "lse", device, b.rows());
  check_vector_f32(grad_tok, fn, "grad_tok", device, b.rows());
  if (grad_bias.present()) check_vector_f32(grad_bias, fn, "grad_bias", device, b.vocab);
  if (out.present()) {
    check_tensor<float, Bf16>(out, fn, "out", device, {b.rows(), b.cols()});
    RADIT_CHECK(out.stride[1] == 1 || b.rows() == 0, fn << ": out must have stride(1) == 1, got " << out.stride[1]);
    RADIT_CHECK(out.stride[0] >= b.cols() || b.rows() <= 1,
                fn << ": out row stride must be >= cols = " << b.cols() << ", got " << out.stride[0]);
  }
}

// ---- CPU entry points ----
void fwd_block_cpu(const TensorArg& z_arg, std::int64_t col0, std::int64_t vocab, const TensorArg& bias_arg,
                   const TensorArg& targets, std::int64_t ignore_index, const TensorArg& row_max,
                   const TensorArg& row_sum, const TensorArg& target_logit, int num_threads) {
  const char* fn = "answer_logprobs_fwd_block";
  const Block p = make_block(fn, z_arg, col0, vocab, bias_arg, targets, ignore_index, -1);
  const std::int64_t rows = p.rows(), cols = p.cols();
  check_vector_f32(row_max, fn, "row_max", -1, rows);
  check_vector_f32(row_sum, fn, "row_sum", -1, rows);
  check_vector_f32(target_logit, fn, "target_logit", -1, rows);
  const std::vector<float> bias = bias_block(p);
  const float* b = bias.empty() ? nullptr : bias.data();
  const bool bf16 = p.z.dtype == DType::kBFloat16;
  const std::size_t elt = elt_size(p.z.dtype);
  const std::int64_t* tg = p.targets.ptr<const std::int64_t>();
  float* mx = row_max.ptr<float>();
  float* sm = row_sum.ptr<float>();
  float* tl = target_logit.ptr<float>();
  const int nt = threads_for(rows, cols, num_threads);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> scratch(bf16 ? static_cast<std::size_t>(cols) : 0);
#pragma omp for schedule(dynamic, 16)  // dynamic: see bwd_block_cpu
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t t = tg[r];
      if (t == p.ignore_index) continue;
      const char* raw = static_cast<const char*>(p.z.data) + static_cast<std::size_t>(r * p.ld()) * elt;
      const float* row = row_as_float(raw, p.z.dtype, cols, scratch.data());
      const LseState st = lse_merge(LseState{mx[r], sm[r]}, row_lse(row, b, cols));
      mx[r] = st.m;
      sm[r] = st.s;
      const std::int64_t j = t - p.col0;
      if (j >= 0 && j < cols) tl[r] = b ? row[j] + b[j] : row[j];
    }
  }
}

void fwd_finalize_cpu(const TensorArg& targets, std::int64_t vocab, std::int64_t ignore_index,
                      const TensorArg& row_max, const TensorArg& row_sum, const TensorArg& target_logit,
                      const TensorArg& lse, const TensorArg& tok_arg, const TensorArg& segment_ids,
                      const TensorArg& seg_arg) {
  const char* fn = "answer_logprobs";
  check_finalize(fn, targets, vocab, row_max, row_sum, target_logit, lse, tok_arg, segment_ids, seg_arg, -1);
  const std::int64_t n = targets.size[0];
  const std::int64_t* tg = targets.ptr<const std::int64_t>();
  for (std::int64_t r = 0; r < n; ++r) {
    RADIT_CHECK(tg[r] == ignore_index || (tg[r] >= 0 && tg[r] < vocab),
                fn << ": targets[" << r << "] = " << tg[r] << " is outside [0, " << vocab
                   << ") and is not ignore_index = " << ignore_index);
  }
  const float* mx = row_max.ptr<const float>();
  const float* sm = row_sum.ptr<const float>();
  const float* tl = target_logit.ptr<const float>();
  float* out_lse = lse.ptr<float>();
  float* tok = tok_arg.ptr<float>();
  for (std::int64_t r = 0; r < n; ++r) {
    const bool ignored = tg[r] == ignore_index;
    const float l = ignored ? 0.0f : lse_value(LseState{mx[r], sm[r]});
    out_lse[r] = l;
    tok[r] = ignored ? 0.0f : tl[r] - l;
  }
  if (!segment_ids.present()) return;
  const std::int64_t num_segments = seg_arg.size[0];
  const std::int64_t* seg = segment_ids.ptr<const std::int64_t>();
  for (std::int64_t r = 0; r < n; ++r) {
    RADIT_CHECK(seg[r] >= 0 && seg[r] < num_segments,
                fn << ": segment_ids[" << r << "] = " << seg[r] << " is outside [0, " << num_segments << ")");
  }
  float* out = seg_arg.ptr<float>();
  for (std::int64_t s = 0; s < num_segments; ++s) out[s] = 0.0f;
  for (std::int64_t r = 0; r < n; ++r) out[seg[r]] += tok[r];
}

void bwd_block_cpu(const TensorArg& z_arg, std::int64_t col0, std::int64_t vocab, const TensorArg& bias_arg,
                   const TensorArg& targets, std::int64_t ignore_index, const TensorArg& lse_arg,
                   const TensorArg& grad_tok, const TensorArg& grad_bias, const TensorArg& out_arg, int num_threads) {
  const char* fn = "answer_logprobs_bwd_block";
  const Block p = make_block(fn, z_arg, col0, vocab, bias_arg, targets, ignore_index, -1);
  check_bwd(fn, p, lse_arg, grad_tok, grad_bias, out_arg, -1);
  const std::int64_t rows = p.rows(), cols = p.cols();
  const std::vector<float> bias = bias_block(p);
  const float* b = bias.empty() ? nullptr : bias.data();
  // Destination: out, or z itself. Rows are computed in float32 in the destination row (float32) or in a
  // scratch row narrowed into it afterwards (bfloat16).
  const TensorArg& dst = out_arg.present() ? out_arg : p.z;
  const std::int64_t dst_ld = rows <= 1 ? cols : dst.stride[0];
  const bool dst_bf16 = dst.dtype == DType::kBFloat16;
  const std::size_t src_elt = elt_size(p.z.dtype), dst_elt = elt_size(dst.dtype);
  const std::int64_t* tg = p.targets.ptr<const std::int64_t>();
  const float* l = lse_arg.ptr<const float>();
  const float* g = grad_tok.ptr<const float>();
  const int nt = threads_for(rows, cols, num_threads);
  // Rows are handed out in fixed chunks, dynamically (a thread that loses its core on a shared machine does
  // not hold the others up at the barrier). Each chunk has its own column sums for the bias gradient,
  // reduced in chunk order afterwards: the result does not depend on which thread ran which chunk.
  const std::int64_t chunks = rows < 16 * nt ? (rows > 0 ? rows : 1) : 16 * nt;
  const std::int64_t chunk_rows = (rows + chunks - 1) / chunks;
  std::vector<float> acc(grad_bias.present() ? static_cast<std::size_t>(chunks) * static_cast<std::size_t>(cols) : 0,
                         0.0f);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> scratch(static_cast<std::size_t>(cols));
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t k = 0; k < chunks; ++k) {
      float* gb = acc.empty() ? nullptr : acc.data() + static_cast<std::size_t>(k) * static_cast<std::size_t>(cols);
      const std::int64_t r_end = (k + 1) * chunk_rows < rows ? (k + 1) * chunk_rows : rows;
      for (std::int64_t r = k * chunk_rows; r < r_end; ++r) {
        const char* src = static_cast<const char*>(p.z.data) + static_cast<std::size_t>(r * p.ld()) * src_elt;
        char* dst_raw = static_cast<char*>(dst.data) + static_cast<std::size_t>(r * dst_ld) * dst_elt;
        const std::int64_t t = tg[r];
        const float gr = g[r];
        if (t == p.ignore_index || gr == 0.0f) {
          std::memset(dst_raw, 0, static_cast<std::size_t>(cols) * dst_elt);
          continue;
        }
        // The row as float32 in `row` (the destination itself when it is float32).
        float* row = dst_bf16 ? scratch.data() : reinterpret_cast<float*>(dst_raw);
        if (p.z.dtype == DType::kBFloat16) {
          widen_row(reinterpret_cast<const Bf16*>(src), row, cols);
        } else if (reinterpret_cast<const char*>(row) != src) {
          std::memcpy(row, src, static_cast<std::size_t>(cols) * sizeof(float));
        }
        const std::int64_t j = t - p.col0;
        const bool has_t = j >= 0 && j < cols;
        const float xt = has_t ? (b ? row[j] + b[j] : row[j]) : 0.0f;
        row_bwd(row, b, cols, l[r], -gr, gb);
        if (has_t) {  // the one-hot term: dz_t = g (1 - p_t); the loop above added -g p_t to gb
          row[j] = dlogit(xt, l[r], gr, true);
          if (gb) gb[j] += gr;
        }
        if (dst_bf16) narrow_row(row, reinterpret_cast<Bf16*>(dst_raw), cols);
      }
    }
  }
  if (grad_bias.present()) {
    float* gout = grad_bias.ptr<float>() + p.col0;
    for (std::int64_t k = 0; k < chunks; ++k) {
      const float* a = acc.data() + static_cast<std::size_t>(k) * static_cast<std::size_t>(cols);
      for (std::int64_t j = 0; j < cols; ++j) gout[j] += a[j];
    }
  }
}

}  // namespace answer_logprobs
}  // namespace radit
