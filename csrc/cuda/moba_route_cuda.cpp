// CUDA registration of sparse_attn::moba_route, moba_route_means and moba_route_varlen (semantics
// in csrc/ops.cpp): argument checks, the block-mean workspace, output allocation and dtype dispatch
// around the raw launchers of moba_route_kernels.h. Device-generic torch headers only, as in
// selection_cuda.cpp.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../cpu/moba_route_cpu.h"
#include "moba_route_kernels.h"

namespace sparse_attn::cuda {
namespace {

cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl cuda_guard_impl(c10::DeviceType::CUDA);
  return reinterpret_cast<cudaStream_t>(cuda_guard_impl.getStream(device).native_handle());
}

// Checks shared by the batched (4-D) and packed (3-D) layouts; both hold heads in dim 1.
void check_query_and_keys(const at::Tensor& q, const at::Tensor& k, int64_t dims, int64_t topk) {
  const char* layout = dims == 4 ? "[B, H, S, D]" : "[total, H, D]";
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK_VALUE(k.device() == q.device(), "k must be on ", q.device(), ", got ", k.device());
  TORCH_CHECK_VALUE(q.dim() == dims, "q must be ", dims, "-D ", layout, ", got ", q.dim(), " dims");
  TORCH_CHECK_VALUE(k.dim() == dims, "k must be ", dims, "-D ", layout, ", got ", k.dim(), " dims");
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "q must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(k.scalar_type() == dtype, "k dtype ", k.scalar_type(), " differs from q dtype ", dtype);
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "k head dim ", k.size(-1), " differs from q head dim ", q.size(-1));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "the number of query heads (", q.size(1),
                    ") must be a multiple of the number of KV heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(topk > 0, "topk must be positive, got ", topk);
}

void check_ranked_blocks(int64_t num_blocks, int64_t topk, bool causal) {
  TORCH_CHECK_VALUE(num_blocks <= std::numeric_limits<int32_t>::max(), "the number of KV blocks must fit in int32");
  const int64_t ranked = moba_ranked_blocks(num_blocks, topk, causal);
  TORCH_CHECK_VALUE(ranked <= kMaxMobaRankedBlocks, "sparse_attn::moba_route: the CUDA kernel ranks at most ",
                    kMaxMobaRankedBlocks, " blocks per row (topk up to ", kMaxMobaRankedBlocks + (causal ? 1 : 0),
                    " with ", causal ? "causal" : "non-causal", " routing), got topk=", topk, " over ", num_blocks,
                    " blocks");
}

at::ScalarType mean_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The CUDA element type of a launch and the torch type that holds it.
template <typename CudaScalar, typename TorchScalar>
struct DtypeTag {
  using scalar = CudaScalar;
  using torch_scalar = TorchScalar;
};

// Calls launch(DtypeTag<...>{}) for q's dtype and checks the CUDA status it returns.
template <typename Launch>
void dispatch_route(const at::Tensor& q, const Launch& launch) {
  cudaError_t status = cudaSuccess;
  switch (q.scalar_type()) {
    case at::kHalf:
      status = launch(DtypeTag<__half, at::Half>{});
      break;
    case at::kBFloat16:
      status = launch(DtypeTag<__nv_bfloat16, at::BFloat16>{});
      break;
    case at::kFloat:
      status = launch(DtypeTag<float, float>{});
      break;
    default:  // kDouble, checked by the caller
      status = launch(DtypeTag<double, double>{});
      break;
  }
  TORCH_CHECK(status == cudaSuccess, "sparse_attn::moba_route: CUDA error: ", cudaGetErrorString(status));
}

template <typename Tag>
const typename Tag::scalar* device_data(const at::Tensor& t) {
  return reinterpret_cast<const typename Tag::scalar*>(t.const_data_ptr<typename Tag::torch_scalar>());
}

