// c (+)= a @ b on the CPU for the three products of answer_logprobs' blocked driver, float32 or bfloat16 inputs
// with float32 accumulation and a float32 c, on CPUs with AVX-512 (AVX512-BF16 for bfloat16) or AVX2:
//   logits          z     = H_r @ W_c^T   (b = W_c^T: K-contiguous columns)
//   grad_hidden     gh    = dZ @ W_c      (b = W_c: rows of N contiguous values, "k-major")
//   grad_weight     gw    = dZ^T @ H_r    (float32: a = dZ^T, k-major; b = H_r, k-major)
//                   gw^T  = H_r^T @ dZ    (bfloat16: a = H_r^T, b = dZ, both k-major; transpose_cpu at the end)
// Why not torch.mm: on CPU it calls MKL's sgemm for float32, which runs at an AVX2 rate on non-Intel CPUs (about
// 90 GFLOP/s per core on the AMD EPYC this project is measured on, where this kernel runs about 220), and for
// bfloat16 it writes the products in bfloat16 (aten::mm.dtype has no CPU kernel in torch 2.13), a 2^-9 relative
// rounding of every logit.
//
// Scheme (GotoBLAS-style, one micro kernel for both dtypes; a "lane" is 32 bits: one float32, or one pair of
// bfloat16 along K that vdpbf16ps multiplies with a pair of the other operand and adds into one float32):
//   * b is cut into blocks of KC lanes of K x NC >= 256 columns (as many as fit in kBBytes). A block is packed
//     into 16-column tiles bp[tile][q][16] (zero beyond N and K): K-contiguous columns by a transposing loop,
//     k-major rows by vector copies (float32) or by interleaving two rows (bfloat16 pairs). Float32 k-major b
//     whose K block fits in kDirectBytes (W in dZ @ W: packing it per row chunk would copy all of W) is read in
//     place instead.
//   * a is read in place when its rows hold K contiguous values (bfloat16: K even, so adjacent pairs are lanes),
//     one 32-bit broadcast per row and lane; other layouts (k-major a: dZ^T, H^T) are packed once per call into
//     micro panels ap[panel][q][MR].
//   * Micro tile MR x NR = 6 x 64 float32 accumulators (24 zmm registers); per lane 4 vector loads of b,
//     6 broadcasts of a, 24 FMAs (float32) or vdpbf16ps (bfloat16). Only a tile narrower than 64 columns uses
//     masked loads (they cost ~20% in the loop on Zen 4). A K of several blocks is summed in three levels (64
//     lanes in registers, their sums in an L1 tile, K blocks in c): as accurate as MKL's sgemm (see micro).
//   * Threads (OpenMP) split each packed block's tiles, then the row panels of a; every c entry is computed by
//     one thread, in the same K order on every run, so the result does not depend on the thread count.
// CPUs with AVX2 and FMA but not the AVX-512 set a dtype needs run the AVX2 kernel of gemm_avx2_cpu.cpp instead
// (gemm_cpu_isa names the one that runs). Without either (checked at run time with __builtin_cpu_supports) the
// entry points raise; Python asks gemm_cpu_isa() first and keeps torch.mm otherwise.
#include "answer_logprobs/answer_logprobs.h"

#include "answer_logprobs/gemm_cpu.h"
#include "common/radit_math.h"

#include <string>
#include <vector>

