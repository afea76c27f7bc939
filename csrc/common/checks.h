// Argument checks shared by every native entry point. Errors surface in Python as ValueError with a
// message that names the argument and what was expected (pybind11 maps std::invalid_argument).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace radit {

// dtype codes passed from Python (radit_fast/_native.py keeps the matching table).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt64 = 3, kInt32 = 4, kBool = 5 };

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

#define RADIT_CHECK(cond, ...)                       \
  do {                                               \
    if (!(cond)) {                                   \
      std::ostringstream radit_check_os_;            \
      radit_check_os_ << __VA_ARGS__;                \
      ::radit::fail(radit_check_os_.str());          \
    }                                                \
  } while (0)

}  // namespace radit
