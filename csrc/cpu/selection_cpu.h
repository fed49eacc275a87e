// CPU kernels of the selection primitives (semantics in csrc/ops.cpp).
// Declared here so the C++ unit tests in csrc/tests can call them directly.
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace sparse_attn::cpu {

at::Tensor block_mean_pool(const at::Tensor& keys, int64_t block_size);
at::Tensor topk_rows(const at::Tensor& scores, int64_t k);
std::tuple<at::Tensor, at::Tensor> threshold_select(const at::Tensor& scores, const at::Tensor& threshold,
                                                    const at::Tensor& forced, const at::Tensor& allowed);
std::tuple<at::Tensor, at::Tensor> layout_transpose(const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                    int64_t num_kv_blocks);

}  // namespace sparse_attn::cpu