namespace radit {
namespace answer_logprobs {

namespace gemm_detail {
bool has_avx512(bool bf16) {
#if RADIT_HAVE_GEMM_KERNEL
  static const bool f32 = [] {  // probed once
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  static const bool bf = f32 && __builtin_cpu_supports("avx512bf16");
  return bf16 ? bf : f32;
#else
  (void)bf16;
  return false;
#endif
}
}  // namespace gemm_detail

const char* gemm_cpu_isa(bool bf16) {
  return gemm_detail::has_avx512(bf16) ? "avx512" : (gemm_detail::has_avx2() ? "avx2" : "");
}

bool gemm_cpu_supported(bool bf16) { return gemm_cpu_isa(bf16)[0] != '\0'; }

#if RADIT_HAVE_GEMM_KERNEL
namespace {

using namespace gemm_detail;

constexpr i64 kMR = 6;    // rows of a per micro panel
constexpr i64 kNR = 64;   // columns of c per micro tile (4 vectors of 16 float32)
constexpr i64 kNC = 256;  // columns of b per packed block, at least
constexpr i64 kBBytes = 320 << 10;  // bytes of a packed block of b, at most (when wider than kNC)
constexpr i64 kDirectBytes = 2 << 20;  // float32 k-major b is read in place when a K block of it is this small
constexpr i64 kSub = 64;  // lanes summed in registers before they are added to the tile's running sum
constexpr i64 kKC = 640;  // lanes of K per block (576 float32 = SmolLM2's d is one block; 640 x 256 x 4 B in L2)

// a as 32-bit lanes: lane (i, q) of the micro panel p at base + p * panel + i * row + q * lane bytes.
struct AView {
  const char* base;
  i64 row, lane, panel;
};

// b for one micro tile: vector t (16 columns) of lane q at base + t * tile + q * lane (in 32-bit units), the
// columns past `cols` masked off.
struct BView {
  const u32* base;
  i64 tile, lane;
};

// c[0:16] (masked) = v, or c + v with accumulate.
RADIT_AVX512 inline void store_c(float* c, __mmask16 mask, __m512 v, bool accumulate) {
  _mm512_mask_storeu_ps(c, mask, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), v) : v);
}

// c[rows, cols] (+)= one micro panel of a x one micro tile of b (cols <= 64, rows <= MR); Masked: cols < 64.
template <bool Bf16, bool Masked, int Rows>
RADIT_AVX512 void micro(AView a, BView b, i64 lanes, i64 sub, float* c, i64 ldc, i64 cols, bool accumulate) {
  __mmask16 mask[4];
  for (int j = 0; j < 4; ++j) {
    const i64 left = cols - 16 * j;
    mask[j] = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : (left > 0 ? static_cast<__mmask16>((1u << left) - 1u) : static_cast<__mmask16>(0));
  }
  // Summation in three levels when K spans several blocks: the registers sum `sub` lanes, `part` (L1) sums
  // those sums, and c the K blocks. One sequential float32 sum over a long K (dZ @ W: K = V) lets one large term
  // (the target's 1 - p) swamp the rounding of every later small one; measured on SmolLM2's Trainer step, a
  // 640-lane sequential sum made the last layer's norm-weight gradient 3x less accurate than MKL's, this one
  // more accurate. A K of one block (the logits: K = d) is one sequential sum, as in a vendor GEMM.
  alignas(64) float part[Rows][kNR];
  const char* ar[Rows];
#pragma GCC unroll 6
  for (int i = 0; i < Rows; ++i) ar[i] = a.base + i * a.row;
  const u32* b0 = b.base;
  for (i64 s0 = 0; s0 < lanes; s0 += sub) {
    const i64 s1 = lanes - s0 < sub ? lanes : s0 + sub;
    __m512 acc[Rows][4];
#pragma GCC unroll 6
    for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    for (i64 q = s0; q < s1; ++q) {
      __m512i v0, v1, v2, v3;
      if constexpr (Masked) {  // columns past cols may lie past the end of an operand read in place
        v0 = _mm512_maskz_loadu_epi32(mask[0], b0);
        v1 = _mm512_maskz_loadu_epi32(mask[1], b0 + b.tile);
        v2 = _mm512_maskz_loadu_epi32(mask[2], b0 + 2 * b.tile);
        v3 = _mm512_maskz_loadu_epi32(mask[3], b0 + 3 * b.tile);
      } else {
        v0 = _mm512_loadu_si512(b0);
        v1 = _mm512_loadu_si512(b0 + b.tile);
        v2 = _mm512_loadu_si512(b0 + 2 * b.tile);
        v3 = _mm512_loadu_si512(b0 + 3 * b.tile);
      }
      b0 += b.lane;
#pragma GCC unroll 6
      for (int i = 0; i < Rows; ++i) {
        const __m512i x = _mm512_set1_epi32(static_cast<int>(load32(ar[i])));
        ar[i] += a.lane;
        if constexpr (Bf16) {
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)x, (__m512bh)v0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)x, (__m512bh)v1);
          acc[i][2] = _mm512_dpbf16_ps(acc[i][2], (__m512bh)x, (__m512bh)v2);
          acc[i][3] = _mm512_dpbf16_ps(acc[i][3], (__m512bh)x, (__m512bh)v3);
        } else {
          const __m512 xf = _mm512_castsi512_ps(x);
          acc[i][0] = _mm512_fmadd_ps(xf, _mm512_castsi512_ps(v0), acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(xf, _mm512_castsi512_ps(v1), acc[i][1]);
          acc[i][2] = _mm512_fmadd_ps(xf, _mm512_castsi512_ps(v2), acc[i][2]);
          acc[i][3] = _mm512_fmadd_ps(xf, _mm512_castsi512_ps(v3), acc[i][3]);
        }
      }
    }
    if (s0 == 0 && s1 == lanes) {  // one register block: straight to c
#pragma GCC unroll 6
      for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) store_c(c + i * ldc + 16 * j, mask[j], acc[i][j], accumulate);
      return;
    }
#pragma GCC unroll 6
    for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        float* pij = &part[i][16 * j];
        _mm512_store_ps(pij, s0 == 0 ? acc[i][j] : _mm512_add_ps(_mm512_load_ps(pij), acc[i][j]));
      }
  }
