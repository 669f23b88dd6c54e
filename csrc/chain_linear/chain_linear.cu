// colm_kernels: Chain-of-Linear forward, input gradient and weight gradient on cuBLAS.
// Math and tensor contracts: chain_linear.h. No torch here.
//
// cuBLAS is column-major: a row-major (r x c) matrix with row stride ld IS a column-major (c x r)
// matrix with leading dimension ld, i.e. its transpose. Every row-major product Y = A @ B below is
// issued as the column-major product Y^T = B^T @ A^T, which needs no copy.
//
// Decomposition (n chains, M rows; every GEMM accumulates in fp32, CUBLAS_COMPUTE_32F):
//
//   forward   one GEMM per chain, issued together (see "issuing"):
//               y[:, o_i:o_i+d_i] (M x d_i) = x[:, :P_i] @ W_i^T
//             column-major: C (d_i x M, ldc = ldy) = op_T(W_i) (d_i x P_i) @ x^T (P_i x M).
//             Bias: a small kernel first broadcasts b_i into y[:, o_i:o_i+d_i]; the GEMMs then run
//             with beta = 1, so y = round(acc + b) is rounded once (as torch's addmm).
//
//   input     dx[:, seg_j] = sum_{i >= j} dy_i @ W_i[:, seg_j]   with seg_j = [P_(j-1), P_j).
//             Stacking the blocks of chains j..n-1 (rows o_j..N of a dense lower-block-triangular
//             (N x P_n) matrix Wd), the sum is ONE product with inner size N - o_j:
//               dx[:, seg_j] (M x s_j) = dy[:, o_j:N] @ Wd[o_j:N, seg_j]
//             column-major: C (s_j x M, ldc = ldx) = Wd-block^T (s_j x (N-o_j)) @ dy^T.
//             When the weights are views of one dense matrix (equal row strides, W_i = W_0 + o_i
//             rows: a dense weight passed to the op) Wd is that matrix, read in place (its upper
//             blocks are never read): one GEMM per segment, all issued together, each output
//             written once (beta = 0, fp32 accumulation over all contributing chains, one rounding).
//             Separate blocks (ChainLinear's mlps.{i}.weight) are read through their own pointers,
//             never copied: one grouped call per block diagonal t = i - j, holding the GEMMs
//               dx[:, seg_j] (+)= dy_i @ W_i[:, seg_j]     (i = j + t)
//             with beta = 0 on the diagonal t = 0 and beta = 1 after it. Segment j is rounded
//             n - j times, as eager autograd rounds its sum of per-chain gradients; the extra dx
//             traffic is read in the GEMM epilogue instead of a packed copy of the weights in a
//             workspace on every call. dx[:, P_n:K] is zeroed by cudaMemset2DAsync.
//
//   weight    one GEMM per chain whose dW is needed (frozen chains get none), issued together:
//               dW_i (d_i x P_i) = dy_i^T @ x[:, :P_i]
//             column-major: C (P_i x d_i, ldc = P_i) = x^T (P_i x M) @ op_T(dy_i^T) (M x d_i).
//   bias      db_i = column sums of dy_i, two deterministic kernels: per (32-column tile, row
//             split) fp32 partial sums into the workspace, then a fixed-order sum over the splits.
//             M == 0 gives exact zeros for dW and db.
//
// Issuing the GEMMs of one step: cublasGemmGroupedBatchedEx (cuBLAS >= 12.5; its 64-bit variant
// when a size or stride exceeds INT_MAX) with one group per GEMM, when the step has more than one
// GEMM and every A/B/C pointer is 16-byte aligned (the grouped API reads the pointers from device
// memory and cannot check their alignment; cuBLAS documents misaligned-access errors for fp16 /
// bf16 otherwise); else one cublasGemmEx per GEMM, which picks kernels for any alignment. The
// grouped call's pointer arrays live in the workspace, written by a tiny kernel whose arguments
// carry the pointers (no host-to-device copy, so CUDA-graph capture works).

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "../common/checks.h"
#include "../common/device_utils.cuh"
#include "../common/dispatch.h"
#include "../common/types.h"
#include "chain_linear.h"

#if defined(CUBLAS_VERSION) && CUBLAS_VERSION >= 120500
#define COLM_HAS_CUBLAS_GROUPED_GEMM 1
#else
#define COLM_HAS_CUBLAS_GROUPED_GEMM 0
#endif
#if defined(CUBLAS_VERSION) && CUBLAS_VERSION >= 120000
#define COLM_HAS_CUBLAS_64 1
#else
#define COLM_HAS_CUBLAS_64 0
#endif

