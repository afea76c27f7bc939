// C = A @ B^T with bfloat16 A [M, K], B [N, K] and a float32 C [M, N]: the logits GEMM of answer_logprobs'
// blocked driver on CPUs with AVX512-BF16, which torch does not offer (torch.mm on CPU writes bf16 x bf16 products
// in bfloat16: aten::mm.dtype has no CPU kernel in torch 2.13). Keeping the logits in float32 removes the 2^-9
// relative rounding of every logit that a bfloat16 block carries into lse and log p.
//
// Scheme (a small GotoBLAS-style kernel; the vdpbf16ps instruction multiplies pairs of bfloat16 along K and adds
// both products into one float32 lane):
//   * A is packed once per call into pairs: Ap[m / MR][k / 2][MR] of 32-bit (a[m, k], a[m, k + 1]), the rows of
//     a micro panel side by side, zero-padded to whole panels and an even K.
//   * B is cut into blocks of NC rows (vocabulary entries); each thread packs its block into
//     Bp[n / 16][k / 2][16][2] (16 consecutive n of one k pair = one 64-byte vector) and then sweeps every
//     micro panel of A over it: MR x NR = 6 x 64 float32 accumulators (24 zmm registers), per k pair 4 vector
//     loads of B, 6 broadcasts of A, 24 vdpbf16ps.
//   * Threads take blocks of B (OpenMP, static): every C entry is written by one thread, in the same order of K
//     on every run (the result does not depend on the thread count).
// Accumulation is float32 inside the instruction (bfloat16 products are exact in float32), in K order by pairs.
// Without AVX512-BF16 (checked at run time with __builtin_cpu_supports) the entry point raises; Python asks
// mm_bf16_f32_supported() first and keeps torch.mm otherwise.
#include "answer_logprobs/answer_logprobs.h"

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define RADIT_HAVE_BF16_KERNEL 1
#include <immintrin.h>
#define RADIT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define RADIT_HAVE_BF16_KERNEL 0
#endif

namespace radit {
namespace answer_logprobs {

bool mm_bf16_f32_supported() {
#if RADIT_HAVE_BF16_KERNEL
  static const bool supported = [] {  // probed once: every block's call checks it
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return supported;
#else
  return false;
#endif
}

#if RADIT_HAVE_BF16_KERNEL
namespace {

constexpr std::int64_t kMR = 6;   // rows of A per micro panel
constexpr std::int64_t kNR = 64;  // columns of C per micro tile (4 vectors of 16 float32)
constexpr std::int64_t kNC = 256; // rows of B per packed block (4 micro tiles; 256 x K bf16 stays in L2)

inline std::uint32_t pair(const std::uint16_t* row, std::int64_t k, std::int64_t kdim) {
  const std::uint32_t lo = row[k];
  const std::uint32_t hi = k + 1 < kdim ? row[k + 1] : 0u;
  return lo | (hi << 16);
}

// The rows of src [rows, K] in tiles of `width` rows, each tile as dst[t][k / 2][width] 32-bit pairs
// (src[t * width + i, k], src[t * width + i, k + 1]): A's micro panels (width MR) and B's 16-row vectors
// (width 16). Rows past `rows` and the k + 1 past an odd K are zero.
void pack_pairs(const std::uint16_t* src, std::int64_t ld, std::int64_t rows, std::int64_t kdim,
                std::int64_t width, std::uint32_t* dst) {
  const std::int64_t kp = (kdim + 1) / 2, tiles = (rows + width - 1) / width;
  for (std::int64_t t = 0; t < tiles; ++t) {
    std::uint32_t* tile = dst + t * kp * width;
    for (std::int64_t i = 0; i < width; ++i) {
      const std::int64_t r = t * width + i;
      if (r >= rows) {
        for (std::int64_t q = 0; q < kp; ++q) tile[q * width + i] = 0u;
        continue;
      }
      const std::uint16_t* row = src + r * ld;
      for (std::int64_t q = 0; q < kp; ++q) tile[q * width + i] = pair(row, 2 * q, kdim);
    }
  }
}

// C[rows, cols] = one micro panel of A x up to 4 packed 16-column tiles of B (cols <= 64, rows <= MR).
template <int Rows>
RADIT_AVX512BF16 void micro(const std::uint32_t* ap, const std::uint32_t* bp, std::int64_t kp,
                            std::int64_t tile_stride, float* c, std::int64_t ldc, std::int64_t cols) {
  __m512 acc[Rows][4];
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const std::uint32_t* b0 = bp;
  const std::uint32_t* b1 = bp + tile_stride;
  const std::uint32_t* b2 = bp + 2 * tile_stride;
  const std::uint32_t* b3 = bp + 3 * tile_stride;
  for (std::int64_t q = 0; q < kp; ++q) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + q * 16);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(b1 + q * 16);
    const __m512bh v2 = (__m512bh)_mm512_loadu_si512(b2 + q * 16);
    const __m512bh v3 = (__m512bh)_mm512_loadu_si512(b3 + q * 16);
    const std::uint32_t* aq = ap + q * kMR;
    for (int i = 0; i < Rows; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, v0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, v1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], x, v2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], x, v3);
    }
  }
  for (int i = 0; i < Rows; ++i) {
    float* ci = c + i * ldc;
    for (int j = 0; j < 4; ++j) {
      const std::int64_t left = cols - 16 * j;
      if (left >= 16) {
        _mm512_storeu_ps(ci + 16 * j, acc[i][j]);
      } else if (left > 0) {
        _mm512_mask_storeu_ps(ci + 16 * j, static_cast<__mmask16>((1u << left) - 1u), acc[i][j]);
      }
    }
  }
}

