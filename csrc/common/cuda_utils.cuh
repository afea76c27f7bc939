// CUDA infrastructure shared by every .cu file: the one launch check, the device guard, the raw stream and the
// grid sizing from the SM count and the occupancy the CUDA runtime reports. Errors are radit::CudaError.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/checks.h"
#include "common/tensor.h"

namespace radit {
namespace cuda {

// Throws CudaError naming `what` when err is not cudaSuccess.
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw CudaError(std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
}

// After a launch: the launch error (bad configuration, no kernel image for this GPU). Does not synchronise.
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

// Makes `device` current for the scope (kernels launch on the device of their tensors, whatever the caller's
// current device is) and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    device_ = device;
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  int device_ = 0;
};

inline cudaStream_t as_stream(std::uint64_t s) {
  return reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(s));
}

// Streaming multiprocessors of the current device.
inline int sm_count() {
  int dev = 0, n = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return n > 0 ? n : 1;
}

// Blocks of `kernel` (threads per block, dynamic shared memory) that are resident on the whole current device
// at once: SM count times the occupancy the runtime computes from the kernel's registers and shared memory.
template <class Kernel>
std::int64_t resident_blocks(Kernel kernel, int threads, std::size_t smem = 0) {
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return static_cast<std::int64_t>(per_sm > 0 ? per_sm : 1) * sm_count();
}

// The one CUDA device of a set of tensors (the absent ones skipped); ValueError naming the first that differs.
inline int common_device(const char* fn, std::initializer_list<std::pair<const char*, const TensorArg*>> ts) {
  int dev = -2;
  const char* first = nullptr;
  for (const auto& [name, t] : ts) {
    if (!t->present()) continue;
    RADIT_CHECK(t->device >= 0, fn << ": " << name << " must be a CUDA tensor");
    if (dev == -2) {
      dev = t->device;
      first = name;
    }
    RADIT_CHECK(t->device == dev, fn << ": " << name << " is on cuda:" << t->device << " but " << first
                                     << " is on cuda:" << dev);
  }
  RADIT_CHECK(dev >= 0, fn << ": no CUDA tensor given");
  return dev;
}

}  // namespace cuda
}  // namespace radit

namespace radit {
namespace cuda {

// ---- 8-element chunks of a row as float32 (the epilogues' unit of work per thread) ----
// Full, aligned chunks move as 16-byte vectors (one uint4 of bfloat16, two float4 of float32); a partial chunk
// (n < 8 valid elements) or an unaligned row moves element by element. Missing elements read as `fill`.
constexpr int kChunk = 8;

__device__ __forceinline__ void load_chunk(const float* p, float (&x)[kChunk], int n, bool vec, float fill) {
  if (vec) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    return;
  }
  RADIT_UNROLL
  for (int i = 0; i < kChunk; ++i) x[i] = i < n ? p[i] : fill;
}

__device__ __forceinline__ void load_chunk(const Bf16* p, float (&x)[kChunk], int n, bool vec, float fill) {
  if (vec) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
    RADIT_UNROLL
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
    return;
  }
  RADIT_UNROLL
  for (int i = 0; i < kChunk; ++i) x[i] = i < n ? bf16_to_float(p[i].x) : fill;
}

__device__ __forceinline__ void store_chunk(float* p, const float (&x)[kChunk], int n, bool vec) {
  if (vec) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(x[4], x[5], x[6], x[7]);
    return;
  }
  RADIT_UNROLL
  for (int i = 0; i < kChunk; ++i)
    if (i < n) p[i] = x[i];
}

__device__ __forceinline__ void store_chunk(Bf16* p, const float (&x)[kChunk], int n, bool vec) {
  if (vec) {
    unsigned w[4];
    RADIT_UNROLL
    for (int i = 0; i < 4; ++i)
      w[i] = static_cast<unsigned>(float_to_bf16(x[2 * i])) |
             (static_cast<unsigned>(float_to_bf16(x[2 * i + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    return;
  }
  RADIT_UNROLL
  for (int i = 0; i < kChunk; ++i)
    if (i < n) p[i].x = float_to_bf16(x[i]);
}

// True when every chunk of a [rows, ld]-strided array of elt-byte elements starts on a 16-byte boundary.
inline bool chunks_aligned(const void* p, std::int64_t ld, std::int64_t rows, std::size_t elt) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 &&
         (rows <= 1 || (ld * static_cast<std::int64_t>(elt)) % 16 == 0);
}

}  // namespace cuda
}  // namespace radit
