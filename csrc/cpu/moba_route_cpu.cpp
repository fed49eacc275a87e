// CPU kernel of MoBA routing; semantics in csrc/ops.cpp.
//
// Block means are pooled once per (batch, KV head) by block_mean_pool; each query row then scores
// its eligible blocks one by one, keeping only a small insertion-sorted top-k, so no
// [blocks, heads, rows] score matrix is ever formed.
#include "moba_route_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "selection_cpu.h"

namespace sparse_attn::cpu {
namespace {

// Query rows per parallel task: the rows of a task share one head's block means, which stay in cache.
constexpr int64_t kRowsPerTask = 64;

bool is_routable_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

// q against the KV side it routes over (keys or their block means, named kv_name), both with heads in
// dim 1 and the head dim last.
void check_heads(const at::Tensor& q, const at::Tensor& kv, const char* kv_name, int64_t topk) {
  TORCH_CHECK_VALUE(kv.size(-1) == q.size(-1), kv_name, " head dim ", kv.size(-1), " differs from q head dim ",
                    q.size(-1));
  TORCH_CHECK_VALUE(kv.size(1) > 0 && q.size(1) % kv.size(1) == 0, "the number of query heads (", q.size(1),
                    ") must be a multiple of the number of KV heads (", kv.size(1), ")");
  TORCH_CHECK_VALUE(topk > 0, "topk must be positive, got ", topk);
}

// Batched q [B, Hq, Sq, D] routed over kv_len keys (named kv_len_name) in blocks of block_size.
void check_batched_extent(const at::Tensor& q, int64_t kv_len, const char* kv_len_name, int64_t block_size) {
  TORCH_CHECK_VALUE(q.size(2) <= kv_len, "q has more rows (", q.size(2), ") than ", kv_len_name, " (", kv_len, ")");
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK_VALUE((kv_len + block_size - 1) / block_size <= std::numeric_limits<int32_t>::max(),
                    "the number of KV blocks must fit in int32");
}

// Checks shared by the batched (4-D) and packed (3-D) layouts; both hold heads in dim 1.
void check_query_and_keys(const at::Tensor& q, const at::Tensor& k, int64_t dims, int64_t topk) {
  const char* layout = dims == 4 ? "[B, H, S, D]" : "[total, H, D]";
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu(), "q and k must be CPU tensors, got ", q.device(),
                    " and ", k.device());
  TORCH_CHECK_VALUE(q.dim() == dims, "q must be ", dims, "-D ", layout, ", got ", q.dim(), " dims");
  TORCH_CHECK_VALUE(k.dim() == dims, "k must be ", dims, "-D ", layout, ", got ", k.dim(), " dims");
  TORCH_CHECK_TYPE(is_routable_dtype(q.scalar_type()), "q must be float16, bfloat16, float32 or float64, got ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k dtype ", k.scalar_type(), " differs from q dtype ",
                   q.scalar_type());
  check_heads(q, k, "k", topk);
}

void check_route_args(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk) {
  check_query_and_keys(q, k, 4, topk);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k batch ", k.size(0), " differs from q batch ", q.size(0));
  check_batched_extent(q, k.size(2), "k", block_size);
}

// The best `capacity` candidates offered so far, in rank order (descending score). Candidates
// arrive in ascending block order and an equal score never displaces a kept one, so ties go to
// the lower block index. NaN and -inf scores are never kept, as in topk_rows.
template <typename T>
class StreamingTopK {
 public:
  explicit StreamingTopK(int64_t capacity) : scores_(capacity), blocks_(capacity) {}

  void clear() { size_ = 0; }

  void offer(T score, int32_t block) {
    if (std::isnan(score) || score == -std::numeric_limits<T>::infinity()) return;
    const int64_t capacity = static_cast<int64_t>(scores_.size());
    int64_t slot;
    if (size_ < capacity) {
      slot = size_++;
    } else if (capacity > 0 && score > scores_[capacity - 1]) {
      slot = capacity - 1;  // evicts the last-ranked candidate
    } else {
      return;
    }
    for (; slot > 0 && scores_[slot - 1] < score; --slot) {
      scores_[slot] = scores_[slot - 1];
      blocks_[slot] = blocks_[slot - 1];
    }
    scores_[slot] = score;
    blocks_[slot] = block;
  }

  // Writes the kept blocks in ascending order; returns how many.
  int64_t write_ascending(int32_t* out) const {
    std::copy(blocks_.begin(), blocks_.begin() + size_, out);
    std::sort(out, out + size_);
    return size_;
  }

