// colm_kernels._C: the torch binding of the CUDA kernels. The ONLY file that includes torch.
//
// Every input check lives here (device, dtype, shapes, strides, chain offsets), with messages
// that name the op and the argument. The .cu launchers take raw pointers, int64 sizes/strides,
// a DType and the current CUDA stream; they re-check what the kernels rely on and throw
// std::invalid_argument (-> ValueError) or std::runtime_error (-> RuntimeError).
//
// Python API (all tensors on one CUDA device; dtypes float32 / float16 / bfloat16):
//   chain_rmsnorm_fwd(x (M, W), weight (W,), offsets: list[int], eps: float) -> (y, rstd)
//       y: (M, W) contiguous, x.dtype;  rstd: (M, n_chains) float32 contiguous
//   chain_rmsnorm_bwd(dy (M, W), x (M, W), weight (W,), rstd (M, n), offsets, needs_weight)
//       -> (dx, dweight); dweight (0,) when needs_weight is false
//       dx: (M, W) contiguous, x.dtype;  dweight: (W,), weight.dtype (fp32-accumulated)
// offsets = [0, o_1, ..., o_n = W], strictly increasing, 1 <= n <= MAX_CHAINS (64).
// x / dy need a unit stride along W; any non-negative row stride is accepted.
//
//   chain_linear_fwd(x (M, K), weights: list[(d_i, P_i)], biases: list[(d_i,)] or []) -> y (M, N)
//   chain_linear_bwd_dx(dy (M, N), weights, in_features K) -> dx (M, K), zeros past P_last
//   chain_linear_bwd_dw(dy (M, N), x (M, K), weights, needs_weight: list[bool],
//                       needs_bias: list[bool]) -> (dW list, db list)
//       dW_i (d_i, P_i) / db_i (d_i,) contiguous, a fresh empty (0,) tensor where not needed
// Weights: 1 <= P_1 <= ... <= P_n <= K, d_i >= 1, unit column stride, any row stride >= P_i
// (separate tensors or views of one dense matrix, read in place). x / dy: any row stride, unit
// column stride. y, dx contiguous. Products on cuBLAS with fp32 accumulation (TF32 for float32
// only when torch.backends.cuda.matmul.allow_tf32 is set).
// COLM_KERNELS_CHAIN_LINEAR_GEMM=loop issues one cublasGemmEx per GEMM instead of grouped calls
// (default "auto"; see csrc/chain_linear/chain_linear.cu).
//
//   chain_attention_decode_fwd(q (B, Sq, Hq, D), k_cache, v_cache (B, S_max, Hkv_cache, D),
//                              cache_seqlens int32 (B,), group_heads int32 (Hkv, G),
//                              group_chains int32 (Hkv, G), head_chain int32 (Hq,),
//                              seq_chains int32 (B,) or None, softmax_scale, num_splits,
//                              block_table int32 (B, max_blocks) or None)
//       -> out (B, Sq, Hq, D) contiguous, q.dtype. Split-K decode attention over the first Hkv kv
//       heads of the caches (Hkv * G = Hq); num_splits 0 = automatic. With block_table the caches
//       are paged, (num_blocks, page_size, Hkv_cache, D) (flash-attn's convention). Caches: any
//       strides that are multiples of 16 bytes, unit last stride; D a multiple of 8 in [8, 256];
//       1 <= Sq <= 128.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

// torch's cuBLAS handle (bound to the current stream, with torch's workspace and math mode) comes
// from ATen/cuda/CUDAContextLight.h, which also includes the cuSPARSE / cuSOLVER headers. Where
// those are missing (a toolkit or pip set with cuBLAS alone) a handle of our own is used instead.
#if __has_include(<cusparse.h>) && __has_include(<cusolverDn.h>) && \
    __has_include(<ATen/cuda/CUDAContextLight.h>)
#include <ATen/cuda/CUDAContextLight.h>
#define COLM_KERNELS_TORCH_BLAS_HANDLE 1
#else
#include <cublas_v2.h>
#define COLM_KERNELS_TORCH_BLAS_HANDLE 0
#endif

#include "chain_attention_decode/chain_attention_decode.h"
#include "chain_linear/chain_linear.h"
#include "chain_rmsnorm/chain_rmsnorm.h"
#include "common/types.h"

