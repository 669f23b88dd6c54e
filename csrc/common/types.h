// colm_kernels: basic types shared by the CUDA sources and the torch binding.
//
// Plain C++ (no CUDA, no torch): bindings.cpp and every .cu file may include it.
#pragma once

#include <cstdint>

namespace colm_kernels {

// Index type for every offset that meets a stride (row * row_stride, partial-buffer rows, ...).
// int32 offsets corrupt silently past 2^31 elements (fla #1080, vllm #22419).
using index_t = int64_t;

// Element type of the floating-point tensors a kernel reads and writes. Math is always fp32.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

}  // namespace colm_kernels
