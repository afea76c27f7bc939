// c (+)= a @ b on CPUs with AVX2 and FMA, for the dtypes the AVX-512 kernel of gemm_cpu.cpp cannot run there (no
// AVX-512 at all, or no AVX512-BF16 for bfloat16): the same contract (float32 accumulation and c, any strides,
// results independent of the thread count, three-level sums over a long K). What it is for: on such CPUs torch.mm
// has no bfloat16 kernel worth the name (aten's fallback measured 0.5-2 GFLOP/s on the driver's shapes on the AVX2
// AMD EPYC here, against ~90 for float32 MKL); this kernel runs bfloat16 at the float32 rate (~85-92 GFLOP/s per
// core there) and keeps the logits in float32. Float32 runs here too, but the driver leaves float32 to MKL's sgemm
// on these CPUs (as fast on the logits, faster on the gradient products).
//
// Scheme (GotoBLAS-style; every element is widened to float32 before it is multiplied):
//   * K is cut into equal blocks of at most kKC, each block's sum added into c in order. A K longer than kOneSum is
//     summed in three levels as in the AVX-512 kernel (kSub values in registers, their sums in an L1 tile, the
//     blocks in c: dZ @ W, K = V); a shorter one is one sequential sum (the logits, K = d).
//   * a in float32 is read in place at any strides (one broadcast per row and k). bfloat16 a is widened per K
//     block into micro panels ap[panel][k][MR] (a is the small operand of every product the driver passes: H, dZ
//     row chunks, H^T).
//   * b is packed per block of K-block x NC columns (NC: as many as fit kBBytes, in L2) into 16-column tiles
//     bp[tile][k][16] in its own dtype, zero past the last column; bfloat16 tiles are widened in registers (a
//     zero-extension and a shift per 8 columns). Reading k-major b in place instead (W, dZ) ran 10-40% slower:
//     its rows lie a page or more apart.
//   * Micro tile MR x NR = 6 x 16 float32 accumulators (12 ymm registers); per k 2 loads of b, 6 broadcasts of a,
//     12 FMAs.
//   * Threads (OpenMP) split the tiles of a block while packing, then the panels of a; every c entry is computed
//     by one thread, in the same K order on every run.
#include "answer_logprobs/gemm_cpu.h"

#include <type_traits>
#include <vector>

namespace radit {
namespace answer_logprobs {
namespace gemm_detail {

#if RADIT_HAVE_GEMM_KERNEL
namespace {

constexpr i64 kMR = 6;                  // rows of a per micro panel
constexpr i64 kNR = 16;                 // columns of c per micro tile (2 vectors of 8 float32)
constexpr i64 kKC = 768;                // K per block, at most (blocks are equal; SmolLM2's d = 576 is one)
constexpr i64 kOneSum = 640;            // a K up to this is one sequential sum, as in the AVX-512 kernel
constexpr i64 kSub = 64;                // values summed in registers before they go to the L1 tile
constexpr i64 kBBytes = 192 << 10;      // bytes of a packed block of b (L2)

// float32 a(i, k) at base + i * row + k * step bytes.
struct AView {
  const char* base;
  i64 row, step;
};

// 16 consecutive columns of b at row k of the tile: base + k * step bytes, float32 or bfloat16.
struct BView {
  const char* base;
  i64 step;
};

template <bool Bf16>
RADIT_AVX2 inline void load_b(const char* p, __m256& b0, __m256& b1) {
  if constexpr (Bf16) {
    const __m256i w0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i w1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    b0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    b1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
  } else {
    b0 = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    b1 = _mm256_loadu_ps(reinterpret_cast<const float*>(p) + 8);
  }
}

// c[0:8] (masked unless full) = v, or c + v with accumulate.
RADIT_AVX2 inline void store_c(float* c, bool full, __m256i mask, __m256 v, bool accumulate) {
  if (full) {
    _mm256_storeu_ps(c, accumulate ? _mm256_add_ps(_mm256_loadu_ps(c), v) : v);
  } else {
    _mm256_maskstore_ps(c, mask, accumulate ? _mm256_add_ps(_mm256_maskload_ps(c, mask), v) : v);
  }
}

// c[Rows, cols] (+)= a panel x b tile over `depth` values of K, summed `sub` at a time in registers (see above).
template <bool Bf16, int Rows>
RADIT_AVX2 void micro(AView a, BView b, i64 depth, i64 sub, float* c, i64 ldc, i64 cols, bool accumulate) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), idx),
                           _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols) - 8), idx)};
  const bool full[2] = {cols >= 8, cols >= 16};
  alignas(32) float part[Rows][kNR];
  const char* ar[Rows];