namespace {

using colm_kernels::DType;

DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& t, const char* op, const char* name,
                const at::Tensor* same_device_as = nullptr, const char* other_name = nullptr) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  if (same_device_as != nullptr) {
    TORCH_CHECK(t.device() == same_device_as->device(), op, ": ", name, " is on ", t.device(),
                " but ", other_name, " is on ", same_device_as->device());
  }
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                      const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// (M, W) with a unit stride along W. Returns the row stride in elements.
int64_t check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D (M, W), got shape ", t.sizes(),
                    " (flatten the leading dimensions first)");
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
                    " must be contiguous along its last dimension, got strides ", t.strides());
  TORCH_CHECK_VALUE(t.stride(0) >= 0, op, ": ", name, " has a negative row stride ", t.stride(0));
  return t.size(0) <= 1 ? 0 : t.stride(0);
}

void check_weight(const at::Tensor& w, int64_t W, const char* op, const char* name) {
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == W, op, ": ", name,
                    " must have shape (W,) = (", W, ",), got ", w.sizes());
  TORCH_CHECK_VALUE(W <= 1 || w.stride(0) == 1, op, ": ", name,
                    " must be contiguous, got stride ", w.stride(0));
}

void check_offsets(const std::vector<int64_t>& offsets_vec, int64_t W, const char* op) {
  const c10::IntArrayRef offsets(offsets_vec);
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK_VALUE(n >= 1 && n <= colm_kernels::kChainRMSNormMaxChains, op,
                    ": offsets must hold n_chains + 1 values with 1 <= n_chains <= ",
                    colm_kernels::kChainRMSNormMaxChains, ", got ", offsets.size(), " values ",
                    offsets);
  TORCH_CHECK_VALUE(offsets.front() == 0, op, ": offsets[0] must be 0, got ", offsets);
  TORCH_CHECK_VALUE(offsets.back() == W, op, ": offsets[-1] must equal the width W = ", W,
                    " (x.shape[1]), got ", offsets);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(offsets[i] < offsets[i + 1], op,
                      ": offsets must be strictly increasing, got ", offsets);
  }
  TORCH_CHECK_VALUE(W <= colm_kernels::kChainRMSNormMaxWidth, op, ": width W = ", W,
                    " exceeds the supported maximum ", colm_kernels::kChainRMSNormMaxWidth);
}

std::tuple<at::Tensor, at::Tensor> chain_rmsnorm_fwd(const at::Tensor& x,
                                                     const at::Tensor& weight,
                                                     const std::vector<int64_t>& offsets,
                                                     double eps) {
  constexpr const char* op = "chain_rmsnorm_fwd";
  check_cuda(x, op, "x");
  check_cuda(weight, op, "weight", &x, "x");
  const DType dtype = to_dtype(x, op, "x");
  check_same_dtype(weight, x, op, "weight", "x");
  const int64_t x_stride = check_rows(x, op, "x");
  const int64_t M = x.size(0);
  const int64_t W = x.size(1);
  check_weight(weight, W, op, "weight");
  check_offsets(offsets, W, op);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ",
                    eps);
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, W}, x.options());
  at::Tensor rstd = at::empty({M, n}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  colm_kernels::launch_chain_rmsnorm_fwd(x.data_ptr(), x_stride, weight.data_ptr(),
                                         y.data_ptr(), W, rstd.data_ptr<float>(), offsets.data(),
                                         n, M, W, eps, dtype, stream);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> chain_rmsnorm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight,
                                                     const at::Tensor& rstd,
                                                     const std::vector<int64_t>& offsets,
                                                     bool needs_weight) {
  constexpr const char* op = "chain_rmsnorm_bwd";
  check_cuda(x, op, "x");
  check_cuda(dy, op, "dy", &x, "x");
  check_cuda(weight, op, "weight", &x, "x");
  check_cuda(rstd, op, "rstd", &x, "x");
  const DType dtype = to_dtype(x, op, "x");
  check_same_dtype(dy, x, op, "dy", "x");
  check_same_dtype(weight, x, op, "weight", "x");
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat, op, ": rstd must be float32, got ",
                   rstd.scalar_type());
  const int64_t x_stride = check_rows(x, op, "x");
  const int64_t dy_stride = check_rows(dy, op, "dy");
  const int64_t M = x.size(0);
  const int64_t W = x.size(1);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), op, ": dy must have the shape of x ", x.sizes(),
                    ", got ", dy.sizes());
  check_weight(weight, W, op, "weight");
  check_offsets(offsets, W, op);
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK_VALUE(rstd.dim() == 2 && rstd.size(0) == M && rstd.size(1) == n, op,
                    ": rstd must have shape (M, n_chains) = (", M, ", ", n, "), got ",
                    rstd.sizes());
  TORCH_CHECK_VALUE(rstd.is_contiguous(), op, ": rstd must be contiguous, got strides ",
                    rstd.strides());

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({M, W}, x.options());
  // A frozen gain (needs_weight false): an empty dweight, and no dweight work in the kernels.
  at::Tensor dweight = at::empty({needs_weight ? W : 0}, weight.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t rows =
      needs_weight ? colm_kernels::chain_rmsnorm_bwd_workspace_rows(M, W, offsets.data(), n, dtype)
                   : 0;
  at::Tensor workspace;
  float* workspace_ptr = nullptr;
  if (rows > 0) {
    workspace = at::empty({rows, W}, x.options().dtype(at::kFloat));
    workspace_ptr = workspace.data_ptr<float>();
  }
  colm_kernels::launch_chain_rmsnorm_bwd(
      dy.data_ptr(), dy_stride, x.data_ptr(), x_stride, weight.data_ptr(),
      rstd.data_ptr<float>(), dx.data_ptr(), W, needs_weight ? dweight.data_ptr() : nullptr,
      workspace_ptr, rows,
      offsets.data(), n, M, W, dtype, stream);
  return {dx, dweight};
}

