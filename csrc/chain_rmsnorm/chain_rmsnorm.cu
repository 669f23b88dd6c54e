// colm_kernels: per-chain RMSNorm forward and backward kernels (COLM_SPEC.md section 3).
// Math and tensor contracts: chain_rmsnorm.h.
//
// Work split. Each chain segment is cut into "items" of kChunkVecs * 32 lanes * VEC elements
// (VEC = 16 bytes / element size: 4 for fp32, 8 for fp16/bf16). One block handles one row at a
// time (grid-stride over rows) with min(8, n_items) warps; warp k takes items k, k + n_warps, ...
//   pass 1: each warp reduces its items to one fp32 partial each (shared memory)
//   step 2: one thread per segment adds the partials of its items in order -> rstd (fwd) or the
//           mean(dxhat * xhat) term (bwd)
//   pass 2: each warp rereads its items (L1/L2-resident) and writes the output
// Every sum has a fixed order, so results are bitwise reproducible for a given shape, layout and
// launch configuration. Segments whose pointers share the same 16-byte misalignment use vector
// loads after a scalar head; others fall back to coalesced scalar loads.
//
// dweight: each backward block accumulates dy * xhat for the rows it visits in an fp32 row of
// its own (shared memory when W fits, else its row of the global workspace; no atomics), writes
// it to workspace[block, :], and a second kernel adds the workspace rows in a fixed order. A
// frozen gain (dweight == nullptr) compiles the accumulation out and launches no reduction.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../common/checks.h"
#include "../common/device_utils.cuh"
#include "../common/dispatch.h"
#include "../common/types.h"
#include "chain_rmsnorm.h"

namespace colm_kernels {
namespace {

using dev::kWarpSize;

constexpr int kMaxChains = static_cast<int>(kChainRMSNormMaxChains);
constexpr int kMaxWarps = 8;
constexpr int kMaxThreads = kMaxWarps * kWarpSize;
constexpr int kChunkVecs = 2;  // vectors per lane per item
// Backward keeps the block's fp32 dweight row in shared memory up to this size (W <= 16384);
// above it the row lives in the global workspace (same arithmetic, more traffic).
enum DgMode : int { kDgNone = 0, kDgShared = 1, kDgGlobal = 2 };
constexpr size_t kDgSmemMaxBytes = 64 * 1024;
constexpr size_t kDefaultSmemBytes = 48 * 1024;

template <typename T>
constexpr int chunk_elems() {
  return kChunkVecs * kWarpSize * dev::VecWidth<T>::value;
}

// Chain layout, passed by value as a __grid_constant__ kernel parameter (~540 bytes).
struct ChainLayout {
  int32_t n;        // chains
  int32_t n_items;  // work items over all chains
  int32_t width;    // W
  int32_t chunk;    // elements per item
  int32_t offsets[kMaxChains + 1];    // o_0 = 0 < ... < o_n = W
  int32_t item_base[kMaxChains + 1];  // first item of each segment; item_base[n] = n_items
};

ChainLayout make_layout(const int64_t* offsets, int64_t n_chains, int64_t W, int chunk,
                        const char* op) {
  COLM_CHECK(offsets != nullptr, op, ": offsets is null");
  COLM_CHECK(n_chains >= 1 && n_chains <= kChainRMSNormMaxChains, op,
             ": the number of chains must be in [1, ", kChainRMSNormMaxChains, "], got ",
             n_chains);
  COLM_CHECK(W >= 1 && W <= kChainRMSNormMaxWidth, op, ": width W must be in [1, ",
             kChainRMSNormMaxWidth, "], got ", W);
  COLM_CHECK(offsets[0] == 0, op, ": offsets[0] must be 0, got ", offsets[0]);
  COLM_CHECK(offsets[n_chains] == W, op, ": offsets[-1] must equal the width W = ", W, ", got ",
             offsets[n_chains]);
  ChainLayout L{};
  L.n = static_cast<int32_t>(n_chains);
  L.width = static_cast<int32_t>(W);
  L.chunk = chunk;
  int64_t items = 0;
  for (int64_t s = 0; s < n_chains; ++s) {
    const int64_t w = offsets[s + 1] - offsets[s];
    COLM_CHECK(w > 0, op, ": offsets must be strictly increasing, got offsets[", s,
               "] = ", offsets[s], " and offsets[", s + 1, "] = ", offsets[s + 1]);
    L.offsets[s] = static_cast<int32_t>(offsets[s]);
    L.item_base[s] = static_cast<int32_t>(items);
    items += (w + chunk - 1) / chunk;
  }
  L.offsets[n_chains] = static_cast<int32_t>(W);
  L.item_base[n_chains] = static_cast<int32_t>(items);
  L.n_items = static_cast<int32_t>(items);
  return L;
}

int threads_for(const ChainLayout& L) {
  return kWarpSize * std::min(kMaxWarps, std::max(1, L.n_items));
}

// Allows `bytes` of dynamic shared memory for `kernel` on the current device; throws when the
// device cannot give that much.
template <typename Kernel>
void ensure_dynamic_smem(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= kDefaultSmemBytes) return;
  int device = 0;
  int optin = 0;
  COLM_CUDA_CHECK(cudaGetDevice(&device));
  COLM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  COLM_CHECK(bytes <= static_cast<size_t>(optin), op, ": needs ", bytes,
             " bytes of shared memory per block, the device allows ", optin,
             " (the width or the number of chains is too large)");
  COLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
}

int64_t grid_for_rows(int64_t M) { return std::min<int64_t>(M, INT_MAX); }

// ------------------------------------------------------------------------------------------
// Device side
// ------------------------------------------------------------------------------------------

struct Item {
  int seg;
  int start;
  int end;
};

// Item -> (segment, [start, end)). item_base is strictly increasing (segments are non-empty).
__device__ __forceinline__ Item get_item(const int* s_off, const int* s_base, int n, int chunk,
                                         int item) {
  int lo = 0;
  int hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s_base[mid] <= item) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  Item it;
  it.seg = lo;
  it.start = s_off[lo] + (item - s_base[lo]) * chunk;
  it.end = min(it.start + chunk, s_off[lo + 1]);
  return it;
}

