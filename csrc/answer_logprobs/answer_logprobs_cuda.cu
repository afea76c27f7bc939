// answer_logprobs, CUDA kernels: log p(target | hidden) without materialising the N x V logits.
//
// Math. Row r has hidden h_r [d] and target t_r; the logits over the vocabulary are
//     z_rv = h_r . w_v + b_v,     lse_r = log sum_v exp(z_rv),     tok_r = z_{r t_r} - lse_r
// (tok_r = 0 where t_r == ignore_index). lse is built online: the vocabulary is cut into 64-column blocks;
// each block gives a state (m, s) = (max_v z, sum_v exp(z - m)) and states merge associatively,
// (m1, s1) + (m2, s2) = (M, s1 e^{m1-M} + s2 e^{m2-M}) with M = max(m1, m2), lse = m + log s
// (radit::lse_push / lse_merge / lse_value in common/radit_math.h, the same code the CPU path runs).
//
// Gradient of L = sum_r g_r tok_r (g_r = dL/dtok_r, 0 at ignored rows). With p_rv = exp(z_rv - lse_r),
//     d tok_r / d z_rv = [v == t_r] - p_rv,      dz_rv = g_r ([v == t_r] - p_rv),
//     dL/dh_r = sum_v dz_rv w_v   (grad_hidden = dz W),      dL/dw_v = sum_r dz_rv h_r   (grad_weight = dz^T H),
//     dL/db_v = sum_r dz_rv.
// (The negative log-likelihood has g = -1, giving the usual dz = p - onehot.)
//
// Design. Everything is built from one block-tile product, block_gemm: a 128-thread block computes a
// 64 x 64 fp32 tile C = A[64 x K] B[K x 64] from strided global views (transposes are strides), staging
// 64 x 32 and 32 x 64 tiles in shared memory. The inner product is a compile-time switch on the input type:
// bfloat16 uses tensor cores (nvcuda::wmma 16x16x16 bf16 fragments, fp32 accumulators, 4 warps of 2 x 2
// fragments) on sm_80+; float32 (and bfloat16 below sm_80) uses a SIMT 4 x 8 register micro-tile per
// thread. Three kernels use it:
//   * fwd_partial_kernel: block (row block, vocabulary split) loops over its 64-column vocabulary blocks,
//     C = H W^T, adds the bias, folds each row into an online-logsumexp state (one warp per 16 rows,
//     two columns per lane, warp-shuffle lse_merge) and stores the target logit where it falls;
//     fwd_merge_kernel merges the splits' states per row into lse and tok.
//   * dlogits_kernel: recomputes C for (row block, vocabulary block) of one vocabulary chunk and writes
//     dz into a [n, chunk] workspace in the input dtype, adding its column sums to grad_bias (atomics).
//   * gemm_kernel: grad_hidden (+)= dz_chunk W_chunk and grad_weight_chunk = dz_chunk^T H, each output
//     element reduced in registers by one block (no atomics on the big gradients).
// Accumulation is fp32 throughout; outputs are fp32. Memory is O(n d + v d + n chunk), never O(n v).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "answer_logprobs/answer_logprobs_cuda.h"
#include "common/checks.h"
#include "common/radit_math.h"

