// Python bindings of radit_fast._C: declarations and docstrings only. Each op's entry points live in
// csrc/<op>/<op>.h and check their own arguments. Every tensor crosses as a TensorArg (common/tensor.h: pointer,
// dtype, shape, strides, device), built in Python by radit_fast._native.tensor_arg, so the module does not link
// libtorch and works across torch versions. CUDA entry points take the raw stream (an integer) last.
#include <pybind11/pybind11.h>

#include "answer_logprobs/answer_logprobs.h"
#include "common/checks.h"
#include "common/tensor.h"
#include "common/tensor_caster.h"
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
    } catch (const radit::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  // ---- the calling convention (csrc/common/tensor.h) ----
  py::enum_<radit::DType>(m, "DType", "Element types of the native kernels (names follow torch's dtypes).")
      .value("float32", radit::DType::kFloat32)
      .value("bfloat16", radit::DType::kBFloat16)
      .value("float16", radit::DType::kFloat16)
      .value("int64", radit::DType::kInt64)
      .value("int32", radit::DType::kInt32)
      .value("bool", radit::DType::kBool);
  m.attr("tensor_dims_max") = radit::TensorArg::kMaxDims;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  // ---- answer_logprobs (csrc/answer_logprobs/answer_logprobs.h) ----
  {
    namespace al = radit::answer_logprobs;
    m.def("answer_logprobs_fwd_block_cpu", &al::fwd_block_cpu, nogil, py::arg("z"), py::arg("col0"), py::arg("vocab"),
          py::arg("bias"), py::arg("targets"), py::arg("ignore_index"), py::arg("row_max"), py::arg("row_sum"),
          py::arg("target_logit"), py::arg("num_threads"),
          "Merge one [rows, cols] logits block (+ bias[col0:col0+cols]) into the per-row online logsumexp state "
          "(row_max, row_sum) and gather the target logit into target_logit.");
    m.def("answer_logprobs_fwd_finalize_cpu", &al::fwd_finalize_cpu, nogil, py::arg("targets"), py::arg("vocab"),
          py::arg("ignore_index"), py::arg("row_max"), py::arg("row_sum"), py::arg("target_logit"), py::arg("lse"),
          py::arg("tok"), py::arg("segment_ids"), py::arg("seg"),
          "lse = row_max + log(row_sum), tok = target_logit - lse (0 at ignore_index), per-segment sums of tok "
          "into seg when segment_ids is given; ValueError for a target outside [0, vocab).");
    m.def("answer_logprobs_bwd_block_cpu", &al::bwd_block_cpu, nogil, py::arg("z"), py::arg("col0"), py::arg("vocab"),
          py::arg("bias"), py::arg("targets"), py::arg("ignore_index"), py::arg("lse"), py::arg("grad_tok"),
          py::arg("grad_bias"), py::arg("out"), py::arg("num_threads"),
          "dz = grad_tok * (onehot(target) - softmax) of a logits block into out (or in place); column sums "
          "added to grad_bias[col0:col0+cols] when given.");
    m.def("answer_logprobs_gemm_cpu_supported", &al::gemm_cpu_supported, py::arg("bf16"),
          "True when this CPU runs answer_logprobs_gemm_cpu for the dtype (AVX-512, AVX512-BF16 or AVX2 + FMA).");
    m.def("answer_logprobs_gemm_cpu_isa", &al::gemm_cpu_isa, py::arg("bf16"),
          "The kernel answer_logprobs_gemm_cpu runs for the dtype here: 'avx512', 'avx2' or '' (none).");
    m.def("answer_logprobs_gemm_cpu", &al::gemm_cpu, nogil, py::arg("a"), py::arg("b"), py::arg("c"),
          py::arg("accumulate"), py::arg("num_threads"), py::arg("isa") = "",
          "c (+)= a @ b for float32 or bfloat16 a [M, K], b [K, N] (any strides) into float32 c [M, N]; isa '' "
          "(the best kernel here), 'avx2' or 'avx512'.");
    m.def("answer_logprobs_transpose_cpu", &al::transpose_cpu, nogil, py::arg("src"), py::arg("dst"),
          py::arg("num_threads"), "dst = src.T for float32 src [R, C] into float32 | bfloat16 dst [C, R].");
    m.def("answer_logprobs_bwd_workspace_rows", &al::bwd_workspace_rows, py::arg("rows"),
          "Rows of the float32 [rows', cols] grad_bias workspace of answer_logprobs_bwd_block_cuda.");
#ifdef RADIT_WITH_CUDA
    m.def("answer_logprobs_fwd_block_cuda", &al::fwd_block_cuda, nogil, py::arg("z"), py::arg("col0"),
          py::arg("vocab"), py::arg("bias"), py::arg("targets"), py::arg("ignore_index"), py::arg("row_max"),
          py::arg("row_sum"), py::arg("target_logit"), py::arg("stream"), "CUDA answer_logprobs_fwd_block_cpu.");
    m.def("answer_logprobs_fwd_finalize_cuda", &al::fwd_finalize_cuda, nogil, py::arg("targets"), py::arg("vocab"),
          py::arg("ignore_index"), py::arg("row_max"), py::arg("row_sum"), py::arg("target_logit"), py::arg("lse"),
          py::arg("tok"), py::arg("segment_ids"), py::arg("seg"), py::arg("error_flag"), py::arg("stream"),
          "CUDA answer_logprobs_fwd_finalize_cpu: an out-of-range target gives NaN and sets error_flag to 1.");
    m.def("answer_logprobs_bwd_block_cuda", &al::bwd_block_cuda, nogil, py::arg("z"), py::arg("col0"),
          py::arg("vocab"), py::arg("bias"), py::arg("targets"), py::arg("ignore_index"), py::arg("lse"),
          py::arg("grad_tok"), py::arg("grad_bias"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
          "CUDA answer_logprobs_bwd_block_cpu (deterministic grad_bias through the workspace).");
#endif
  }

  // ---- ensemble (csrc/ensemble/ensemble.h): [B, k] inputs, contiguous float32 outputs ----
  {
    namespace en = radit::ensemble;
    m.attr("mixture_max_splits") = en::kMixtureMaxSplits;
    m.def("replug_forward_cpu", &en::replug_forward_cpu, nogil,
          "REPLUG marginal out[B] = logsumexp_i(log_softmax(scores/t)_i + lm_i) over present chunks, and "
          "optionally d out/d lm and d out/d scores ([B, k] each).",
          py::arg("lm"), py::arg("scores"), py::arg("mask"), py::arg("temperature"), py::arg("out"),
          py::arg("grad_lm"), py::arg("grad_scores"));
    m.def("lsr_forward_cpu", &en::lsr_forward_cpu, nogil,
          "Per-row LSR KL loss[B] (direction 0: KL(p_LSR||p_R), 1: KL(p_R||p_LSR)) and optionally its "
          "gradient w.r.t. the retriever scores [B, k].",
          py::arg("scores"), py::arg("lm_scores"), py::arg("mask"), py::arg("retriever_temperature"),
          py::arg("lm_temperature"), py::arg("direction"), py::arg("loss"), py::arg("grad_scores"));
    m.def("mixture_forward_cpu", &en::mixture_forward_cpu, nogil,
          "Token mixture out[B, V] = logsumexp_i(w_i + log_softmax(logits_i)); also writes c[B, k] = "
          "w_i - logsumexp_v(logits_i).",
          py::arg("logits"), py::arg("log_weights"), py::arg("c"), py::arg("out"));
#ifdef RADIT_WITH_CUDA
    m.def("replug_forward_cuda", &en::replug_forward_cuda, nogil, "CUDA replug_forward_cpu (on `stream`).",
          py::arg("lm"), py::arg("scores"), py::arg("mask"), py::arg("temperature"), py::arg("out"),
          py::arg("grad_lm"), py::arg("grad_scores"), py::arg("stream"));
    m.def("lsr_forward_cuda", &en::lsr_forward_cuda, nogil, "CUDA lsr_forward_cpu (on `stream`).",
          py::arg("scores"), py::arg("lm_scores"), py::arg("mask"), py::arg("retriever_temperature"),
          py::arg("lm_temperature"), py::arg("direction"), py::arg("loss"), py::arg("grad_scores"),
          py::arg("stream"));
    m.def("mixture_forward_cuda", &en::mixture_forward_cuda, nogil,
          "CUDA mixture_forward_cpu (on `stream`); workspace float32 [B * k * mixture_max_splits * 2].",
          py::arg("logits"), py::arg("log_weights"), py::arg("c"), py::arg("out"), py::arg("workspace"),
          py::arg("stream"));
#endif
  }
}
