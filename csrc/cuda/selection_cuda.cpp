// CUDA registrations of the sparse_attn selection ops (semantics in csrc/ops.cpp): argument checks,
// output allocation and dtype dispatch around the raw launchers of selection_kernels.h.
//
// Only device-generic torch headers are used (no ATen/cuda/*): the CPU torch wheel ships an
// incomplete set of CUDA headers, and this keeps the file syntax-checkable without a CUDA torch
// (scripts/check_cuda_compile.sh). The current stream therefore comes from the CUDA
// DeviceGuardImpl that libtorch_cuda registers at runtime, through c10::impl::VirtualGuardImpl.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "selection_kernels.h"

namespace sparse_attn::cuda {
namespace {

constexpr int64_t kMaxIndexValue = std::numeric_limits<int32_t>::max();

cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl cuda_guard_impl(c10::DeviceType::CUDA);
  return reinterpret_cast<cudaStream_t>(cuda_guard_impl.getStream(device).native_handle());
}

void check_status(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "sparse_attn::", op, ": CUDA error: ", cudaGetErrorString(status));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& reference, const char* name) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), name, " must be on ", reference.device(), ", got ", t.device());
}

void check_score_rows(const at::Tensor& scores) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be 2-D [rows, entries], got ", scores.dim(), " dims");
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                   "scores must be float32 or float64, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(scores.size(1) <= kMaxIndexValue, "scores rows must have at most ", kMaxIndexValue, " entries");
}

// The sort-based kernels hold a whole row in shared memory; say so clearly instead of failing
// with cudaErrorInvalidValue.
template <typename Score>
void check_row_fits(int64_t row_len, const char* op) {
  int64_t max_row_len = 0;
  check_status(max_selection_row_length<Score>(&max_row_len), op);
  TORCH_CHECK_VALUE(row_len <= max_row_len, "sparse_attn::", op, ": rows of ", row_len,
                    " entries exceed the CUDA kernel's",
                    " limit of ", max_row_len, " for ", sizeof(Score) == 8 ? "float64" : "float32",
                    " scores on this GPU (a row is sorted in shared memory)");
}

at::Tensor block_mean_pool_cuda(const at::Tensor& keys, int64_t block_size) {
  check_cuda(keys, "keys");
  TORCH_CHECK_VALUE(keys.dim() == 4, "keys must be 4-D [B, H, S, D], got ", keys.dim(), " dims");
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  const at::ScalarType dtype = keys.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "keys must be float16, bfloat16, float32 or float64, got ", dtype);
  const c10::DeviceGuard device_guard(keys.device());
  const at::Tensor src = keys.contiguous();
  const int64_t batch = keys.size(0), heads = keys.size(1), seq_len = keys.size(2), head_dim = keys.size(3);
  const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
  const at::ScalarType out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({batch, heads, num_blocks, head_dim}, keys.options().dtype(out_dtype));
  if (out.numel() == 0) return out;

  const cudaStream_t stream = current_stream(keys.device());
  const int64_t batch_heads = batch * heads;
  cudaError_t status = cudaSuccess;
  switch (dtype) {
    case at::kHalf:
      status = block_mean_pool(reinterpret_cast<const __half*>(src.const_data_ptr<at::Half>()),
                               out.mutable_data_ptr<float>(), batch_heads, seq_len, head_dim, block_size, stream);
      break;
    case at::kBFloat16:
      status = block_mean_pool(reinterpret_cast<const __nv_bfloat16*>(src.const_data_ptr<at::BFloat16>()),
                               out.mutable_data_ptr<float>(), batch_heads, seq_len, head_dim, block_size, stream);
      break;
    case at::kFloat:
      status = block_mean_pool(src.const_data_ptr<float>(), out.mutable_data_ptr<float>(), batch_heads, seq_len,
                               head_dim, block_size, stream);
      break;
    default:  // kDouble, checked above
      status = block_mean_pool(src.const_data_ptr<double>(), out.mutable_data_ptr<double>(), batch_heads, seq_len,
                               head_dim, block_size, stream);
      break;
  }
  check_status(status, "block_mean_pool");
  return out;
}