namespace colm_kernels {
namespace {

[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* expr, const char* file,
                                     int line) {
  std::ostringstream os;
  os << "cuBLAS error " << static_cast<int>(status) << " (" << cublasGetStatusName(status)
     << "): " << cublasGetStatusString(status) << " in `" << expr << "` at " << file << ":"
     << line;
  throw std::runtime_error(os.str());
}

#define COLM_CUBLAS_CHECK(expr)                                                       \
  do {                                                                                \
    const cublasStatus_t colm_status_ = (expr);                                       \
    if (colm_status_ != CUBLAS_STATUS_SUCCESS) {                                      \
      ::colm_kernels::throw_cublas_error(colm_status_, #expr, __FILE__, __LINE__);    \
    }                                                                                 \
  } while (0)

constexpr size_t kWorkspaceAlign = 256;
// Chains per launch of the bias kernels (their tables travel as kernel arguments).
constexpr int kBiasBatch = 64;
// Bias gradient: columns and row-lanes of one partial-sum block, rows per split, most splits.
constexpr int kDbCols = 32;
constexpr int kDbRowLanes = 8;
constexpr int64_t kDbMinRowsPerSplit = 256;
constexpr int64_t kDbMaxSplits = 128;
// Pointers written per launch of the pointer-table kernel.
constexpr int kPtrChunk = 256;

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return CUDA_R_32F;
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
  }
  COLM_CHECK(false, "chain_linear: unsupported dtype enum value ", static_cast<int>(dtype),
             " (expected float32, float16 or bfloat16)");
  return CUDA_R_32F;  // unreachable
}

const char* byte_ptr_c(const void* p, int64_t elems, int64_t es) {
  return static_cast<const char*>(p) + elems * es;
}
char* byte_ptr(void* p, int64_t elems, int64_t es) { return static_cast<char*>(p) + elems * es; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------
// Validated chain layout
// ------------------------------------------------------------------------------------------
struct Layout {
  int64_t n = 0;
  int64_t N = 0;                // sum d_i
  std::vector<const void*> w;   // W_i
  std::vector<int64_t> d, p;    // d_i, P_i
  std::vector<int64_t> ld;      // usable row stride of W_i (>= P_i)
  std::vector<int64_t> o;       // o_i (n + 1 entries, o_n = N)
  int64_t p_last() const { return p[n - 1]; }
};

Layout make_layout(const ChainLinearWeights& w, const char* op, bool need_data) {
  COLM_CHECK(w.n_chains >= 1, op, ": the number of chains must be >= 1, got ", w.n_chains);
  COLM_CHECK(w.out_features && w.in_features && w.row_strides, op,
             ": null weight layout array");
  COLM_CHECK(!need_data || w.ptrs, op, ": null weight pointer array");
  Layout L;
  L.n = w.n_chains;
  L.w.resize(L.n);
  L.d.resize(L.n);
  L.p.resize(L.n);
  L.ld.resize(L.n);
  L.o.resize(L.n + 1);
  int64_t acc = 0;
  for (int64_t i = 0; i < L.n; ++i) {
    const int64_t d = w.out_features[i];
    const int64_t p = w.in_features[i];
    const int64_t s = w.row_strides[i];
    COLM_CHECK(d >= 1 && p >= 1, op, ": weight[", i, "] has shape (", d, ", ", p,
               "): chains need d_i >= 1 and P_i >= 1");
    COLM_CHECK(i == 0 || p >= L.p[i - 1], op,
               ": prefix widths P_i must be non-decreasing, got P_", i - 1, " = ", L.p[i - 1],
               " and P_", i, " = ", p);
    COLM_CHECK(d == 1 || s >= p, op, ": weight[", i, "] has row stride ", s, " < P_", i, " = ",
               p, ": rows would overlap");
    if (need_data) {
      COLM_CHECK(w.ptrs[i] != nullptr, op, ": weight[", i, "] is a null pointer");
      L.w[i] = w.ptrs[i];
    }
    L.d[i] = d;
    L.p[i] = p;
    L.ld[i] = std::max(s, p);
    L.o[i] = acc;
    acc += d;
  }
  L.o[L.n] = acc;
  L.N = acc;
  return L;
}

// A row stride that cuBLAS accepts as a leading dimension: any value is fine for one row.
int64_t usable_ld(int64_t row_stride, int64_t rows, int64_t width, const char* name,
                  const char* op) {
  COLM_CHECK(rows <= 1 || row_stride >= width, op, ": ", name, " has row stride ", row_stride,
             " < its width ", width);
  return std::max(row_stride, width);
}

struct Carver {
  char* base;
  size_t size;
  size_t used = 0;
  const char* op;
  void* take(size_t bytes) {
    if (bytes == 0) return nullptr;
    COLM_CHECK(used + bytes <= size, op, ": workspace of ", size, " bytes is too small (needs ",
               used + bytes, "; size it with the matching *_workspace_bytes())");
    void* p = base + used;
    used += round_up(bytes, kWorkspaceAlign);
    return p;
  }
};

Carver make_carver(void* workspace, size_t bytes, const char* op) {
  COLM_CHECK(workspace != nullptr || bytes == 0, op, ": null workspace of ", bytes, " bytes");
  COLM_CHECK(reinterpret_cast<uintptr_t>(workspace) % 16 == 0, op,
             ": the workspace must be 16-byte aligned");
  return Carver{static_cast<char*>(workspace), bytes, 0, op};
}

size_t table_bytes(int64_t gemms) {
  return gemms > 1 ? round_up(static_cast<size_t>(3 * gemms) * sizeof(void*), kWorkspaceAlign)
                   : 0;
}

// ------------------------------------------------------------------------------------------
// cuBLAS handle scope and GEMM issuing
// ------------------------------------------------------------------------------------------
class HandleScope {
 public:
  HandleScope(cublasHandle_t handle, cudaStream_t stream, const char* op) : handle_(handle) {
    COLM_CHECK(handle != nullptr, op, ": the cuBLAS handle is null");
    cudaStream_t bound = nullptr;
    COLM_CUBLAS_CHECK(cublasGetStream(handle, &bound));
    if (bound != stream) COLM_CUBLAS_CHECK(cublasSetStream(handle, stream));
    COLM_CUBLAS_CHECK(cublasGetPointerMode(handle, &previous_));
    if (previous_ != CUBLAS_POINTER_MODE_HOST) {
      COLM_CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
    }
  }
  ~HandleScope() {
    if (previous_ != CUBLAS_POINTER_MODE_HOST) cublasSetPointerMode(handle_, previous_);
  }
  HandleScope(const HandleScope&) = delete;
  HandleScope& operator=(const HandleScope&) = delete;

 private:
  cublasHandle_t handle_;
  cublasPointerMode_t previous_ = CUBLAS_POINTER_MODE_HOST;
};

// Column-major C (m x n, ldc) = op(A) (m x k) @ op(B) (k x n) + beta * C, alpha = 1.
struct Gemm {
  cublasOperation_t ta, tb;
  int64_t m, n, k, lda, ldb, ldc;
  const void* a;
  const void* b;
  void* c;
  float beta;
};

bool fits_int(const Gemm& g) {
  return std::max({g.m, g.n, g.k, g.lda, g.ldb, g.ldc}) <= static_cast<int64_t>(INT_MAX);
}

struct PtrChunk {
  int32_t count;
  void* ptrs[kPtrChunk];
};

__global__ void write_ptr_table_kernel(const __grid_constant__ PtrChunk chunk, void** dst) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < chunk.count) dst[i] = chunk.ptrs[i];
}

