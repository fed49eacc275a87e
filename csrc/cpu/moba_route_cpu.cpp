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

void check_route_args(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "q and k must be CPU tensors, got ", q.device(), " and ",
              k.device());
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, Hq, Sq, D], got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 4, "k must be 4-D [B, Hkv, Skv, D], got ", k.dim(), " dims");
  TORCH_CHECK(is_routable_dtype(q.scalar_type()), "q must be float16, bfloat16, float32 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k dtype ", k.scalar_type(), " differs from q dtype ",
              q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0), "k batch ", k.size(0), " differs from q batch ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "k head dim ", k.size(3), " differs from q head dim ", q.size(3));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "the number of query heads (", q.size(1),
              ") must be a multiple of the number of KV heads (", k.size(1), ")");
  TORCH_CHECK(q.size(2) <= k.size(2), "q has more rows (", q.size(2), ") than k (", k.size(2), ")");
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK(topk > 0, "topk must be positive, got ", topk);
  TORCH_CHECK((k.size(2) + block_size - 1) / block_size <= std::numeric_limits<int32_t>::max(),
              "the number of KV blocks must fit in int32");
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

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T sum = T(0);
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

at::Tensor moba_route(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t topk, bool causal) {
  check_route_args(q, k, block_size, topk);
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), kv_len = k.size(2);
  const int64_t num_blocks = (kv_len + block_size - 1) / block_size;
  at::Tensor out = at::full({batch, q_heads, q_len, topk}, -1, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  // [B, Hkv, N, D]: float32, float64 for float64 keys. Query heads index their KV head's means (no K copies).
  const at::Tensor means = block_mean_pool(k, block_size);
  const at::Tensor queries = q.contiguous();
  const int64_t group = q_heads / kv_heads;
  const int64_t position_offset = kv_len - q_len;  // bottom-right alignment
  // Causal rows always take their current block, so only topk - 1 slots are ranked.
  const int64_t capacity = std::min(causal ? topk - 1 : topk, num_blocks);
  const int64_t chunks = (q_len + kRowsPerTask - 1) / kRowsPerTask;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moba_route", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* q_data = queries.const_data_ptr<scalar_t>();
    const acc_t* mean_data = means.const_data_ptr<acc_t>();
    int32_t* out_data = out.mutable_data_ptr<int32_t>();
    at::parallel_for(0, batch * q_heads * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> query(head_dim);
      StreamingTopK<acc_t> best(capacity);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t head = task / chunks;  // b * Hq + h
        const int64_t kv_head = (head / q_heads) * kv_heads + (head % q_heads) / group;
        const acc_t* head_means = mean_data + kv_head * num_blocks * head_dim;
        const int64_t first_row = (task % chunks) * kRowsPerTask;
        const int64_t last_row = std::min(q_len, first_row + kRowsPerTask);
        for (int64_t row = first_row; row < last_row; ++row) {
          const scalar_t* q_row = q_data + (head * q_len + row) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) query[d] = static_cast<acc_t>(q_row[d]);
          const int64_t current_block = (row + position_offset) / block_size;
          // (i + 1) * block_size <= position  <=>  i < current_block: causal rows rank only earlier blocks.
          const int64_t candidates = causal ? current_block : num_blocks;
          best.clear();
          if (capacity > 0) {
            for (int64_t i = 0; i < candidates; ++i) {
              best.offer(dot(query.data(), head_means + i * head_dim, head_dim), static_cast<int32_t>(i));
            }
          }
          int32_t* row_out = out_data + (head * q_len + row) * topk;
          const int64_t kept = best.write_ascending(row_out);
          // Every ranked block precedes the current one, so appending keeps the list ascending.
          if (causal) row_out[kept] = static_cast<int32_t>(current_block);
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) { m.impl("moba_route", &moba_route); }

}  // namespace sparse_attn::cpu
