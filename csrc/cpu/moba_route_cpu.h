// CPU kernel of MoBA routing (semantics in csrc/ops.cpp).
// Declared here so the C++ unit tests in csrc/tests can call it directly.
#pragma once
#include <ATen/ATen.h>

namespace sparse_attn::cpu {

// q [B, Hq, Sq, D], k [B, Hkv, Skv, D] -> int32 [B, Hq, Sq, topk]: the KV blocks each query row
// attends to, ascending, -1 padded.
at::Tensor moba_route(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal);

}  // namespace sparse_attn::cpu