// Writes host[0..size) to the device array dst, in stream order.
void upload_ptrs(const std::vector<void*>& host, void** dst, cudaStream_t stream) {
  for (size_t base = 0; base < host.size(); base += kPtrChunk) {
    PtrChunk chunk{};
    chunk.count = static_cast<int32_t>(std::min<size_t>(kPtrChunk, host.size() - base));
    for (int32_t i = 0; i < chunk.count; ++i) chunk.ptrs[i] = host[base + i];
    write_ptr_table_kernel<<<1, kPtrChunk, 0, stream>>>(chunk, dst + base);
    COLM_CUDA_CHECK_LAUNCH();
  }
}

void gemm_one(cublasHandle_t handle, const Gemm& g, cudaDataType_t t, const char* op) {
  const float alpha = 1.0f;
  if (fits_int(g)) {
    COLM_CUBLAS_CHECK(cublasGemmEx(handle, g.ta, g.tb, static_cast<int>(g.m),
                                   static_cast<int>(g.n), static_cast<int>(g.k), &alpha, g.a, t,
                                   static_cast<int>(g.lda), g.b, t, static_cast<int>(g.ldb),
                                   &g.beta, g.c, t, static_cast<int>(g.ldc), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
    return;
  }
#if COLM_HAS_CUBLAS_64
  COLM_CUBLAS_CHECK(cublasGemmEx_64(handle, g.ta, g.tb, g.m, g.n, g.k, &alpha, g.a, t, g.lda, g.b,
                                    t, g.ldb, &g.beta, g.c, t, g.ldc, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
#else
  COLM_CHECK(false, op, ": a size or stride exceeds INT_MAX and this cuBLAS (",
             CUBLAS_VERSION, ") has no 64-bit GEMM interface");
#endif
}

#if COLM_HAS_CUBLAS_GROUPED_GEMM
template <typename I>
void gemm_grouped_impl(cublasHandle_t handle, const std::vector<Gemm>& gs, cudaDataType_t t,
                       void** table) {
  const size_t count = gs.size();
  std::vector<cublasOperation_t> ta(count), tb(count);
  std::vector<I> m(count), n(count), k(count), lda(count), ldb(count), ldc(count);
  std::vector<I> group_size(count, 1);
  std::vector<float> alpha(count, 1.0f), beta(count);
  for (size_t i = 0; i < count; ++i) {
    const Gemm& g = gs[i];
    ta[i] = g.ta;
    tb[i] = g.tb;
    m[i] = static_cast<I>(g.m);
    n[i] = static_cast<I>(g.n);
    k[i] = static_cast<I>(g.k);
    lda[i] = static_cast<I>(g.lda);
    ldb[i] = static_cast<I>(g.ldb);
    ldc[i] = static_cast<I>(g.ldc);
    beta[i] = g.beta;
  }
  const void* const* a = table;
  const void* const* b = table + count;
  void* const* c = table + 2 * count;
  if constexpr (sizeof(I) == sizeof(int)) {
    COLM_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        handle, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(), a, t,
        lda.data(), b, t, ldb.data(), beta.data(), c, t, ldc.data(), static_cast<int>(count),
        group_size.data(), CUBLAS_COMPUTE_32F));
  } else {
    COLM_CUBLAS_CHECK(cublasGemmGroupedBatchedEx_64(
        handle, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(), a, t,
        lda.data(), b, t, ldb.data(), beta.data(), c, t, ldc.data(),
        static_cast<int64_t>(count), group_size.data(), CUBLAS_COMPUTE_32F));
  }
}
#endif

// Issues the GEMMs of one step (their outputs must not overlap). `table` is a device array of at
// least 3 * gs.size() pointers (table_bytes()), or null when gs.size() <= 1.
void run_gemms(cublasHandle_t handle, const std::vector<Gemm>& gs, DType dtype, void** table,
               ChainLinearGemmMode mode, cudaStream_t stream, const char* op) {
  if (gs.empty()) return;
  const cudaDataType_t t = cuda_type(dtype);
#if COLM_HAS_CUBLAS_GROUPED_GEMM
  bool grouped = mode == ChainLinearGemmMode::kAuto && gs.size() > 1 && table != nullptr;
  bool small = true;
  for (const Gemm& g : gs) {
    grouped = grouped && aligned16(g.a) && aligned16(g.b) && aligned16(g.c);
    small = small && fits_int(g);
  }
  if (grouped) {
    const size_t count = gs.size();
    std::vector<void*> host(3 * count);
    for (size_t i = 0; i < count; ++i) {
      host[i] = const_cast<void*>(gs[i].a);
      host[count + i] = const_cast<void*>(gs[i].b);
      host[2 * count + i] = gs[i].c;
    }
    upload_ptrs(host, table, stream);
    if (small) {
      gemm_grouped_impl<int>(handle, gs, t, table);
    } else {
      gemm_grouped_impl<int64_t>(handle, gs, t, table);
    }
    return;
  }
#else
  (void)table;
  (void)mode;
  (void)stream;
#endif
  for (const Gemm& g : gs) gemm_one(handle, g, t, op);
}

// ------------------------------------------------------------------------------------------
// Bias kernels
// ------------------------------------------------------------------------------------------
// A batch of at most kBiasBatch chains' columns, numbered 0..cols: chain c owns
// [col_begin[c], col_begin[c + 1]) and maps it to columns [mat_col[c], ...) of y / dy.
struct BiasTable {
  int32_t n;
  int64_t cols;
  int64_t col_begin[kBiasBatch + 1];
  int64_t mat_col[kBiasBatch];
  void* vec[kBiasBatch];  // b_c (read) or db_c (written)
};

__device__ __forceinline__ int find_chain(const BiasTable& t, int64_t col) {
  int c = 0;
  while (c + 1 < t.n && col >= t.col_begin[c + 1]) ++c;
  return c;
}

// y[r, mat_col[c] + j] = b_c[j] for every row r.
template <typename T>
__global__ void bias_fill_kernel(const __grid_constant__ BiasTable t, T* __restrict__ y,
                                 int64_t ldy, int64_t M) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t.cols) return;
  const int c = find_chain(t, col);
  const int64_t j = col - t.col_begin[c];
  const T v = static_cast<const T*>(t.vec[c])[j];
  T* out = y + t.mat_col[c] + j;
  for (int64_t r = blockIdx.y; r < M; r += gridDim.y) out[r * ldy] = v;
}

