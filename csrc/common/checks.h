// Argument checks and the error types shared by every native entry point.
//
// Two kinds of failure leave the native module:
//   * a bad argument (shape, dtype, device, pointer): std::invalid_argument, ValueError in Python, with a message
//     that names the argument and what was expected (RADIT_CHECK);
//   * a failed CUDA call or launch: radit::CudaError, RuntimeError in Python (common/cuda_utils.cuh check_launch).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace radit {

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// The one error type of CUDA failures (launch errors, failed runtime calls). Bound to RuntimeError.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

#define RADIT_CHECK(cond, ...)                       \
  do {                                               \
    if (!(cond)) {                                   \
      std::ostringstream radit_check_os_;            \
      radit_check_os_ << __VA_ARGS__;                \
      ::radit::fail(radit_check_os_.str());          \
    }                                                \
  } while (0)

}  // namespace radit