RADIT_AVX512BF16 void micro_rows(std::int64_t rows, const std::uint32_t* ap, const std::uint32_t* bp,
                                 std::int64_t kp, std::int64_t tile_stride, float* c, std::int64_t ldc,
                                 std::int64_t cols) {
  switch (rows) {
    case 6: micro<6>(ap, bp, kp, tile_stride, c, ldc, cols); break;
    case 5: micro<5>(ap, bp, kp, tile_stride, c, ldc, cols); break;
    case 4: micro<4>(ap, bp, kp, tile_stride, c, ldc, cols); break;
    case 3: micro<3>(ap, bp, kp, tile_stride, c, ldc, cols); break;
    case 2: micro<2>(ap, bp, kp, tile_stride, c, ldc, cols); break;
    default: micro<1>(ap, bp, kp, tile_stride, c, ldc, cols); break;
  }
}

}  // namespace
#endif

void mm_bf16_f32_cpu(const TensorArg& a, const TensorArg& b, const TensorArg& c, int num_threads) {
  const char* fn = "mm_bf16_f32";
  check_tensor<Bf16>(a, fn, "a", -1, {-1, -1});
  const std::int64_t m = a.size[0], kdim = a.size[1];
  check_tensor<Bf16>(b, fn, "b", -1, {-1, kdim});
  const std::int64_t n = b.size[0];
  check_tensor<float>(c, fn, "c", -1, {m, n});
  RADIT_CHECK((a.stride[1] == 1 || kdim <= 1) && (b.stride[1] == 1 || kdim <= 1),
              fn << ": a and b must have stride(1) == 1 (rows of K contiguous values)");
  RADIT_CHECK(c.stride[1] == 1 || n <= 1, fn << ": c must have stride(1) == 1, got " << c.stride[1]);
  RADIT_CHECK(mm_bf16_f32_supported(), fn << ": this CPU has no AVX512-BF16 (ask mm_bf16_f32_supported() first)");
#if RADIT_HAVE_BF16_KERNEL
  if (m == 0 || n == 0) return;
  const std::int64_t lda = m <= 1 ? kdim : a.stride[0], ldb = n <= 1 ? kdim : b.stride[0];
  const std::int64_t ldc = m <= 1 ? n : c.stride[0];
  float* cp = c.ptr<float>();
  if (kdim == 0) {
    for (std::int64_t r = 0; r < m; ++r) std::memset(cp + r * ldc, 0, static_cast<std::size_t>(n) * sizeof(float));
    return;
  }
  const std::int64_t kp = (kdim + 1) / 2, panels = (m + kMR - 1) / kMR, blocks = (n + kNC - 1) / kNC;
  std::vector<std::uint32_t> ap(static_cast<std::size_t>(panels * kp * kMR));
  pack_pairs(a.ptr<const std::uint16_t>(), lda, m, kdim, kMR, ap.data());
  const std::uint16_t* bsrc = b.ptr<const std::uint16_t>();
  int nt = num_threads < 1 ? 1 : num_threads;
  if (nt > blocks) nt = static_cast<int>(blocks);
#pragma omp parallel num_threads(nt)
  {
    std::vector<std::uint32_t> bp(static_cast<std::size_t>(kNC / 16 * kp * 16));
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < blocks; ++blk) {
      const std::int64_t n0 = blk * kNC, nb = n - n0 < kNC ? n - n0 : kNC;
      pack_pairs(bsrc + n0 * ldb, ldb, nb, kdim, 16, bp.data());
      const std::int64_t tile_stride = kp * 16;
      for (std::int64_t p = 0; p < panels; ++p) {
        const std::int64_t r0 = p * kMR, rows = m - r0 < kMR ? m - r0 : kMR;
        for (std::int64_t j0 = 0; j0 < nb; j0 += kNR) {
          const std::int64_t cols = nb - j0 < kNR ? nb - j0 : kNR;
          // Tiles past nb are zero-padded within the block's buffer only up to the block's last 16-row tile:
          // columns beyond `cols` are computed from whatever the buffer holds and never stored.
          micro_rows(rows, ap.data() + p * kp * kMR, bp.data() + (j0 / 16) * tile_stride, kp, tile_stride,
                     cp + r0 * ldc + n0 + j0, ldc, cols);
        }
      }
    }
  }
#endif
}

}  // namespace answer_logprobs
}  // namespace radit