// partial[split, col] = sum of dy[r, mat_col[c] + j] over the split's rows (fixed order).
template <typename T>
__global__ void __launch_bounds__(kDbCols* kDbRowLanes)
    bias_grad_partial_kernel(const __grid_constant__ BiasTable t, const T* __restrict__ dy,
                             int64_t ldy, int64_t M, int64_t rows_per_split,
                             float* __restrict__ partial) {
  __shared__ float sums[kDbRowLanes][kDbCols + 1];
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kDbCols + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < M ? r0 + rows_per_split : M;
  float acc = 0.0f;
  if (col < t.cols) {
    const int c = find_chain(t, col);
    const T* p = dy + t.mat_col[c] + (col - t.col_begin[c]);
    for (int64_t r = r0 + ty; r < r1; r += kDbRowLanes) acc += dev::to_float(p[r * ldy]);
  }
  sums[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < t.cols) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kDbRowLanes; ++k) s += sums[k][tx];
    partial[static_cast<int64_t>(blockIdx.y) * t.cols + col] = s;
  }
}

// db_c[j] = sum over splits (in order) of partial[split, col].
template <typename T>
__global__ void bias_grad_final_kernel(const __grid_constant__ BiasTable t,
                                       const float* __restrict__ partial, int64_t splits) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t.cols) return;
  float s = 0.0f;
  for (int64_t k = 0; k < splits; ++k) s += partial[k * t.cols + col];
  const int c = find_chain(t, col);
  static_cast<T*>(t.vec[c])[col - t.col_begin[c]] = dev::from_float<T>(s);
}