at::Tensor moba_route_cuda(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal) {
  check_query_and_keys(q, k, 4, topk);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k batch ", k.size(0), " differs from q batch ", q.size(0));
  TORCH_CHECK_VALUE(q.size(2) <= k.size(2), "q has more rows (", q.size(2), ") than k (", k.size(2), ")");
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  const int64_t num_blocks = (k.size(2) + block_size - 1) / block_size;
  check_ranked_blocks(num_blocks, topk, causal);
  const c10::DeviceGuard device_guard(q.device());
  const at::Tensor queries = q.contiguous();
  const at::Tensor keys = k.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), topk}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  // [B, Hkv, N, D]: pooled once per KV head, shared by the query heads of its group.
  at::Tensor block_means = at::empty({k.size(0), k.size(1), num_blocks, k.size(3)}, q.options().dtype(mean_dtype(q)));
  dispatch_route(q, [&](auto tag) {
    using Tag = decltype(tag);
    using Accum = typename PooledType<typename Tag::scalar>::type;
    return moba_route(device_data<Tag>(queries), device_data<Tag>(keys),
                      block_means.mutable_data_ptr<Accum>(), q.size(0), q.size(1), k.size(1), q.size(2), k.size(2),
                      q.size(3), block_size, topk, causal, out.mutable_data_ptr<int32_t>(), current_stream(q.device()));
  });
  return out;
}

at::Tensor moba_route_means_cuda(const at::Tensor& q, const at::Tensor& block_means, int64_t kv_len,
                                 int64_t block_size, int64_t topk, bool causal) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK_VALUE(block_means.device() == q.device(), "block_means must be on ", q.device(), ", got ",
                    block_means.device());
  cpu::check_route_means_args(q, block_means, kv_len, block_size, topk, causal);
  check_ranked_blocks((kv_len + block_size - 1) / block_size, topk, causal);
  const c10::DeviceGuard device_guard(q.device());
  const at::Tensor queries = q.contiguous();
  const at::Tensor means = block_means.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), topk}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  dispatch_route(q, [&](auto tag) {
    using Tag = decltype(tag);
    using Accum = typename PooledType<typename Tag::scalar>::type;
    return moba_route_means(device_data<Tag>(queries), means.const_data_ptr<Accum>(), q.size(0), q.size(1),
                            means.size(1), q.size(2), kv_len, means.size(2), q.size(3), block_size, topk, causal,
                            out.mutable_data_ptr<int32_t>(), current_stream(q.device()));
  });
  return out;
}

at::Tensor moba_route_varlen_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t block_size,
                                  int64_t topk, bool causal) {
  check_query_and_keys(q, k, 3, topk);
  TORCH_CHECK_VALUE(cu_seqlens_q.device() == q.device() && cu_seqlens_k.device() == q.device(),
                    "cu_seqlens_q and cu_seqlens_k must be on ", q.device());
  // One small device-to-host copy of the offsets: the kernels trust them, so they are checked here.
  const cpu::PackedSequences packed =
      cpu::packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0), max_seqlen_q, block_size);
  check_ranked_blocks(packed.max_blocks, topk, causal);
  const c10::DeviceGuard device_guard(q.device());
  const int64_t num_seqs = static_cast<int64_t>(packed.q_len.size());
  const int64_t total_blocks = packed.block_begin.back();
  at::Tensor out = at::empty({num_seqs, q.size(1), max_seqlen_q, topk}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  const at::Tensor queries = q.contiguous();
  const at::Tensor keys = k.contiguous();
  const at::Tensor offsets_q = cu_seqlens_q.contiguous();
  const at::Tensor offsets_k = cu_seqlens_k.contiguous();
  const at::Tensor block_begin =
      at::tensor(packed.block_begin, at::TensorOptions().dtype(at::kLong)).to(q.device(), /*non_blocking=*/false);
  at::Tensor block_means = at::empty({k.size(1), total_blocks, k.size(2)}, q.options().dtype(mean_dtype(q)));
  dispatch_route(q, [&](auto tag) {
    using Tag = decltype(tag);
    using Accum = typename PooledType<typename Tag::scalar>::type;
    return moba_route_varlen(device_data<Tag>(queries), device_data<Tag>(keys),
                             block_means.mutable_data_ptr<Accum>(), offsets_q.const_data_ptr<int32_t>(),
                             offsets_k.const_data_ptr<int32_t>(), block_begin.const_data_ptr<int64_t>(), num_seqs,
                             total_blocks, packed.max_blocks, q.size(1), k.size(1), max_seqlen_q, q.size(2),
                             block_size, topk, causal, out.mutable_data_ptr<int32_t>(), current_stream(q.device()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("moba_route", &moba_route_cuda);
  m.impl("moba_route_means", &moba_route_means_cuda);
  m.impl("moba_route_varlen", &moba_route_varlen_cuda);
}

}  // namespace sparse_attn::cuda
