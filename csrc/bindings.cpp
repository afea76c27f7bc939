// Python bindings of radit_fast._C: declarations and docstrings only. Each op's entry points live in
// csrc/<op>/<op>.h and check their own arguments. Pointers travel as integers (tensor.data_ptr()),
// so the module does not link libtorch and works across torch versions.
#include <pybind11/pybind11.h>

#include "answer_logprobs/answer_logprobs.h"
#include "answer_logprobs/answer_logprobs_cuda.h"
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
  {
    namespace al = radit::answer_logprobs;
    // The block epilogues take the fields of al::BlockParams flat (see answer_logprobs.h).
    auto block = [](std::intptr_t logits, int logits_dtype, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                    std::int64_t col0, std::int64_t vocab, std::intptr_t bias, int bias_dtype, std::intptr_t targets,
                    int targets_dtype, std::int64_t ignore_index, int num_threads) {
      al::BlockParams p;
      p.logits = logits; p.logits_dtype = logits_dtype; p.rows = rows; p.cols = cols; p.ld = ld; p.col0 = col0;
      p.vocab = vocab; p.bias = bias; p.bias_dtype = bias_dtype; p.targets = targets;
      p.targets_dtype = targets_dtype; p.ignore_index = ignore_index; p.num_threads = num_threads;
      return p;
    };
#define RADIT_AL_BLOCK_ARGS                                                                                  \
  py::arg("logits"), py::arg("logits_dtype"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("col0"), \
      py::arg("vocab"), py::arg("bias"), py::arg("bias_dtype"), py::arg("targets"), py::arg("targets_dtype"),   \
      py::arg("ignore_index"), py::arg("num_threads")
    m.def(
        "answer_logprobs_fwd_block",
        [block](std::intptr_t logits, int logits_dtype, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                std::int64_t col0, std::int64_t vocab, std::intptr_t bias, int bias_dtype, std::intptr_t targets,
                int targets_dtype, std::int64_t ignore_index, int num_threads, std::intptr_t row_max,
                std::intptr_t row_sum, std::intptr_t target_logit) {
          py::gil_scoped_release nogil;
          al::fwd_block(block(logits, logits_dtype, rows, cols, ld, col0, vocab, bias, bias_dtype, targets,
                              targets_dtype, ignore_index, num_threads),
                        row_max, row_sum, target_logit);
        },
        RADIT_AL_BLOCK_ARGS, py::arg("row_max"), py::arg("row_sum"), py::arg("target_logit"),
        "Merge one [rows, cols] logits block (+ bias[col0:col0+cols]) into the per-row online logsumexp state "
        "(row_max, row_sum: float32 [rows]) and gather the target logit into target_logit (float32 [rows]).");
    m.def("answer_logprobs_fwd_finalize", &al::fwd_finalize, py::arg("n"), py::arg("vocab"), py::arg("targets"),
          py::arg("targets_dtype"), py::arg("ignore_index"), py::arg("row_max"), py::arg("row_sum"),
          py::arg("target_logit"), py::arg("lse"), py::arg("tok_logprob"), py::arg("segment_ids"),
          py::arg("num_segments"), py::arg("seg_logprob"),
          "lse = row_max + log(row_sum), tok_logprob = target_logit - lse (0 at ignore_index), and the per-segment "
          "sums of tok_logprob when segment_ids (int64 [n]) is given; checks targets lie in [0, vocab).",
          py::call_guard<py::gil_scoped_release>());
    m.def(
        "answer_logprobs_bwd_block",
        [block](std::intptr_t logits, int logits_dtype, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                std::int64_t col0, std::int64_t vocab, std::intptr_t bias, int bias_dtype, std::intptr_t targets,
                int targets_dtype, std::int64_t ignore_index, int num_threads, std::intptr_t lse,
                std::intptr_t grad_tok, std::intptr_t grad_bias) {
          py::gil_scoped_release nogil;
          al::bwd_block(block(logits, logits_dtype, rows, cols, ld, col0, vocab, bias, bias_dtype, targets,
                              targets_dtype, ignore_index, num_threads),
                        lse, grad_tok, grad_bias);
        },
        RADIT_AL_BLOCK_ARGS, py::arg("lse"), py::arg("grad_tok"), py::arg("grad_bias"),
        "In place, turn a logits block into dlogits = grad_tok * (onehot(target) - softmax) (0 at ignored rows); "
        "add its column sums to grad_bias[col0:col0+cols] (float32 [V]) when grad_bias != 0.");
#undef RADIT_AL_BLOCK_ARGS
  }
#ifdef RADIT_WITH_CUDA
  {  // CUDA backend (csrc/answer_logprobs/answer_logprobs_cuda.h); launched by radit_fast/ops/_answer_logprobs_cuda.py
    namespace alc = radit::answer_logprobs;
    m.def("answer_logprobs_fwd_cuda", &alc::fwd_cuda, py::call_guard<py::gil_scoped_release>(), py::arg("hidden"),
          py::arg("hidden_stride0"), py::arg("hidden_stride1"), py::arg("weight"), py::arg("weight_stride0"),
          py::arg("weight_stride1"), py::arg("dtype"), py::arg("bias"), py::arg("targets"), py::arg("n"),
          py::arg("v"), py::arg("d"), py::arg("ignore_index"), py::arg("tok_logprob"), py::arg("lse"),
          py::arg("workspace"), py::arg("num_splits"), py::arg("stream"),
          "Fused LM-head log-probs on `stream`: tok_logprob[n] and lse[n] (float32) from hidden [n, d] and "
          "weight [v, d] (float32 | bfloat16), bias float32 [v] or 0; workspace float32 [(2 num_splits + 1) n].");
    m.def("answer_logprobs_bwd_cuda", &alc::bwd_cuda, py::call_guard<py::gil_scoped_release>(), py::arg("hidden"),
          py::arg("hidden_stride0"), py::arg("hidden_stride1"), py::arg("weight"), py::arg("weight_stride0"),
          py::arg("weight_stride1"), py::arg("dtype"), py::arg("bias"), py::arg("targets"), py::arg("n"),
          py::arg("v"), py::arg("d"), py::arg("lse"), py::arg("grad_tok"), py::arg("grad_hidden"),
          py::arg("grad_weight"), py::arg("grad_bias"), py::arg("dz_workspace"), py::arg("chunk_v"),
          py::arg("stream"),
          "Backward of sum grad_tok * tok_logprob on `stream`: grad_hidden [n, d] and grad_weight [v, d] "
          "(float32, overwritten), grad_bias float32 [v] (accumulated); 0 = not wanted; dz_workspace [n, chunk_v].");
  }
#endif
  // ---- END answer_logprobs ----

  // ---- BEGIN ensemble (owned by csrc/ensemble) ----
  // Tensor arguments are tuples (data_ptr, stride0, stride1, dtype code); the mask tuple has data_ptr 0 when
  // absent. Outputs are contiguous float32 buffers given by data_ptr (0 = do not compute).
  {
    namespace en = radit::ensemble;
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("replug_forward_cpu", &en::replug_forward_cpu, nogil,
          "REPLUG marginal out[B] = logsumexp_i(log_softmax(scores/t)_i + lm_i) over present chunks, and "
          "optionally d out/d lm and d out/d scores ([B, k] each).",
          py::arg("B"), py::arg("k"), py::arg("lm"), py::arg("scores"), py::arg("mask"), py::arg("temperature"),
          py::arg("out"), py::arg("grad_lm"), py::arg("grad_scores"));
    m.def("lsr_forward_cpu", &en::lsr_forward_cpu, nogil,
          "Per-row LSR KL loss[B] (direction 0: KL(p_LSR||p_R), 1: KL(p_R||p_LSR)) and optionally its "
          "gradient w.r.t. the retriever scores [B, k].",
          py::arg("B"), py::arg("k"), py::arg("scores"), py::arg("lm_scores"), py::arg("mask"),
          py::arg("retriever_temperature"), py::arg("lm_temperature"), py::arg("direction"), py::arg("loss"),
          py::arg("grad_scores"));
    m.def("mixture_forward_cpu", &en::mixture_forward_cpu, nogil,
          "Token mixture out[B, V] = logsumexp_i(w_i + log_softmax(logits_i)); also writes c[B, k] = "
          "w_i - logsumexp_v(logits_i).",
          py::arg("B"), py::arg("k"), py::arg("V"), py::arg("logits"), py::arg("log_weights"), py::arg("c"),
          py::arg("out"));
#ifdef RADIT_WITH_CUDA
    m.def("replug_forward_cuda", &en::replug_forward_cuda, nogil, "CUDA replug_forward_cpu (on `stream`).",
          py::arg("B"), py::arg("k"), py::arg("lm"), py::arg("scores"), py::arg("mask"), py::arg("temperature"),
          py::arg("out"), py::arg("grad_lm"), py::arg("grad_scores"), py::arg("stream"));
    m.def("lsr_forward_cuda", &en::lsr_forward_cuda, nogil, "CUDA lsr_forward_cpu (on `stream`).", py::arg("B"),
          py::arg("k"), py::arg("scores"), py::arg("lm_scores"), py::arg("mask"), py::arg("retriever_temperature"),
          py::arg("lm_temperature"), py::arg("direction"), py::arg("loss"), py::arg("grad_scores"),
          py::arg("stream"));
    m.def("mixture_forward_cuda", &en::mixture_forward_cuda, nogil, "CUDA mixture_forward_cpu (on `stream`).",
          py::arg("B"), py::arg("k"), py::arg("V"), py::arg("logits"), py::arg("log_weights"), py::arg("c"),
          py::arg("out"), py::arg("stream"));
#endif
  }
  // ---- END ensemble ----
}
