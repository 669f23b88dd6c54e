// colm_kernels: device helpers shared by the kernels (no torch).
//   to_float / from_float<T>   explicit conversions (the torch build defines
//                               __CUDA_NO_HALF_CONVERSIONS__ etc., so no implicit ones)
//   load_f32<N> / store_f32<N>  N == 1: one element; N > 1: one aligned vector load/store
//   warp_sum                    xor-butterfly: every lane gets the same, run-to-run stable sum
//   IntC<N>                     compile-time element counts passed to generic lambdas
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace colm_kernels {
namespace dev {

constexpr int kWarpSize = 32;

template <int N>
using IntC = std::integral_constant<int, N>;

// Elements per 16-byte vector.
template <typename T>
struct VecWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = to_float(p[0]);
  } else {
    const Vec<T, N> vec = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(vec.v[j]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = from_float<T>(in[0]);
  } else {
    Vec<T, N> vec;
#pragma unroll
    for (int j = 0; j < N; ++j) vec.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Vec<T, N>*>(p) = vec;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Elements from p to the next 16-byte boundary (0 when p is on one).
template <typename T>
__device__ __forceinline__ int elems_to_align16(const T* p) {
  constexpr int kVec = VecWidth<T>::value;
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % kVec);
  return (kVec - mis) % kVec;
}

// One warp visits [start, end): a scalar head up to the first 16-byte boundary, full vectors,
// a scalar tail. f(col, IntC<N>{}) handles N = 1 or N = VEC elements starting at col.
// vec_ok must be warp-uniform and true only if every pointer f touches is 16-byte aligned at
// start + head. Every column is visited exactly once; which lane visits it depends only on
// (start, end, head, vec_ok).
template <int VEC, typename F>
__device__ __forceinline__ void warp_for_each(int start, int end, int head, bool vec_ok, int lane,
                                              F&& f) {
  if (!vec_ok) {
    for (int c = start + lane; c < end; c += kWarpSize) f(c, IntC<1>{});
    return;
  }
  const int len = end - start;
  const int h = head < len ? head : len;
  if (lane < h) f(start + lane, IntC<1>{});
  const int body = start + h;
  const int nvec = (len - h) / VEC;
  for (int v = lane; v < nvec; v += kWarpSize) f(body + v * VEC, IntC<VEC>{});
  const int tail_start = body + nvec * VEC;
  if (tail_start + lane < end) f(tail_start + lane, IntC<1>{});
}

}  // namespace dev
}  // namespace colm_kernels
