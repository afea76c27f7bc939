// The one native calling convention: every tensor crosses the binding as a TensorArg (pointer, dtype, shape,
// strides in elements, device), and kernels pick their element types with one dtype switch (dispatch_dtype).
//
// Python passes radit_fast._native.tensor_arg(t) = (data_ptr, dtype code, sizes, strides, device) or None (an
// absent argument); common/tensor_caster.h converts it. The dtype codes are the DType enum below, exported to
// Python as radit_fast._C.DType, so no code number is written anywhere else.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <sstream>
#include <string>

#include "common/checks.h"
#include "common/radit_math.h"

namespace radit {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt64 = 3, kInt32 = 4, kBool = 5 };

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kInt64: return "int64";
    case DType::kInt32: return "int32";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

// C++ element type <-> DType. Bf16 and F16 are radit_math.h's 2-byte bit-pattern types (host and device).
template <class T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeOf<Bf16> { static constexpr DType value = DType::kBFloat16; };
template <> struct DTypeOf<F16> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<std::int64_t> { static constexpr DType value = DType::kInt64; };
template <> struct DTypeOf<std::int32_t> { static constexpr DType value = DType::kInt32; };
template <> struct DTypeOf<bool> { static constexpr DType value = DType::kBool; };

// A strided tensor of up to 3 dimensions. The default-constructed TensorArg (no dimensions, null data) is "absent"
// (an optional argument given as None); an empty tensor has dimensions and may have a null data pointer.
// device: -1 for host memory, else the CUDA device index.
struct TensorArg {
  static constexpr int kMaxDims = 3;
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int ndim = 0;
  std::int64_t size[kMaxDims] = {0, 0, 0};
  std::int64_t stride[kMaxDims] = {0, 0, 0};
  int device = -1;

  TensorArg() = default;
  // From the binding (common/tensor_caster.h): ndim sizes and strides (elements), a DType code.
  TensorArg(std::uint64_t ptr, int dtype_code, int dims, const std::int64_t* sizes, const std::int64_t* strides,
            int dev)
      : data(reinterpret_cast<void*>(static_cast<std::uintptr_t>(ptr))), ndim(dims), device(dev) {
    RADIT_CHECK(dtype_code >= 0 && dtype_code <= static_cast<int>(DType::kBool),
                "TensorArg: unknown dtype code " << dtype_code);
    dtype = static_cast<DType>(dtype_code);
    RADIT_CHECK(dims >= 1 && dims <= kMaxDims, "TensorArg: 1 to " << kMaxDims << " dimensions, got " << dims);
    for (int i = 0; i < dims; ++i) {
      RADIT_CHECK(sizes[i] >= 0 && strides[i] >= 0, "TensorArg: negative size or stride");
      size[i] = sizes[i];
      stride[i] = strides[i];
    }
  }

  bool present() const { return data != nullptr || ndim > 0; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= size[i];
    return n;
  }
  bool contiguous() const {
    std::int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (size[i] != 1 && stride[i] != expect) return false;
      expect *= size[i];
    }
    return true;
  }
  template <class T> T* ptr() const { return static_cast<T*>(data); }
  std::string describe() const {
    std::ostringstream os;
    os << dtype_name(dtype) << " [";
    for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << size[i];
    os << "]";
    return os.str();
  }
};

// ---- the one dtype switch: f(T{}) for the T in Ts... whose DType is dt; ValueError naming `what` otherwise ----
template <class... Ts> std::string dtype_names() {
  std::string out;
  for (const char* n : {dtype_name(DTypeOf<Ts>::value)...}) out += (out.empty() ? "" : " | ") + std::string(n);
  return out;
}

template <class... Ts, class F>
void dispatch_dtype(DType dt, const char* what, F&& f) {
  const bool done = ((dt == DTypeOf<Ts>::value ? (f(Ts{}), true) : false) || ...);
  RADIT_CHECK(done, what << ": expected dtype " << dtype_names<Ts...>() << ", got " << dtype_name(dt));
}

// The float element types every kernel reads.
#define RADIT_FLOAT_TYPES float, ::radit::Bf16, ::radit::F16

// ---- argument checks (name the argument, the expected shape and what was given) ----
// `t` is present, on `device`, has dims `ndim` with the given sizes (-1 = any), and one of the dtypes Ts.
template <class... Ts>
void check_tensor(const TensorArg& t, const char* fn, const char* name, int device,
                  std::initializer_list<std::int64_t> sizes) {
  RADIT_CHECK(t.present(), fn << ": " << name << " is missing");
  RADIT_CHECK(t.device == device, fn << ": " << name << " is on "
                                     << (t.device < 0 ? std::string("cpu") : "cuda:" + std::to_string(t.device))
                                     << " but the op runs on "
                                     << (device < 0 ? std::string("cpu") : "cuda:" + std::to_string(device)));
  RADIT_CHECK(t.ndim == static_cast<int>(sizes.size()), fn << ": " << name << " must have " << sizes.size()
                                                           << " dimensions, got " << t.describe());
  int i = 0;
  for (std::int64_t s : sizes) {
    RADIT_CHECK(s < 0 || t.size[i] == s, fn << ": " << name << " dimension " << i << " must be " << s << ", got "
                                            << t.describe());
    ++i;
  }
  const bool ok = ((t.dtype == DTypeOf<Ts>::value) || ...);
  RADIT_CHECK(ok, fn << ": " << name << " must be " << dtype_names<Ts...>() << ", got " << dtype_name(t.dtype));
}

// A contiguous 1-D float32 array of n entries on `device`.
inline void check_vector_f32(const TensorArg& t, const char* fn, const char* name, int device, std::int64_t n) {
  check_tensor<float>(t, fn, name, device, {n});
  RADIT_CHECK(n <= 1 || t.stride[0] == 1, fn << ": " << name << " must be contiguous");
}

}  // namespace radit
