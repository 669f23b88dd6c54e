// colm_kernels: chain attention over a KV cache, split-K flash-decoding (COLM_SPEC.md 3, 4, 6).
// Math and tensor contracts: chain_attention_decode.h.
//
// Head dims: every multiple of 8 in [8, 256]. Kernels are compiled for the padded head dims
// kDPad = 16, 32, 64, 128, 256 (the next power of two, at least 16); the real one, p.head_dim, is a
// runtime value. A row of D elements is D / kVec whole 16-byte vectors in every dtype (D % 8 == 0),
// so a lane's vectors are either inside the head dim (loaded) or padding (zeros, never loaded or
// stored): padding costs idle lanes, never extra memory traffic.
//
// Paged caches (block_table != nullptr): key j of sequence b lives at row
// [block_table[b, j / page_size], j % page_size] of the (num_blocks, page_size, Hkv, D) caches; the
// block index is clamped into [0, num_blocks) so that no table, checked or not, sends a read
// outside the cache.
//
// Work split. A thread block (128 threads) owns (split s, kv head g, row block, sequence b): the
// keys [s * split_size, min((s + 1) * split_size, L_b)) of kv head g and up to kRows packed rows
// (new token i x query head of g, active heads first, as the Triton kernel). The block is cut into
// key groups of kTd threads; a group reads one key's K and V rows with 16-byte vector loads (each
// thread kEpt consecutive elements of the head dim), so every K/V element of the split is read from
// memory once for all the rows. Group g handles keys base + g, base + g + kGroups, ... and keeps
// its own online softmax (fp32, exp2, scores pre-scaled by softmax_scale * log2 e) per row; the
// partial dot products are summed across the group's lanes with xor shuffles (every lane gets the
// same bits). At the end the groups are merged through shared memory:
//   num_splits == 1: the block writes out (and zeros for the inactive heads of its rows);
//   num_splits > 1 : it writes the split's normalised output and lse (log2) to the workspace, and
//                    decode_combine_kernel (one warp per output row) merges the valid splits
//                    cdiv(L_b, split_size) of each row, writing zeros for inactive heads.
// Blocks whose split starts at or past L_b, or whose rows are all inactive, load nothing.
// Every loop bound that guards a shuffle or __syncthreads is uniform over the block.
//
// Math is fp32 on CUDA cores (no tensor cores): the kernel is bound by K/V bandwidth while
// rows_per_block * (2 FMAs per element) stays below the SM's FMA rate per loaded byte, i.e. for
// the usual decode shapes (Sq * G <= 8). Larger packed row counts (up to 128 new tokens x G) are
// split into row blocks of 8, each of which reads the split's K/V again: correct, and L2 serves
// the re-reads, but a long chunk of new tokens is cheaper through chain_attention's tensor cores.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "../common/checks.h"
#include "../common/device_utils.cuh"
#include "../common/dispatch.h"
#include "../common/types.h"
#include "chain_attention_decode.h"