__host__ __device__ __forceinline__ int round_up4(int v) { return (v + 3) & ~3; }

// p[j] += v[j] for j < N (fp32). float4 read-modify-writes when p is 16-byte aligned: in shared
// memory this keeps bank conflicts at <= 2-way instead of N-way for per-lane runs of N floats.
template <int N>
__device__ __forceinline__ void accumulate_f32(float* p, const float (&v)[N]) {
  if constexpr (N % 4 == 0) {
    if (dev::aligned16(p)) {
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        float4 a = reinterpret_cast<float4*>(p)[q];
        a.x += v[4 * q + 0];
        a.y += v[4 * q + 1];
        a.z += v[4 * q + 2];
        a.w += v[4 * q + 3];
        reinterpret_cast<float4*>(p)[q] = a;
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) p[j] += v[j];
}

// Segment s's total of the per-item partial sums (its items are [s_base[s], s_base[s + 1])).
__device__ __forceinline__ float segment_total(const float* s_partial, const int* s_base, int s) {
  float total = 0.f;
  for (int k = s_base[s]; k < s_base[s + 1]; ++k) total += s_partial[k];
  return total;
}

__device__ __forceinline__ void load_layout(const ChainLayout& L, int* s_off, int* s_base) {
  for (int i = threadIdx.x; i <= L.n; i += blockDim.x) {
    s_off[i] = L.offsets[i];
    s_base[i] = L.item_base[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    chain_rmsnorm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ g,
                             T* __restrict__ y, float* __restrict__ rstd, index_t M,
                             index_t x_stride, index_t y_stride, float eps,
                             const __grid_constant__ ChainLayout layout) {
  constexpr int VEC = dev::VecWidth<T>::value;
  __shared__ int s_off[kMaxChains + 1];
  __shared__ int s_base[kMaxChains + 1];
  __shared__ float s_rstd[kMaxChains];
  extern __shared__ float s_partial[];  // [n_items]

  const int n = layout.n;
  const int n_items = layout.n_items;
  const int chunk = layout.chunk;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  load_layout(layout, s_off, s_base);
  __syncthreads();

  for (index_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    T* yr = y + row * y_stride;

    // pass 1: sum of squares per item
    for (int i = warp; i < n_items; i += n_warps) {
      const Item it = get_item(s_off, s_base, n, chunk, i);
      const int head = dev::elems_to_align16(xr + it.start);
      const bool vec_ok = dev::aligned16(xr + it.start + head);
      float acc = 0.f;
      dev::warp_for_each<VEC>(it.start, it.end, head, vec_ok, lane, [&](int c, auto nc) {
        constexpr int N = decltype(nc)::value;
        float v[N];
        dev::load_f32<N>(xr + c, v);
#pragma unroll
        for (int j = 0; j < N; ++j) acc = fmaf(v[j], v[j], acc);
      });
      acc = dev::warp_sum(acc);
      if (lane == 0) s_partial[i] = acc;
    }
    __syncthreads();

    // step 2: rstd per segment
    for (int s = threadIdx.x; s < n; s += blockDim.x) {
      const float ss = segment_total(s_partial, s_base, s);
      const float w = static_cast<float>(s_off[s + 1] - s_off[s]);
      const float r = 1.0f / sqrtf(ss / w + eps);
      s_rstd[s] = r;
      rstd[row * n + s] = r;
    }
    __syncthreads();

    // pass 2: y = x * rstd * g
    for (int i = warp; i < n_items; i += n_warps) {
      const Item it = get_item(s_off, s_base, n, chunk, i);
      const float r = s_rstd[it.seg];
      const int head = dev::elems_to_align16(xr + it.start);
      const bool vec_ok = dev::aligned16(xr + it.start + head) &&
                          dev::aligned16(g + it.start + head) &&
                          dev::aligned16(yr + it.start + head);
      dev::warp_for_each<VEC>(it.start, it.end, head, vec_ok, lane, [&](int c, auto nc) {
        constexpr int N = decltype(nc)::value;
        float xv[N];
        float gv[N];
        float out[N];
        dev::load_f32<N>(xr + c, xv);
        dev::load_f32<N>(g + c, gv);
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = xv[j] * r * gv[j];
        dev::store_f32<N>(yr + c, out);
      });
    }
    // No barrier needed here: the next row writes s_partial only after this row's second
    // barrier (all reads of s_partial are before it) and s_rstd only after its own first
    // barrier (all reads of s_rstd for this row are before it).
  }
}

template <typename T, int kDg>
__global__ void __launch_bounds__(kMaxThreads)
    chain_rmsnorm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ g, const float* __restrict__ rstd,
                             T* __restrict__ dx, float* __restrict__ dg_partial, index_t M,
                             index_t dy_stride, index_t x_stride, index_t dx_stride,
                             const __grid_constant__ ChainLayout layout) {
  constexpr int VEC = dev::VecWidth<T>::value;
  __shared__ int s_off[kMaxChains + 1];
  __shared__ int s_base[kMaxChains + 1];
  __shared__ float s_rstd[kMaxChains];
  __shared__ float s_mean[kMaxChains];
  // [n_items rounded up to 4] partials, then (kDgShared) [W] dweight row, 16-byte aligned
  extern __shared__ __align__(16) float s_dyn[];

  const int n = layout.n;
  const int n_items = layout.n_items;
  const int chunk = layout.chunk;
  const int W = layout.width;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  float* s_partial = s_dyn;
  float* dg_out = kDg == kDgNone ? nullptr : dg_partial + static_cast<index_t>(blockIdx.x) * W;
  float* dg_acc = kDg == kDgShared ? s_dyn + round_up4(n_items) : dg_out;

  load_layout(layout, s_off, s_base);
  if constexpr (kDg != kDgNone) {
    for (int c = threadIdx.x; c < W; c += blockDim.x) dg_acc[c] = 0.f;
  }
  __syncthreads();

  for (index_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* dyr = dy + row * dy_stride;
    const T* xr = x + row * x_stride;
    T* dxr = dx + row * dx_stride;

    // pass 1: sum(dy * g * x) per item
    for (int i = warp; i < n_items; i += n_warps) {
      const Item it = get_item(s_off, s_base, n, chunk, i);
      const int head = dev::elems_to_align16(xr + it.start);
      const bool vec_ok = dev::aligned16(xr + it.start + head) &&
                          dev::aligned16(dyr + it.start + head) &&
                          dev::aligned16(g + it.start + head);
      float acc = 0.f;
      dev::warp_for_each<VEC>(it.start, it.end, head, vec_ok, lane, [&](int c, auto nc) {
        constexpr int N = decltype(nc)::value;
        float xv[N];
        float dyv[N];
        float gv[N];
        dev::load_f32<N>(xr + c, xv);
        dev::load_f32<N>(dyr + c, dyv);
        dev::load_f32<N>(g + c, gv);
#pragma unroll
        for (int j = 0; j < N; ++j) acc = fmaf(dyv[j] * gv[j], xv[j], acc);
      });
      acc = dev::warp_sum(acc);
      if (lane == 0) s_partial[i] = acc;
    }
    __syncthreads();

    // step 2: m = mean(dxhat * xhat) = rstd * sum(dy * g * x) / w
    for (int s = threadIdx.x; s < n; s += blockDim.x) {
      const float dot = segment_total(s_partial, s_base, s);
      const float w = static_cast<float>(s_off[s + 1] - s_off[s]);
      const float r = rstd[row * n + s];
      s_rstd[s] = r;
      s_mean[s] = r * dot / w;
    }
    __syncthreads();

    // pass 2: dx, and dweight accumulation (each column is touched by one thread per row;
    // rows are separated by the barriers above, so the read-modify-writes never race)
    for (int i = warp; i < n_items; i += n_warps) {
      const Item it = get_item(s_off, s_base, n, chunk, i);
      const float r = s_rstd[it.seg];
      const float m = s_mean[it.seg];
      const int head = dev::elems_to_align16(xr + it.start);
      const bool vec_ok = dev::aligned16(xr + it.start + head) &&
                          dev::aligned16(dyr + it.start + head) &&
                          dev::aligned16(g + it.start + head) &&
                          dev::aligned16(dxr + it.start + head);
      dev::warp_for_each<VEC>(it.start, it.end, head, vec_ok, lane, [&](int c, auto nc) {
        constexpr int N = decltype(nc)::value;
        float xv[N];
        float dyv[N];
        float gv[N];
        float out[N];
        dev::load_f32<N>(xr + c, xv);
        dev::load_f32<N>(dyr + c, dyv);
        dev::load_f32<N>(g + c, gv);
        float dgv[N];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float xhat = xv[j] * r;
          const float dxhat = dyv[j] * gv[j];
          out[j] = r * (dxhat - xhat * m);
          dgv[j] = dyv[j] * xhat;
        }
        dev::store_f32<N>(dxr + c, out);
        if constexpr (kDg != kDgNone) accumulate_f32<N>(dg_acc + c, dgv);
      });
    }
  }

  if constexpr (kDg == kDgShared) {
    __syncthreads();
    for (int c = threadIdx.x; c < W; c += blockDim.x) dg_out[c] = dg_acc[c];
  }
}

// dweight[c] = sum over b of partial[b, c], in order of b (fixed), cast to T.
// Block (32, 8): 32 columns, 8 row groups; grid ceil(W / 32).
template <typename T>
__global__ void __launch_bounds__(256)
    chain_rmsnorm_dg_reduce_kernel(const float* __restrict__ partial, T* __restrict__ dg,
                                   index_t rows, int W) {
  __shared__ float s[8][kWarpSize + 1];
  const int c = blockIdx.x * kWarpSize + threadIdx.x;
  float acc = 0.f;
  if (c < W) {
    for (index_t b = threadIdx.y; b < rows; b += blockDim.y) acc += partial[b * W + c];
  }
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < W) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += s[k][threadIdx.x];
    dg[c] = dev::from_float<T>(t);
  }
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------