 private:
  std::vector<T> scores_;
  std::vector<int32_t> blocks_;
  int64_t size_ = 0;
};

// Eight interleaved partial sums, added pairwise at the end: a fixed order (every route op that
// shares this function rounds alike), and independent lanes the compiler vectorises without
// -ffast-math (a single running sum is a serial dependency: 4-8x slower).
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  T lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += a[i + j] * b[i + j];
  }
  for (int64_t j = 0; i < n; ++i, ++j) lane[j] += a[i] * b[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Where one sequence's rows live, as element offsets into q and the block means.
struct RouteSequence {
  int64_t q_offset;
  int64_t means_offset;
  int64_t q_len;
  int64_t kv_len;
};

// Strides shared by every sequence. Output rows are [sequence, query head, max_q_len, topk] in
// both layouts; block means are [.., KV head, block, head_dim] with a per-layout head stride.
struct RouteLayout {
  int64_t q_heads, kv_heads, head_dim, block_size, topk, max_q_len;
  int64_t q_row_stride, q_head_stride, means_head_stride;
  bool causal;
};

// Routes every row of every sequence into out (pre-filled with -1), in parallel tasks of
// kRowsPerTask rows of one (sequence, query head).
template <typename scalar_t, typename acc_t>
void route_sequences(const scalar_t* q, const acc_t* means, const std::vector<RouteSequence>& sequences,
                     const RouteLayout& layout, int64_t capacity, int32_t* out) {
  const int64_t group = layout.q_heads / layout.kv_heads;
  const int64_t head_dim = layout.head_dim;
  const int64_t chunks = (layout.max_q_len + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t num_tasks = static_cast<int64_t>(sequences.size()) * layout.q_heads * chunks;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> query(head_dim);
    StreamingTopK<acc_t> best(capacity);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / chunks;  // sequence * q_heads + query head
      const RouteSequence& seq = sequences[head / layout.q_heads];
      const int64_t q_head = head % layout.q_heads;
      const acc_t* head_means = means + seq.means_offset + (q_head / group) * layout.means_head_stride;
      const int64_t num_blocks = (seq.kv_len + layout.block_size - 1) / layout.block_size;
      const int64_t position_offset = seq.kv_len - seq.q_len;  // bottom-right alignment
      const int64_t first_row = (task % chunks) * kRowsPerTask;
      const int64_t last_row = std::min(seq.q_len, first_row + kRowsPerTask);
      for (int64_t row = first_row; row < last_row; ++row) {
        const scalar_t* q_row = q + seq.q_offset + q_head * layout.q_head_stride + row * layout.q_row_stride;
        for (int64_t d = 0; d < head_dim; ++d) query[d] = static_cast<acc_t>(q_row[d]);
        const int64_t current_block = (row + position_offset) / layout.block_size;
        // (i + 1) * block_size <= position  <=>  i < current_block: causal rows rank only earlier blocks.
        const int64_t candidates = layout.causal ? current_block : num_blocks;
        best.clear();
        if (capacity > 0) {
          for (int64_t i = 0; i < candidates; ++i) {
            best.offer(dot(query.data(), head_means + i * head_dim, head_dim), static_cast<int32_t>(i));
          }
        }
        int32_t* row_out = out + (head * layout.max_q_len + row) * layout.topk;
        const int64_t kept = best.write_ascending(row_out);
        // Every ranked block precedes the current one, so appending keeps the list ascending.
        if (layout.causal) row_out[kept] = static_cast<int32_t>(current_block);
      }
    }
  });
}

// Causal rows always take their current block, so only topk - 1 slots are ranked.
int64_t ranked_capacity(int64_t topk, bool causal, int64_t max_blocks) {
  return std::min(causal ? topk - 1 : topk, max_blocks);
}