// ------------------------------------------------------------------------------------------
// chain_linear
// ------------------------------------------------------------------------------------------
cublasHandle_t blas_handle(const at::Tensor& like, cudaStream_t stream) {
#if COLM_KERNELS_TORCH_BLAS_HANDLE
  (void)like;
  (void)stream;
  // Binds the handle to the current stream and sets torch's workspace and math mode.
  return at::cuda::getCurrentCUDABlasHandle();
#else
  // One handle per thread and device, never destroyed (as torch's own pool); default math mode
  // (no TF32), cuBLAS's own workspace.
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  const int device = like.device().index();
  cublasHandle_t& handle = handles[device];
  if (handle == nullptr) {
    TORCH_CHECK(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS,
                "chain_linear: cublasCreate failed on device ", device);
  }
  TORCH_CHECK(cublasSetStream(handle, stream) == CUBLAS_STATUS_SUCCESS,
              "chain_linear: cublasSetStream failed");
  return handle;
#endif
}

colm_kernels::ChainLinearGemmMode gemm_mode() {
  const char* env = std::getenv("COLM_KERNELS_CHAIN_LINEAR_GEMM");
  const std::string v = env ? env : "";
  if (v.empty() || v == "auto") return colm_kernels::ChainLinearGemmMode::kAuto;
  if (v == "loop") return colm_kernels::ChainLinearGemmMode::kLoop;
  TORCH_CHECK_VALUE(false, "COLM_KERNELS_CHAIN_LINEAR_GEMM must be 'auto' or 'loop', got '", v,
                    "'");
  return colm_kernels::ChainLinearGemmMode::kAuto;  // unreachable
}

// Host-side copies of the weight layout that ChainLinearWeights points into.
struct WeightLayout {
  std::vector<const void*> ptrs;
  std::vector<int64_t> d, p, strides;
  int64_t N = 0;
  colm_kernels::ChainLinearWeights view() const {
    colm_kernels::ChainLinearWeights w;
    w.n_chains = static_cast<int64_t>(d.size());
    w.ptrs = ptrs.data();
    w.out_features = d.data();
    w.in_features = p.data();
    w.row_strides = strides.data();
    return w;
  }
  int64_t p_last() const { return p.back(); }
};