// Consecutive batches of at most kBiasBatch of the given chains.
std::vector<BiasTable> bias_tables(const Layout& L, const std::vector<int64_t>& chains,
                                   const std::vector<void*>& vecs) {
  std::vector<BiasTable> out;
  for (size_t base = 0; base < chains.size(); base += kBiasBatch) {
    BiasTable t{};
    const size_t count = std::min<size_t>(kBiasBatch, chains.size() - base);
    t.n = static_cast<int32_t>(count);
    int64_t acc = 0;
    for (size_t c = 0; c < count; ++c) {
      const int64_t i = chains[base + c];
      t.col_begin[c] = acc;
      t.mat_col[c] = L.o[i];
      t.vec[c] = vecs[base + c];
      acc += L.d[i];
    }
    t.col_begin[count] = acc;
    t.cols = acc;
    out.push_back(t);
  }
  return out;
}

int64_t db_splits(int64_t M) {
  return std::min(kDbMaxSplits, std::max<int64_t>(1, ceil_div(M, kDbMinRowsPerSplit)));
}

unsigned grid_rows(int64_t M) { return static_cast<unsigned>(std::min<int64_t>(M, 1024)); }

// The checks every launcher starts with: a known dtype, the chain layout, M >= 0, and an input
// width K that covers the last chain's prefix.
Layout checked_layout(const ChainLinearWeights& w, const char* op, bool need_data, DType dtype, int64_t M,
                      int64_t K) {
  (void)cuda_type(dtype);  // rejects an unknown dtype before any work
  Layout L = make_layout(w, op, need_data);
  COLM_CHECK(M >= 0, op, ": the number of rows M must be >= 0, got ", M);
  COLM_CHECK(K >= L.p_last(), op, ": the input has ", K, " features (in_features) but the last chain reads P = ",
             L.p_last());
  return L;
}


}  // namespace

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
size_t chain_linear_fwd_workspace_bytes(const ChainLinearWeights& w, int64_t M) {
  const Layout L = make_layout(w, "chain_linear_fwd", false);
  return M > 0 ? table_bytes(L.n) : 0;
}