#pragma GCC unroll 6
  for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) store_c(c + i * ldc + 16 * j, mask[j], _mm512_load_ps(&part[i][16 * j]), accumulate);
}

template <bool Bf16, bool Masked>
void micro_rows(i64 rows, AView a, BView b, i64 lanes, i64 sub, float* c, i64 ldc, i64 cols, bool accumulate) {
  switch (rows) {
    case 6: micro<Bf16, Masked, 6>(a, b, lanes, sub, c, ldc, cols, accumulate); break;
    case 5: micro<Bf16, Masked, 5>(a, b, lanes, sub, c, ldc, cols, accumulate); break;
    case 4: micro<Bf16, Masked, 4>(a, b, lanes, sub, c, ldc, cols, accumulate); break;
    case 3: micro<Bf16, Masked, 3>(a, b, lanes, sub, c, ldc, cols, accumulate); break;
    case 2: micro<Bf16, Masked, 2>(a, b, lanes, sub, c, ldc, cols, accumulate); break;
    default: micro<Bf16, Masked, 1>(a, b, lanes, sub, c, ldc, cols, accumulate); break;
  }
}

// Tiles [t0, t1) of the block of b^T (rows n0.., lanes q0..q0 + lanes) into bp[t][q][16], zero past the end.
// bt is b viewed as [N, K] (row = column of b). The two common layouts get their own loops.
RADIT_AVX512 void pack_b(const Operand& bt, i64 n0, i64 q0, i64 lanes, i64 t0, i64 t1, u32* bp) {
  for (i64 t = t0; t < t1; ++t) {
    u32* tile = bp + t * lanes * 16;
    const i64 r0 = n0 + 16 * t;
    const i64 live = bt.rows - r0 < 16 ? (bt.rows - r0 > 0 ? bt.rows - r0 : 0) : 16;
    if (bt.bf16 && bt.s0 == 1 && live > 0) {  // k-major bfloat16: interleave two rows of 16 columns per lane
      const __mmask16 m = static_cast<__mmask16>(live >= 16 ? 0xFFFF : (1u << live) - 1u);
      const u16* src = reinterpret_cast<const u16*>(bt.data) + r0;
      for (i64 q = 0; q < lanes; ++q) {
        const i64 k = 2 * (q0 + q);
        const __m256i lo = k < bt.cols ? _mm256_maskz_loadu_epi16(m, src + k * bt.s1) : _mm256_setzero_si256();
        const __m256i hi = k + 1 < bt.cols ? _mm256_maskz_loadu_epi16(m, src + (k + 1) * bt.s1) : _mm256_setzero_si256();
        const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        _mm512_storeu_si512(tile + q * 16, w);
      }
      continue;
    }
    if (!bt.bf16 && bt.s0 == 1 && live > 0) {  // k-major float32: 16 consecutive columns per lane
      const __mmask16 m = static_cast<__mmask16>(live >= 16 ? 0xFFFF : (1u << live) - 1u);
      const float* src = reinterpret_cast<const float*>(bt.data) + r0;
      for (i64 q = 0; q < lanes; ++q) {
        const i64 k = q0 + q;
        const __m512 w = k < bt.cols ? _mm512_maskz_loadu_ps(m, src + k * bt.s1) : _mm512_setzero_ps();
        _mm512_storeu_ps(reinterpret_cast<float*>(tile + q * 16), w);
      }
      continue;
    }
    const i64 kl = bt.bf16 ? (bt.cols + 1) / 2 : bt.cols;  // lanes of K in all
    const i64 q_end = kl - q0 < lanes ? kl - q0 : lanes;
    if (bt.s1 == 1 && (!bt.bf16 || bt.cols % 2 == 0)) {  // K-contiguous rows: lane q is the 32 bits at row + 4q
      for (i64 i = 0; i < 16; ++i) {
        if (i >= live) {
          for (i64 q = 0; q < lanes; ++q) tile[q * 16 + i] = 0u;
          continue;
        }
        const char* row = bt.data + ((r0 + i) * bt.s0 + (bt.bf16 ? 2 * q0 : q0)) * bt.elt();
        for (i64 q = 0; q < q_end; ++q) tile[q * 16 + i] = load32(row + 4 * q);
        for (i64 q = q_end; q < lanes; ++q) tile[q * 16 + i] = 0u;
      }
      continue;
    }
    for (i64 i = 0; i < 16; ++i) {
      const i64 r = r0 + i;
      for (i64 q = 0; q < lanes; ++q) tile[q * 16 + i] = (i < live && q0 + q < kl) ? bt.lane(r, q0 + q) : 0u;
    }
  }
}

