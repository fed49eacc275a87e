// CPU twin of block-sparse decode (semantics in csrc/ops.cpp), plus the checks and split planning
// shared with the CUDA registration (decode_cpu.h).
//
// It mirrors the CUDA op's structure on purpose: the selected blocks of a row are cut into the
// same num_splits contiguous shares, each share produces a normalised partial output and a base-2
// log-sum-exp, and the shares are merged by LSE exactly as the CUDA combine kernel does. Tests on
// machines without a GPU thereby exercise the split and combine logic (empty shares, rows without
// a visible key) against the reference.
#include "decode_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace sparse_attn {
namespace decode {

namespace {
// Launch-planning constants of the split heuristic (see resolve_num_splits).
constexpr int64_t kAssumedSms = 132;  // H100 SXM
constexpr int64_t kCtasPerSm = 2;
constexpr int64_t kWaves = 2;
}  // namespace

DecodeShape check_decode_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices, int64_t kv_block_size,
                              double softmax_scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, Hq, Sq, D], got ", q.dim(), " dims");
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be 4-D [B, Hkv, Skv, D], got ", k.dim(), " dims");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  for (const auto& [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&kv_num_blocks, "kv_num_blocks"},
                                {&kv_indices, "kv_indices"}}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " must be on ", q.device(), " like q, got ", t->device());
  }
  DecodeShape shape;
  shape.batch = q.size(0);
  shape.q_heads = q.size(1);
  shape.seq_len_q = q.size(2);
  shape.head_dim = q.size(3);
  shape.kv_heads = k.size(1);
  shape.seq_len_kv = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == shape.batch, "k batch ", k.size(0), " differs from q batch ", shape.batch);
  TORCH_CHECK_VALUE(k.size(3) == shape.head_dim, "k head dim ", k.size(3), " differs from q head dim ", shape.head_dim);
  TORCH_CHECK_VALUE(shape.kv_heads > 0 && shape.q_heads % shape.kv_heads == 0, "the number of query heads (",
                    shape.q_heads, ") must be a multiple of the number of KV heads (", shape.kv_heads, ")");
  TORCH_CHECK_VALUE(shape.seq_len_q <= kMaxQueryLen, "block_sparse_decode takes at most ", kMaxQueryLen,
                    " queries per row, got Sq=", shape.seq_len_q, " (use block_sparse_attn for prefill)");
  TORCH_CHECK_VALUE(shape.seq_len_kv <= std::numeric_limits<int32_t>::max(), "seq_len_kv must be below 2^31, got ",
                    shape.seq_len_kv);
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK_VALUE(t->size(3) <= 1 || t->stride(3) == 1, name,
                      " must be contiguous in the last dim (stride 1), got stride ", t->stride(3));
  }

  TORCH_CHECK_VALUE(kv_num_blocks.dim() == 3 && kv_indices.dim() == 4,
                    "kv_num_blocks must be [B, H, Mq] and kv_indices [B, H, Mq, Nmax], got ", kv_num_blocks.sizes(),
                    " and ", kv_indices.sizes());
  TORCH_CHECK_TYPE(kv_num_blocks.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt,
                   "kv_num_blocks and kv_indices must be int32, got ", kv_num_blocks.scalar_type(), " and ",
                   kv_indices.scalar_type());
  TORCH_CHECK_VALUE(kv_indices.sizes().slice(0, 3) == kv_num_blocks.sizes(), "kv_indices leading shape ",
                    kv_indices.sizes(), " must equal kv_num_blocks shape ", kv_num_blocks.sizes());
  shape.layout_batch = kv_num_blocks.size(0);
  shape.layout_heads = kv_num_blocks.size(1);
  shape.max_blocks = kv_indices.size(3);
  TORCH_CHECK_VALUE(shape.layout_batch == shape.batch || shape.layout_batch == 1, "layout batch ", shape.layout_batch,
                    " must be the batch (", shape.batch, ") or 1");
  TORCH_CHECK_VALUE(
      shape.layout_heads == shape.q_heads || shape.layout_heads == shape.kv_heads || shape.layout_heads == 1,
      "layout has ", shape.layout_heads, " heads; expected the query heads (", shape.q_heads, "), the KV heads (",
      shape.kv_heads, ") or 1");
  TORCH_CHECK_VALUE(kv_num_blocks.size(2) == 1,
                    "block_sparse_decode needs a single query block (Mq == 1, Sq <= q_block_size),",
                    " got Mq=", kv_num_blocks.size(2));
  TORCH_CHECK_VALUE(kv_block_size > 0, "kv_block_size must be positive, got ", kv_block_size);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0,
                    "softmax_scale must be a positive finite float, got ", softmax_scale);
  return shape;
}