void launch_chain_linear_fwd(cublasHandle_t handle, const void* x, int64_t x_row_stride, int64_t M,
                             int64_t K, const ChainLinearWeights& w, const void* const* bias_ptrs,
                             void* y, int64_t y_row_stride, void* workspace,
                             size_t workspace_bytes, DType dtype, ChainLinearGemmMode mode,
                             cudaStream_t stream) {
  constexpr const char* op = "chain_linear_fwd";
  const Layout L = checked_layout(w, op, true, dtype, M, K);
  if (M == 0) return;
  COLM_CHECK(x != nullptr && y != nullptr, op, ": null x or y");
  const int64_t es = dtype_size(dtype);
  const int64_t ldx = usable_ld(x_row_stride, M, K, "x", op);
  const int64_t ldy = usable_ld(y_row_stride, M, L.N, "y", op);
  Carver carver = make_carver(workspace, workspace_bytes, op);
  void** table = static_cast<void**>(carver.take(table_bytes(L.n)));

  const bool has_bias = bias_ptrs != nullptr;
  if (has_bias) {
    std::vector<int64_t> chains(L.n);
    std::vector<void*> vecs(L.n);
    for (int64_t i = 0; i < L.n; ++i) {
      COLM_CHECK(bias_ptrs[i] != nullptr, op, ": bias[", i, "] is a null pointer");
      chains[i] = i;
      vecs[i] = const_cast<void*>(bias_ptrs[i]);
    }
    dispatch_float_types(dtype, op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      for (const BiasTable& t : bias_tables(L, chains, vecs)) {
        const dim3 grid(static_cast<unsigned>(ceil_div(t.cols, 256)), grid_rows(M));
        bias_fill_kernel<T><<<grid, 256, 0, stream>>>(t, static_cast<T*>(y), ldy, M);
        COLM_CUDA_CHECK_LAUNCH();
      }
    });
  }

  std::vector<Gemm> gs;
  gs.reserve(L.n);
  for (int64_t i = 0; i < L.n; ++i) {
    // C (d_i x M) = op_T(W_i as col-major P_i x d_i) @ x^T (P_i x M)
    gs.push_back(Gemm{CUBLAS_OP_T, CUBLAS_OP_N, L.d[i], M, L.p[i], L.ld[i], ldx, ldy, L.w[i], x,
                      byte_ptr(y, L.o[i], es), has_bias ? 1.0f : 0.0f});
  }
  HandleScope scope(handle, stream, op);
  run_gemms(handle, gs, dtype, table, mode, stream, op);
}

// ------------------------------------------------------------------------------------------
// Input gradient
// ------------------------------------------------------------------------------------------
namespace {

// The weights are views of one dense matrix: equal row strides >= P_n, W_i = W_0 + o_i rows.
bool weights_dense(const Layout& L, int64_t es) {
  const int64_t ld = L.ld[0];
  if (ld < L.p_last()) return false;
  for (int64_t i = 0; i < L.n; ++i) {
    if (L.ld[i] != ld) return false;
    if (byte_ptr_c(L.w[0], L.o[i] * ld, es) != static_cast<const char*>(L.w[i])) return false;
  }
  return true;
}

int64_t dx_segments(const Layout& L) {
  int64_t count = 0;
  for (int64_t j = 0; j < L.n; ++j) count += L.p[j] > (j ? L.p[j - 1] : 0);
  return count;
}

}  // namespace

size_t chain_linear_bwd_dx_workspace_bytes(const ChainLinearWeights& w, int64_t M, DType dtype) {
  (void)dtype;
  const Layout L = make_layout(w, "chain_linear_bwd_dx", false);
  // Only the grouped calls' pointer tables: no weight is ever copied.
  return M <= 0 ? 0 : table_bytes(dx_segments(L));
}

