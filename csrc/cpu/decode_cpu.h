// Block-sparse decode: the CPU kernel and the argument checks and launch planning that the CPU and
// CUDA registrations share (semantics in csrc/ops.cpp). Defined in decode_cpu.cpp, which is built
// into every configuration of the extension, so csrc/cuda/decode_cuda.cpp can use it too.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace sparse_attn::decode {

// Query rows per call: decode means a few queries (speculative tokens, a small query block).
constexpr int64_t kMaxQueryLen = 16;
// Query rows (heads x Sq) one CUDA CTA holds; equals kDecodeMaxRowsPerCta in decode_kernels.h.
constexpr int64_t kMaxRowsPerCta = 16;

// Sizes of a validated call.
struct DecodeShape {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, seq_len_q = 0, seq_len_kv = 0, head_dim = 0;
  int64_t layout_batch = 0, layout_heads = 0, max_blocks = 0;
};

// Device-independent checks (shapes, head counts, index dtypes, Sq, a single query block,
// last-dim contiguity, block size, scale); dtype and device checks are the caller's.
DecodeShape check_decode_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices, int64_t kv_block_size,
                              double softmax_scale);

// Query heads that one CUDA CTA serves: the largest divisor of the GQA group whose rows fit into a
// CTA when the group shares one block list, else 1.
int64_t heads_per_cta(const DecodeShape& shape);

// `requested` if positive, else enough CTAs for about two waves of a 132-SM GPU (at two CTAs per
// SM), capped by the width of kv_indices (the most blocks a row can select; reading the counts
// themselves would synchronise with the GPU). Both backends use it, so they split identically.
int64_t resolve_num_splits(const DecodeShape& shape, int64_t requested);

}  // namespace sparse_attn::decode

namespace sparse_attn::cpu {

// CPU twin of the CUDA op: same split partitioning and combine; accumulates in double (the CUDA
// kernel in float). q, k, v: float16, bfloat16, float32 or float64.
std::tuple<at::Tensor, at::Tensor> block_sparse_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                       int64_t kv_block_size, bool causal, double softmax_scale,
                                                       int64_t num_splits);

}  // namespace sparse_attn::cpu