int64_t heads_per_cta(const DecodeShape& shape) {
  const int64_t group = shape.kv_heads > 0 ? shape.q_heads / shape.kv_heads : 1;
  // A layout per query head gives every head of a group its own block list.
  if (shape.layout_heads == shape.q_heads && group > 1) return 1;
  const int64_t rows_per_head = std::max<int64_t>(shape.seq_len_q, 1);
  for (int64_t heads = group; heads > 1; --heads) {
    if (group % heads == 0 && heads * rows_per_head <= kMaxRowsPerCta) return heads;
  }
  return 1;
}

int64_t resolve_num_splits(const DecodeShape& shape, int64_t requested) {
  TORCH_CHECK_VALUE(requested >= 0, "num_splits must be >= 0 (0 chooses automatically), got ", requested);
  // Shares beyond a row's list width would all be empty (and each holds a partial output per row).
  if (requested > 0) return std::min(requested, std::max<int64_t>(1, shape.max_blocks));
  const int64_t ctas_per_split = std::max<int64_t>(1, shape.batch * shape.q_heads / heads_per_cta(shape));
  const int64_t target_ctas = kWaves * kAssumedSms * kCtasPerSm;
  const int64_t splits = (target_ctas + ctas_per_split - 1) / ctas_per_split;
  return std::max<int64_t>(1, std::min(splits, shape.max_blocks));
}

}  // namespace decode

namespace cpu {
namespace {

// Scores, weights and sums accumulate in double whatever the input: a row may see thousands of
// keys, and a float running sum's error grows with their number (the fp64 oracle's tolerance
// comes from a fp32 PyTorch implementation, whose matmuls sum in blocks).
using Acc = double;

// A [B, H, S, D] tensor read in place: its element strides (the last dim has stride 1).
template <typename In>
struct Strided4d {
  const In* data;
  int64_t batch, head, row;