namespace colm_kernels {
namespace {

using dev::kWarpSize;

constexpr int kThreads = 128;
constexpr int kMaxRows = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMinSplitKeys = 128;  // auto splits keep at least this many keys each

struct Params {
  const void* q;
  index_t q_sb, q_ss, q_sh;
  const void* k;
  index_t k_sb, k_ss, k_sh;
  const void* v;
  index_t v_sb, v_ss, v_sh;
  void* out;
  float* part_o;
  float* part_lse;
  const int32_t* seqlens;
  const int32_t* seq_chains;
  const int32_t* group_heads;
  const int32_t* group_chains;
  const int32_t* head_chain;
  const int32_t* block_table;  // nullptr: contiguous caches
  index_t bt_stride;           // elements between block_table rows
  int32_t page_size, num_blocks;
  int32_t sq, hq, group, s_max, split_size, num_splits, row_blocks, head_dim;
  float qk_scale;  // softmax_scale * log2(e)
};

// Lane layout for the padded head dim DP (a power of two): kTd lanes per key, kEpt consecutive
// elements (kNv 16-byte vectors) per lane.
template <typename T, int DP>
struct Traits {
  static constexpr int kVec = dev::VecWidth<T>::value;                          // elements / 16 B
  static constexpr int kEpt = (DP / kWarpSize > kVec) ? DP / kWarpSize : kVec;  // per thread
  static constexpr int kTd = DP / kEpt;                                         // threads / key
  static constexpr int kGroups = kThreads / kTd;                                // keys in flight
  static constexpr int kNv = kEpt / kVec;                                       // vectors / lane
  static_assert(DP % kEpt == 0 && kEpt % kVec == 0, "head dim must split into 16-byte vectors");
  static_assert(kTd >= 1 && kTd <= kWarpSize && kWarpSize % kTd == 0,
                "a key group must lie inside one warp");
};

// Cache row of key `key` of sequence b: (block, position in block). Contiguous caches: (b, key).
struct CacheSlot {
  index_t block, pos;
};

__device__ __forceinline__ CacheSlot cache_slot(const Params& p, index_t b64, int key) {
  if (p.block_table == nullptr) return {b64, static_cast<index_t>(key)};
  const int page = key / p.page_size;
  int blk = p.block_table[b64 * p.bt_stride + page];
  blk = blk < 0 ? 0 : (blk >= p.num_blocks ? p.num_blocks - 1 : blk);
  return {static_cast<index_t>(blk), static_cast<index_t>(key - page * p.page_size)};
}

__device__ __forceinline__ int seq_len(const Params& p, int b) {
  const int n = p.seqlens[b];
  return n < 0 ? 0 : (n > p.s_max ? p.s_max : n);
}

// How many of kv head g's query heads are active for sequence b (a prefix: sorted by chain).
__device__ __forceinline__ int active_members(const Params& p, int b, int g) {
  if (p.seq_chains == nullptr) return p.group;
  const int sc = p.seq_chains[b];
  int a = 0;
  for (int m = 0; m < p.group; ++m) a += p.group_chains[g * p.group + m] <= sc ? 1 : 0;
  return a;
}

// Packed row r (< G * Sq) -> (position, member): the A * Sq active rows first, position-major.
__device__ __forceinline__ void packed_row(int r, int n_act, int A, int G, int& pos, int& member) {
  if (r < n_act) {
    pos = r / A;
    member = r % A;
  } else {
    const int ri = r - n_act;
    const int n_inactive = G - A;
    pos = ri / n_inactive;
    member = A + ri % n_inactive;
  }
}

template <int kTd>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = kTd / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, int DP, int kRows>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const Params p) {
  using Tr = Traits<T, DP>;
  constexpr int kEpt = Tr::kEpt;
  constexpr int kUnroll = kRows >= 8 ? 1 : 2;  // keys per group per step (registers allowing)
  constexpr int kStep = Tr::kGroups * kUnroll;
  __shared__ float sm_acc[Tr::kGroups][kRows][DP];
  __shared__ float sm_m[Tr::kGroups][kRows];
  __shared__ float sm_l[Tr::kGroups][kRows];
  __shared__ int sm_pos[kRows];
  __shared__ int sm_head[kRows];
  __shared__ int sm_rows;  // n_rows for the merge: read back, not kept live across the key loop

  const int split = static_cast<int>(blockIdx.x);
  const int g = static_cast<int>(blockIdx.y) / p.row_blocks;
  const int start_row = (static_cast<int>(blockIdx.y) % p.row_blocks) * kRows;
  const int b = static_cast<int>(blockIdx.z);
  const index_t b64 = b;
  const int G = p.group;
  const int Sq = p.sq;
  const int D = p.head_dim;
  const int L = seq_len(p, b);
  const int A = active_members(p, b, g);
  const int n_act = A * Sq;
  const bool split_mode = p.num_splits > 1;
  T* out = static_cast<T*>(p.out);

  if (!split_mode) {  // exact zeros for the inactive heads among this block's rows
    const int lo = max(start_row, n_act);
    const int hi_row = min(start_row + kRows, G * Sq);
    for (int idx = threadIdx.x; idx < (hi_row - lo) * D; idx += kThreads) {
      int pos, mem;
      packed_row(lo + idx / D, n_act, A, G, pos, mem);
      const index_t head = p.group_heads[g * G + mem];
      out[((b64 * Sq + pos) * p.hq + head) * D + idx % D] = dev::from_float<T>(0.f);
    }
  }
  const int n_rows = min(kRows, n_act - start_row);
  if (n_rows <= 0) return;  // block-uniform
  const int key_start = split_mode ? split * p.split_size : 0;
  const int key_end = split_mode ? min(key_start + p.split_size, L) : L;
  if (split_mode && key_start >= L) return;  // block-uniform; the combine skips this split

  const int tid = static_cast<int>(threadIdx.x);
  const int grp = tid / Tr::kTd;
  const int lane = tid % Tr::kTd;
  const int d0 = lane * kEpt;
  // This lane's vectors inside the head dim; the rest (d >= D) are padding, read as zeros.
  const int n_vec = min(max((D - d0) / Tr::kVec, 0), Tr::kNv);

  float q[kRows][kEpt];
  int lim[kRows];  // row r sees keys j < lim[r]
  int max_lim = INT_MIN;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    lim[r] = INT_MIN;
#pragma unroll
    for (int e = 0; e < kEpt; ++e) q[r][e] = 0.f;
    if (r < n_rows) {
      int pos, mem;
      packed_row(start_row + r, n_act, A, G, pos, mem);
      const int head = p.group_heads[g * G + mem];
      lim[r] = L - Sq + pos + 1;
      max_lim = max(max_lim, lim[r]);
      const T* qp = static_cast<const T*>(p.q) + b64 * p.q_sb + static_cast<index_t>(pos) * p.q_ss +
                    static_cast<index_t>(head) * p.q_sh + d0;
#pragma unroll
      for (int e = 0; e < kEpt; ++e) q[r][e] = e < n_vec * Tr::kVec ? dev::to_float(qp[e]) * p.qk_scale : 0.f;
      if (tid == 0) {
        sm_pos[r] = pos;
        sm_head[r] = head;
      }
    }
  }
  const int hi = min(key_end, max_lim);  // keys no row sees are never loaded
  if (tid == 0) sm_rows = n_rows;

