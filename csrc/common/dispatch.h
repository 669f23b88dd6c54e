// colm_kernels: dtype enum -> CUDA element type dispatch, usable from .cu files without torch.
//
//   COLM_DISPATCH_FLOAT_TYPES(dtype, "my_op", [&] { launch<scalar_t>(...); });
//   dispatch_float_types(dtype, "my_op", [&](auto tag) { using T = typename decltype(tag)::type; });
//
// scalar_t is float, __half or __nv_bfloat16. Both forms throw std::invalid_argument on an
// unknown enum value, naming the op.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "checks.h"
#include "types.h"

namespace colm_kernels {

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kFloat32;
};
template <>
struct DTypeOf<__half> {
  static constexpr DType value = DType::kFloat16;
};
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr DType value = DType::kBFloat16;
};

template <typename F>
inline void dispatch_float_types(DType dtype, const char* op_name, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(TypeTag<float>{});
      return;
    case DType::kFloat16:
      f(TypeTag<__half>{});
      return;
    case DType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      return;
  }
  COLM_CHECK(false, op_name, ": unsupported dtype enum value ", static_cast<int>(dtype),
             " (expected float32, float16 or bfloat16)");
}

}  // namespace colm_kernels

#define COLM_DISPATCH_CASE_(ENUM, TYPE, ...) \
  case ::colm_kernels::DType::ENUM: {        \
    using scalar_t = TYPE;                   \
    __VA_ARGS__();                           \
    break;                                   \
  }

#define COLM_DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                         \
  do {                                                                                      \
    const ::colm_kernels::DType colm_dt_ = (DTYPE);                                         \
    switch (colm_dt_) {                                                                     \
      COLM_DISPATCH_CASE_(kFloat32, float, __VA_ARGS__)                                     \
      COLM_DISPATCH_CASE_(kFloat16, __half, __VA_ARGS__)                                    \
      COLM_DISPATCH_CASE_(kBFloat16, __nv_bfloat16, __VA_ARGS__)                            \
      default:                                                                              \
        COLM_CHECK(false, NAME, ": unsupported dtype enum value ", static_cast<int>(colm_dt_), \
                   " (expected float32, float16 or bfloat16)");                             \
    }                                                                                       \
  } while (0)