struct BwdPlan {
  int threads;
  size_t smem;
  int dg;  // DgMode
};

// Calls f(kernel) with the backward kernel instantiated for the plan's DgMode.
template <typename T, typename F>
void with_bwd_kernel(int dg, F&& f) {
  if (dg == kDgShared) {
    f(chain_rmsnorm_bwd_kernel<T, kDgShared>);
  } else if (dg == kDgGlobal) {
    f(chain_rmsnorm_bwd_kernel<T, kDgGlobal>);
  } else {
    f(chain_rmsnorm_bwd_kernel<T, kDgNone>);
  }
}

template <typename T>
BwdPlan plan_bwd(const ChainLayout& L, bool need_dg, const char* op) {
  BwdPlan p;
  p.threads = threads_for(L);
  const size_t base = static_cast<size_t>(round_up4(L.n_items)) * sizeof(float);
  const size_t with_dg = base + static_cast<size_t>(L.width) * sizeof(float);
  p.dg = !need_dg ? kDgNone : with_dg <= kDgSmemMaxBytes ? kDgShared : kDgGlobal;
  p.smem = p.dg == kDgShared ? with_dg : base;
  with_bwd_kernel<T>(p.dg, [&](auto kernel) { ensure_dynamic_smem(kernel, p.smem, op); });
  return p;
}