namespace radit {
namespace answer_logprobs {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kBM = static_cast<int>(kCudaTileRows);  // rows of a tile
constexpr int kBN = static_cast<int>(kCudaTileCols);  // columns of a tile
constexpr int kBK = 32;                               // reduction step staged in shared memory
constexpr int kThreads = 128;                         // 4 warps
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr int kPad = 1;  // breaks bank conflicts of the SIMT reads
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
};
template <>
struct Traits<bf16> {
  static constexpr int kPad = 8;  // wmma: leading dimensions a multiple of 8 elements (16 bytes)
  __device__ static float to_float(bf16 x) { return __bfloat162float(x); }
  __device__ static bf16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// A strided [rows, cols] view of global memory: element (r, c) at p[r * sr + c * sc].
template <typename T>
struct View {
  const T* p;
  std::int64_t sr, sc, rows, cols;
};

// Shared memory of one block. For bf16 every fragment pointer is 32-byte aligned: row strides are
// 80 B (a), 144 B (b) and 272 B (c), fragments start at multiples of 16 rows and 16 columns.
template <typename T>
struct alignas(128) Smem {
  T a[kBM][kBK + Traits<T>::kPad];  // A tile [64 rows x 32 k]
  T b[kBK][kBN + Traits<T>::kPad];  // B tile [32 k x 64 cols]
  float c[kBM][kBN + 4];            // the fp32 product tile
};
static_assert(sizeof(bf16[kBM][kBK + 8]) % 32 == 0 && sizeof(bf16[kBK][kBN + 8]) % 32 == 0,
              "wmma needs 32-byte aligned fragment rows");

// tile[r][c] = g(r0 + r, c0 + c), zero outside the view. Consecutive threads walk the view's contiguous
// dimension so global reads coalesce for both plain and transposed views.
template <typename T, int R, int C, int LD>
__device__ void load_tile(T (*tile)[LD], const View<T>& g, std::int64_t r0, std::int64_t c0) {
  const bool col_fast = g.sc == 1 || g.sr != 1;
  for (int i = threadIdx.x; i < R * C; i += kThreads) {
    const int r = col_fast ? i / C : i % R;
    const int c = col_fast ? i % C : i / R;
    const std::int64_t gr = r0 + r, gc = c0 + c;
    tile[r][c] = (gr < g.rows && gc < g.cols) ? g.p[gr * g.sr + gc * g.sc] : Traits<T>::from_float(0.0f);
  }
}

// The per-type inner product of the staged tiles: zero(), step(sm) (C += A B for one kBK slice), store(sm).
template <typename T>
struct BlockMma;

// SIMT: thread (ty, tx) = (tid / 8, tid % 8) owns rows 4 ty + i (i < 4) and columns tx + 8 j (j < 8).
// The float32 path, and the bfloat16 path on GPUs older than sm_80 (no bf16 tensor-core fragments).
template <typename T>
struct BlockMmaSimt {
  float acc[4][8];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }
  __device__ void step(const Smem<T>& sm) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Traits<T>::to_float(sm.a[ty * 4 + i][k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = Traits<T>::to_float(sm.b[k][tx + 8 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ void store(Smem<T>& sm) const {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) sm.c[ty * 4 + i][tx + 8 * j] = acc[i][j];
  }
};

template <>
struct BlockMma<float> : BlockMmaSimt<float> {};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <>
struct BlockMma<bf16> : BlockMmaSimt<bf16> {};
#else
// bfloat16 on sm_80+: warp w owns the 32 x 32 sub-tile at (32 (w / 2), 32 (w % 2)) as 2 x 2 wmma fragments.
template <>
struct BlockMma<bf16> {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ void step(const Smem<bf16>& sm) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &sm.a[wm + 16 * i][kk], kBK + Traits<bf16>::kPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &sm.b[kk][wn + 16 * j], kBN + Traits<bf16>::kPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ void store(Smem<bf16>& sm) const {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sm.c[wm + 16 * i][wn + 16 * j], acc[i][j], kBN + 4, wmma::mem_row_major);
  }
};
#endif

// sm.c = A[m0 : m0+64, 0:K] B[0:K, n0 : n0+64] in fp32 (zero outside the views). Begins and ends with a
// barrier, so sm.c may be read by the previous epilogue and is visible to every thread on return.
template <typename T>
__device__ void block_gemm(Smem<T>& sm, const View<T>& A, const View<T>& B, std::int64_t m0, std::int64_t n0,
                           std::int64_t K) {
  BlockMma<T> mma;
  mma.zero();
  __syncthreads();
  for (std::int64_t k0 = 0; k0 < K; k0 += kBK) {
    load_tile<T, kBM, kBK>(sm.a, A, m0, k0);
    load_tile<T, kBK, kBN>(sm.b, B, k0, n0);
    __syncthreads();
    mma.step(sm);
    __syncthreads();
  }
  mma.store(sm);
  __syncthreads();
}

// Forward, part 1. Block (blockIdx.x = row block, blockIdx.y = vocabulary split) handles 64 rows and the
// vocabulary blocks [split * blocks_per_split, ...). Writes the split's state (m, s) of every row to
// part_m / part_s [splits, n] and the target logit to tgt_logit [n] where the target falls in the split.
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_partial_kernel(View<T> H, View<T> Wt, const float* bias,
                                                               const std::int64_t* targets, float* part_m,
                                                               float* part_s, float* tgt_logit, std::int64_t n,
                                                               std::int64_t v, std::int64_t d,
                                                               std::int64_t blocks_per_split) {
  __shared__ Smem<T> sm;
  __shared__ LseState row_state[kBM];  // row r is touched only by lane 0 of warp r / (kBM / kWarps)
  constexpr int kRowsPerWarp = kBM / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * kBM;
  const std::int64_t split = blockIdx.y;
  const std::int64_t num_vb = (v + kBN - 1) / kBN;
  const std::int64_t vb_end = min(num_vb, (split + 1) * blocks_per_split);
  if (lane == 0)
    for (int rr = 0; rr < kRowsPerWarp; ++rr) row_state[warp * kRowsPerWarp + rr] = lse_empty();

  for (std::int64_t vb = split * blocks_per_split; vb < vb_end; ++vb) {
    const std::int64_t v0 = vb * kBN;
    block_gemm(sm, H, Wt, n0, v0, d);
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const std::int64_t row = n0 + r;
      if (row >= n) break;  // uniform across the warp
      const std::int64_t t = targets[row];
      LseState st = lse_empty();
      for (int c = lane; c < kBN; c += 32) {
        const std::int64_t col = v0 + c;
        if (col < v) {
          const float z = sm.c[r][c] + (bias != nullptr ? bias[col] : 0.0f);
          st = lse_push(st, z);
          if (col == t) tgt_logit[row] = z;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        const LseState other{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off)};
        st = lse_merge(st, other);
      }
      if (lane == 0) row_state[r] = lse_merge(row_state[r], st);
    }
  }
  if (lane == 0) {
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const std::int64_t row = n0 + r;
      if (row < n) {
        part_m[split * n + row] = row_state[r].m;
        part_s[split * n + row] = row_state[r].s;
      }
    }
  }
}

// Forward, part 2: one thread per row merges the splits' states and writes lse and tok.
__global__ void fwd_merge_kernel(const float* part_m, const float* part_s, const float* tgt_logit,
                                 const std::int64_t* targets, float* tok, float* lse, std::int64_t n,
                                 std::int64_t splits, std::int64_t ignore_index) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  LseState st = lse_empty();
  for (std::int64_t s = 0; s < splits; ++s) st = lse_merge(st, LseState{part_m[s * n + row], part_s[s * n + row]});
  const float l = lse_value(st);
  lse[row] = l;
  tok[row] = targets[row] == ignore_index ? 0.0f : tgt_logit[row] - l;
}

