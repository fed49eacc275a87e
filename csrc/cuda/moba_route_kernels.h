// CUDA kernel of MoBA routing behind a raw-pointer launcher (semantics in csrc/ops.cpp; the CPU
// kernel csrc/cpu/moba_route_cpu.cpp and sparse_attn/methods/moba.py compute the same function).
// Plain CUDA, no torch headers; csrc/cuda/moba_route_cuda.cpp is the torch glue. The launcher
// follows the conventions listed in selection_kernels.h.
//
// Pipeline: block_mean_pool or block_mean_pool_varlen (selection_kernels.h) writes the block means
// of every KV head into a caller-provided workspace; one kernel then scores and ranks them, one
// thread per query row, keeping an insertion-sorted top-k in shared memory. Scores never reach
// global memory.
//
// Limits: min(topk, num_blocks) - (causal ? 1 : 0) <= kMaxMobaRankedBlocks (the length of a row's
// top-k list); the output may still be wider (topk > num_blocks pads with -1). Block indices
// must fit in int32. No limit on head_dim or block_size.
#pragma once

#include <cstdint>

#include "selection_kernels.h"

namespace sparse_attn::cuda {

constexpr int64_t kMaxMobaRankedBlocks = 64;

// Number of blocks a row ranks by score (its top-k list length): topk, less the current block
// when causal, and at most the blocks it could rank (all but the current one when causal).
inline int64_t moba_ranked_blocks(int64_t num_blocks, int64_t topk, bool causal) {
  const int64_t ranked = causal ? topk - 1 : topk;
  const int64_t candidates = causal ? (num_blocks > 0 ? num_blocks - 1 : 0) : num_blocks;
  return ranked < candidates ? ranked : candidates;
}

// q [batch, q_heads, q_len, head_dim], k [batch, kv_heads, kv_len, head_dim] (contiguous) ->
// out [batch, q_heads, q_len, topk] int32: per query row, the selected KV blocks ascending, then -1.
// block_means: workspace of batch * kv_heads * ceil(kv_len / block_size) * head_dim elements.
// Requires q_heads % kv_heads == 0, q_len <= kv_len, block_size >= 1, topk >= 1 and the limits
// above; otherwise returns cudaErrorInvalidValue. Scalar: __half, __nv_bfloat16, float or double
// (scores and means in float, double for double).
template <typename Scalar>
cudaError_t moba_route(const Scalar* q, const Scalar* k, typename PooledType<Scalar>::type* block_means, int64_t batch,
                       int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                       int64_t block_size, int64_t topk, bool causal, int32_t* out, cudaStream_t stream);

// The block means a routing of kv_len keys reads: causal rows rank only the blocks before their
// own (the last row's own block is (kv_len - 1) / block_size), non-causal rows every block.
inline int64_t moba_needed_means(int64_t kv_len, int64_t block_size, bool causal) {
  if (causal) return kv_len > 0 ? (kv_len - 1) / block_size : 0;
  return (kv_len + block_size - 1) / block_size;
}

// moba_route with the block means given: block_means [batch, kv_heads, num_means, head_dim]
// (contiguous, as block_mean_pool writes them; num_means >= moba_needed_means), scored exactly as
// moba_route scores the means it pools. Same limits and errors.
template <typename Scalar>
cudaError_t moba_route_means(const Scalar* q, const typename PooledType<Scalar>::type* block_means, int64_t batch,
                             int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t num_means,
                             int64_t head_dim, int64_t block_size, int64_t topk, bool causal, int32_t* out,
                             cudaStream_t stream);

// Packed sequences: q [total_q, q_heads, head_dim], k [total_k, kv_heads, head_dim] (contiguous);
// sequence s holds query rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and keys
// [cu_seqlens_k[s], cu_seqlens_k[s + 1]), with Lq <= Lk and Lq <= max_q_len, and owns the blocks
// [block_begin[s], block_begin[s + 1]) (int64 [num_seqs + 1], ceil(Lk / block_size) each; total_blocks
// in all, at most max_blocks per sequence). -> out [num_seqs, q_heads, max_q_len, topk] int32: each
// sequence routed as moba_route routes one batch entry, rows past Lq -1. block_means: workspace of
// kv_heads * total_blocks * head_dim elements. The offsets are trusted (the glue validates them on
// the host); the limits above apply with max_blocks.
template <typename Scalar>
cudaError_t moba_route_varlen(const Scalar* q, const Scalar* k, typename PooledType<Scalar>::type* block_means,
                              const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, const int64_t* block_begin,
                              int64_t num_seqs, int64_t total_blocks, int64_t max_blocks, int64_t q_heads,
                              int64_t kv_heads, int64_t max_q_len, int64_t head_dim, int64_t block_size, int64_t topk,
                              bool causal, int32_t* out, cudaStream_t stream);

}  // namespace sparse_attn::cuda
