// CUDA registration of sparse_attn::moba_route (semantics in csrc/ops.cpp): argument checks, the
// block-mean workspace, output allocation and dtype dispatch around the raw launcher of
// moba_route_kernels.h. Device-generic torch headers only, as in selection_cuda.cpp.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "moba_route_kernels.h"

namespace sparse_attn::cuda {
namespace {

cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl cuda_guard_impl(c10::DeviceType::CUDA);
  return reinterpret_cast<cudaStream_t>(cuda_guard_impl.getStream(device).native_handle());
}

void check_route_args(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), "k must be on ", q.device(), ", got ", k.device());
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, Hq, Sq, D], got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 4, "k must be 4-D [B, Hkv, Skv, D], got ", k.dim(), " dims");
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "q must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype, "k dtype ", k.scalar_type(), " differs from q dtype ", dtype);
  TORCH_CHECK(k.size(0) == q.size(0), "k batch ", k.size(0), " differs from q batch ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "k head dim ", k.size(3), " differs from q head dim ", q.size(3));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "the number of query heads (", q.size(1),
              ") must be a multiple of the number of KV heads (", k.size(1), ")");
  TORCH_CHECK(q.size(2) <= k.size(2), "q has more rows (", q.size(2), ") than k (", k.size(2), ")");
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK(topk > 0, "topk must be positive, got ", topk);
  const int64_t num_blocks = (k.size(2) + block_size - 1) / block_size;
  TORCH_CHECK(num_blocks <= std::numeric_limits<int32_t>::max(), "the number of KV blocks must fit in int32");
  const int64_t ranked = moba_ranked_blocks(num_blocks, topk, causal);
  TORCH_CHECK(ranked <= kMaxMobaRankedBlocks, "sparse_attn::moba_route: the CUDA kernel ranks at most ",
              kMaxMobaRankedBlocks, " blocks per row (topk up to ", kMaxMobaRankedBlocks + (causal ? 1 : 0),
              " with ", causal ? "causal" : "non-causal", " routing), got topk=", topk, " over ", num_blocks,
              " blocks");
}

template <typename Scalar, typename TorchScalar>
cudaError_t launch(const at::Tensor& q, const at::Tensor& k, at::Tensor& block_means, int64_t block_size,
                   int64_t topk, bool causal, at::Tensor& out) {
  using Accum = typename PooledType<Scalar>::type;
  return moba_route(reinterpret_cast<const Scalar*>(q.const_data_ptr<TorchScalar>()),
                    reinterpret_cast<const Scalar*>(k.const_data_ptr<TorchScalar>()),
                    block_means.mutable_data_ptr<Accum>(), q.size(0), q.size(1), k.size(1), q.size(2), k.size(2),
                    q.size(3), block_size, topk, causal, out.mutable_data_ptr<int32_t>(), current_stream(q.device()));
}

at::Tensor moba_route_cuda(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal) {
  check_route_args(q, k, block_size, topk, causal);
  const c10::DeviceGuard device_guard(q.device());
  const at::Tensor queries = q.contiguous();
  const at::Tensor keys = k.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), topk}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  const int64_t num_blocks = (k.size(2) + block_size - 1) / block_size;
  const at::ScalarType mean_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // [B, Hkv, N, D]: pooled once per KV head, shared by the query heads of its group.
  at::Tensor block_means = at::empty({k.size(0), k.size(1), num_blocks, k.size(3)}, q.options().dtype(mean_dtype));
  cudaError_t status = cudaSuccess;
  switch (q.scalar_type()) {
    case at::kHalf:
      status = launch<__half, at::Half>(queries, keys, block_means, block_size, topk, causal, out);
      break;
    case at::kBFloat16:
      status = launch<__nv_bfloat16, at::BFloat16>(queries, keys, block_means, block_size, topk, causal, out);
      break;
    case at::kFloat:
      status = launch<float, float>(queries, keys, block_means, block_size, topk, causal, out);
      break;
    default:  // kDouble, checked above
      status = launch<double, double>(queries, keys, block_means, block_size, topk, causal, out);
      break;
  }
  TORCH_CHECK(status == cudaSuccess, "sparse_attn::moba_route: CUDA error: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) { m.impl("moba_route", &moba_route_cuda); }

}  // namespace sparse_attn::cuda