// Backward, part 1. Block (row block, column block of the chunk): dz[row, c] for vocabulary entry
// v_start + c, c < chunk_width, stored in T with row stride ldz; column sums added to grad_bias.
template <typename T>
__global__ void __launch_bounds__(kThreads) dlogits_kernel(View<T> H, View<T> Wt, const float* bias,
                                                           const std::int64_t* targets, const float* lse,
                                                           const float* grad_tok, T* dz, std::int64_t ldz,
                                                           float* grad_bias, std::int64_t n, std::int64_t v,
                                                           std::int64_t d, std::int64_t v_start,
                                                           std::int64_t chunk_width) {
  __shared__ Smem<T> sm;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * kBM;
  const std::int64_t c0 = static_cast<std::int64_t>(blockIdx.y) * kBN;
  block_gemm(sm, H, Wt, n0, v_start + c0, d);
  for (int i = threadIdx.x; i < kBM * kBN; i += kThreads) {
    const int r = i / kBN, c = i % kBN;
    const std::int64_t row = n0 + r, cc = c0 + c, col = v_start + cc;
    float val = 0.0f;
    if (row < n && cc < chunk_width && col < v) {
      const float g = grad_tok[row];
      if (g != 0.0f) {
        const float z = sm.c[r][c] + (bias != nullptr ? bias[col] : 0.0f);
        val = g * ((col == targets[row] ? 1.0f : 0.0f) - exp_minus(z, lse[row]));
      }
      dz[row * ldz + cc] = Traits<T>::from_float(val);
    }
    sm.c[r][c] = val;  // each element has one owner thread: no race
  }
  if (grad_bias != nullptr) {
    __syncthreads();
    const int c = threadIdx.x;
    if (c < kBN && c0 + c < chunk_width && v_start + c0 + c < v) {
      float s = 0.0f;
      for (int r = 0; r < kBM; ++r) s += sm.c[r][c];
      atomicAdd(&grad_bias[v_start + c0 + c], s);
    }
  }
}

