// colm_kernels: per-chain RMSNorm (COLM_SPEC.md section 3), CUDA host launchers.
//
// No torch here: raw device pointers, sizes, a DType and a cudaStream_t. bindings.cpp checks and
// allocates the tensors; these launchers re-check what the kernels rely on and throw
// std::invalid_argument (-> ValueError) / std::runtime_error (-> RuntimeError).
//
// Math, per row r and chain segment s = [o_s, o_{s+1}) of width w_s (fp32 throughout):
//   rstd[r, s] = 1 / sqrt(sum_{c in s} x[r, c]^2 / w_s + eps)
//   y[r, c]    = x[r, c] * rstd[r, s] * g[c]                      (rounded once to dtype)
// Backward:  xhat = x * rstd,  dxhat = dy * g,  m = sum_{c in s}(dxhat * xhat) / w_s
//   dx[r, c]   = rstd[r, s] * (dxhat - xhat * m)
//   dg[c]      = sum_r dy[r, c] * xhat[r, c]     (deterministic: fixed-order two-stage sum)
//
// Tensor contracts (element strides; the last dimension is always contiguous):
//   x, y, dy, dx : M rows of W elements, row i at ptr + i * row_stride (int64, may differ per
//                  tensor; input strides may be 0 to broadcast one row)
//   weight, dweight : W contiguous elements, same dtype as x
//   rstd         : fp32, (M, n_chains) contiguous
//   offsets      : HOST array of n_chains + 1 int64, 0 = o_0 < o_1 < ... < o_n = W,
//                  1 <= n_chains <= kChainRMSNormMaxChains, W <= kChainRMSNormMaxWidth
//   workspace    : fp32 device buffer of workspace_rows * W elements (backward only); get
//                  workspace_rows from chain_rmsnorm_bwd_workspace_rows() on the same device.
//   dweight      : may be null in the backward (a frozen gain): no dweight work at all, and the
//                  workspace may then be null too.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/types.h"

namespace colm_kernels {

constexpr int64_t kChainRMSNormMaxChains = 64;
constexpr int64_t kChainRMSNormMaxWidth = int64_t(1) << 30;

void launch_chain_rmsnorm_fwd(const void* x, int64_t x_row_stride, const void* weight,
                              void* y, int64_t y_row_stride, float* rstd,
                              const int64_t* offsets, int64_t n_chains, int64_t M, int64_t W,
                              double eps, DType dtype, cudaStream_t stream);

// Rows of the fp32 dweight partial-sum workspace that launch_chain_rmsnorm_bwd uses for these
// sizes on the current device (0 when M == 0). Queries the device; call it on the device that
// will run the backward.
int64_t chain_rmsnorm_bwd_workspace_rows(int64_t M, int64_t W, const int64_t* offsets,
                                         int64_t n_chains, DType dtype);

void launch_chain_rmsnorm_bwd(const void* dy, int64_t dy_row_stride, const void* x,
                              int64_t x_row_stride, const void* weight, const float* rstd,
                              void* dx, int64_t dx_row_stride, void* dweight, float* workspace,
                              int64_t workspace_rows, const int64_t* offsets, int64_t n_chains,
                              int64_t M, int64_t W, DType dtype, cudaStream_t stream);

}  // namespace colm_kernels
