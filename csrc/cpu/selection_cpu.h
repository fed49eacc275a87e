// CPU kernels of the selection primitives (semantics in csrc/ops.cpp).
// Declared here so the C++ unit tests in csrc/tests can call them directly.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace sparse_attn::cpu {

at::Tensor block_mean_pool(const at::Tensor& keys, int64_t block_size);

// dst[d] = the mean over `rows` keys, `row_stride` elements apart from `first`, of element d
// (summed in order in acc_t, then scaled by 1 / rows): block_mean_pool's arithmetic, shared with
// MoBA's packed routing so both give bit-identical means.
template <typename scalar_t, typename acc_t>
void mean_of_rows(const scalar_t* first, int64_t row_stride, int64_t rows, int64_t head_dim, acc_t* dst) {
  std::fill(dst, dst + head_dim, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* key = first + r * row_stride;
    for (int64_t d = 0; d < head_dim; ++d) dst[d] += static_cast<acc_t>(key[d]);
  }
  // A true division, not a multiply by 1/rows (inexact for rows = 3, 5, ...): the means of exact
  // sums are then bit-identical to the reference's and the CUDA kernel's, and so are the routes.
  const acc_t len = static_cast<acc_t>(rows);
  for (int64_t d = 0; d < head_dim; ++d) dst[d] /= len;
}
at::Tensor topk_rows(const at::Tensor& scores, int64_t k);
std::tuple<at::Tensor, at::Tensor> threshold_select(const at::Tensor& scores, const at::Tensor& threshold,
                                                    const at::Tensor& forced, const at::Tensor& allowed);
std::tuple<at::Tensor, at::Tensor> layout_transpose(const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                    int64_t num_kv_blocks);

}  // namespace sparse_attn::cpu