// Panels [p0, p1) of a (MR rows each) into ap[p][q][MR] 32-bit lanes over all of K (zero past the last row and,
// for bfloat16, past K). The k-major layout (a^T rows, s0 == 1) is read a block of 16 lanes at a time, so that
// its rows are read in order.
void pack_a(const Operand& a, i64 p0, i64 p1, i64 lanes_all, u32* ap) {
  if (a.s0 == 1 && a.rows > 1) {
    for (i64 qb = 0; qb < lanes_all; qb += 16) {
      const i64 qe = lanes_all - qb < 16 ? lanes_all : qb + 16;
      for (i64 p = p0; p < p1; ++p) {
        const i64 r0 = p * kMR, live = a.rows - r0 < kMR ? a.rows - r0 : kMR;
        for (i64 q = qb; q < qe; ++q) {
          u32* dst = ap + (p * lanes_all + q) * kMR;
          if (live < kMR) {
            for (i64 i = 0; i < kMR; ++i) dst[i] = i < live ? a.lane(r0 + i, q) : 0u;
          } else if (!a.bf16) {  // 6 consecutive float32 of row q of a^T
            std::memcpy(dst, a.data + (q * a.s1 + r0) * 4, kMR * 4);
          } else {  // rows 2q and 2q + 1 of a^T interleaved
            const u16* lo = reinterpret_cast<const u16*>(a.data) + 2 * q * a.s1 + r0;
            const u16* hi = lo + a.s1;
            const bool has_hi = 2 * q + 1 < a.cols;
            for (i64 i = 0; i < kMR; ++i) dst[i] = static_cast<u32>(lo[i]) | (has_hi ? static_cast<u32>(hi[i]) << 16 : 0u);
          }
        }
      }
    }
    return;
  }
  const bool rows_fast = a.s1 == 1 && (!a.bf16 || a.cols % 2 == 0);  // lane q of a row: the 32 bits at row + 4q
  for (i64 p = p0; p < p1; ++p) {
    const i64 r0 = p * kMR;
    u32* panel = ap + p * lanes_all * kMR;
    for (i64 i = 0; i < kMR; ++i) {
      const i64 r = r0 + i;
      if (r >= a.rows) {
        for (i64 q = 0; q < lanes_all; ++q) panel[q * kMR + i] = 0u;
      } else if (rows_fast) {
        const char* row = a.data + r * a.s0 * a.elt();
        for (i64 q = 0; q < lanes_all; ++q) panel[q * kMR + i] = load32(row + 4 * q);
      } else {
        for (i64 q = 0; q < lanes_all; ++q) panel[q * kMR + i] = a.lane(r, q);
      }
    }
  }
}