// Packed keys [total, Hkv, D] -> means [Hkv, total_blocks, D] (acc_t), blocks restarting at every
// sequence start; block_begin[s] is sequence s's first block.
template <typename scalar_t, typename acc_t>
void pool_packed_blocks(const scalar_t* keys, const PackedSequences& packed, int64_t kv_heads, int64_t head_dim,
                        int64_t block_size, acc_t* means) {
  const int64_t total_blocks = packed.block_begin.back();
  std::vector<int64_t> block_sequence(total_blocks);
  for (size_t s = 0; s + 1 < packed.block_begin.size(); ++s) {
    std::fill(block_sequence.begin() + packed.block_begin[s], block_sequence.begin() + packed.block_begin[s + 1],
              static_cast<int64_t>(s));
  }
  at::parallel_for(0, kv_heads * total_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t head = job / total_blocks, block = job % total_blocks;
      const int64_t s = block_sequence[block];
      const int64_t first = packed.k_begin[s] + (block - packed.block_begin[s]) * block_size;
      const int64_t last = std::min(packed.k_begin[s] + packed.k_len[s], first + block_size);
      mean_of_rows(keys + (first * kv_heads + head) * head_dim, kv_heads * head_dim, last - first, head_dim,
                   means + job * head_dim);
    }
  });
}

void check_cu_seqlens(const at::Tensor& cu, const char* name) {
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, name, " must be 1-D with at least one entry, got shape ",
                    cu.sizes());
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
}

std::vector<int64_t> host_offsets(const at::Tensor& cu, int64_t total, const char* name) {
  const at::Tensor host = cu.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> offsets(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + host.numel());
  TORCH_CHECK_VALUE(offsets.front() == 0 && offsets.back() == total, name, " must start at 0 and end at ", total,
                    " (the packed length), got ", offsets.front(), " and ", offsets.back());
  for (size_t s = 0; s + 1 < offsets.size(); ++s) {
    TORCH_CHECK_VALUE(offsets[s] <= offsets[s + 1], name, " must be non-decreasing");
  }
  return offsets;
}

}  // namespace

PackedSequences packed_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                                 int64_t total_k, int64_t max_seqlen_q, int64_t block_size) {
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q");
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k");
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
                    "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got ",
                    cu_seqlens_q.numel() - 1, " and ", cu_seqlens_k.numel() - 1);
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, "max_seqlen_q must be non-negative, got ", max_seqlen_q);
  const std::vector<int64_t> q_offsets = host_offsets(cu_seqlens_q, total_q, "cu_seqlens_q");
  const std::vector<int64_t> k_offsets = host_offsets(cu_seqlens_k, total_k, "cu_seqlens_k");
  PackedSequences packed;
  packed.block_begin.push_back(0);
  for (size_t s = 0; s + 1 < q_offsets.size(); ++s) {
    const int64_t q_len = q_offsets[s + 1] - q_offsets[s], k_len = k_offsets[s + 1] - k_offsets[s];
    TORCH_CHECK_VALUE(q_len <= k_len, "sequence ", s, " has ", q_len, " queries but ", k_len,
                      " keys; routing needs Lq <= Lk");
    TORCH_CHECK_VALUE(q_len <= max_seqlen_q, "sequence ", s, " has ", q_len, " queries, more than max_seqlen_q=",
                      max_seqlen_q);
    const int64_t blocks = (k_len + block_size - 1) / block_size;
    packed.q_begin.push_back(q_offsets[s]);
    packed.q_len.push_back(q_len);
    packed.k_begin.push_back(k_offsets[s]);
    packed.k_len.push_back(k_len);
    packed.max_blocks = std::max(packed.max_blocks, blocks);
    packed.block_begin.push_back(packed.block_begin.back() + blocks);
  }
  TORCH_CHECK_VALUE(packed.max_blocks <= std::numeric_limits<int32_t>::max(),
                    "the number of KV blocks must fit in int32");
  return packed;
}

namespace {

// Routes q [B, Hq, Sq, D] against contiguous block means [B, Hkv, N, D] of keys kv_len long: the
// scoring and ranking shared by moba_route (which pools the means) and moba_route_means (given them).
at::Tensor route_batched(const at::Tensor& q, const at::Tensor& means, int64_t kv_len, int64_t block_size,
                         int64_t topk, bool causal) {
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = means.size(1), num_means = means.size(2);
  const int64_t num_blocks = (kv_len + block_size - 1) / block_size;
  at::Tensor out = at::full({batch, q_heads, q_len, topk}, -1, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  // Query heads index their KV head's means (no K copies).
  const at::Tensor queries = q.contiguous();
  const RouteLayout layout{q_heads, kv_heads, head_dim, block_size, topk, q_len, head_dim, q_len * head_dim,
                           num_means * head_dim, causal};
  std::vector<RouteSequence> sequences;
  for (int64_t b = 0; b < batch; ++b) {
    sequences.push_back({b * q_heads * q_len * head_dim, b * kv_heads * num_means * head_dim, q_len, kv_len});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moba_route", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_sequences(queries.const_data_ptr<scalar_t>(), means.const_data_ptr<acc_t>(), sequences, layout,
                    ranked_capacity(topk, causal, num_blocks), out.mutable_data_ptr<int32_t>());
  });
  return out;
}

}  // namespace