// Blocks of the backward grid: one wave of resident blocks, at most one per row.
template <typename T>
int64_t bwd_blocks(const BwdPlan& p, int64_t M) {
  if (M <= 0) return 0;
  int device = 0;
  int sms = 0;
  int per_sm = 0;
  COLM_CUDA_CHECK(cudaGetDevice(&device));
  COLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  with_bwd_kernel<T>(p.dg, [&](auto kernel) {
    COLM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, p.threads, p.smem));
  });
  const int64_t wave = static_cast<int64_t>(std::max(1, sms)) * std::max(1, per_sm);
  return std::min<int64_t>(M, wave);
}

template <typename T>
void fwd_impl(const T* x, index_t x_stride, const T* g, T* y, index_t y_stride, float* rstd,
              const ChainLayout& L, int64_t M, float eps, cudaStream_t stream) {
  const int threads = threads_for(L);
  const size_t smem = static_cast<size_t>(L.n_items) * sizeof(float);
  ensure_dynamic_smem(chain_rmsnorm_fwd_kernel<T>, smem, "chain_rmsnorm_fwd");
  const unsigned grid = static_cast<unsigned>(grid_for_rows(M));
  chain_rmsnorm_fwd_kernel<T>
      <<<grid, threads, smem, stream>>>(x, g, y, rstd, M, x_stride, y_stride, eps, L);
  COLM_CUDA_CHECK_LAUNCH();
}