  float m[kRows], l[kRows], acc[kRows][kEpt];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kEpt; ++e) acc[r][e] = 0.f;
  }
  const T* kbase = static_cast<const T*>(p.k) + static_cast<index_t>(g) * p.k_sh + d0;
  const T* vbase = static_cast<const T*>(p.v) + static_cast<index_t>(g) * p.v_sh + d0;

  for (int base = key_start; base < hi; base += kStep) {  // block-uniform trip count
    float kf[kUnroll][kEpt], vf[kUnroll][kEpt];
    int key[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      key[u] = base + u * Tr::kGroups + grp;
      if (key[u] < hi) {
        const CacheSlot s = cache_slot(p, b64, key[u]);
        const T* kp = kbase + s.block * p.k_sb + s.pos * p.k_ss;
        const T* vp = vbase + s.block * p.v_sb + s.pos * p.v_ss;
#pragma unroll
        for (int i = 0; i < Tr::kNv; ++i) {
          float tk[Tr::kVec] = {}, tv[Tr::kVec] = {};
          if (i < n_vec) {
            dev::load_f32<Tr::kVec>(kp + i * Tr::kVec, tk);
            dev::load_f32<Tr::kVec>(vp + i * Tr::kVec, tv);
          }
#pragma unroll
          for (int j = 0; j < Tr::kVec; ++j) {
            kf[u][i * Tr::kVec + j] = tk[j];
            vf[u][i * Tr::kVec + j] = tv[j];
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < kEpt; ++e) {
          kf[u][e] = 0.f;
          vf[u][e] = 0.f;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < n_rows) {  // block-uniform: every lane takes part in the shuffles
        float s[kUnroll];
        float s_max = -INFINITY;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          float part = 0.f;
#pragma unroll
          for (int e = 0; e < kEpt; ++e) part = fmaf(q[r][e], kf[u][e], part);
          part = group_sum<Tr::kTd>(part);
          s[u] = (key[u] < hi && key[u] < lim[r]) ? part : -INFINITY;
          s_max = fmaxf(s_max, s[u]);
        }
        const float m_new = fmaxf(m[r], s_max);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no key yet: no NaN
        const float alpha = exp2f(m[r] - m_use);
        float pu[kUnroll];
        float p_sum = 0.f;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          pu[u] = exp2f(s[u] - m_use);
          p_sum += pu[u];
        }
        l[r] = l[r] * alpha + p_sum;
#pragma unroll
        for (int e = 0; e < kEpt; ++e) {
          float a = acc[r][e] * alpha;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) a = fmaf(pu[u], vf[u][e], a);
          acc[r][e] = a;
        }
        m[r] = m_new;
      }
    }
  }

  // Merge the key groups (fixed order: run-to-run reproducible).
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (lim[r] != INT_MIN) {  // r < n_rows
#pragma unroll
      for (int e = 0; e < kEpt; ++e) sm_acc[grp][r][d0 + e] = acc[r][e];
      if (lane == 0) {
        sm_m[grp][r] = m[r];
        sm_l[grp][r] = l[r];
      }
    }
  }
  __syncthreads();
  const int rows_done = sm_rows;
  for (int idx = tid; idx < rows_done * D; idx += kThreads) {
    const int r = idx / D;
    const int d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int gi = 0; gi < Tr::kGroups; ++gi) mx = fmaxf(mx, sm_m[gi][r]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float lt = 0.f;
    float o = 0.f;
#pragma unroll
    for (int gi = 0; gi < Tr::kGroups; ++gi) {
      const float w = exp2f(sm_m[gi][r] - m_use);
      lt = fmaf(w, sm_l[gi][r], lt);
      o = fmaf(w, sm_acc[gi][r][d], o);
    }
    const float val = lt > 0.f ? o / lt : 0.f;
    const index_t row = (b64 * Sq + sm_pos[r]) * p.hq + sm_head[r];  // row of (B, Sq, Hq)
    if (!split_mode) {
      out[row * D + d] = dev::from_float<T>(val);
    } else {
      const index_t slot = row * p.num_splits + split;
      p.part_o[slot * D + d] = val;
      if (d == 0) p.part_lse[slot] = lt > 0.f ? mx + log2f(lt) : -INFINITY;
    }
  }
}