at::Tensor moba_route(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal) {
  check_route_args(q, k, block_size, topk);
  // [B, Hkv, N, D]: float32, float64 for float64 keys.
  return route_batched(q, block_mean_pool(k, block_size), k.size(2), block_size, topk, causal);
}

at::Tensor moba_route_means(const at::Tensor& q, const at::Tensor& block_means, int64_t kv_len, int64_t block_size,
                            int64_t topk, bool causal) {
  TORCH_CHECK_VALUE(q.device().is_cpu() && block_means.device().is_cpu(), "q and block_means must be CPU tensors, got ",
                    q.device(), " and ", block_means.device());
  check_route_means_args(q, block_means, kv_len, block_size, topk, causal);
  return route_batched(q, block_means.contiguous(), kv_len, block_size, topk, causal);
}

void check_route_means_args(const at::Tensor& q, const at::Tensor& block_means, int64_t kv_len, int64_t block_size,
                            int64_t topk, bool causal) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, Hq, Sq, D], got ", q.dim(), " dims");
  TORCH_CHECK_VALUE(block_means.dim() == 4, "block_means must be 4-D [B, Hkv, N, D], got ", block_means.dim(),
                    " dims");
  TORCH_CHECK_TYPE(is_routable_dtype(q.scalar_type()), "q must be float16, bfloat16, float32 or float64, got ",
                   q.scalar_type());
  const at::ScalarType mean_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(block_means.scalar_type() == mean_type, "block_means must be ", mean_type, " for ",
                   q.scalar_type(), " queries (block_mean_pool's dtype), got ", block_means.scalar_type());
  check_heads(q, block_means, "block_means", topk);
  TORCH_CHECK_VALUE(block_means.size(0) == q.size(0), "block_means batch ", block_means.size(0),
                    " differs from q batch ", q.size(0));
  check_batched_extent(q, kv_len, "kv_len", block_size);
  // Causal rows rank only the blocks before their own; non-causal rows rank every block.
  const int64_t needed =
      causal ? std::max<int64_t>(kv_len - 1, 0) / block_size : (kv_len + block_size - 1) / block_size;
  TORCH_CHECK_VALUE(block_means.size(2) >= needed, "block_means holds ", block_means.size(2), " blocks; routing ",
                    kv_len, " keys in blocks of ", block_size, (causal ? " causally" : ""), " needs ", needed);
}

at::Tensor moba_route_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t block_size, int64_t topk,
                             bool causal) {
  check_query_and_keys(q, k, 3, topk);
  const int64_t q_heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  const PackedSequences packed =
      packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0), max_seqlen_q, block_size);
  const int64_t num_seqs = static_cast<int64_t>(packed.q_len.size());
  const int64_t total_blocks = packed.block_begin.back();
  at::Tensor out = at::full({num_seqs, q_heads, max_seqlen_q, topk}, -1, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  const at::Tensor queries = q.contiguous();
  const at::Tensor keys = k.contiguous();
  const auto mean_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor means = at::empty({kv_heads, total_blocks, head_dim}, q.options().dtype(mean_dtype));
  const RouteLayout layout{q_heads, kv_heads, head_dim, block_size, topk, max_seqlen_q, q_heads * head_dim, head_dim,
                           total_blocks * head_dim, causal};
  std::vector<RouteSequence> sequences;
  for (int64_t s = 0; s < num_seqs; ++s) {
    sequences.push_back(
        {packed.q_begin[s] * q_heads * head_dim, packed.block_begin[s] * head_dim, packed.q_len[s], packed.k_len[s]});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moba_route_varlen", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_data = means.mutable_data_ptr<acc_t>();
    pool_packed_blocks(keys.const_data_ptr<scalar_t>(), packed, kv_heads, head_dim, block_size, mean_data);
    route_sequences(queries.const_data_ptr<scalar_t>(), static_cast<const acc_t*>(mean_data), sequences, layout,
                    ranked_capacity(topk, causal, packed.max_blocks), out.mutable_data_ptr<int32_t>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("moba_route", &moba_route);
  m.impl("moba_route_means", &moba_route_means);
  m.impl("moba_route_varlen", &moba_route_varlen);
}

}  // namespace sparse_attn::cpu
