// colm_kernels: chain attention over a KV cache (flash-decoding), CUDA host launchers.
//
// No torch here: raw device pointers, int64 sizes/strides, a DType and a cudaStream_t.
// bindings.cpp checks and allocates the tensors; these launchers re-check what the kernels rely on
// and throw std::invalid_argument (-> ValueError) / std::runtime_error (-> RuntimeError).
//
// Math (matches colm_kernels/ops/chain_attention_decode/reference.py), fp32 throughout:
//   L_b = clamp(cache_seqlens[b], 0, S_max); query i of sequence b, head h (kv head g) sees keys
//   j < L_b - Sq + i + 1;  out[b, i, h] = softmax_j(scale * q . k[b, j, g]) @ v[b, :, g]
//   (zeros for a row that sees no key, and for heads with head_chain[h] > seq_chains[b]).
//
// Tensor contracts (element strides; the last dimension is always contiguous):
//   q            (B, Sq, Hq, D), any strides, read element-wise
//   k, v         contiguous cache (block_table == nullptr): (B, S_max, >= Hkv, D);
//                paged cache: (num_blocks, page_size, >= Hkv, D), key j of sequence b at
//                [block_table[b * block_table_stride + j / page_size], j % page_size], and
//                S_max = max_blocks_per_seq * page_size (the keys a sequence can hold);
//                any strides that are multiples of 16 bytes, 16-byte aligned base (16-byte
//                vector loads); only kv heads 0..Hkv-1 and positions < L_b are read
//   block_table  nullable int32 (B, max_blocks_per_seq), rows block_table_stride apart; entries a
//                sequence uses are clamped into [0, num_blocks) in the kernel
//   out          (B, Sq, Hq, D) contiguous, q's dtype
//   cache_seqlens, seq_chains (nullable): int32 (B,)
//   group_heads, group_chains: int32 (Hkv, G) contiguous: the G query heads of each kv head,
//                sorted by (chain, head), and their chains (G = Hq / Hkv)
//   head_chain   int32 (Hq,): the chain of every query head
//   workspace    fp32, chain_attention_decode_workspace_floats(args, plan) elements (none when
//                plan.num_splits == 1): per-split outputs (B, Sq * Hq, NS, D) then lse (B, Sq * Hq, NS)
// Head dims: multiples of 8 in [8, 256]; 1 <= Sq <= kDecodeMaxTokens; dtypes float32, float16,
// bfloat16.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/types.h"

namespace colm_kernels {

constexpr int64_t kDecodeMaxTokens = 128;  // = MAX_DECODE_TOKENS (chain_attention/heads.py)
constexpr int64_t kDecodeMaxSplits = 64;
constexpr int64_t kDecodeSplitGranule = 64;  // keys; a split is a multiple of it

struct ChainAttentionDecodeArgs {
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_s = 0, q_stride_h = 0;
  const void* k = nullptr;
  int64_t k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  const void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_s = 0, v_stride_h = 0;
  void* out = nullptr;
  const int32_t* cache_seqlens = nullptr;
  const int32_t* seq_chains = nullptr;  // nullptr: every head active
  const int32_t* group_heads = nullptr;
  const int32_t* group_chains = nullptr;
  const int32_t* head_chain = nullptr;
  const int32_t* block_table = nullptr;  // nullptr: contiguous caches
  int64_t block_table_stride = 0, page_size = 0, num_blocks = 0;  // paged caches only
  int64_t batch = 0, sq = 0, hq = 0, hkv = 0, s_max = 0, head_dim = 0;
  double softmax_scale = 1.0;
};

struct ChainAttentionDecodePlan {
  int64_t num_splits = 1;     // splits of the key axis (1: no partials, no combine kernel)
  int64_t split_size = 0;     // keys per split, a multiple of kDecodeSplitGranule
  int64_t rows_per_block = 1; // packed rows (new token x query head) per thread block: 1, 2, 4, 8
  int64_t row_blocks = 1;     // blocks along the packed rows of one kv head
};

// Whether the kernels are compiled for this head dim.
bool chain_attention_decode_supports_head_dim(int64_t head_dim);

// The launch plan. num_splits > 0 forces the split count (clamped to the key granules of S_max);
// 0 picks it from S_max and the current device's SM count (a power of two, never from lengths).
ChainAttentionDecodePlan chain_attention_decode_plan(const ChainAttentionDecodeArgs& args,
                                                     int64_t num_splits);

int64_t chain_attention_decode_workspace_floats(const ChainAttentionDecodeArgs& args,
                                                const ChainAttentionDecodePlan& plan);

void launch_chain_attention_decode(const ChainAttentionDecodeArgs& args,
                                   const ChainAttentionDecodePlan& plan, float* workspace,
                                   int64_t workspace_floats, DType dtype, cudaStream_t stream);

}  // namespace colm_kernels