template <typename T>
void bwd_impl(const T* dy, index_t dy_stride, const T* x, index_t x_stride, const T* g,
              const float* rstd, T* dx, index_t dx_stride, T* dg, float* workspace,
              int64_t workspace_rows, const ChainLayout& L, int64_t M, cudaStream_t stream) {
  const BwdPlan p = plan_bwd<T>(L, dg != nullptr, "chain_rmsnorm_bwd");
  // With dweight, one block per workspace row; without, one wave of blocks.
  const int64_t G = std::min<int64_t>(dg != nullptr ? workspace_rows : bwd_blocks<T>(p, M),
                                      grid_for_rows(M));
  const unsigned grid = static_cast<unsigned>(G);
  with_bwd_kernel<T>(p.dg, [&](auto kernel) {
    kernel<<<grid, p.threads, p.smem, stream>>>(dy, x, g, rstd, dx, workspace, M, dy_stride,
                                                x_stride, dx_stride, L);
  });
  COLM_CUDA_CHECK_LAUNCH();
  if (dg == nullptr) return;  // frozen gain: no dweight reduction
  const unsigned rgrid = static_cast<unsigned>((L.width + kWarpSize - 1) / kWarpSize);
  chain_rmsnorm_dg_reduce_kernel<T>
      <<<rgrid, dim3(kWarpSize, 8), 0, stream>>>(workspace, dg, G, L.width);
  COLM_CUDA_CHECK_LAUNCH();
}