template <bool Bf16>
void gemm(const Operand& a, const Operand& bt, float* c, i64 ldc, bool accumulate, int nt) {
  const i64 m = a.rows, n = bt.rows;
  const i64 lanes_all = Bf16 ? (a.cols + 1) / 2 : a.cols;
  const i64 panels = (m + kMR - 1) / kMR;
  // b in place when it is float32 with rows of 16+ consecutive columns (k-major) and a K block of it stays in
  // cache while every panel of a sweeps it (dZ @ W: 640 rows of W, which a packing per call would copy whole);
  // else packed per block.
  const i64 klanes = lanes_all < kKC ? lanes_all : kKC;
  const bool b_direct = !Bf16 && bt.s0 == 1 && klanes * n * 4 <= kDirectBytes;
  std::vector<u32> bp;
  // Columns per block: as many 64-column tiles as keep a block of b within ~640 KB of L2 (at least NC), all of
  // them when b is read in place: every block sweeps all of a once.
  i64 nc = kBBytes / (klanes * 4 * kNR) * kNR;
  nc = b_direct ? n : (nc < kNC ? kNC : nc);
  if (!b_direct) bp.resize(static_cast<std::size_t>(((nc < n ? nc : n) + 15) / 16 * 16 * klanes));
  // a in place when its rows hold K contiguous values (lanes are 32-bit words at a fixed stride; bfloat16 needs
  // K even: as fast as packed panels here); else packed once into panels (a^T layouts: dZ^T).
  const bool in_place = a.s1 == 1 && (!Bf16 || a.cols % 2 == 0);
  std::vector<u32> ap;
  AView av{a.data, a.s0 * a.elt(), a.s1 * a.elt() * (Bf16 ? 2 : 1), kMR * a.s0 * a.elt()};
  if (!in_place) {
    ap.resize(static_cast<std::size_t>(panels * lanes_all * kMR));
    const i64 per = 64;  // panels per task
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 p = 0; p < panels; p += per) pack_a(a, p, p + per < panels ? p + per : panels, lanes_all, ap.data());
    av = AView{reinterpret_cast<const char*>(ap.data()), 4, 4 * kMR, 4 * kMR * lanes_all};
  }
  const i64 sub = lanes_all > kKC ? kSub : kKC;  // register blocks of a long K (see micro)
#pragma omp parallel num_threads(nt)
  for (i64 n0 = 0; n0 < n; n0 += nc) {
    const i64 nb = n - n0 < nc ? n - n0 : nc, tiles = (nb + 15) / 16;
    for (i64 q0 = 0; q0 < lanes_all; q0 += kKC) {
      const i64 lanes = lanes_all - q0 < kKC ? lanes_all - q0 : kKC;
      if (!b_direct) {
#pragma omp for schedule(static)
        for (i64 t = 0; t < tiles; ++t) pack_b(bt, n0, q0, lanes, t, t + 1, bp.data());
      }
      const bool acc = accumulate || q0 > 0;
#pragma omp for schedule(static)
      for (i64 p = 0; p < panels; ++p) {
        const i64 r0 = p * kMR, rows = m - r0 < kMR ? m - r0 : kMR;
        const AView ai{av.base + p * av.panel + q0 * av.lane, av.row, av.lane, av.panel};
        for (i64 j0 = 0; j0 < nb; j0 += kNR) {
          const i64 cols = nb - j0 < kNR ? nb - j0 : kNR;
          BView bv;
          if (b_direct) {
            bv = BView{reinterpret_cast<const u32*>(bt.data) + (n0 + j0) + q0 * bt.s1, 16, bt.s1};
          } else {
            bv = BView{bp.data() + (j0 / 16) * lanes * 16, lanes * 16, 16};
          }
          if (cols == kNR) {
            micro_rows<Bf16, false>(rows, ai, bv, lanes, sub, c + r0 * ldc + n0 + j0, ldc, cols, acc);
          } else {
            micro_rows<Bf16, true>(rows, ai, bv, lanes, sub, c + r0 * ldc + n0 + j0, ldc, cols, acc);
          }
        }
      }
    }
  }
}

}  // namespace
#endif