#pragma GCC unroll 6
  for (int i = 0; i < Rows; ++i) ar[i] = a.base + i * a.row;
  const char* bk = b.base;
  for (i64 s0 = 0; s0 < depth; s0 += sub) {
    const i64 s1 = depth - s0 < sub ? depth : s0 + sub;
    __m256 acc[Rows][2];
#pragma GCC unroll 6
    for (int i = 0; i < Rows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (i64 k = s0; k < s1; ++k) {
      __m256 b0, b1;
      load_b<Bf16>(bk, b0, b1);
      bk += b.step;
#pragma GCC unroll 6
      for (int i = 0; i < Rows; ++i) {
        const __m256 x = _mm256_broadcast_ss(reinterpret_cast<const float*>(ar[i]));
        ar[i] += a.step;
        acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
      }
    }
    if (s0 == 0 && s1 == depth) {  // one register block: straight to c
#pragma GCC unroll 6
      for (int i = 0; i < Rows; ++i)
        for (int j = 0; j < 2; ++j) store_c(c + i * ldc + 8 * j, full[j], mask[j], acc[i][j], accumulate);
      return;
    }
#pragma GCC unroll 6
    for (int i = 0; i < Rows; ++i)
      for (int j = 0; j < 2; ++j) {
        float* pij = &part[i][8 * j];
        _mm256_store_ps(pij, s0 == 0 ? acc[i][j] : _mm256_add_ps(_mm256_load_ps(pij), acc[i][j]));
      }
  }
#pragma GCC unroll 6
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < 2; ++j) store_c(c + i * ldc + 8 * j, full[j], mask[j], _mm256_load_ps(&part[i][8 * j]), accumulate);
}

template <bool Bf16>
void micro_rows(i64 rows, AView a, BView b, i64 depth, i64 sub, float* c, i64 ldc, i64 cols, bool accumulate) {
  switch (rows) {
    case 6: micro<Bf16, 6>(a, b, depth, sub, c, ldc, cols, accumulate); break;
    case 5: micro<Bf16, 5>(a, b, depth, sub, c, ldc, cols, accumulate); break;
    case 4: micro<Bf16, 4>(a, b, depth, sub, c, ldc, cols, accumulate); break;
    case 3: micro<Bf16, 3>(a, b, depth, sub, c, ldc, cols, accumulate); break;
    case 2: micro<Bf16, 2>(a, b, depth, sub, c, ldc, cols, accumulate); break;
    default: micro<Bf16, 1>(a, b, depth, sub, c, ldc, cols, accumulate); break;
  }
}

