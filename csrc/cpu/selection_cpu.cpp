// CPU kernels of the selection primitives; semantics in csrc/ops.cpp.
#include "selection_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace sparse_attn::cpu {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [rows, entries], got ", t.dim(), " dims");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
  // The selected entries come back as int32 column indices.
  TORCH_CHECK_VALUE(t.size(1) <= std::numeric_limits<int32_t>::max(), name,
                    " rows must have fewer than 2^31 entries, got ", t.size(1));
}

template <typename T>
bool selectable(T x) {
  return !std::isnan(x) && x != -std::numeric_limits<T>::infinity();
}

// Rank order shared by top-k and threshold selection: higher score first, ties to the lower index.
template <typename T>
struct RankOrder {
  const T* row;
  bool operator()(int32_t a, int32_t b) const { return row[a] > row[b] || (row[a] == row[b] && a < b); }
};

}  // namespace

at::Tensor block_mean_pool(const at::Tensor& keys, int64_t block_size) {
  check_cpu(keys, "keys");
  TORCH_CHECK_VALUE(keys.dim() == 4, "keys must be 4-D [B, H, S, D], got ", keys.dim(), " dims");
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  const auto acc_type = keys.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Keys are read in place, in their dtype and strides (a cache is often a view: one sequence of a
  // padded batch); only a last dim with a stride other than 1 is copied first.
  const at::Tensor src = keys.size(3) <= 1 || keys.stride(3) == 1 ? keys : keys.contiguous();
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2), D = keys.size(3);
  const int64_t num_blocks = (S + block_size - 1) / block_size;
  at::Tensor out = at::empty({B, H, num_blocks, D}, keys.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "block_mean_pool", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    const int64_t batch_stride = src.stride(0), head_stride = src.stride(1), row_stride = src.stride(2);
    AT_DISPATCH_FLOATING_TYPES(acc_type, "block_mean_pool_acc", [&] {
      using acc_t = scalar_t;
      acc_t* o = out.mutable_data_ptr<acc_t>();
      at::parallel_for(0, B * H * num_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t job = begin; job < end; ++job) {
          const int64_t b = job / (H * num_blocks), h = job / num_blocks % H, blk = job % num_blocks;
          const int64_t start = blk * block_size, stop = std::min(S, start + block_size);
          mean_of_rows(in + b * batch_stride + h * head_stride + start * row_stride, row_stride, stop - start, D,
                       o + job * D);
        }
      });
    });
  });
  return out;
}

at::Tensor topk_rows(const at::Tensor& scores, int64_t k) {
  check_cpu(scores, "scores");
  check_rows(scores, "scores");
  TORCH_CHECK_VALUE(k >= 0, "k must be non-negative, got ", k);
  const at::Tensor src = scores.contiguous();
  const int64_t R = src.size(0), N = src.size(1);
  at::Tensor out = at::full({R, k}, -1, scores.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "topk_rows", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    int32_t* o = out.data_ptr<int32_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> candidates;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = s + r * N;
        candidates.clear();
        for (int32_t n = 0; n < N; ++n)
          if (selectable(row[n])) candidates.push_back(n);
        const int64_t take = std::min<int64_t>(k, candidates.size());
        std::partial_sort(candidates.begin(), candidates.begin() + take, candidates.end(), RankOrder<scalar_t>{row});
        std::copy(candidates.begin(), candidates.begin() + take, o + r * k);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> threshold_select(const at::Tensor& scores, const at::Tensor& threshold,
                                                    const at::Tensor& forced, const at::Tensor& allowed) {
  for (const auto* t : {&scores, &threshold, &forced, &allowed}) check_cpu(*t, "threshold_select inputs");
  check_rows(scores, "scores");
  const int64_t R = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(threshold.dim() == 1 && threshold.size(0) == R, "threshold must have shape [", R, "], got ",
                    threshold.sizes());
  TORCH_CHECK_VALUE(forced.sizes() == scores.sizes() && allowed.sizes() == scores.sizes(),
                    "forced and allowed must have the shape of scores");
  TORCH_CHECK_TYPE(forced.scalar_type() == at::kBool && allowed.scalar_type() == at::kBool,
                   "forced and allowed must be bool tensors");
  const at::Tensor src = scores.contiguous();
  const at::Tensor tau = threshold.to(at::kDouble).contiguous();
  const at::Tensor is_forced = forced.contiguous(), is_allowed = allowed.contiguous();
  at::Tensor count = at::zeros({R}, scores.options().dtype(at::kInt));
  at::Tensor indices = at::full({R, N}, -1, scores.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "threshold_select", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    const double* t = tau.data_ptr<double>();
    const bool* f = is_forced.data_ptr<bool>();
    const bool* a = is_allowed.data_ptr<bool>();
    int32_t* c = count.data_ptr<int32_t>();
    int32_t* idx = indices.data_ptr<int32_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> ranked;
      std::vector<char> keep(N);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = s + r * N;
        const bool* row_forced = f + r * N;
        const bool* row_allowed = a + r * N;
        double total = 0.0, prefix = 0.0;
        ranked.clear();
        for (int32_t n = 0; n < N; ++n) {
          keep[n] = row_forced[n];
          if (row_allowed[n]) total += row[n];
          if (row_forced[n]) prefix += row_allowed[n] ? double(row[n]) : 0.0;
          else if (row_allowed[n]) ranked.push_back(n);
        }
        const bool keep_all = t[r] >= 1.0;
        const double required = t[r] * total;
        std::stable_sort(ranked.begin(), ranked.end(), RankOrder<scalar_t>{row});
        for (int32_t n : ranked) {
          if (!keep_all && !(prefix < required)) break;
          keep[n] = 1;
          prefix += row[n];
        }
        int32_t kept = 0;
        for (int32_t n = 0; n < N; ++n)
          if (keep[n]) idx[r * N + kept++] = n;
        c[r] = kept;
      }
    });
  });
  return {count, indices};
}