WeightLayout check_chain_weights(const std::vector<at::Tensor>& weights, const at::Tensor& ref,
                                 const char* ref_name, const char* op) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights must hold one (d_i, P_i) tensor per chain");
  WeightLayout L;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const std::string name = "weights[" + std::to_string(i) + "]";
    check_cuda(w, op, name.c_str(), &ref, ref_name);
    check_same_dtype(w, ref, op, name.c_str(), ref_name);
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": ", name, " must be 2-D (d_i, P_i), got shape ",
                      w.sizes());
    const int64_t d = w.size(0);
    const int64_t p = w.size(1);
    TORCH_CHECK_VALUE(d >= 1 && p >= 1, op, ": ", name, " has shape ", w.sizes(),
                      ": chains need d_i >= 1 and P_i >= 1");
    TORCH_CHECK_VALUE(p == 1 || w.stride(1) == 1, op, ": ", name,
                      " must be contiguous along its last dimension, got strides ", w.strides());
    TORCH_CHECK_VALUE(d == 1 || w.stride(0) >= p, op, ": ", name, " has row stride ",
                      w.stride(0), " < P_i = ", p, ": rows would overlap");
    TORCH_CHECK_VALUE(L.p.empty() || p >= L.p.back(), op,
                      ": prefix widths P_i (weights[i].shape[1]) must be non-decreasing, got ",
                      p, " after ", L.p.back());
    L.ptrs.push_back(w.data_ptr());
    L.d.push_back(d);
    L.p.push_back(p);
    L.strides.push_back(d == 1 ? std::max<int64_t>(w.stride(0), p) : w.stride(0));
    L.N += d;
  }
  return L;
}

at::Tensor workspace_tensor(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor chain_linear_fwd(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                            const std::vector<at::Tensor>& biases) {
  constexpr const char* op = "chain_linear_fwd";
  check_cuda(x, op, "x");
  const DType dtype = to_dtype(x, op, "x");
  const int64_t x_stride = check_rows(x, op, "x");
  const WeightLayout L = check_chain_weights(weights, x, "x", op);
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(K >= L.p_last(), op, ": x has ", K,
                    " features but the last chain reads P = ", L.p_last());
  TORCH_CHECK_VALUE(biases.empty() || biases.size() == weights.size(), op,
                    ": biases must be empty or hold one tensor per chain (", weights.size(),
                    "), got ", biases.size());
  std::vector<const void*> bias_ptrs;
  for (size_t i = 0; i < biases.size(); ++i) {
    const at::Tensor& b = biases[i];
    const std::string name = "biases[" + std::to_string(i) + "]";
    check_cuda(b, op, name.c_str(), &x, "x");
    check_same_dtype(b, x, op, name.c_str(), "x");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == L.d[i], op, ": ", name, " must have shape (",
                      L.d[i], ",), got ", b.sizes());
    TORCH_CHECK_VALUE(b.size(0) <= 1 || b.stride(0) == 1, op, ": ", name,
                      " must be contiguous, got stride ", b.stride(0));
    bias_ptrs.push_back(b.data_ptr());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, L.N}, x.options());
  if (M == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const colm_kernels::ChainLinearWeights w = L.view();
  at::Tensor ws = workspace_tensor(colm_kernels::chain_linear_fwd_workspace_bytes(w, M), x);
  colm_kernels::launch_chain_linear_fwd(
      blas_handle(x, stream), x.data_ptr(), x_stride, M, K, w,
      bias_ptrs.empty() ? nullptr : bias_ptrs.data(), y.data_ptr(), L.N, data_or_null(ws),
      ws.defined() ? static_cast<size_t>(ws.numel()) : 0, dtype, gemm_mode(), stream);
  return y;
}

