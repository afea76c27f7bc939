// Internal to the native GEMM of answer_logprobs' CPU driver: what gemm_cpu.cpp (the entry points, the AVX-512
// kernel) and gemm_avx2_cpu.cpp (the AVX2 + FMA kernel) share. The public declarations are in answer_logprobs.h.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define RADIT_HAVE_GEMM_KERNEL 1
#include <immintrin.h>
#define RADIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define RADIT_AVX2 __attribute__((target("avx2,fma")))
#else
#define RADIT_HAVE_GEMM_KERNEL 0
#endif

namespace radit {
namespace answer_logprobs {
namespace gemm_detail {

using i64 = std::int64_t;
using u32 = std::uint32_t;
using u16 = std::uint16_t;

inline u32 load32(const char* p) {
  u32 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// An operand as 2-D strided elements of 4 (float32) or 2 (bfloat16) bytes.
struct Operand {
  const char* data;
  i64 rows, cols, s0, s1;  // element (r, k) at data + (r * s0 + k * s1) * elt
  bool bf16;
  i64 elt() const { return bf16 ? 2 : 4; }
  const char* at(i64 r, i64 k) const { return data + (r * s0 + k * s1) * elt(); }
  // Lane q of row r: the float32 element (r, q), or the bfloat16 pair (r, 2q), (r, 2q + 1) (0 past the end).
  u32 lane(i64 r, i64 q) const {
    if (!bf16) return load32(at(r, q));
    u16 lo, hi = 0;
    std::memcpy(&lo, at(r, 2 * q), 2);
    if (2 * q + 1 < cols) std::memcpy(&hi, at(r, 2 * q + 1), 2);
    return static_cast<u32>(lo) | (static_cast<u32>(hi) << 16);
  }
};

// The instruction sets of the two kernels, probed once at run time.
bool has_avx512(bool bf16);
bool has_avx2();

// c [M, N] (ldc) (+)= a [M, K] @ bt^T (bt: b viewed as [N, K]) with the AVX2 + FMA kernel (gemm_avx2_cpu.cpp).
void gemm_avx2(const Operand& a, const Operand& bt, float* c, i64 ldc, bool accumulate, int nt);

}  // namespace gemm_detail
}  // namespace answer_logprobs
}  // namespace radit