void launch_chain_linear_bwd_dx(cublasHandle_t handle, const void* dy, int64_t dy_row_stride,
                                int64_t M, const ChainLinearWeights& w, void* dx,
                                int64_t dx_row_stride, int64_t K, void* workspace,
                                size_t workspace_bytes, DType dtype, ChainLinearGemmMode mode,
                                cudaStream_t stream) {
  constexpr const char* op = "chain_linear_bwd_dx";
  const Layout L = checked_layout(w, op, true, dtype, M, K);
  if (M == 0) return;
  COLM_CHECK(dy != nullptr && dx != nullptr, op, ": null dy or dx");
  const int64_t es = dtype_size(dtype);
  const int64_t ldy = usable_ld(dy_row_stride, M, L.N, "dy", op);
  const int64_t ldx = usable_ld(dx_row_stride, M, K, "dx", op);
  Carver carver = make_carver(workspace, workspace_bytes, op);
  const int64_t segments = dx_segments(L);
  void** table = static_cast<void**>(carver.take(table_bytes(segments)));

  HandleScope scope(handle, stream, op);
  if (weights_dense(L, es)) {
    // Wd, the dense lower-block-triangular (N x P_n) weight, read in place: one GEMM per segment.
    const void* wd = L.w[0];
    const int64_t ldd = L.ld[0];
    std::vector<Gemm> gs;
    gs.reserve(segments);
    for (int64_t j = 0; j < L.n; ++j) {
      const int64_t start = j ? L.p[j - 1] : 0;
      const int64_t width = L.p[j] - start;
      if (width == 0) continue;
      // C (s_j x M) = Wd[o_j:N, seg_j] as col-major (s_j x (N - o_j)) @ dy[:, o_j:]^T
      gs.push_back(Gemm{CUBLAS_OP_N, CUBLAS_OP_N, width, M, L.N - L.o[j], ldd, ldy, ldx,
                        byte_ptr_c(wd, L.o[j] * ldd + start, es), byte_ptr_c(dy, L.o[j], es),
                        byte_ptr(dx, start, es), 0.0f});
    }
    run_gemms(handle, gs, dtype, table, mode, stream, op);
  } else {
    // Separate blocks, each through its own pointer: one call per block diagonal t = i - j.
    // The calls run in stream order, so each may reuse the same pointer table.
    for (int64_t t = 0; t < L.n; ++t) {
      std::vector<Gemm> gs;
      for (int64_t j = 0; j + t < L.n; ++j) {
        const int64_t i = j + t;
        const int64_t start = j ? L.p[j - 1] : 0;
        const int64_t width = L.p[j] - start;
        if (width == 0) continue;
        // C (s_j x M) (+)= W_i[:, seg_j] as col-major (s_j x d_i) @ dy[:, o_i:o_i+d_i]^T
        gs.push_back(Gemm{CUBLAS_OP_N, CUBLAS_OP_N, width, M, L.d[i], L.ld[i], ldy, ldx,
                          byte_ptr_c(L.w[i], start, es), byte_ptr_c(dy, L.o[i], es),
                          byte_ptr(dx, start, es), t == 0 ? 0.0f : 1.0f});
      }
      run_gemms(handle, gs, dtype, table, mode, stream, op);
    }
  }
  if (K > L.p_last()) {
    COLM_CUDA_CHECK(cudaMemset2DAsync(byte_ptr(dx, L.p_last(), es),
                                      static_cast<size_t>(ldx * es), 0,
                                      static_cast<size_t>((K - L.p_last()) * es),
                                      static_cast<size_t>(M), stream));
  }
}

// ------------------------------------------------------------------------------------------
// Weight and bias gradients
// ------------------------------------------------------------------------------------------
namespace {

struct DwPlan {
  std::vector<int64_t> w_chains, b_chains;
  int64_t b_cols = 0;
  int64_t splits = 0;
};

DwPlan plan_dw(const Layout& L, int64_t M, void* const* dw_ptrs, void* const* db_ptrs) {
  DwPlan p;
  for (int64_t i = 0; i < L.n; ++i) {
    if (dw_ptrs && dw_ptrs[i]) p.w_chains.push_back(i);
    if (db_ptrs && db_ptrs[i]) {
      p.b_chains.push_back(i);
      p.b_cols += L.d[i];
    }
  }
  p.splits = db_splits(M);
  return p;
}

size_t db_partial_bytes(const DwPlan& p, int64_t M) {
  if (M <= 0 || p.b_cols == 0) return 0;
  return round_up(static_cast<size_t>(p.splits) * p.b_cols * sizeof(float), kWorkspaceAlign);
}

}  // namespace