void gemm_cpu(const TensorArg& a, const TensorArg& b, const TensorArg& c, bool accumulate, int num_threads,
              const std::string& isa) {
  const char* fn = "answer_logprobs_gemm";
  check_tensor<float, Bf16>(a, fn, "a", -1, {-1, -1});
  const std::int64_t m = a.size[0], kdim = a.size[1];
  check_tensor<float, Bf16>(b, fn, "b", -1, {kdim, -1});
  const std::int64_t n = b.size[1];
  RADIT_CHECK(a.dtype == b.dtype, fn << ": a and b must have one dtype, got " << a.describe() << " and "
                                      << b.describe());
  check_tensor<float>(c, fn, "c", -1, {m, n});
  RADIT_CHECK(c.stride[1] == 1 || n <= 1, fn << ": c must have stride(1) == 1, got " << c.stride[1]);
  const bool bf16 = a.dtype == DType::kBFloat16;
  RADIT_CHECK(gemm_cpu_supported(bf16), fn << ": this CPU has neither AVX-512 nor AVX2 with FMA"
                                           << " (ask gemm_cpu_supported() first)");
  RADIT_CHECK(isa.empty() || isa == "avx2" || isa == "avx512", fn << ": isa must be '', 'avx2' or 'avx512', got '"
                                                                 << isa << "'");
  const bool avx512 = isa.empty() ? gemm_detail::has_avx512(bf16) : isa == "avx512";
  RADIT_CHECK(!avx512 || gemm_detail::has_avx512(bf16), fn << ": this CPU cannot run the avx512 kernel for "
                                                           << (bf16 ? "bfloat16" : "float32"));
  RADIT_CHECK(avx512 || gemm_detail::has_avx2(), fn << ": this CPU cannot run the avx2 kernel");
#if RADIT_HAVE_GEMM_KERNEL
  if (m == 0 || n == 0) return;
  const std::int64_t ldc = m <= 1 ? n : c.stride[0];
  float* cp = c.ptr<float>();
  if (kdim == 0) {
    if (!accumulate)
      for (std::int64_t r = 0; r < m; ++r) std::memset(cp + r * ldc, 0, static_cast<std::size_t>(n) * sizeof(float));
    return;
  }
  // Size-1 dimensions may report any stride: give them the one that makes the fast layouts apply.
  const Operand ao{static_cast<const char*>(a.data), m, kdim, m <= 1 ? kdim : a.stride[0], kdim <= 1 ? 1 : a.stride[1],
                   bf16};
  const Operand bt{static_cast<const char*>(b.data), n, kdim, n <= 1 ? 1 : b.stride[1], kdim <= 1 ? n : b.stride[0],
                   bf16};
  const int nt = num_threads < 1 ? 1 : num_threads;
  if (!avx512) {
    gemm_detail::gemm_avx2(ao, bt, cp, ldc, accumulate, nt);
  } else if (bf16) {
    gemm<true>(ao, bt, cp, ldc, accumulate, nt);
  } else {
    gemm<false>(ao, bt, cp, ldc, accumulate, nt);
  }
#else
  (void)accumulate;
  (void)num_threads;
#endif
}