std::tuple<at::Tensor, at::Tensor> layout_transpose(const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                    int64_t num_kv_blocks) {
  check_cpu(kv_num_blocks, "kv_num_blocks");
  check_cpu(kv_indices, "kv_indices");
  TORCH_CHECK_VALUE(kv_num_blocks.dim() == 3 && kv_indices.dim() == 4,
                    "kv_num_blocks must be [B,H,Mq] and kv_indices [B,H,Mq,Nmax]");
  TORCH_CHECK_TYPE(kv_num_blocks.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt,
                   "kv_num_blocks and kv_indices must be int32");
  TORCH_CHECK_VALUE(num_kv_blocks >= 0, "num_kv_blocks must be non-negative");
  TORCH_CHECK_VALUE(kv_indices.sizes().slice(0, 3) == kv_num_blocks.sizes(), "kv_indices leading shape ",
                    kv_indices.sizes(), " must equal kv_num_blocks shape ", kv_num_blocks.sizes());
  const at::Tensor counts = kv_num_blocks.contiguous(), rows = kv_indices.contiguous();
  const int64_t BH = counts.size(0) * counts.size(1), Mq = counts.size(2), Nmax = rows.size(3);
  const int64_t N = num_kv_blocks;
  at::Tensor q_count = at::zeros({counts.size(0), counts.size(1), N}, counts.options());
  at::Tensor q_idx = at::full({counts.size(0), counts.size(1), N, Mq}, -1, counts.options());
  const int32_t* cnt = counts.data_ptr<int32_t>();
  const int32_t* ind = rows.data_ptr<int32_t>();
  int32_t* qc = q_count.data_ptr<int32_t>();
  int32_t* qi = q_idx.data_ptr<int32_t>();
  // Walking query blocks in ascending order appends each KV block's list already sorted.
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t m = 0; m < Mq; ++m) {
        const int32_t n_sel = cnt[bh * Mq + m];
        TORCH_CHECK_VALUE(n_sel >= 0 && n_sel <= Nmax, "kv_num_blocks entry ", n_sel, " is outside [0, ", Nmax, "]");
        for (int32_t j = 0; j < n_sel; ++j) {
          const int32_t n = ind[(bh * Mq + m) * Nmax + j];
          TORCH_CHECK_VALUE(n >= 0 && n < N, "kv_indices entry ", n, " is outside [0, ", N, ")");
          const int32_t filled = qc[bh * N + n];
          // Rows arrive in ascending order, so a repeated index within row m shows up as m already last.
          TORCH_CHECK_VALUE(filled == 0 || qi[(bh * N + n) * Mq + filled - 1] != m,
                            "kv_indices rows must hold unique block indices");
          qi[(bh * N + n) * Mq + qc[bh * N + n]++] = static_cast<int32_t>(m);
        }
      }
    }
  });
  return {q_count, q_idx};
}

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("block_mean_pool", &block_mean_pool);
  m.impl("topk_rows", &topk_rows);
  m.impl("threshold_select", &threshold_select);
  m.impl("layout_transpose", &layout_transpose);
}

}  // namespace sparse_attn::cpu