// Backward, part 2: C[M, NC] (+)= A[M, K] B[K, NC]; C float32 with row stride ldc.
template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_kernel(View<T> A, View<T> B, float* C, std::int64_t ldc,
                                                        std::int64_t M, std::int64_t NC, std::int64_t K,
                                                        bool accumulate) {
  __shared__ Smem<T> sm;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * kBM;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.y) * kBN;
  block_gemm(sm, A, B, m0, n0, K);
  for (int i = threadIdx.x; i < kBM * kBN; i += kThreads) {
    const int r = i / kBN, c = i % kBN;
    const std::int64_t row = m0 + r, col = n0 + c;
    if (row < M && col < NC) {
      float* out = C + row * ldc + col;
      *out = accumulate ? *out + sm.c[r][c] : sm.c[r][c];
    }
  }
}

// ---- host side ----

std::int64_t cdiv(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

template <typename P>
P* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
  }
}

// Calls f(T{}) with T the element type of the float dtype code (the compile-time switch of the kernels).
template <typename F>
void dtype_switch(int dtype, const char* op, F&& f) {
  if (dtype == static_cast<int>(DType::kFloat32)) {
    f(float{});
  } else if (dtype == static_cast<int>(DType::kBFloat16)) {
    f(bf16{});
  } else {
    RADIT_CHECK(false, op << ": hidden and weight must be float32 or bfloat16 (dtype code 0 or 1), got dtype code "
                          << dtype);
  }
}

// Checks shared by the forward and the backward entry points.
void check_common(const char* op, std::uintptr_t hidden, std::int64_t hs0, std::int64_t hs1, std::uintptr_t weight,
                  std::int64_t ws0, std::int64_t ws1, int dtype, std::uintptr_t targets, std::int64_t n,
                  std::int64_t v, std::int64_t d) {
  RADIT_CHECK(dtype == static_cast<int>(DType::kFloat32) || dtype == static_cast<int>(DType::kBFloat16),
              op << ": hidden and weight must be float32 or bfloat16 (dtype code 0 or 1), got dtype code " << dtype);
  RADIT_CHECK(n >= 0, op << ": n (rows of hidden [n, d]) must be >= 0, got " << n);
  RADIT_CHECK(v >= 1, op << ": v (rows of weight [v, d]) must be >= 1, got " << v);
  RADIT_CHECK(d >= 0, op << ": d (columns of hidden [n, d] and weight [v, d]) must be >= 0, got " << d);
  RADIT_CHECK(hs0 >= 0 && hs1 >= 0, op << ": hidden [" << n << ", " << d << "] strides must be >= 0");
  RADIT_CHECK(ws0 >= 0 && ws1 >= 0, op << ": weight [" << v << ", " << d << "] strides must be >= 0");
  RADIT_CHECK(hidden != 0 || n * d == 0, op << ": hidden [" << n << ", " << d << "] is a null pointer");
  RADIT_CHECK(weight != 0 || d == 0, op << ": weight [" << v << ", " << d << "] is a null pointer");
  RADIT_CHECK(targets != 0 || n == 0, op << ": targets int64 [" << n << "] is a null pointer");
  RADIT_CHECK(cdiv(n, kBM) <= 0x7fffffff, op << ": n = " << n << " rows is too many");
}

}  // namespace