inline float widen(u16 x) {
  const u32 bits = static_cast<u32>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Micro panel p of bfloat16 a over K values [k0, k0 + depth), widened into ap[k][MR] (zero past the last row).
void pack_a(const Operand& a, i64 p, i64 k0, i64 depth, float* ap) {
  const i64 r0 = p * kMR;
  for (i64 i = 0; i < kMR; ++i) {
    const i64 r = r0 + i;
    if (r >= a.rows) {
      for (i64 k = 0; k < depth; ++k) ap[k * kMR + i] = 0.0f;
    } else if (a.s1 == 1) {
      const u16* row = reinterpret_cast<const u16*>(a.at(r, k0));
      for (i64 k = 0; k < depth; ++k) ap[k * kMR + i] = widen(row[k]);
    } else {
      for (i64 k = 0; k < depth; ++k) {
        u16 x;
        std::memcpy(&x, a.at(r, k0 + k), 2);
        ap[k * kMR + i] = widen(x);
      }
    }
  }
}

// The 16 columns n0.. of b (rows n0.. of bt) over K values [k0, k0 + depth) into tile[k][16] in b's dtype T,
// zero past the last column.
template <typename T>
void pack_b(const Operand& bt, i64 n0, i64 k0, i64 depth, T* tile) {
  if (bt.s0 == 1) {  // k-major (dZ, W): 16 consecutive columns per k
    const i64 live = bt.rows - n0 < kNR ? bt.rows - n0 : kNR;
    for (i64 k = 0; k < depth; ++k) {
      std::memcpy(tile + k * kNR, bt.at(n0, k0 + k), static_cast<std::size_t>(live) * sizeof(T));
      for (i64 i = live; i < kNR; ++i) tile[k * kNR + i] = 0;
    }
    return;
  }
  for (i64 i = 0; i < kNR; ++i) {
    const i64 r = n0 + i;
    if (r >= bt.rows) {
      for (i64 k = 0; k < depth; ++k) tile[k * kNR + i] = 0;
    } else if (bt.s1 == 1) {  // K-contiguous (W^T in the logits)
      const T* row = reinterpret_cast<const T*>(bt.at(r, k0));
      for (i64 k = 0; k < depth; ++k) tile[k * kNR + i] = row[k];
    } else {
      for (i64 k = 0; k < depth; ++k) std::memcpy(&tile[k * kNR + i], bt.at(r, k0 + k), sizeof(T));
    }
  }
}

template <bool Bf16>
void gemm(const Operand& a, const Operand& bt, float* c, i64 ldc, bool accumulate, int nt) {
  using T = std::conditional_t<Bf16, u16, u32>;
  constexpr i64 elt = sizeof(T);
  const i64 m = a.rows, n = bt.rows, kdim = a.cols;
  const i64 kblocks = (kdim + kKC - 1) / kKC, kc = (kdim + kblocks - 1) / kblocks;
  const i64 panels = (m + kMR - 1) / kMR;
  const i64 sub = kdim > kOneSum ? kSub : kc;
  i64 nc = kBBytes / (kc * elt * kNR) * kNR;
  nc = nc < 4 * kNR ? 4 * kNR : nc;
  nc = nc < n ? nc : (n + kNR - 1) / kNR * kNR;
  std::vector<float> ap(Bf16 ? static_cast<std::size_t>(panels * kc * kMR) : 0);
  std::vector<T> bp(static_cast<std::size_t>(nc * kc));
#pragma omp parallel num_threads(nt)
  for (i64 k0 = 0; k0 < kdim; k0 += kc) {
    const i64 depth = kdim - k0 < kc ? kdim - k0 : kc;
    if constexpr (Bf16) {
#pragma omp for schedule(static)
      for (i64 p = 0; p < panels; ++p) pack_a(a, p, k0, depth, ap.data() + p * depth * kMR);
    }
    const bool acc = accumulate || k0 > 0;
    for (i64 n0 = 0; n0 < n; n0 += nc) {
      const i64 nb = n - n0 < nc ? n - n0 : nc, tiles = (nb + kNR - 1) / kNR;
#pragma omp for schedule(static)
      for (i64 t = 0; t < tiles; ++t) pack_b<T>(bt, n0 + t * kNR, k0, depth, bp.data() + t * depth * kNR);
#pragma omp for schedule(static)
      for (i64 p = 0; p < panels; ++p) {
        const i64 r0 = p * kMR, rows = m - r0 < kMR ? m - r0 : kMR;
        const AView ai = Bf16 ? AView{reinterpret_cast<const char*>(ap.data() + p * depth * kMR), 4, 4 * kMR}
                              : AView{a.at(r0, k0), a.s0 * 4, a.s1 * 4};
        for (i64 t = 0; t < tiles; ++t) {
          const i64 j0 = t * kNR, cols = nb - j0 < kNR ? nb - j0 : kNR;
          const BView bv{reinterpret_cast<const char*>(bp.data() + t * depth * kNR), kNR * elt};
          micro_rows<Bf16>(rows, ai, bv, depth, sub, c + r0 * ldc + n0 + j0, ldc, cols, acc);
        }
      }
    }
  }
}

}  // namespace

void gemm_avx2(const Operand& a, const Operand& bt, float* c, i64 ldc, bool accumulate, int nt) {
  if (a.bf16) {
    gemm<true>(a, bt, c, ldc, accumulate, nt);
  } else {
    gemm<false>(a, bt, c, ldc, accumulate, nt);
  }
}

bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#else
void gemm_avx2(const Operand&, const Operand&, float*, i64, bool, int) {}
bool has_avx2() { return false; }
#endif

}  // namespace gemm_detail
}  // namespace answer_logprobs
}  // namespace radit