at::Tensor topk_rows_cuda(const at::Tensor& scores, int64_t k) {
  check_cuda(scores, "scores");
  check_score_rows(scores);
  TORCH_CHECK_VALUE(k >= 0, "k must be non-negative, got ", k);
  const c10::DeviceGuard device_guard(scores.device());
  const at::Tensor src = scores.contiguous();
  const int64_t rows = src.size(0), row_len = src.size(1);
  at::Tensor out = at::empty({rows, k}, scores.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  const cudaStream_t stream = current_stream(scores.device());
  cudaError_t status = cudaSuccess;
  if (src.scalar_type() == at::kFloat) {
    if (row_len > 0) check_row_fits<float>(row_len, "topk_rows");
    status = topk_rows(src.const_data_ptr<float>(), rows, row_len, k, out.mutable_data_ptr<int32_t>(), stream);
  } else {
    if (row_len > 0) check_row_fits<double>(row_len, "topk_rows");
    status = topk_rows(src.const_data_ptr<double>(), rows, row_len, k, out.mutable_data_ptr<int32_t>(), stream);
  }
  check_status(status, "topk_rows");
  return out;
}

std::tuple<at::Tensor, at::Tensor> threshold_select_cuda(const at::Tensor& scores, const at::Tensor& threshold,
                                                         const at::Tensor& forced, const at::Tensor& allowed) {
  check_cuda(scores, "scores");
  check_same_device(threshold, scores, "threshold");
  check_same_device(forced, scores, "forced");
  check_same_device(allowed, scores, "allowed");
  check_score_rows(scores);
  const int64_t rows = scores.size(0), row_len = scores.size(1);
  TORCH_CHECK_VALUE(threshold.dim() == 1 && threshold.size(0) == rows, "threshold must have shape [", rows, "], got ",
                    threshold.sizes());
  TORCH_CHECK_VALUE(forced.sizes() == scores.sizes() && allowed.sizes() == scores.sizes(),
                    "forced and allowed must have the shape of scores");
  TORCH_CHECK_TYPE(forced.scalar_type() == at::kBool && allowed.scalar_type() == at::kBool,
                   "forced and allowed must be bool tensors");
  const c10::DeviceGuard device_guard(scores.device());
  const at::Tensor src = scores.contiguous();
  const at::Tensor tau = threshold.to(at::kDouble).contiguous();  // compared in double, like the CPU op
  const at::Tensor is_forced = forced.contiguous();
  const at::Tensor is_allowed = allowed.contiguous();
  at::Tensor count = at::empty({rows}, scores.options().dtype(at::kInt));
  at::Tensor indices = at::empty({rows, row_len}, scores.options().dtype(at::kInt));
  if (rows == 0) return {count, indices};

  const cudaStream_t stream = current_stream(scores.device());
  cudaError_t status = cudaSuccess;
  if (src.scalar_type() == at::kFloat) {
    if (row_len > 0) check_row_fits<float>(row_len, "threshold_select");
    status = threshold_select(src.const_data_ptr<float>(), tau.const_data_ptr<double>(),
                              is_forced.const_data_ptr<bool>(), is_allowed.const_data_ptr<bool>(), rows, row_len,
                              count.mutable_data_ptr<int32_t>(), indices.mutable_data_ptr<int32_t>(), stream);
  } else {
    if (row_len > 0) check_row_fits<double>(row_len, "threshold_select");
    status = threshold_select(src.const_data_ptr<double>(), tau.const_data_ptr<double>(),
                              is_forced.const_data_ptr<bool>(), is_allowed.const_data_ptr<bool>(), rows, row_len,
                              count.mutable_data_ptr<int32_t>(), indices.mutable_data_ptr<int32_t>(), stream);
  }
  check_status(status, "threshold_select");
  return {count, indices};
}

std::tuple<at::Tensor, at::Tensor> layout_transpose_cuda(const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                         int64_t num_kv_blocks) {
  check_cuda(kv_num_blocks, "kv_num_blocks");
  check_same_device(kv_indices, kv_num_blocks, "kv_indices");
  TORCH_CHECK_VALUE(kv_num_blocks.dim() == 3 && kv_indices.dim() == 4,
                    "kv_num_blocks must be [B,H,Mq] and kv_indices [B,H,Mq,Nmax]");
  TORCH_CHECK_VALUE(kv_indices.sizes().slice(0, 3) == kv_num_blocks.sizes(), "kv_indices ", kv_indices.sizes(),
                    " does not match kv_num_blocks ", kv_num_blocks.sizes());
  TORCH_CHECK_TYPE(kv_num_blocks.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt,
                   "kv_num_blocks and kv_indices must be int32");
  TORCH_CHECK_VALUE(num_kv_blocks >= 0 && num_kv_blocks <= kMaxIndexValue, "num_kv_blocks must lie in [0, ",
                    kMaxIndexValue,
                    "], got ", num_kv_blocks);
  const c10::DeviceGuard device_guard(kv_num_blocks.device());
  const at::Tensor counts = kv_num_blocks.contiguous();
  const at::Tensor lists = kv_indices.contiguous();
  const int64_t batch = counts.size(0), heads = counts.size(1), num_q_blocks = counts.size(2);
  const int64_t max_kv_per_q = lists.size(3);
  TORCH_CHECK_VALUE(num_q_blocks <= kMaxIndexValue, "at most ", kMaxIndexValue, " query blocks are supported");
  at::Tensor q_num_blocks = at::empty({batch, heads, num_kv_blocks}, counts.options());
  at::Tensor q_indices = at::empty({batch, heads, num_kv_blocks, num_q_blocks}, counts.options());
  if (q_num_blocks.numel() == 0) return {q_num_blocks, q_indices};

  const cudaError_t status = layout_transpose(
      counts.const_data_ptr<int32_t>(), lists.const_data_ptr<int32_t>(), batch * heads, num_q_blocks, max_kv_per_q,
      num_kv_blocks, q_num_blocks.mutable_data_ptr<int32_t>(), q_indices.mutable_data_ptr<int32_t>(),
      current_stream(kv_num_blocks.device()));
  check_status(status, "layout_transpose");
  return {q_num_blocks, q_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("block_mean_pool", &block_mean_pool_cuda);
  m.impl("topk_rows", &topk_rows_cuda);
  m.impl("threshold_select", &threshold_select_cuda);
  m.impl("layout_transpose", &layout_transpose_cuda);
}

}  // namespace sparse_attn::cuda