void fwd_cuda(std::uintptr_t hidden, std::int64_t hidden_stride0, std::int64_t hidden_stride1,
              std::uintptr_t weight, std::int64_t weight_stride0, std::int64_t weight_stride1, int dtype,
              std::uintptr_t bias, std::uintptr_t targets, std::int64_t n, std::int64_t v, std::int64_t d,
              std::int64_t ignore_index, std::uintptr_t tok_logprob, std::uintptr_t lse,
              std::uintptr_t workspace, std::int64_t num_splits, std::uintptr_t stream) {
  constexpr const char* op = "answer_logprobs_fwd_cuda";
  check_common(op, hidden, hidden_stride0, hidden_stride1, weight, weight_stride0, weight_stride1, dtype, targets,
               n, v, d);
  RADIT_CHECK(num_splits >= 1, op << ": num_splits must be >= 1, got " << num_splits);
  RADIT_CHECK(n == 0 || (tok_logprob != 0 && lse != 0),
              op << ": tok_logprob and lse must be float32 [" << n << "] outputs (null pointer given)");
  RADIT_CHECK(n == 0 || workspace != 0,
              op << ": workspace must be float32 [(2 * num_splits + 1) * n] = [" << (2 * num_splits + 1) * n << "]");
  if (n == 0) return;
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  const std::int64_t num_vb = cdiv(v, kBN);
  const std::int64_t per_split = cdiv(num_vb, std::min(num_splits, num_vb));
  const std::int64_t splits = cdiv(num_vb, per_split);  // <= num_splits, every split non-empty
  RADIT_CHECK(splits <= 65535, op << ": num_splits must be <= 65535, got " << num_splits);
  float* part_m = as_ptr<float>(workspace);
  float* part_s = part_m + splits * n;
  float* tgt = part_m + 2 * splits * n;
  // 0xFFFFFFFF is a NaN: a target outside [0, v) (and not ignore_index) yields NaN, never stale memory.
  if (cudaMemsetAsync(tgt, 0xFF, sizeof(float) * n, st) != cudaSuccess) check_launch(op);
  dtype_switch(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const View<T> H{as_ptr<const T>(hidden), hidden_stride0, hidden_stride1, n, d};
    const View<T> Wt{as_ptr<const T>(weight), weight_stride1, weight_stride0, d, v};  // W^T [d, v]
    fwd_partial_kernel<T><<<dim3(static_cast<unsigned>(cdiv(n, kBM)), static_cast<unsigned>(splits)), kThreads, 0,
                            st>>>(H, Wt, as_ptr<const float>(bias), as_ptr<const std::int64_t>(targets), part_m,
                                  part_s, tgt, n, v, d, per_split);
  });
  check_launch(op);
  constexpr int kMergeThreads = 256;
  fwd_merge_kernel<<<static_cast<unsigned>(cdiv(n, kMergeThreads)), kMergeThreads, 0, st>>>(
      part_m, part_s, tgt, as_ptr<const std::int64_t>(targets), as_ptr<float>(tok_logprob), as_ptr<float>(lse), n,
      splits, ignore_index);
  check_launch(op);
}

