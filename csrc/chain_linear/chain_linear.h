// colm_kernels: Chain-of-Linear (COLM_SPEC.md section 2), cuBLAS host launchers.
//
// No torch here: raw device pointers, int64 sizes and element strides, a DType, a cuBLAS handle and
// a cudaStream_t. bindings.cpp checks and allocates the tensors; these launchers re-check what they
// rely on and throw std::invalid_argument (-> ValueError) / std::runtime_error (-> RuntimeError).
//
// Math. n chains; chain i has W_i (d_i, P_i), d_i >= 1, 1 <= P_1 <= ... <= P_n, optional b_i (d_i,);
// o_i = d_1 + ... + d_(i-1), N = sum d_i, dy_i = dy[:, o_i:o_i+d_i]:
//   forward   y[:, o_i:o_i+d_i] = x[:, :P_i] @ W_i^T + b_i          x (M, K >= P_n), y (M, N)
//   input     dx[:, :P_i] += dy_i @ W_i  (summed over chains)       dx (M, K), 0 in [P_n, K)
//   weight    dW_i = dy_i^T @ x[:, :P_i]                            dW_i (d_i, P_i) contiguous
//   bias      db_i = sum over rows of dy_i                          db_i (d_i,) contiguous
// Products accumulate in fp32 (CUBLAS_COMPUTE_32F, fp32 alpha/beta); outputs are rounded once to
// the input dtype. fp32 inputs use TF32 only if the handle's math mode allows it (torch sets it
// from torch.backends.cuda.matmul.allow_tf32, off by default).
//
// Tensor contracts (all row-major, element strides, last dimension contiguous):
//   x, dy        : M rows, row i at ptr + i * row_stride; row_stride >= width unless M <= 1
//   y, dx        : outputs, M rows, row_stride >= width unless M <= 1; fully written
//   W_i          : d_i rows of P_i, row stride >= P_i unless d_i == 1 (separate tensors, or views
//                  W[o_i:o_i+d_i, :P_i] of one dense (N, >= P_n) matrix: its upper blocks are never
//                  read); only read, never written
//   b_i, db_i    : d_i contiguous elements
//   dW_i         : (d_i, P_i) contiguous, fully written
// Every pointer must be aligned to its element size. All host arrays below have n_chains entries.
//
// Workspace: each launcher takes a device buffer of at least *_workspace_bytes() bytes (same
// arguments), 256-byte aligned (torch's caching allocator gives that), used in stream order only.
//
// cuBLAS handle: the launchers run on `stream` (they call cublasSetStream if the handle is bound to
// another stream, which resets the handle's workspace to cuBLAS's default: bind it first, as
// torch's getCurrentCUDABlasHandle() does); the pointer mode is set to host for the call and
// restored. The math mode (TF32, reduced-precision reductions) is left as the caller set it.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/types.h"

namespace colm_kernels {

// Per-chain weight layout: host arrays of n_chains entries (the pointers point to device memory).
struct ChainLinearWeights {
  int64_t n_chains = 0;
  const void* const* ptrs = nullptr;     // W_i
  const int64_t* out_features = nullptr; // d_i >= 1
  const int64_t* in_features = nullptr;  // P_i >= 1, non-decreasing
  const int64_t* row_strides = nullptr;  // elements; >= P_i when d_i > 1
};

// How the per-chain GEMMs of one step are issued.
enum class ChainLinearGemmMode : int32_t {
  // One cublasGemmGroupedBatchedEx call when cuBLAS >= 12.5 is built in, the step has several
  // GEMMs and every matrix pointer is 16-byte aligned; else one cublasGemmEx per GEMM.
  kAuto = 0,
  // Always one cublasGemmEx per GEMM (a baseline for tests and benchmarks).
  kLoop = 1,
};

// Forward. bias_ptrs: host array of n_chains device pointers, or nullptr for no bias.
size_t chain_linear_fwd_workspace_bytes(const ChainLinearWeights& w, int64_t M);
void launch_chain_linear_fwd(cublasHandle_t handle, const void* x, int64_t x_row_stride, int64_t M,
                             int64_t K, const ChainLinearWeights& w, const void* const* bias_ptrs,
                             void* y, int64_t y_row_stride, void* workspace,
                             size_t workspace_bytes, DType dtype, ChainLinearGemmMode mode,
                             cudaStream_t stream);

// Input gradient dx (M, K) from dy (M, N). Views of one dense matrix (same row stride, W_i at
// W_0 + o_i rows) are read as that matrix; separate blocks through their own pointers (one grouped
// call per block diagonal). The workspace holds only the grouped calls' pointer tables.
size_t chain_linear_bwd_dx_workspace_bytes(const ChainLinearWeights& w, int64_t M, DType dtype);
void launch_chain_linear_bwd_dx(cublasHandle_t handle, const void* dy, int64_t dy_row_stride,
                                int64_t M, const ChainLinearWeights& w, void* dx,
                                int64_t dx_row_stride, int64_t K, void* workspace,
                                size_t workspace_bytes, DType dtype, ChainLinearGemmMode mode,
                                cudaStream_t stream);

// Weight and bias gradients. dw_ptrs / db_ptrs: host arrays of n_chains device pointers, nullptr
// for a chain whose gradient is not needed (no work is done for it); either array may be nullptr
// (none needed). The weights' data pointers are not read (only the shapes); x is (M, >= P_n).
size_t chain_linear_bwd_dw_workspace_bytes(const ChainLinearWeights& w, int64_t M,
                                           void* const* dw_ptrs, void* const* db_ptrs);
void launch_chain_linear_bwd_dw(cublasHandle_t handle, const void* dy, int64_t dy_row_stride,
                                const void* x, int64_t x_row_stride, int64_t M, int64_t K,
                                const ChainLinearWeights& w, void* const* dw_ptrs,
                                void* const* db_ptrs, void* workspace, size_t workspace_bytes,
                                DType dtype, ChainLinearGemmMode mode, cudaStream_t stream);

}  // namespace colm_kernels
