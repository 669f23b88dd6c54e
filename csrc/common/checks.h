// colm_kernels: error checks usable from .cu files without torch.
//
// Host-side failures throw C++ exceptions; pybind11 turns std::invalid_argument into Python's
// ValueError and std::runtime_error into RuntimeError, so the binding needs no translation.
//   COLM_CHECK(cond, msg...)    invalid arguments         -> std::invalid_argument
//   COLM_CUDA_CHECK(expr)       a CUDA runtime call failed -> std::runtime_error
//   COLM_CUDA_CHECK_LAUNCH()    after <<<...>>>: launch errors (bad config, no kernel image)
#pragma once

#include <cuda_runtime_api.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace colm_kernels {
namespace detail {

inline void stream_all(std::ostringstream&) {}

template <typename T, typename... Rest>
inline void stream_all(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  stream_all(os, rest...);
}

template <typename... Args>
[[noreturn]] inline void throw_invalid_argument(const char* cond, const char* file, int line,
                                                const Args&... args) {
  std::ostringstream os;
  stream_all(os, args...);
  os << " (check `" << cond << "` failed at " << file << ":" << line << ")";
  throw std::invalid_argument(os.str());
}

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  std::ostringstream os;
  os << "CUDA error " << static_cast<int>(err) << " (" << cudaGetErrorName(err)
     << "): " << cudaGetErrorString(err) << " in `" << expr << "` at " << file << ":" << line;
  throw std::runtime_error(os.str());
}

}  // namespace detail
}  // namespace colm_kernels

#define COLM_CHECK(cond, ...)                                                              \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      ::colm_kernels::detail::throw_invalid_argument(#cond, __FILE__, __LINE__, __VA_ARGS__); \
    }                                                                                      \
  } while (0)

#define COLM_CUDA_CHECK(expr)                                                        \
  do {                                                                               \
    cudaError_t colm_err_ = (expr);                                                  \
    if (colm_err_ != cudaSuccess) {                                                  \
      ::colm_kernels::detail::throw_cuda_error(colm_err_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)

// cudaPeekAtLastError does not reset a sticky error, so it cannot hide an earlier failure.
#define COLM_CUDA_CHECK_LAUNCH() COLM_CUDA_CHECK(cudaPeekAtLastError())
