// pybind11 conversion of a Python (data_ptr, dtype code, sizes, strides, device) tuple, or None, into a
// radit::TensorArg (common/tensor.h). Included by csrc/bindings.cpp only. A plain tuple converts in well under a
// microsecond, which matters for the small [B, k] ops called once per decoded token; a malformed tuple raises
// ValueError naming what is wrong.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/tensor.h"

namespace pybind11 {
namespace detail {

template <>
struct type_caster<radit::TensorArg> {
  PYBIND11_TYPE_CASTER(radit::TensorArg, const_name("TensorArg"));

  bool load(handle src, bool /*convert*/) {
    if (src.is_none()) {
      value = radit::TensorArg();
      return true;
    }
    PyObject* o = src.ptr();
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 5) return false;
    const unsigned long long ptr = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(o, 0));
    const long code = PyLong_AsLong(PyTuple_GET_ITEM(o, 1));
    const long device = PyLong_AsLong(PyTuple_GET_ITEM(o, 4));
    if (PyErr_Occurred()) throw error_already_set();
    PyObject* sizes = PyTuple_GET_ITEM(o, 2);
    PyObject* strides = PyTuple_GET_ITEM(o, 3);
    RADIT_CHECK(PyTuple_Check(sizes) && PyTuple_Check(strides) && PyTuple_GET_SIZE(sizes) == PyTuple_GET_SIZE(strides),
                "TensorArg: sizes and strides must be tuples of one length");
    const Py_ssize_t n = PyTuple_GET_SIZE(sizes);
    RADIT_CHECK(n >= 1 && n <= radit::TensorArg::kMaxDims,
                "TensorArg: 1 to " << radit::TensorArg::kMaxDims << " dimensions, got " << n);
    std::int64_t sz[radit::TensorArg::kMaxDims], st[radit::TensorArg::kMaxDims];
    for (Py_ssize_t i = 0; i < n; ++i) {
      sz[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(sizes, i));
      st[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides, i));
    }
    if (PyErr_Occurred()) throw error_already_set();
    value = radit::TensorArg(ptr, static_cast<int>(code), static_cast<int>(n), sz, st, static_cast<int>(device));
    return true;
  }

  static handle cast(const radit::TensorArg&, return_value_policy, handle) {
    return none().release();  // never returned to Python
  }
};

}  // namespace detail
}  // namespace pybind11