#if RADIT_HAVE_GEMM_KERNEL
namespace {

// out[c][0..16) = in[0..16)[c] for a 16 x 16 block (in rows s0 apart, out rows ld apart), bfloat16 or float32 out.
template <bool ToBf16>
RADIT_AVX512 void transpose16(const float* in, i64 s0, void* out, i64 ld) {
  __m512 r[16], a[16], b[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * s0);
  for (int k = 0; k < 8; ++k) {
    a[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // b[4k + m], 128-bit lane l: rows 4k..4k+3 of column 4l + m
    const __m512d a0 = _mm512_castps_pd(a[4 * k]), a1 = _mm512_castps_pd(a[4 * k + 1]);
    const __m512d a2 = _mm512_castps_pd(a[4 * k + 2]), a3 = _mm512_castps_pd(a[4 * k + 3]);
    b[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    b[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    b[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    b[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 e_lo = _mm512_shuffle_f32x4(b[m], b[4 + m], 0x44), e_hi = _mm512_shuffle_f32x4(b[m], b[4 + m], 0xEE);
    const __m512 f_lo = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0x44);
    const __m512 f_hi = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0xEE);
    const __m512 cols[4] = {_mm512_shuffle_f32x4(e_lo, f_lo, 0x88), _mm512_shuffle_f32x4(e_lo, f_lo, 0xDD),
                            _mm512_shuffle_f32x4(e_hi, f_hi, 0x88), _mm512_shuffle_f32x4(e_hi, f_hi, 0xDD)};
    for (int l = 0; l < 4; ++l) {
      const i64 c = 4 * l + m;
      if constexpr (ToBf16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<u16*>(out) + c * ld),
                            (__m256i)_mm512_cvtneps_pbh(cols[l]));
      } else {
        _mm512_storeu_ps(static_cast<float*>(out) + c * ld, cols[l]);
      }
    }
  }
}

}  // namespace
#endif

void transpose_cpu(const TensorArg& src, const TensorArg& dst, int num_threads) {
  const char* fn = "answer_logprobs_transpose";
  check_tensor<float>(src, fn, "src", -1, {-1, -1});
  const std::int64_t rows = src.size[0], cols = src.size[1];
  check_tensor<float, Bf16>(dst, fn, "dst", -1, {cols, rows});
  RADIT_CHECK(dst.stride[1] == 1 || rows <= 1, fn << ": dst must have stride(1) == 1, got " << dst.stride[1]);
  const bool bf16 = dst.dtype == DType::kBFloat16;
  RADIT_CHECK(gemm_cpu_supported(bf16), fn << ": this CPU has neither AVX-512 nor AVX2 with FMA"
                                           << " (ask gemm_cpu_supported() first)");
#if RADIT_HAVE_GEMM_KERNEL
  const std::int64_t s0 = rows <= 1 ? cols : src.stride[0], s1 = cols <= 1 ? 1 : src.stride[1];
  const std::int64_t ld = cols <= 1 ? rows : dst.stride[0];
  const float* in = src.ptr<const float>();
  constexpr std::int64_t kTile = 64;  // 64 x 64 tiles of src, as 16 x 16 register blocks where whole
  const std::int64_t tr = (rows + kTile - 1) / kTile, tc = (cols + kTile - 1) / kTile;
  const int nt = num_threads < 1 ? 1 : num_threads;
  const bool registers = s1 == 1 && gemm_detail::has_avx512(bf16);  // 16 x 16 blocks in zmm registers
#pragma omp parallel for num_threads(nt) schedule(static)
  for (std::int64_t t = 0; t < tr * tc; ++t) {
    const std::int64_t r0 = (t % tr) * kTile, c0 = (t / tr) * kTile;
    const std::int64_t r1 = r0 + kTile < rows ? r0 + kTile : rows, c1 = c0 + kTile < cols ? c0 + kTile : cols;
    for (std::int64_t rb = r0; rb < r1; rb += 16) {
      for (std::int64_t cb = c0; cb < c1; cb += 16) {
        if (registers && rb + 16 <= r1 && cb + 16 <= c1) {
          if (bf16) {
            transpose16<true>(in + rb * s0 + cb, s0, dst.ptr<Bf16>() + cb * ld + rb, ld);
          } else {
            transpose16<false>(in + rb * s0 + cb, s0, dst.ptr<float>() + cb * ld + rb, ld);
          }
          continue;
        }
        const std::int64_t re = rb + 16 < r1 ? rb + 16 : r1, ce = cb + 16 < c1 ? cb + 16 : c1;
        for (std::int64_t c = cb; c < ce; ++c) {
          for (std::int64_t r = rb; r < re; ++r) {
            const float x = in[r * s0 + c * s1];
            if (bf16) {
              dst.ptr<Bf16>()[c * ld + r].x = float_to_bf16(x);
            } else {
              dst.ptr<float>()[c * ld + r] = x;
            }
          }
        }
      }
    }
  }
#else
  (void)num_threads;
#endif
}

}  // namespace answer_logprobs
}  // namespace radit
