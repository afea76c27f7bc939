// Python bindings of radit_fast._C: declarations and docstrings only. Each op's entry points live in
// csrc/<op>/<op>.h and check their own arguments. Pointers travel as integers (tensor.data_ptr()),
// so the module does not link libtorch and works across torch versions.
#include <pybind11/pybind11.h>

#include "answer_logprobs/answer_logprobs.h"
#include "ensemble/ensemble.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "radit_fast native kernels (CPU, and CUDA when built with it)";
  m.attr("__version__") = RADIT_VERSION;
#ifdef RADIT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  // ---- BEGIN answer_logprobs (owned by csrc/answer_logprobs) ----
  // ---- END answer_logprobs ----

  // ---- BEGIN ensemble (owned by csrc/ensemble) ----
  // ---- END ensemble ----
}