at::Tensor chain_linear_bwd_dx(const at::Tensor& dy, const std::vector<at::Tensor>& weights,
                               int64_t in_features) {
  constexpr const char* op = "chain_linear_bwd_dx";
  check_cuda(dy, op, "dy");
  const DType dtype = to_dtype(dy, op, "dy");
  const int64_t dy_stride = check_rows(dy, op, "dy");
  const WeightLayout L = check_chain_weights(weights, dy, "dy", op);
  TORCH_CHECK_VALUE(dy.size(1) == L.N, op, ": dy has width ", dy.size(1),
                    " but the chains' output widths sum to ", L.N);
  TORCH_CHECK_VALUE(in_features >= L.p_last(), op, ": in_features = ", in_features,
                    " is smaller than the last chain's P = ", L.p_last());
  const int64_t M = dy.size(0);

  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dx = at::empty({M, in_features}, dy.options());
  if (M == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.device().index()).stream();
  const colm_kernels::ChainLinearWeights w = L.view();
  at::Tensor ws =
      workspace_tensor(colm_kernels::chain_linear_bwd_dx_workspace_bytes(w, M, dtype), dy);
  colm_kernels::launch_chain_linear_bwd_dx(
      blas_handle(dy, stream), dy.data_ptr(), dy_stride, M, w, dx.data_ptr(), in_features,
      in_features, data_or_null(ws), ws.defined() ? static_cast<size_t>(ws.numel()) : 0, dtype,
      gemm_mode(), stream);
  return dx;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> chain_linear_bwd_dw(
    const at::Tensor& dy, const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const std::vector<bool>& needs_weight, const std::vector<bool>& needs_bias) {
  constexpr const char* op = "chain_linear_bwd_dw";
  check_cuda(dy, op, "dy");
  check_cuda(x, op, "x", &dy, "dy");
  const DType dtype = to_dtype(dy, op, "dy");
  check_same_dtype(x, dy, op, "x", "dy");
  const int64_t dy_stride = check_rows(dy, op, "dy");
  const int64_t x_stride = check_rows(x, op, "x");
  const WeightLayout L = check_chain_weights(weights, dy, "dy", op);
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(dy.size(1) == L.N, op, ": dy has width ", dy.size(1),
                    " but the chains' output widths sum to ", L.N);
  TORCH_CHECK_VALUE(x.size(0) == dy.size(0), op, ": x has ", x.size(0), " rows but dy has ",
                    dy.size(0));
  TORCH_CHECK_VALUE(x.size(1) >= L.p_last(), op, ": x has ", x.size(1),
                    " features but the last chain reads P = ", L.p_last());
  TORCH_CHECK_VALUE(needs_weight.size() == n && needs_bias.size() == n, op,
                    ": needs_weight and needs_bias must hold one bool per chain (", n, "), got ",
                    needs_weight.size(), " and ", needs_bias.size());
  const int64_t M = dy.size(0);

  const c10::cuda::CUDAGuard guard(dy.device());
  std::vector<at::Tensor> dws, dbs;
  std::vector<void*> dw_ptrs(n, nullptr), db_ptrs(n, nullptr);
  for (size_t i = 0; i < n; ++i) {
    // A fresh tensor per gap: outputs of a custom op may not alias each other.
    dws.push_back(needs_weight[i] ? at::empty({L.d[i], L.p[i]}, dy.options())
                                  : at::empty({0}, dy.options()));
    dbs.push_back(needs_bias[i] ? at::empty({L.d[i]}, dy.options())
                                : at::empty({0}, dy.options()));
    if (needs_weight[i]) dw_ptrs[i] = dws.back().data_ptr();
    if (needs_bias[i]) db_ptrs[i] = dbs.back().data_ptr();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.device().index()).stream();
  const colm_kernels::ChainLinearWeights w = L.view();
  at::Tensor ws = workspace_tensor(
      colm_kernels::chain_linear_bwd_dw_workspace_bytes(w, M, dw_ptrs.data(), db_ptrs.data()),
      dy);
  bool any = false;
  for (size_t i = 0; i < n; ++i) any = any || needs_weight[i] || needs_bias[i];
  if (any) {
    colm_kernels::launch_chain_linear_bwd_dw(
        blas_handle(dy, stream), dy.data_ptr(), dy_stride, x.data_ptr(), x_stride, M, x.size(1),
        w, dw_ptrs.data(), db_ptrs.data(), data_or_null(ws),
        ws.defined() ? static_cast<size_t>(ws.numel()) : 0, dtype, gemm_mode(), stream);
  }
  return {dws, dbs};
}

// ------------------------------------------------------------------------------------------
// chain_attention_decode
// ------------------------------------------------------------------------------------------
const int32_t* int32_vector(const at::Tensor& t, const at::Tensor& q, int64_t numel,
                            const char* op, const char* name) {
  check_cuda(t, op, name, &q, "q");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.numel() == numel, op, ": ", name,
                    " must be contiguous with ", numel, " elements, got shape ", t.sizes(),
                    " and strides ", t.strides());
  return t.data_ptr<int32_t>();
}