// One warp per output row (b, i, h): merges the valid splits by their lse.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const Params p, int D) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int row = static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(threadIdx.x) / kWarpSize;
  const int b = static_cast<int>(blockIdx.y);
  if (row >= p.sq * p.hq) return;  // whole warps
  const index_t b64 = b;
  const int h = row % p.hq;
  const int L = seq_len(p, b);
  const int n_valid = min((L + p.split_size - 1) / p.split_size, p.num_splits);
  const bool active = p.seq_chains == nullptr || p.head_chain[h] <= p.seq_chains[b];
  const index_t flat = b64 * p.sq * p.hq + row;
  T* out = static_cast<T*>(p.out) + flat * D;
  const float* lse = p.part_lse + flat * p.num_splits;
  const float* po = p.part_o + flat * p.num_splits * D;
  float mx = -INFINITY;
  if (active) {
    for (int s = 0; s < n_valid; ++s) mx = fmaxf(mx, lse[s]);
  }
  if (mx == -INFINITY) {  // inactive head, or a row that sees no key
    for (int d = lane; d < D; d += kWarpSize) out[d] = dev::from_float<T>(0.f);
    return;
  }
  float lt = 0.f;
  for (int s = 0; s < n_valid; ++s) lt += exp2f(lse[s] - mx);
  const float inv = 1.f / lt;
  for (int d = lane; d < D; d += kWarpSize) {
    float o = 0.f;
    for (int s = 0; s < n_valid; ++s) o = fmaf(exp2f(lse[s] - mx), po[static_cast<index_t>(s) * D + d], o);
    out[d] = dev::from_float<T>(o * inv);
  }
}