void check_stride(int64_t stride, const char* name, const char* op) {
  COLM_CHECK(stride >= 0, op, ": ", name, " must be >= 0, got ", stride);
}

}  // namespace

void launch_chain_rmsnorm_fwd(const void* x, int64_t x_row_stride, const void* weight,
                              void* y, int64_t y_row_stride, float* rstd,
                              const int64_t* offsets, int64_t n_chains, int64_t M, int64_t W,
                              double eps, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "chain_rmsnorm_fwd";
  COLM_CHECK(M >= 0, op, ": number of rows M must be >= 0, got ", M);
  check_stride(x_row_stride, "x_row_stride", op);
  check_stride(y_row_stride, "y_row_stride", op);
  COLM_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  dispatch_float_types(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ChainLayout L = make_layout(offsets, n_chains, W, chunk_elems<T>(), op);
    if (M == 0) return;
    COLM_CHECK(x && weight && y && rstd, op, ": null data pointer");
    fwd_impl<T>(static_cast<const T*>(x), x_row_stride, static_cast<const T*>(weight),
                static_cast<T*>(y), y_row_stride, rstd, L, M, static_cast<float>(eps), stream);
  });
}

int64_t chain_rmsnorm_bwd_workspace_rows(int64_t M, int64_t W, const int64_t* offsets,
                                         int64_t n_chains, DType dtype) {
  constexpr const char* op = "chain_rmsnorm_bwd";
  COLM_CHECK(M >= 0, op, ": number of rows M must be >= 0, got ", M);
  int64_t rows = 0;
  dispatch_float_types(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ChainLayout L = make_layout(offsets, n_chains, W, chunk_elems<T>(), op);
    rows = bwd_blocks<T>(plan_bwd<T>(L, true, op), M);
  });
  return rows;
}

void launch_chain_rmsnorm_bwd(const void* dy, int64_t dy_row_stride, const void* x,
                              int64_t x_row_stride, const void* weight, const float* rstd,
                              void* dx, int64_t dx_row_stride, void* dweight, float* workspace,
                              int64_t workspace_rows, const int64_t* offsets, int64_t n_chains,
                              int64_t M, int64_t W, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "chain_rmsnorm_bwd";
  COLM_CHECK(M >= 0, op, ": number of rows M must be >= 0, got ", M);
  check_stride(dy_row_stride, "dy_row_stride", op);
  check_stride(x_row_stride, "x_row_stride", op);
  check_stride(dx_row_stride, "dx_row_stride", op);
  dispatch_float_types(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ChainLayout L = make_layout(offsets, n_chains, W, chunk_elems<T>(), op);
    if (M == 0) {
      if (dweight != nullptr) {
        COLM_CUDA_CHECK(cudaMemsetAsync(dweight, 0, static_cast<size_t>(W) * sizeof(T), stream));
      }
      return;
    }
    COLM_CHECK(dy && x && weight && rstd && dx, op, ": null data pointer");
    COLM_CHECK(dweight == nullptr || (workspace != nullptr && workspace_rows >= 1), op,
               ": workspace must hold at least one row of W fp32 values, got workspace_rows = ",
               workspace_rows, " (use chain_rmsnorm_bwd_workspace_rows)");
    bwd_impl<T>(static_cast<const T*>(dy), dy_row_stride, static_cast<const T*>(x),
                x_row_stride, static_cast<const T*>(weight), rstd, static_cast<T*>(dx),
                dx_row_stride, static_cast<T*>(dweight), workspace, workspace_rows, L, M,
                stream);
  });
}

}  // namespace colm_kernels