void bwd_cuda(std::uintptr_t hidden, std::int64_t hidden_stride0, std::int64_t hidden_stride1,
              std::uintptr_t weight, std::int64_t weight_stride0, std::int64_t weight_stride1, int dtype,
              std::uintptr_t bias, std::uintptr_t targets, std::int64_t n, std::int64_t v, std::int64_t d,
              std::uintptr_t lse, std::uintptr_t grad_tok, std::uintptr_t grad_hidden,
              std::uintptr_t grad_weight, std::uintptr_t grad_bias, std::uintptr_t dz_workspace,
              std::int64_t chunk_v, std::uintptr_t stream) {
  constexpr const char* op = "answer_logprobs_bwd_cuda";
  check_common(op, hidden, hidden_stride0, hidden_stride1, weight, weight_stride0, weight_stride1, dtype, targets,
               n, v, d);
  RADIT_CHECK(chunk_v >= 1 && cdiv(chunk_v, kBN) <= 65535,
              op << ": chunk_v (vocabulary entries per chunk) must be in [1, " << 65535 * kBN << "], got " << chunk_v);
  RADIT_CHECK(n == 0 || (lse != 0 && grad_tok != 0),
              op << ": lse and grad_tok must be float32 [" << n << "] inputs (null pointer given)");
  RADIT_CHECK(n == 0 || dz_workspace != 0,
              op << ": dz_workspace must be [n, chunk_v] = [" << n << ", " << chunk_v << "] in the dtype of hidden");
  RADIT_CHECK(cdiv(d, kBN) <= 65535, op << ": d = " << d << " is too large");
  if (n == 0 || (grad_hidden == 0 && grad_weight == 0 && grad_bias == 0)) return;
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  dtype_switch(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const View<T> H{as_ptr<const T>(hidden), hidden_stride0, hidden_stride1, n, d};
    const View<T> Wt{as_ptr<const T>(weight), weight_stride1, weight_stride0, d, v};  // W^T [d, v]
    T* dz = as_ptr<T>(dz_workspace);
    for (std::int64_t v0 = 0; v0 < v; v0 += chunk_v) {
      const std::int64_t cw = std::min(chunk_v, v - v0);
      dlogits_kernel<T><<<dim3(static_cast<unsigned>(cdiv(n, kBM)), static_cast<unsigned>(cdiv(cw, kBN))), kThreads,
                          0, st>>>(H, Wt, as_ptr<const float>(bias), as_ptr<const std::int64_t>(targets),
                                   as_ptr<const float>(lse), as_ptr<const float>(grad_tok), dz, chunk_v,
                                   as_ptr<float>(grad_bias), n, v, d, v0, cw);
      check_launch(op);
      if (grad_hidden != 0 && d > 0) {  // grad_hidden (+)= dz[:, :cw] W[v0 : v0+cw]
        const View<T> A{dz, chunk_v, 1, n, cw};
        const View<T> B{as_ptr<const T>(weight) + v0 * weight_stride0, weight_stride0, weight_stride1, cw, d};
        gemm_kernel<T><<<dim3(static_cast<unsigned>(cdiv(n, kBM)), static_cast<unsigned>(cdiv(d, kBN))), kThreads, 0,
                         st>>>(A, B, as_ptr<float>(grad_hidden), d, n, d, cw, v0 > 0);
        check_launch(op);
      }
      if (grad_weight != 0 && d > 0) {  // grad_weight[v0 : v0+cw] = dz[:, :cw]^T H
        const View<T> A{dz, 1, chunk_v, cw, n};
        gemm_kernel<T><<<dim3(static_cast<unsigned>(cdiv(cw, kBM)), static_cast<unsigned>(cdiv(d, kBN))), kThreads, 0,
                         st>>>(A, H, as_ptr<float>(grad_weight) + v0 * d, d, cw, d, n, false);
        check_launch(op);
      }
    }
  });
}

}  // namespace answer_logprobs
}  // namespace radit