at::Tensor chain_attention_decode_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                      const at::Tensor& group_heads,
                                      const at::Tensor& group_chains,
                                      const at::Tensor& head_chain,
                                      const std::optional<at::Tensor>& seq_chains,
                                      double softmax_scale, int64_t num_splits,
                                      const std::optional<at::Tensor>& block_table) {
  constexpr const char* op = "chain_attention_decode_fwd";
  check_cuda(q, op, "q");
  check_cuda(k_cache, op, "k_cache", &q, "q");
  check_cuda(v_cache, op, "v_cache", &q, "q");
  const DType dtype = to_dtype(q, op, "q");
  check_same_dtype(k_cache, q, op, "k_cache", "q");
  check_same_dtype(v_cache, q, op, "v_cache", "q");
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, Sq, Hq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
                    ": k_cache and v_cache must be 4-D (B, S_max, Hkv, D) or, paged, (num_blocks, "
                    "page_size, Hkv, D), of one shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const bool paged = block_table.has_value();
  TORCH_CHECK_VALUE((paged || k_cache.size(0) == B) && k_cache.size(3) == D, op, ": k_cache ",
                    k_cache.sizes(), " must have q's batch ", B, " (unless paged) and head dim ", D);
  if (paged) {
    check_cuda(*block_table, op, "block_table", &q, "q");
    TORCH_CHECK_TYPE(block_table->scalar_type() == at::kInt, op, ": block_table must be int32, got ",
                     block_table->scalar_type());
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == B &&
                          (block_table->size(1) <= 1 || block_table->stride(1) == 1),
                      op, ": block_table must be (B, max_blocks) = (", B,
                      ", *) with a unit last stride, got shape ", block_table->sizes(),
                      " and strides ", block_table->strides());
    TORCH_CHECK_VALUE(k_cache.size(0) >= 1 && k_cache.size(1) >= 1, op,
                      ": a paged cache needs num_blocks >= 1 and page_size >= 1, got ",
                      k_cache.sizes());
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"},
                                {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK_VALUE(t->size(3) <= 1 || t->stride(3) == 1, op, ": ", name,
                      " must be contiguous along its last dimension, got strides ", t->strides());
  }
  TORCH_CHECK_VALUE(group_heads.dim() == 2 && group_chains.sizes() == group_heads.sizes(), op,
                    ": group_heads and group_chains must be (Hkv, G) of one shape, got ",
                    group_heads.sizes(), " and ", group_chains.sizes());
  const int64_t Hkv = group_heads.size(0), G = group_heads.size(1);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hkv * G == Hq, op, ": group_heads ", group_heads.sizes(),
                    " must list the ", Hq, " query heads of q");
  TORCH_CHECK_VALUE(Hkv <= k_cache.size(2), op, ": ", Hkv, " kv heads read but the caches hold ",
                    k_cache.size(2));

  colm_kernels::ChainAttentionDecodeArgs a;
  a.q = q.data_ptr();
  a.q_stride_b = q.stride(0);
  a.q_stride_s = q.stride(1);
  a.q_stride_h = q.stride(2);
  a.k = k_cache.data_ptr();
  a.k_stride_b = k_cache.stride(0);
  a.k_stride_s = k_cache.stride(1);
  a.k_stride_h = k_cache.stride(2);
  a.v = v_cache.data_ptr();
  a.v_stride_b = v_cache.stride(0);
  a.v_stride_s = v_cache.stride(1);
  a.v_stride_h = v_cache.stride(2);
  a.cache_seqlens = int32_vector(cache_seqlens, q, B, op, "cache_seqlens");
  a.group_heads = int32_vector(group_heads, q, Hq, op, "group_heads");
  a.group_chains = int32_vector(group_chains, q, Hq, op, "group_chains");
  a.head_chain = int32_vector(head_chain, q, Hq, op, "head_chain");
  a.seq_chains = seq_chains.has_value() ? int32_vector(*seq_chains, q, B, op, "seq_chains") : nullptr;
  if (paged) {
    a.block_table = block_table->data_ptr<int32_t>();
    a.block_table_stride = block_table->size(0) <= 1 ? 0 : block_table->stride(0);
    a.page_size = k_cache.size(1);
    a.num_blocks = k_cache.size(0);
  }
  a.batch = B;
  a.sq = Sq;
  a.hq = Hq;
  a.hkv = Hkv;
  a.s_max = paged ? k_cache.size(1) * block_table->size(1) : k_cache.size(1);
  a.head_dim = D;
  a.softmax_scale = softmax_scale;

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Sq, Hq, D}, q.options());
  if (out.numel() == 0) return out;
  a.out = out.data_ptr();
  const colm_kernels::ChainAttentionDecodePlan plan =
      colm_kernels::chain_attention_decode_plan(a, num_splits);
  const int64_t ws_floats = colm_kernels::chain_attention_decode_workspace_floats(a, plan);
  at::Tensor ws;
  if (ws_floats > 0) ws = at::empty({ws_floats}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  colm_kernels::launch_chain_attention_decode(
      a, plan, ws.defined() ? ws.data_ptr<float>() : nullptr, ws_floats, dtype, stream);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "colm_kernels CUDA kernels (see csrc/bindings.cpp for the tensor contracts)";
  m.attr("MAX_CHAINS") = colm_kernels::kChainRMSNormMaxChains;
  m.def("chain_rmsnorm_fwd", &chain_rmsnorm_fwd, pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("offsets"), pybind11::arg("eps"),
        "Per-chain RMSNorm forward: x (M, W), weight (W,), offsets [0, ..., W], eps -> "
        "(y (M, W), rstd (M, n_chains) float32).");
  m.def("chain_rmsnorm_bwd", &chain_rmsnorm_bwd, pybind11::arg("dy"), pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("rstd"), pybind11::arg("offsets"),
        pybind11::arg("needs_weight") = true,
        "Per-chain RMSNorm backward: dy, x (M, W), weight (W,), rstd (M, n_chains) float32, "
        "offsets, needs_weight -> (dx (M, W), dweight (W,), summed in a fixed order; (0,) and "
        "no dweight work when needs_weight is false: a frozen gain).");
  m.def("chain_linear_fwd", &chain_linear_fwd, pybind11::arg("x"), pybind11::arg("weights"),
        pybind11::arg("biases"),
        "Chain-of-Linear forward: x (M, K), weights [(d_i, P_i)], biases [] or [(d_i,)] -> "
        "y (M, sum d_i) = cat_i(x[:, :P_i] @ W_i^T + b_i).");
  m.def("chain_linear_bwd_dx", &chain_linear_bwd_dx, pybind11::arg("dy"),
        pybind11::arg("weights"), pybind11::arg("in_features"),
        "Chain-of-Linear input gradient: dy (M, sum d_i), weights, in_features K -> dx (M, K); "
        "columns >= P_last are zeros.");
  m.def("chain_linear_bwd_dw", &chain_linear_bwd_dw, pybind11::arg("dy"), pybind11::arg("x"),
        pybind11::arg("weights"), pybind11::arg("needs_weight"), pybind11::arg("needs_bias"),
        "Chain-of-Linear weight and bias gradients -> (dW list, db list); dW_i = dy_i^T x[:, :P_i] "
        "(d_i, P_i), db_i = column sums of dy_i; an empty (0,) tensor where not needed.");
  m.def("chain_attention_decode_fwd", &chain_attention_decode_fwd, pybind11::arg("q"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("cache_seqlens"),
        pybind11::arg("group_heads"), pybind11::arg("group_chains"), pybind11::arg("head_chain"),
        pybind11::arg("seq_chains"), pybind11::arg("softmax_scale"), pybind11::arg("num_splits"),
        pybind11::arg("block_table") = pybind11::none(),
        "Split-K decode attention over a KV cache: q (B, Sq, Hq, D), caches (B, S_max, Hkv, D) or, "
        "with block_table int32 (B, max_blocks), paged (num_blocks, page_size, Hkv, D), "
        "cache_seqlens int32 (B,) (new tokens included), head tables int32, seq_chains int32 (B,) "
        "or None, softmax_scale, num_splits (0: automatic) -> out (B, Sq, Hq, D).");
}