  explicit Strided4d(const at::Tensor& t)
      : data(t.const_data_ptr<In>()), batch(t.stride(0)), head(t.stride(1)), row(t.stride(2)) {}
  const In* at(int64_t b, int64_t h, int64_t s) const { return data + b * batch + h * head + s * row; }
};

// q, k and v are read where they are, in their own dtype and strides: a decode step reads a few
// blocks of a cache that is often a view (one sequence of a padded batch), which a copy would read whole.
template <typename In>
struct DecodeInputs {
  Strided4d<In> q;  // [B, Hq, Sq, D]
  Strided4d<In> k;  // [B, Hkv, Skv, D]
  Strided4d<In> v;
  const int32_t* counts;   // [layout_batch, layout_heads]
  const int32_t* indices;  // [layout_batch, layout_heads, max_blocks]
};

// One (batch, query head, split) job: the normalised output and base-2 LSE of every query row over
// this split's share of the row's selected blocks.
template <typename In>
void decode_one_split(const DecodeInputs<In>& in, const decode::DecodeShape& shape, int64_t kv_block_size,
                      bool causal, Acc scale_log2, int64_t num_splits, int64_t batch, int64_t head, int64_t split,
                      Acc* partial_out, Acc* partial_lse, std::vector<int64_t>& keys, std::vector<Acc>& scores) {
  const int64_t D = shape.head_dim, Sq = shape.seq_len_q, Skv = shape.seq_len_kv;
  const int64_t num_kv_blocks = (Skv + kv_block_size - 1) / kv_block_size;
  const int64_t list = (shape.layout_batch == 1 ? 0 : batch) * shape.layout_heads +
                       head / (shape.q_heads / shape.layout_heads);
  const int64_t count = in.counts[list];
  TORCH_CHECK_VALUE(count >= 0 && count <= shape.max_blocks, "kv_num_blocks entry ", count, " is outside [0, ",
                    shape.max_blocks, "]");
  const int32_t* blocks = in.indices + list * shape.max_blocks;
  // The CUDA kernel's partition: shares differ by at most one block; a share may be empty.
  const int64_t first = split * count / num_splits, last = (split + 1) * count / num_splits;

  keys.clear();
  for (int64_t j = first; j < last; ++j) {
    const int64_t block = blocks[j];
    TORCH_CHECK_VALUE(block >= 0 && block < num_kv_blocks, "kv_indices entry ", block, " is outside [0, ",
                      num_kv_blocks, ")");
    TORCH_CHECK_VALUE(j == 0 || block > blocks[j - 1], "kv_indices rows must ascend strictly (no duplicates)");
    for (int64_t key = block * kv_block_size; key < std::min((block + 1) * kv_block_size, Skv); ++key)
      keys.push_back(key);
  }

  const int64_t kv_head = head / (shape.q_heads / shape.kv_heads);
  for (int64_t i = 0; i < Sq; ++i) {
    const In* q_row = in.q.at(batch, head, i);
    Acc* out_row = partial_out + ((batch * shape.q_heads + head) * Sq + i) * D;
    Acc& lse = partial_lse[(batch * shape.q_heads + head) * Sq + i];
    // Query i sits at key position i + Skv - Sq (bottom-right causal alignment).
    const int64_t last_visible = causal ? i + Skv - Sq : std::numeric_limits<int64_t>::max();
    scores.clear();
    Acc max_score = -std::numeric_limits<Acc>::infinity();
    for (int64_t key : keys) {
      if (key > last_visible) break;  // keys ascend
      const In* k_row = in.k.at(batch, kv_head, key);
      Acc dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += Acc(q_row[d]) * Acc(k_row[d]);
      scores.push_back(dot * scale_log2);
      max_score = std::max(max_score, scores.back());
    }
    std::fill(out_row, out_row + D, Acc(0));
    if (scores.empty()) {
      lse = -std::numeric_limits<Acc>::infinity();
      continue;
    }
    Acc denominator = 0;
    for (size_t n = 0; n < scores.size(); ++n) {
      const Acc weight = std::exp2(scores[n] - max_score);
      denominator += weight;
      const In* v_row = in.v.at(batch, kv_head, keys[n]);
      for (int64_t d = 0; d < D; ++d) out_row[d] += weight * Acc(v_row[d]);
    }
    for (int64_t d = 0; d < D; ++d) out_row[d] /= denominator;
    lse = max_score + std::log2(denominator);
  }
}

// Merges the splits of every row by their LSE: the CUDA combine kernel's math.
void combine_splits(const Acc* partial_out, const Acc* partial_lse, int64_t num_splits, int64_t rows, int64_t D,
                    Acc* out, Acc* lse) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      Acc max_lse = -std::numeric_limits<Acc>::infinity();
      // A NaN split LSE (NaN scores) makes the row NaN, as the CUDA combine does; std::max would drop it.
      for (int64_t s = 0; s < num_splits; ++s) {
        const Acc split_lse = partial_lse[s * rows + row];
        max_lse = std::isnan(split_lse) || std::isnan(max_lse) ? split_lse + max_lse : std::max(max_lse, split_lse);
      }
      Acc* dst = out + row * D;
      std::fill(dst, dst + D, Acc(0));
      if (max_lse == -std::numeric_limits<Acc>::infinity()) {
        lse[row] = -std::numeric_limits<Acc>::infinity();
        continue;
      }
      Acc total = 0;
      for (int64_t s = 0; s < num_splits; ++s) {
        const Acc weight = std::exp2(partial_lse[s * rows + row] - max_lse);  // 0 for empty splits
        total += weight;
        const Acc* src = partial_out + (s * rows + row) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += weight * src[d];
      }
      for (int64_t d = 0; d < D; ++d) dst[d] /= total;
      lse[row] = (max_lse + std::log2(total)) * Acc(M_LN2);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                       int64_t kv_block_size, bool causal, double softmax_scale,
                                                       int64_t num_splits) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor, got ", q.device());
  const decode::DecodeShape shape =
      decode::check_decode_args(q, k, v, kv_num_blocks, kv_indices, kv_block_size, softmax_scale);
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "q must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(k.scalar_type() == dtype && v.scalar_type() == dtype, "k and v must have q's dtype ", dtype,
                   ", got ", k.scalar_type(), " and ", v.scalar_type());
  const int64_t splits = decode::resolve_num_splits(shape, num_splits);

  const int64_t B = shape.batch, Hq = shape.q_heads, Sq = shape.seq_len_q, D = shape.head_dim;
  // fp32 LSE, fp64 for fp64 q: a sink applied to it after the op keeps fp64 inputs fp64-accurate.
  const at::ScalarType lse_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (B * Hq * Sq == 0) {
    return {at::empty({B, Hq, Sq, D}, q.options()), at::empty({B, Hq, Sq}, q.options().dtype(lse_dtype))};
  }

  const at::Tensor counts = kv_num_blocks.contiguous(), lists = kv_indices.contiguous();
  at::Tensor partial_out = at::empty({splits, B, Hq, Sq, D}, q.options().dtype(at::kDouble));
  at::Tensor partial_lse = at::empty({splits, B, Hq, Sq}, q.options().dtype(at::kDouble));
  at::Tensor out = at::empty({B, Hq, Sq, D}, q.options().dtype(at::kDouble));
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "block_sparse_decode", [&] {
    const DecodeInputs<scalar_t> inputs{Strided4d<scalar_t>(q), Strided4d<scalar_t>(k), Strided4d<scalar_t>(v),
                                        counts.const_data_ptr<int32_t>(), lists.const_data_ptr<int32_t>()};
    const Acc scale_log2 = static_cast<Acc>(softmax_scale) * static_cast<Acc>(M_LOG2E);
    Acc* partial_out_ptr = partial_out.mutable_data_ptr<Acc>();
    Acc* partial_lse_ptr = partial_lse.mutable_data_ptr<Acc>();
    // Split s of row (b, h) writes slice s of the partial buffers, as the CUDA CTAs do.
    at::parallel_for(0, B * Hq * splits, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> keys;
      std::vector<Acc> scores;
      for (int64_t job = begin; job < end; ++job) {
        const int64_t split = job % splits, head = (job / splits) % Hq, batch = job / (splits * Hq);
        const int64_t slice_offset = split * B * Hq * Sq;
        decode_one_split(inputs, shape, kv_block_size, causal, scale_log2, splits, batch, head, split,
                         partial_out_ptr + slice_offset * D, partial_lse_ptr + slice_offset, keys, scores);
      }
    });
    combine_splits(partial_out.const_data_ptr<Acc>(), partial_lse.const_data_ptr<Acc>(), splits, B * Hq * Sq, D,
                   out.mutable_data_ptr<Acc>(), lse.mutable_data_ptr<Acc>());
  });
  return {out.to(dtype), lse.to(lse_dtype)};
}

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) { m.impl("block_sparse_decode", &block_sparse_decode); }

}  // namespace cpu
}  // namespace sparse_attn
