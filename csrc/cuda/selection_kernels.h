// CUDA kernels of the sparse_attn selection primitives behind a raw-pointer launcher API.
//
// Semantics are those of csrc/ops.cpp (the CPU kernels and sparse_attn/reference.py compute the
// same functions). This header and selection_kernels.cu use no torch headers, so they build with
// plain nvcc; csrc/cuda/selection_cuda.cpp is the torch glue.
//
// Conventions of every launcher:
//   * pointers are device pointers to contiguous row-major arrays;
//   * work is enqueued on `stream` and nothing waits for it;
//   * an empty problem (a zero-sized output) enqueues nothing, and outputs whose content does not
//     depend on the inputs (e.g. all -1 when rows have no entries) are filled with cudaMemsetAsync;
//   * the return value is cudaSuccess or the first CUDA error (launch errors included);
//     cudaErrorInvalidValue also reports arguments outside the supported range.
//
// Size limits:
//   * topk_rows and threshold_select sort a whole row in shared memory (bitonic sort of
//     (key, index) pairs, padded to a power of two), so row_len is bounded by the device's
//     opt-in shared memory per block: max_selection_row_length<Score>() reports the bound for the
//     current device. float rows: 16384 on A100 (sm_80) and H100 (sm_90); double rows: 8192 on
//     A100, 16384 on H100. Longer rows return cudaErrorInvalidValue.
//   * block_mean_pool and layout_transpose have no limit beyond int64 sizes; index values
//     (query/KV block numbers) must fit in int32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparse_attn::cuda {

// Element type of block_mean_pool's output: the fp32 accumulator, or fp64 for double keys.
template <typename Key>
struct PooledType {
  using type = float;
};
template <>
struct PooledType<double> {
  using type = double;
};

// keys [batch_heads, seq_len, head_dim] -> out [batch_heads, ceil(seq_len / block_size), head_dim]:
// the mean of each block of `block_size` keys over its real length (the last block may be short).
// Key: __half, __nv_bfloat16, float or double.
template <typename Key>
cudaError_t block_mean_pool(const Key* keys, typename PooledType<Key>::type* out, int64_t batch_heads,
                            int64_t seq_len, int64_t head_dim, int64_t block_size, cudaStream_t stream);

// Packed keys [total, heads, head_dim] -> out [heads, total_blocks, head_dim]: the same means with
// blocks restarting at every sequence start. Sequence s holds keys [cu_seqlens[s], cu_seqlens[s + 1])
// and owns blocks [block_begin[s], block_begin[s + 1]) (block_begin [num_seqs + 1], int64,
// block_begin[num_seqs] == total_blocks, each sequence's count ceil(len / block_size)). The
// offsets are trusted: callers validate them.
template <typename Key>
cudaError_t block_mean_pool_varlen(const Key* keys, typename PooledType<Key>::type* out, const int32_t* cu_seqlens,
                                   const int64_t* block_begin, int64_t num_seqs, int64_t total_blocks, int64_t heads,
                                   int64_t head_dim, int64_t block_size, cudaStream_t stream);

// scores [rows, row_len] -> out [rows, k]: per row, the indices of the up-to-k largest selectable
// scores in rank order (descending score, ties to the lower index); -inf and NaN are never
// selected; unused slots hold -1. k may exceed row_len. Score: float or double.
template <typename Score>
cudaError_t topk_rows(const Score* scores, int64_t rows, int64_t row_len, int64_t k, int32_t* out,
                      cudaStream_t stream);

// XAttention's cumulative-mass rule per row (see csrc/ops.cpp). scores, forced, allowed
// [rows, row_len]; threshold [rows] (already widened to double) -> count [rows] and
// indices [rows, row_len] (kept entries ascending, then -1). Score: float or double.
template <typename Score>
cudaError_t threshold_select(const Score* scores, const double* threshold, const bool* forced, const bool* allowed,
                             int64_t rows, int64_t row_len, int32_t* count, int32_t* indices, cudaStream_t stream);

// Longest row that topk_rows<Score> and threshold_select<Score> accept on the current device.
template <typename Score>
cudaError_t max_selection_row_length(int64_t* max_row_len);

// kv_num_blocks [batch_heads, num_q_blocks], kv_indices [batch_heads, num_q_blocks, max_kv_per_q]
// (entries below the count: sorted, unique, in [0, num_kv_blocks)) -> q_num_blocks
// [batch_heads, num_kv_blocks] and q_indices [batch_heads, num_kv_blocks, num_q_blocks]: for each
// KV block the query blocks that selected it, ascending, -1 padded. Inputs are trusted, but
// counts are clamped to [0, max_kv_per_q] and out-of-range entries skipped, so invalid input
// cannot write out of bounds. Deterministic: no atomics.
cudaError_t layout_transpose(const int32_t* kv_num_blocks, const int32_t* kv_indices, int64_t batch_heads,
                             int64_t num_q_blocks, int64_t max_kv_per_q, int64_t num_kv_blocks, int32_t* q_num_blocks,
                             int32_t* q_indices, cudaStream_t stream);

}  // namespace sparse_attn::cuda
