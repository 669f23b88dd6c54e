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
//   chain_rmsnorm_bwd(dy (M, W), x (M, W), weight (W,), rstd (M, n), offsets) -> (dx, dweight)
//       dx: (M, W) contiguous, x.dtype;  dweight: (W,), weight.dtype (fp32-accumulated)
// offsets = [0, o_1, ..., o_n = W], strictly increasing, 1 <= n <= MAX_CHAINS (64).
// x / dy need a unit stride along W; any non-negative row stride is accepted.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

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
                                                     const std::vector<int64_t>& offsets) {
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
  at::Tensor dweight = at::empty({W}, weight.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t rows =
      colm_kernels::chain_rmsnorm_bwd_workspace_rows(M, W, offsets.data(), n, dtype);
  at::Tensor workspace;
  float* workspace_ptr = nullptr;
  if (rows > 0) {
    workspace = at::empty({rows, W}, x.options().dtype(at::kFloat));
    workspace_ptr = workspace.data_ptr<float>();
  }
  colm_kernels::launch_chain_rmsnorm_bwd(
      dy.data_ptr(), dy_stride, x.data_ptr(), x_stride, weight.data_ptr(),
      rstd.data_ptr<float>(), dx.data_ptr(), W, dweight.data_ptr(), workspace_ptr, rows,
      offsets.data(), n, M, W, dtype, stream);
  return {dx, dweight};
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
        "Per-chain RMSNorm backward: dy, x (M, W), weight (W,), rstd (M, n_chains) float32, "
        "offsets -> (dx (M, W), dweight (W,)); dweight is summed in a fixed order.");
}