// The power of two (at least 16) the kernels compute a head dim at.
int64_t padded_head_dim(int64_t head_dim) {
  int64_t dp = 16;
  while (dp < head_dim) dp <<= 1;
  return dp;
}

template <typename T, int DP>
void launch_rows(int rows, dim3 grid, const Params& p, cudaStream_t stream) {
  switch (rows) {
    case 1:
      decode_split_kernel<T, DP, 1><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 2:
      decode_split_kernel<T, DP, 2><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 4:
      decode_split_kernel<T, DP, 4><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 8:
      decode_split_kernel<T, DP, 8><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      COLM_CHECK(false, "chain_attention_decode: rows_per_block must be 1, 2, 4 or 8, got ", rows);
  }
  COLM_CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_typed(const ChainAttentionDecodeArgs& a, const ChainAttentionDecodePlan& plan,
                  const Params& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.num_splits),
                  static_cast<unsigned>(a.hkv * plan.row_blocks), static_cast<unsigned>(a.batch));
  const int rows = static_cast<int>(plan.rows_per_block);
  switch (padded_head_dim(a.head_dim)) {
    case 16:
      launch_rows<T, 16>(rows, grid, p, stream);
      break;
    case 32:
      launch_rows<T, 32>(rows, grid, p, stream);
      break;
    case 64:
      launch_rows<T, 64>(rows, grid, p, stream);
      break;
    case 128:
      launch_rows<T, 128>(rows, grid, p, stream);
      break;
    case 256:
      launch_rows<T, 256>(rows, grid, p, stream);
      break;
    default:
      COLM_CHECK(false, "chain_attention_decode: head dim ", a.head_dim,
                 " is not supported (multiples of 8 in [8, 256])");
  }
  if (plan.num_splits > 1) {
    constexpr int kWarps = kThreads / kWarpSize;
    const dim3 cgrid(static_cast<unsigned>((a.sq * a.hq + kWarps - 1) / kWarps),
                     static_cast<unsigned>(a.batch));
    decode_combine_kernel<T><<<cgrid, kThreads, 0, stream>>>(p, static_cast<int>(a.head_dim));
    COLM_CUDA_CHECK_LAUNCH();
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_args(const ChainAttentionDecodeArgs& a, const char* op) {
  COLM_CHECK(a.q && a.k && a.v && a.out, op, ": q, k, v and out must be non-null");
  COLM_CHECK(a.cache_seqlens && a.group_heads && a.group_chains && a.head_chain, op,
             ": cache_seqlens and the head tables must be non-null");
  COLM_CHECK(a.batch >= 1 && a.batch <= kMaxGridYZ, op, ": batch must be in [1, ", kMaxGridYZ,
             "], got ", a.batch);
  COLM_CHECK(a.sq >= 1 && a.sq <= kDecodeMaxTokens, op, ": new tokens Sq must be in [1, ",
             kDecodeMaxTokens, "], got ", a.sq);
  COLM_CHECK(a.hkv >= 1 && a.hq >= a.hkv && a.hq % a.hkv == 0, op, ": Hq = ", a.hq,
             " query heads must be a positive multiple of Hkv = ", a.hkv, " kv heads");
  COLM_CHECK(a.sq * a.hq <= INT32_MAX / 2, op, ": Sq * Hq = ", a.sq * a.hq, " is too large");
  COLM_CHECK(a.s_max >= 0 && a.s_max <= INT32_MAX / 2, op, ": S_max must be in [0, 2^30], got ",
             a.s_max);
  COLM_CHECK(chain_attention_decode_supports_head_dim(a.head_dim), op, ": head dim ", a.head_dim,
             " is not supported (multiples of 8 in [8, 256])");
  if (a.block_table != nullptr) {
    COLM_CHECK(a.page_size >= 1 && a.page_size <= INT32_MAX / 2 && a.num_blocks >= 1 &&
                   a.num_blocks <= INT32_MAX && a.block_table_stride >= 0,
               op, ": a paged cache needs page_size >= 1 and num_blocks >= 1 (got ", a.page_size,
               ", ", a.num_blocks, ")");
  }
  COLM_CHECK(std::isfinite(a.softmax_scale) && a.softmax_scale > 0, op,
             ": softmax_scale must be positive and finite, got ", a.softmax_scale);
}

void check_vector_operand(const void* ptr, int64_t sb, int64_t ss, int64_t sh, int64_t elem,
                          const char* op, const char* name) {
  const int64_t vec = 16 / elem;
  COLM_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, op, ": ", name,
             " must start on a 16-byte boundary (vector loads)");
  COLM_CHECK(sb % vec == 0 && ss % vec == 0 && sh % vec == 0, op, ": ", name,
             " strides (", sb, ", ", ss, ", ", sh, ") must be multiples of ", vec,
             " elements (16 bytes)");
}

}  // namespace

