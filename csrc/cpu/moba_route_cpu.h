// CPU kernel of MoBA routing (semantics in csrc/ops.cpp).
// Declared here so the C++ unit tests in csrc/tests can call it directly.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace sparse_attn::cpu {

// q [B, Hq, Sq, D], k [B, Hkv, Skv, D] -> int32 [B, Hq, Sq, topk]: the KV blocks each query row
// attends to, ascending, -1 padded.
at::Tensor moba_route(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal);

// moba_route from given block means [B, Hkv, N, D] (float32; float64 for float64 q) of keys kv_len
// long, as block_mean_pool computes them: the same scores bit for bit, so routed decode from cached
// means selects exactly what the prefill selects. N covers the blocks a row may rank (causal: the
// complete blocks before the last row's own; non-causal: all ceil(kv_len / block_size)).
at::Tensor moba_route_means(const at::Tensor& q, const at::Tensor& block_means, int64_t kv_len, int64_t block_size,
                            int64_t topk, bool causal);

// The device-independent checks of moba_route_means (shared with the CUDA glue).
void check_route_means_args(const at::Tensor& q, const at::Tensor& block_means, int64_t kv_len, int64_t block_size,
                            int64_t topk, bool causal);

// Packed q [total_q, Hq, D], k [total_k, Hkv, D] with cu_seqlens (int32 [num_seqs + 1]) ->
// int32 [num_seqs, Hq, max_seqlen_q, topk]: each sequence routed as moba_route routes one batch
// entry (blocks restart at the sequence's first key); rows past a sequence's length are -1.
at::Tensor moba_route_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t block_size, int64_t topk,
                             bool causal);

// The packed sequences of moba_route_varlen, read on the host and validated (ValueError on bad
// offsets or Lq > Lk); shared with the CUDA glue.
struct PackedSequences {
  std::vector<int64_t> q_begin, q_len, k_begin, k_len;
  std::vector<int64_t> block_begin;  // num_seqs + 1 entries: sequence s owns blocks [block_begin[s], block_begin[s+1])
  int64_t max_blocks = 0;            // the most blocks of any sequence
};
PackedSequences packed_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                                 int64_t total_k, int64_t max_seqlen_q, int64_t block_size);

}  // namespace sparse_attn::cpu