size_t chain_linear_bwd_dw_workspace_bytes(const ChainLinearWeights& w, int64_t M,
                                           void* const* dw_ptrs, void* const* db_ptrs) {
  const Layout L = make_layout(w, "chain_linear_bwd_dw", false);
  if (M <= 0) return 0;
  const DwPlan p = plan_dw(L, M, dw_ptrs, db_ptrs);
  return table_bytes(static_cast<int64_t>(p.w_chains.size())) + db_partial_bytes(p, M);
}

void launch_chain_linear_bwd_dw(cublasHandle_t handle, const void* dy, int64_t dy_row_stride,
                                const void* x, int64_t x_row_stride, int64_t M, int64_t K,
                                const ChainLinearWeights& w, void* const* dw_ptrs,
                                void* const* db_ptrs, void* workspace, size_t workspace_bytes,
                                DType dtype, ChainLinearGemmMode mode, cudaStream_t stream) {
  constexpr const char* op = "chain_linear_bwd_dw";
  const Layout L = checked_layout(w, op, false, dtype, M, K);
  const DwPlan p = plan_dw(L, M, dw_ptrs, db_ptrs);
  const int64_t es = dtype_size(dtype);
  if (M == 0) {  // empty sums: exact zeros
    for (int64_t i : p.w_chains) {
      COLM_CUDA_CHECK(cudaMemsetAsync(dw_ptrs[i], 0, static_cast<size_t>(L.d[i] * L.p[i] * es),
                                      stream));
    }
    for (int64_t i : p.b_chains) {
      COLM_CUDA_CHECK(cudaMemsetAsync(db_ptrs[i], 0, static_cast<size_t>(L.d[i] * es), stream));
    }
    return;
  }
  if (p.w_chains.empty() && p.b_chains.empty()) return;
  COLM_CHECK(dy != nullptr, op, ": null dy");
  const int64_t ldy = usable_ld(dy_row_stride, M, L.N, "dy", op);
  Carver carver = make_carver(workspace, workspace_bytes, op);
  void** table = static_cast<void**>(carver.take(table_bytes(static_cast<int64_t>(p.w_chains.size()))));
  float* partial = static_cast<float*>(carver.take(db_partial_bytes(p, M)));

  if (!p.w_chains.empty()) {
    COLM_CHECK(x != nullptr, op, ": null x");
    const int64_t ldx = usable_ld(x_row_stride, M, K, "x", op);
    std::vector<Gemm> gs;
    gs.reserve(p.w_chains.size());
    for (int64_t i : p.w_chains) {
      // C (P_i x d_i) = x^T (P_i x M) @ op_T(dy_i as col-major d_i x M)
      gs.push_back(Gemm{CUBLAS_OP_N, CUBLAS_OP_T, L.p[i], L.d[i], M, ldx, ldy, L.p[i], x,
                        byte_ptr_c(dy, L.o[i], es), dw_ptrs[i], 0.0f});
    }
    HandleScope scope(handle, stream, op);
    run_gemms(handle, gs, dtype, table, mode, stream, op);
  }

  if (!p.b_chains.empty()) {
    std::vector<void*> vecs;
    for (int64_t i : p.b_chains) vecs.push_back(db_ptrs[i]);
    const int64_t rows_per_split = ceil_div(M, p.splits);
    dispatch_float_types(dtype, op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      for (const BiasTable& t : bias_tables(L, p.b_chains, vecs)) {
        const dim3 grid(static_cast<unsigned>(ceil_div(t.cols, kDbCols)),
                        static_cast<unsigned>(p.splits));
        bias_grad_partial_kernel<T><<<grid, dim3(kDbCols, kDbRowLanes), 0, stream>>>(
            t, static_cast<const T*>(dy), ldy, M, rows_per_split, partial);
        COLM_CUDA_CHECK_LAUNCH();
        bias_grad_final_kernel<T>
            <<<static_cast<unsigned>(ceil_div(t.cols, 256)), 256, 0, stream>>>(t, partial,
                                                                                p.splits);
        COLM_CUDA_CHECK_LAUNCH();
        // The next batch reuses `partial` after this one's final kernel (stream order).
      }
    });
  }
}

}  // namespace colm_kernels