bool chain_attention_decode_supports_head_dim(int64_t head_dim) {
  return head_dim >= 8 && head_dim <= 256 && head_dim % 8 == 0;
}

ChainAttentionDecodePlan chain_attention_decode_plan(const ChainAttentionDecodeArgs& a,
                                                     int64_t num_splits) {
  constexpr const char* op = "chain_attention_decode";
  check_args(a, op);
  COLM_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0: automatic), got ", num_splits);
  ChainAttentionDecodePlan plan;
  const int64_t rows = (a.hq / a.hkv) * a.sq;
  plan.rows_per_block = 1;
  while (plan.rows_per_block < rows && plan.rows_per_block < kMaxRows) plan.rows_per_block <<= 1;
  plan.row_blocks = cdiv(rows, plan.rows_per_block);
  const int64_t granules = std::max<int64_t>(1, cdiv(a.s_max, kDecodeSplitGranule));
  int64_t n = 1;
  if (num_splits > 0) {
    n = std::min(num_splits, granules);
  } else {
    int device = 0;
    int sms = 1;
    COLM_CUDA_CHECK(cudaGetDevice(&device));
    COLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t programs = a.batch * a.hkv * plan.row_blocks;
    const int64_t max_by_len = granules / (kMinSplitKeys / kDecodeSplitGranule);
    if (5 * programs < 4 * static_cast<int64_t>(sms) && max_by_len >= 2) {
      n = std::min({cdiv(2 * static_cast<int64_t>(sms), programs), max_by_len, kDecodeMaxSplits});
      int64_t pow2 = 1;
      while (pow2 * 2 <= n) pow2 <<= 1;
      n = pow2;
    }
  }
  const int64_t split_granules = cdiv(granules, n);
  plan.split_size = split_granules * kDecodeSplitGranule;
  plan.num_splits = cdiv(granules, split_granules);
  return plan;
}

int64_t chain_attention_decode_workspace_floats(const ChainAttentionDecodeArgs& a,
                                                const ChainAttentionDecodePlan& plan) {
  if (plan.num_splits <= 1) return 0;
  const int64_t slots = a.batch * a.sq * a.hq * plan.num_splits;
  return slots * a.head_dim + slots;
}

