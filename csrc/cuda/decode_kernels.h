// CUDA kernels of block-sparse decode (few queries against a long KV cache) behind a raw-pointer
// launcher API. Semantics are those of block_sparse_decode in csrc/ops.cpp; the CPU twin
// (csrc/cpu/decode_cpu.cpp) computes the same function with the same split partitioning and
// combine step. No torch headers: this file and decode_kernels.cu build with plain nvcc;
// csrc/cuda/decode_cuda.cpp is the torch glue.
//
// Design (split-KV, memory-bound):
//   * one CTA per (batch, head unit, split). A head unit is `heads_per_cta` consecutive query heads
//     of one KV head; they must share one layout head, so heads_per_cta > 1 needs a layout per KV
//     head or a shared one. The CTA walks its contiguous share of the selected block list and
//     streams K/V tiles through shared memory once for all its (heads x Sq) rows;
//   * the share of split s among `count` selected blocks is [s * count / S, (s + 1) * count / S)
//     (integer division), so shares differ by at most one block and a split may be empty;
//   * each split writes its normalised fp32 partial output and its log-sum-exp (base 2, of the
//     log2(e)-scaled scores) to scratch; a second kernel merges the splits by LSE into the final
//     output (q's dtype) and the natural-log LSE. A row without a visible key gets 0 and -inf.
//
// Conventions: pointers are device pointers; q/k/v are addressed through element strides with a
// contiguous last dimension; work is enqueued on `stream` and nothing waits for it; an empty
// problem enqueues nothing; the return value is cudaSuccess or the first CUDA error (launch
// errors included), cudaErrorInvalidValue for arguments outside the supported range.
//
// Limits: head_dim in {64, 96, 128, 256}; heads_per_cta * seq_len_q <= kDecodeMaxRowsPerCta;
// seq_len_kv < 2^31. K/V tiles use 16-byte cp.async loads when k and v are 16-byte aligned and all
// their strides are multiples of 8 elements, plain 2-byte loads otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparse_attn::cuda {

// Query rows (heads x Sq) one CTA holds in registers.
constexpr int64_t kDecodeMaxRowsPerCta = 16;

constexpr bool decode_supports_head_dim(int64_t head_dim) {
  return head_dim == 64 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}

// Element: __half or __nv_bfloat16.
template <typename Element>
struct BlockSparseDecodeArgs {
  // q [batch, q_heads, seq_len_q, head_dim]; k, v [batch, kv_heads, seq_len_kv, head_dim].
  const Element* q = nullptr;
  const Element* k = nullptr;
  const Element* v = nullptr;
  int64_t q_stride_batch = 0, q_stride_head = 0, q_stride_seq = 0;
  int64_t k_stride_batch = 0, k_stride_head = 0, k_stride_seq = 0;
  int64_t v_stride_batch = 0, v_stride_head = 0, v_stride_seq = 0;
  int64_t batch = 0, q_heads = 0, kv_heads = 0, seq_len_q = 0, seq_len_kv = 0, head_dim = 0;

  // Contiguous kv_num_blocks [layout_batch, layout_heads] and kv_indices [layout_batch,
  // layout_heads, max_blocks] (the single query block of a decode layout). layout_batch is batch
  // or 1; layout_heads is q_heads, kv_heads or 1. Counts are clamped to [0, max_blocks] and
  // entries outside [0, ceil(seq_len_kv / kv_block_size)) are skipped, so invalid lists cannot
  // read out of bounds; valid lists ascend strictly.
  const int32_t* kv_num_blocks = nullptr;
  const int32_t* kv_indices = nullptr;
  int64_t layout_batch = 0, layout_heads = 0, max_blocks = 0, kv_block_size = 0;

  bool causal = true;
  float softmax_scale = 1.0f;
  int64_t num_splits = 1;     // >= 1
  int64_t heads_per_cta = 1;  // divides q_heads / kv_heads; 1 when layout_heads == q_heads > kv_heads

  // Scratch: partial_out [num_splits, batch, q_heads, seq_len_q, head_dim] and partial_lse
  // [num_splits, batch, q_heads, seq_len_q], both fp32.
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  // Results: out [batch, q_heads, seq_len_q, head_dim] contiguous in Element, lse [batch, q_heads,
  // seq_len_q] fp32 natural log.
  Element* out = nullptr;
  float* lse = nullptr;
};

template <typename Element>
cudaError_t block_sparse_decode(const BlockSparseDecodeArgs<Element>& args, cudaStream_t stream);

}  // namespace sparse_attn::cuda
