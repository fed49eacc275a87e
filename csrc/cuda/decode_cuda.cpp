// CUDA registration of block_sparse_decode (semantics in csrc/ops.cpp): argument checks, split
// planning, scratch and output allocation, and dtype dispatch around the raw launcher of
// decode_kernels.h. The checks and the split count come from csrc/cpu/decode_cpu.h, shared with
// the CPU twin, so both backends accept the same calls and split them the same way.
//
// Only device-generic torch headers are used (see selection_cuda.cpp for why); the current stream
// comes from the CUDA DeviceGuardImpl through c10::impl::VirtualGuardImpl.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../cpu/decode_cpu.h"
#include "decode_kernels.h"

namespace sparse_attn::cuda {
namespace {

static_assert(decode::kMaxRowsPerCta == kDecodeMaxRowsPerCta, "the split planner and the kernels disagree on rows");

cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl cuda_guard_impl(c10::DeviceType::CUDA);
  return reinterpret_cast<cudaStream_t>(cuda_guard_impl.getStream(device).native_handle());
}

template <typename Element, typename TorchElement>
cudaError_t launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& counts,
                   const at::Tensor& lists, const decode::DecodeShape& shape, int64_t kv_block_size, bool causal,
                   double softmax_scale, int64_t num_splits, int64_t heads_per_cta, at::Tensor& partial_out,
                   at::Tensor& partial_lse, at::Tensor& out, at::Tensor& lse) {
  BlockSparseDecodeArgs<Element> args;
  args.q = reinterpret_cast<const Element*>(q.const_data_ptr<TorchElement>());
  args.k = reinterpret_cast<const Element*>(k.const_data_ptr<TorchElement>());
  args.v = reinterpret_cast<const Element*>(v.const_data_ptr<TorchElement>());
  args.q_stride_batch = q.stride(0);
  args.q_stride_head = q.stride(1);
  args.q_stride_seq = q.stride(2);
  args.k_stride_batch = k.stride(0);
  args.k_stride_head = k.stride(1);
  args.k_stride_seq = k.stride(2);
  args.v_stride_batch = v.stride(0);
  args.v_stride_head = v.stride(1);
  args.v_stride_seq = v.stride(2);
  args.batch = shape.batch;
  args.q_heads = shape.q_heads;
  args.kv_heads = shape.kv_heads;
  args.seq_len_q = shape.seq_len_q;
  args.seq_len_kv = shape.seq_len_kv;
  args.head_dim = shape.head_dim;
  args.kv_num_blocks = counts.const_data_ptr<int32_t>();
  args.kv_indices = lists.const_data_ptr<int32_t>();
  args.layout_batch = shape.layout_batch;
  args.layout_heads = shape.layout_heads;
  args.max_blocks = shape.max_blocks;
  args.kv_block_size = kv_block_size;
  args.causal = causal;
  args.softmax_scale = static_cast<float>(softmax_scale);
  args.num_splits = num_splits;
  args.heads_per_cta = heads_per_cta;
  args.partial_out = partial_out.mutable_data_ptr<float>();
  args.partial_lse = partial_lse.mutable_data_ptr<float>();
  args.out = reinterpret_cast<Element*>(out.mutable_data_ptr<TorchElement>());
  args.lse = lse.mutable_data_ptr<float>();
  return block_sparse_decode(args, current_stream(q.device()));
}

std::tuple<at::Tensor, at::Tensor> block_sparse_decode_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& kv_num_blocks,
                                                            const at::Tensor& kv_indices, int64_t kv_block_size,
                                                            bool causal, double softmax_scale, int64_t num_splits) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  const decode::DecodeShape shape =
      decode::check_decode_args(q, k, v, kv_num_blocks, kv_indices, kv_block_size, softmax_scale);
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16,
                   "the CUDA block_sparse_decode takes float16 or bfloat16 q, k, v, got ", dtype);
  TORCH_CHECK_TYPE(k.scalar_type() == dtype && v.scalar_type() == dtype, "k and v must have q's dtype ", dtype,
                   ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK_VALUE(decode_supports_head_dim(shape.head_dim),
                    "the CUDA block_sparse_decode supports head dims 64, 96, 128 and 256, got ", shape.head_dim);
  const int64_t splits = decode::resolve_num_splits(shape, num_splits);
  const int64_t heads_per_cta = decode::heads_per_cta(shape);
  const int64_t ctas_per_split = shape.batch * shape.q_heads / heads_per_cta;
  TORCH_CHECK_VALUE(ctas_per_split == 0 || splits <= std::numeric_limits<int32_t>::max() / ctas_per_split,
                    "num_splits=", splits, " gives more than 2^31 CTAs");

  const c10::DeviceGuard device_guard(q.device());
  const int64_t B = shape.batch, Hq = shape.q_heads, Sq = shape.seq_len_q, D = shape.head_dim;
  at::Tensor out = at::empty({B, Hq, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const at::Tensor counts = kv_num_blocks.contiguous(), lists = kv_indices.contiguous();
  // Scratch scales with the split count and the queries, never with the cache length.
  at::Tensor partial_out = at::empty({splits, B, Hq, Sq, D}, q.options().dtype(at::kFloat));
  at::Tensor partial_lse = at::empty({splits, B, Hq, Sq}, q.options().dtype(at::kFloat));
  cudaError_t status = cudaSuccess;
  if (dtype == at::kHalf) {
    status = launch<__half, at::Half>(q, k, v, counts, lists, shape, kv_block_size, causal, softmax_scale, splits,
                                      heads_per_cta, partial_out, partial_lse, out, lse);
  } else {
    status = launch<__nv_bfloat16, at::BFloat16>(q, k, v, counts, lists, shape, kv_block_size, causal, softmax_scale,
                                                 splits, heads_per_cta, partial_out, partial_lse, out, lse);
  }
  TORCH_CHECK(status == cudaSuccess, "sparse_attn::block_sparse_decode: CUDA error: ", cudaGetErrorString(status));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) { m.impl("block_sparse_decode", &block_sparse_decode_cuda); }

}  // namespace sparse_attn::cuda