void launch_chain_attention_decode(const ChainAttentionDecodeArgs& a,
                                   const ChainAttentionDecodePlan& plan, float* workspace,
                                   int64_t workspace_floats, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "chain_attention_decode";
  check_args(a, op);
  COLM_CHECK(plan.num_splits >= 1 && plan.num_splits <= INT32_MAX && plan.split_size >= 1 &&
                 plan.split_size <= INT32_MAX / 2,
             op, ": invalid plan (num_splits ", plan.num_splits, ", split_size ", plan.split_size,
             ")");
  COLM_CHECK(plan.num_splits == 1 || plan.num_splits * plan.split_size >= a.s_max, op,
             ": the splits (", plan.num_splits, " x ", plan.split_size, ") must cover S_max = ",
             a.s_max);
  COLM_CHECK(plan.rows_per_block >= 1 && plan.rows_per_block <= kMaxRows &&
                 plan.row_blocks * plan.rows_per_block >= (a.hq / a.hkv) * a.sq,
             op, ": invalid plan (rows_per_block ", plan.rows_per_block, ", row_blocks ",
             plan.row_blocks, ")");
  COLM_CHECK(a.hkv * plan.row_blocks <= kMaxGridYZ, op, ": kv heads x row blocks = ",
             a.hkv * plan.row_blocks, " exceeds the grid limit ", kMaxGridYZ);
  const int64_t need = chain_attention_decode_workspace_floats(a, plan);
  COLM_CHECK(workspace_floats >= need && (need == 0 || workspace != nullptr), op,
             ": workspace must hold ", need, " floats, got ", workspace_floats);
  const int64_t elem = dtype_size(dtype);
  COLM_CHECK(elem > 0, op, ": unsupported dtype enum value ", static_cast<int>(dtype));
  check_vector_operand(a.k, a.k_stride_b, a.k_stride_s, a.k_stride_h, elem, op, "k_cache");
  check_vector_operand(a.v, a.v_stride_b, a.v_stride_s, a.v_stride_h, elem, op, "v_cache");
  Params p{};
  p.q = a.q;
  p.q_sb = a.q_stride_b;
  p.q_ss = a.q_stride_s;
  p.q_sh = a.q_stride_h;
  p.k = a.k;
  p.k_sb = a.k_stride_b;
  p.k_ss = a.k_stride_s;
  p.k_sh = a.k_stride_h;
  p.v = a.v;
  p.v_sb = a.v_stride_b;
  p.v_ss = a.v_stride_s;
  p.v_sh = a.v_stride_h;
  p.out = a.out;
  const int64_t slots = a.batch * a.sq * a.hq * plan.num_splits;  // (B, Sq * Hq, NS)
  p.part_o = need ? workspace : nullptr;
  p.part_lse = need ? workspace + slots * a.head_dim : nullptr;
  p.seqlens = a.cache_seqlens;
  p.seq_chains = a.seq_chains;
  p.group_heads = a.group_heads;
  p.group_chains = a.group_chains;
  p.head_chain = a.head_chain;
  p.block_table = a.block_table;
  p.bt_stride = a.block_table_stride;
  p.page_size = static_cast<int32_t>(a.block_table != nullptr ? a.page_size : 1);
  p.num_blocks = static_cast<int32_t>(a.block_table != nullptr ? a.num_blocks : 1);
  p.head_dim = static_cast<int32_t>(a.head_dim);
  p.sq = static_cast<int32_t>(a.sq);
  p.hq = static_cast<int32_t>(a.hq);
  p.group = static_cast<int32_t>(a.hq / a.hkv);
  p.s_max = static_cast<int32_t>(a.s_max);
  p.split_size = static_cast<int32_t>(plan.split_size);
  p.num_splits = static_cast<int32_t>(plan.num_splits);
  p.row_blocks = static_cast<int32_t>(plan.row_blocks);
  p.qk_scale = static_cast<float>(a.softmax_scale) * kLog2e;

  dispatch_float_types(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_typed<T>(a, plan, p, stream);
  });
}

}  // namespace colm_kernels
