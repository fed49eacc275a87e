// CUDA kernels of the selection primitives; API, semantics and limits in selection_kernels.h.
#include "selection_kernels.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace sparse_attn::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kMaxBlockThreads = 1024;
// Grid-stride loops cover larger problems; this only keeps gridDim.x within the hardware limit.
constexpr int64_t kMaxGridBlocks = int64_t{1} << 30;
// Above this, dynamic shared memory needs an explicit opt-in (cudaFuncSetAttribute).
constexpr size_t kDefaultDynamicSmemBytes = 48 * 1024;

// One declaration shared by every kernel: differing extern __shared__ declarations do not compile.
extern __shared__ __align__(16) unsigned char dynamic_smem[];

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  return static_cast<unsigned>(std::min(ceil_div(work_items, items_per_block), kMaxGridBlocks));
}

// ------------------------------------------------------------------------------------------------
// Shared device helpers
// ------------------------------------------------------------------------------------------------

// Exclusive prefix sum of one value per thread, in thread order; *block_total receives the sum of
// all values. Deterministic (fixed shuffle tree). blockDim.x must be a multiple of 32, and every
// thread of the block must call it: it synchronises the block, also before returning so that a
// following call may reuse the scratch.
template <typename T>
__device__ T block_exclusive_sum(T value, T* block_total) {
  __shared__ T warp_offsets[kMaxBlockThreads / kWarpSize];
  __shared__ T total;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;

  T inclusive = value;
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const T below = __shfl_up_sync(kFullWarpMask, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  // Shift instead of subtracting `value`: inclusive - value is not exact in floating point.
  T exclusive = __shfl_up_sync(kFullWarpMask, inclusive, 1);
  if (lane == 0) exclusive = T(0);
  if (lane == kWarpSize - 1) warp_offsets[warp] = inclusive;
  __syncthreads();

  if (warp == 0) {
    const T warp_sum = lane < num_warps ? warp_offsets[lane] : T(0);
    T warp_inclusive = warp_sum;
    for (int offset = 1; offset < kWarpSize; offset <<= 1) {
      const T below = __shfl_up_sync(kFullWarpMask, warp_inclusive, offset);
      if (lane >= offset) warp_inclusive += below;
    }
    T warp_exclusive = __shfl_up_sync(kFullWarpMask, warp_inclusive, 1);
    if (lane == 0) warp_exclusive = T(0);
    if (lane < num_warps) warp_offsets[lane] = warp_exclusive;
    if (lane == kWarpSize - 1) total = warp_inclusive;
  }
  __syncthreads();

  const T result = warp_offsets[warp] + exclusive;
  *block_total = total;
  __syncthreads();
  return result;
}

// Bit-level view of a score. Keys are unsigned integers whose order is the score order, so that a
// sort never evaluates floating-point comparisons (whose NaN behaviour and, under
// --use_fast_math, denormal flushing would otherwise leak in).
template <typename Score>
struct ScoreBits;

template <>
struct ScoreBits<float> {
  using Key = uint32_t;
  static constexpr Key kSign = 0x80000000u;
  static constexpr Key kPositiveInf = 0x7f800000u;
  static constexpr Key kCanonicalNaN = 0x7fc00000u;
  __device__ static Key bits(float x) { return __float_as_uint(x); }
  __device__ static float value(Key bits) { return __uint_as_float(bits); }
};

template <>
struct ScoreBits<double> {
  using Key = unsigned long long;
  static constexpr Key kSign = 0x8000000000000000ull;
  static constexpr Key kPositiveInf = 0x7ff0000000000000ull;
  static constexpr Key kCanonicalNaN = 0x7ff8000000000000ull;
  __device__ static Key bits(double x) { return static_cast<Key>(__double_as_longlong(x)); }
  __device__ static double value(Key bits) { return __longlong_as_double(static_cast<long long>(bits)); }
};

template <typename Score>
using SortKey = typename ScoreBits<Score>::Key;

// Key 0 marks "not a candidate"; it sorts after every score because the only bit pattern mapping
// to it (an all-ones negative NaN) is canonicalised first.
template <typename Score>
constexpr SortKey<Score> kNoCandidateKey = 0;
// threshold_select's forced entries outrank every score (canonical NaN maps below all ones).
template <typename Score>
constexpr SortKey<Score> kForcedKey = ~SortKey<Score>(0);

// Order-preserving map of a score to an unsigned key: -0 and +0 share a key (they tie), and every
// NaN maps to one key above +inf (where a descending torch.sort puts NaN).
template <typename Score>
__device__ __forceinline__ SortKey<Score> score_key(Score x) {
  using Bits = ScoreBits<Score>;
  SortKey<Score> bits = Bits::bits(x);
  const SortKey<Score> magnitude = bits & ~Bits::kSign;
  if (magnitude == 0) {
    bits = 0;
  } else if (magnitude > Bits::kPositiveInf) {
    bits = Bits::kCanonicalNaN;
  }
  return (bits & Bits::kSign) ? ~bits : (bits | Bits::kSign);
}

// Inverse of score_key (up to the canonicalisation of -0 and NaN).
template <typename Score>
__device__ __forceinline__ Score score_from_key(SortKey<Score> key) {
  using Bits = ScoreBits<Score>;
  return Bits::value((key & Bits::kSign) ? (key & ~Bits::kSign) : ~key);
}

// topk_rows never selects -inf or NaN.
template <typename Score>
__device__ __forceinline__ bool is_selectable(Score x) {
  using Bits = ScoreBits<Score>;
  const SortKey<Score> bits = Bits::bits(x);
  const bool is_nan = (bits & ~Bits::kSign) > Bits::kPositiveInf;
  const bool is_negative_inf = bits == (Bits::kSign | Bits::kPositiveInf);
  return !is_nan && !is_negative_inf;
}

// Sorts padded_len (a power of two) (key, index) pairs in shared memory into rank order: larger
// key first, equal keys by lower index. Indices are unique, so the order is total and the result
// does not depend on the thread count. Callers synchronise before; this synchronises after.
template <typename Key>
__device__ void bitonic_sort_rank_order(Key* keys, int32_t* indices, int padded_len) {
  const int num_pairs = padded_len / 2;
  for (int run = 2; run <= padded_len; run <<= 1) {
    for (int stride = run / 2; stride > 0; stride /= 2) {
      for (int pair = threadIdx.x; pair < num_pairs; pair += blockDim.x) {
        // The pair's first element: insert a zero bit at the stride's position.
        const int i = ((pair & ~(stride - 1)) << 1) | (pair & (stride - 1));
        const int j = i + stride;
        // Runs alternate direction so that each pair of runs forms a bitonic sequence; the final
        // run (run == padded_len) always has the bit clear and ends in rank order.
        const bool i_should_lead = (i & run) == 0;
        const Key key_i = keys[i], key_j = keys[j];
        const int32_t index_i = indices[i], index_j = indices[j];
        const bool j_ranks_first = key_j > key_i || (key_j == key_i && index_j < index_i);
        if (j_ranks_first == i_should_lead) {
          keys[i] = key_j;
          keys[j] = key_i;
          indices[i] = index_j;
          indices[j] = index_i;
        }
      }
      __syncthreads();
    }
  }
}

int64_t next_power_of_two(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Launch shape of the sort-based kernels: one block per row, the row padded to a power of two.
struct RowSortLaunch {
  int padded_len = 0;
  int threads = 0;
  size_t smem_bytes = 0;
};

// Largest padded row whose sort arrays fit next to `kernel`'s static shared memory on the
// current device.
template <typename Kernel>
cudaError_t max_padded_row_length(Kernel kernel, size_t bytes_per_entry, int64_t* max_len) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  int optin_smem = 0;
  status = cudaDeviceGetAttribute(&optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  cudaFuncAttributes attributes{};
  status = cudaFuncGetAttributes(&attributes, kernel);
  if (status != cudaSuccess) return status;
  const int64_t budget = static_cast<int64_t>(optin_smem) - static_cast<int64_t>(attributes.sharedSizeBytes);
  int64_t len = 0;
  while ((len == 0 ? 1 : 2 * len) * static_cast<int64_t>(bytes_per_entry) <= budget && len < (int64_t{1} << 30)) {
    len = len == 0 ? 1 : 2 * len;
  }
  *max_len = len;
  return cudaSuccess;
}

// Checks that rows of row_len entries fit and raises the kernel's dynamic shared-memory limit
// when they need more than the default 48 KiB.
template <typename Kernel>
cudaError_t prepare_row_sort(Kernel kernel, size_t bytes_per_entry, int64_t row_len, RowSortLaunch* launch) {
  int64_t max_len = 0;
  cudaError_t status = max_padded_row_length(kernel, bytes_per_entry, &max_len);
  if (status != cudaSuccess) return status;
  const int64_t padded_len = next_power_of_two(row_len);
  if (row_len <= 0 || padded_len > max_len) return cudaErrorInvalidValue;
  launch->padded_len = static_cast<int>(padded_len);
  // One thread per compare-exchange pair, whole warps, at most a full block.
  launch->threads = static_cast<int>(std::clamp<int64_t>(padded_len / 2, kWarpSize, kMaxBlockThreads));
  launch->smem_bytes = static_cast<size_t>(padded_len) * bytes_per_entry;
  if (launch->smem_bytes > kDefaultDynamicSmemBytes) {
    // Raise the limit to the device maximum rather than to this launch's need: the attribute is
    // per function, so a smaller value set by a concurrent caller could not break this launch.
    int device = 0;
    int optin_smem = 0;
    cudaFuncAttributes attributes{};
    if ((status = cudaGetDevice(&device)) != cudaSuccess) return status;
    if ((status = cudaDeviceGetAttribute(&optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) !=
        cudaSuccess) {
      return status;
    }
    if ((status = cudaFuncGetAttributes(&attributes, kernel)) != cudaSuccess) return status;
    const int dynamic_limit = optin_smem - static_cast<int>(attributes.sharedSizeBytes);
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_limit);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------
// block_mean_pool
// ------------------------------------------------------------------------------------------------

constexpr int kPoolThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T elements[N];
};

__device__ __forceinline__ float to_accumulator(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_accumulator(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_accumulator(float x) { return x; }
__device__ __forceinline__ double to_accumulator(double x) { return x; }

// IEEE round-to-nearest division whatever --use_fast_math says, as the CPU op and the reference divide.
__device__ __forceinline__ float divide_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double divide_rn(double a, double b) { return __ddiv_rn(a, b); }

// Where the keys of output row `out_row` (head * blocks_per_head + block) live. Batched keys are
// [heads, seq_len, head_dim]. Packed keys (cu_seqlens != nullptr) are [total, heads, head_dim];
// their blocks restart at every sequence start, sequence s owning the blocks
// [block_begin[s], block_begin[s + 1]).
struct KeyBlocks {
  int64_t blocks_per_head;
  int64_t heads;
  int64_t head_dim;
  int64_t block_size;
  int64_t seq_len;  // batched only
  const int32_t* cu_seqlens;
  const int64_t* block_begin;
  int64_t num_seqs;
};

struct KeyBlock {
  int64_t offset;      // element offset of the block's first key
  int64_t len;         // its real number of keys
  int64_t row_stride;  // elements between consecutive keys
};

__device__ __forceinline__ KeyBlock key_block(const KeyBlocks& blocks, int64_t out_row) {
  const int64_t head = out_row / blocks.blocks_per_head;
  const int64_t block = out_row % blocks.blocks_per_head;
  if (blocks.cu_seqlens == nullptr) {
    const int64_t first = block * blocks.block_size;
    return {(head * blocks.seq_len + first) * blocks.head_dim, min(blocks.block_size, blocks.seq_len - first),
            blocks.head_dim};
  }
  // The sequence owning the block: the last s with block_begin[s] <= block (never an empty one,
  // whose successor starts at the same block).
  int64_t lo = 0, hi = blocks.num_seqs;  // block_begin[lo] <= block < block_begin[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (blocks.block_begin[mid] <= block) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t first = blocks.cu_seqlens[lo] + (block - blocks.block_begin[lo]) * blocks.block_size;
  const int64_t row_stride = blocks.heads * blocks.head_dim;
  return {first * row_stride + head * blocks.head_dim, min(blocks.block_size, blocks.cu_seqlens[lo + 1] - first),
          row_stride};
}

// One block per output row (a key block of one head). threadIdx.x walks head_dim in vectors of
// kVec elements (coalesced 16-byte loads when kVec > 1); threadIdx.y splits the block's keys so
// that small head dims still use the whole block; a fixed-order shared-memory reduction over y
// combines the partial sums.
template <typename Key, int kVec>
__global__ void __launch_bounds__(kPoolThreads)
    block_mean_pool_kernel(const Key* __restrict__ keys, typename PooledType<Key>::type* __restrict__ out,
                           int64_t out_rows, KeyBlocks blocks) {
  using Accum = typename PooledType<Key>::type;
  using Vector = AlignedVector<Key, kVec>;
  // Layout [y][element of vector][x]: consecutive x are consecutive words, free of bank conflicts.
  Accum* partial_sums = reinterpret_cast<Accum*>(dynamic_smem);
  const int64_t head_dim = blocks.head_dim;
  const int64_t vectors_per_key = head_dim / kVec;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;

  for (int64_t out_row = blockIdx.x; out_row < out_rows; out_row += gridDim.x) {
    const KeyBlock block = key_block(blocks, out_row);
    const Key* block_keys = keys + block.offset;
    Accum* row_out = out + out_row * head_dim;

    for (int64_t vector_base = 0; vector_base < vectors_per_key; vector_base += blockDim.x) {
      const int64_t vector = vector_base + tx;
      Accum sums[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) sums[e] = Accum(0);
      if (vector < vectors_per_key) {
        for (int64_t key = ty; key < block.len; key += blockDim.y) {
          const Vector loaded =
              *reinterpret_cast<const Vector*>(block_keys + key * block.row_stride + vector * kVec);
#pragma unroll
          for (int e = 0; e < kVec; ++e) sums[e] += to_accumulator(loaded.elements[e]);
        }
      }
      if (blockDim.y > 1) {  // uniform across the block, so the barriers below are safe
#pragma unroll
        for (int e = 0; e < kVec; ++e) partial_sums[(ty * kVec + e) * blockDim.x + tx] = sums[e];
        __syncthreads();
        if (ty == 0) {
          for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) sums[e] += partial_sums[(y * kVec + e) * blockDim.x + tx];
          }
        }
        __syncthreads();  // the next vector chunk or row overwrites partial_sums
      }
      if (ty == 0 && vector < vectors_per_key) {
        const Accum len = static_cast<Accum>(block.len);
#pragma unroll
        for (int e = 0; e < kVec; ++e) row_out[vector * kVec + e] = divide_rn(sums[e], len);
      }
    }
  }
}

template <typename Key, int kVec>
cudaError_t launch_block_mean_pool(const Key* keys, typename PooledType<Key>::type* out, int64_t out_rows,
                                   const KeyBlocks& blocks, cudaStream_t stream) {
  using Accum = typename PooledType<Key>::type;
  const int64_t vectors_per_key = blocks.head_dim / kVec;
  const int threads_x = static_cast<int>(std::min<int64_t>(vectors_per_key, kPoolThreads));
  // More y threads than keys per block would only idle.
  const int threads_y = static_cast<int>(std::clamp<int64_t>(kPoolThreads / threads_x, 1, blocks.block_size));
  const size_t smem_bytes = threads_y > 1 ? size_t(threads_x) * threads_y * kVec * sizeof(Accum) : 0;
  block_mean_pool_kernel<Key, kVec><<<grid_for(out_rows, 1), dim3(threads_x, threads_y), smem_bytes, stream>>>(
      keys, out, out_rows, blocks);
  return cudaGetLastError();
}

// 16-byte loads when every key row allows them (row strides are multiples of head_dim).
template <typename Key>
cudaError_t pool_key_blocks(const Key* keys, typename PooledType<Key>::type* out, int64_t out_rows,
                            const KeyBlocks& blocks, cudaStream_t stream) {
  if (out_rows == 0 || blocks.head_dim == 0) return cudaSuccess;
  constexpr int kWideVec = 16 / sizeof(Key);
  if (blocks.head_dim % kWideVec == 0 && reinterpret_cast<uintptr_t>(keys) % 16 == 0) {
    return launch_block_mean_pool<Key, kWideVec>(keys, out, out_rows, blocks, stream);
  }
  return launch_block_mean_pool<Key, 1>(keys, out, out_rows, blocks, stream);
}

// ------------------------------------------------------------------------------------------------
// topk_rows
// ------------------------------------------------------------------------------------------------

// One block per row: sort every entry into rank order, non-selectable ones keyed 0 (last), and
// emit the first k. The shared arrays are keys[padded_len] then indices[padded_len].
template <typename Score>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    topk_rows_kernel(const Score* __restrict__ scores, int64_t rows, int row_len, int padded_len, int64_t k,
                     int32_t* __restrict__ out) {
  using Key = SortKey<Score>;
  Key* keys = reinterpret_cast<Key*>(dynamic_smem);
  int32_t* indices = reinterpret_cast<int32_t*>(keys + padded_len);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const Score* row_scores = scores + row * row_len;
    for (int i = threadIdx.x; i < padded_len; i += blockDim.x) {
      Key key = kNoCandidateKey<Score>;
      if (i < row_len) {
        const Score score = row_scores[i];
        if (is_selectable(score)) key = score_key(score);
      }
      keys[i] = key;
      indices[i] = i;
    }
    __syncthreads();
    bitonic_sort_rank_order(keys, indices, padded_len);

    int32_t* row_out = out + row * k;
    for (int64_t slot = threadIdx.x; slot < k; slot += blockDim.x) {
      const bool filled = slot < padded_len && keys[slot] != kNoCandidateKey<Score>;
      row_out[slot] = filled ? indices[slot] : -1;
    }
    __syncthreads();  // the next row overwrites the shared arrays
  }
}

// ------------------------------------------------------------------------------------------------
// threshold_select
// ------------------------------------------------------------------------------------------------

// threshold_select's mass of a sorted entry: its score if allowed, else 0. Ranked entries carry
// their score in the key; only forced entries (whose key carries none) read global memory.
template <typename Score>
__device__ __forceinline__ double sorted_mass(SortKey<Score> key, int32_t index, const Score* row_scores,
                                              const bool* row_allowed) {
  if (key == kNoCandidateKey<Score>) return 0.0;
  if (key != kForcedKey<Score>) return static_cast<double>(score_from_key<Score>(key));
  return row_allowed[index] ? static_cast<double>(row_scores[index]) : 0.0;
}

// One block per row.
//   1. Key every entry (forced: kForcedKey; allowed: its score key; others: 0) and sum the allowed
//      scores in double.
//   2. Unless threshold >= 1, sort into rank order: forced entries by ascending index, then allowed
//      ones by descending score (ties to the lower index), then the rest.
//   3. Each thread owns a contiguous run of sorted positions; a block-wide exclusive scan of the
//      runs' masses gives each position its exclusive prefix mass, which decides the keep.
//   4. Keep flags are scattered to index order (reusing the key array) and compacted into the
//      ascending index list with another scan.
template <typename Score>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    threshold_select_kernel(const Score* __restrict__ scores, const double* __restrict__ threshold,
                            const bool* __restrict__ forced, const bool* __restrict__ allowed, int64_t rows,
                            int row_len, int padded_len, int32_t* __restrict__ count, int32_t* __restrict__ indices) {
  using Key = SortKey<Score>;
  Key* keys = reinterpret_cast<Key*>(dynamic_smem);
  int32_t* order = reinterpret_cast<int32_t*>(keys + padded_len);
  // After step 3 the key array holds keep flags by index.
  Key* keep = keys;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const Score* row_scores = scores + row * row_len;
    const bool* row_forced = forced + row * row_len;
    const bool* row_allowed = allowed + row * row_len;
    const double row_threshold = threshold[row];
    const bool keep_all_allowed = row_threshold >= 1.0;  // false for NaN, like the reference

    if (keep_all_allowed) {
      for (int i = threadIdx.x; i < padded_len; i += blockDim.x) {
        keep[i] = i < row_len && (row_forced[i] || row_allowed[i]);
      }
      __syncthreads();
    } else {
      double thread_mass = 0.0;
      for (int i = threadIdx.x; i < padded_len; i += blockDim.x) {
        Key key = kNoCandidateKey<Score>;
        if (i < row_len) {
          const bool is_allowed = row_allowed[i];
          if (is_allowed) thread_mass += static_cast<double>(row_scores[i]);
          if (row_forced[i]) {
            key = kForcedKey<Score>;
          } else if (is_allowed) {
            key = score_key(row_scores[i]);
          }
        }
        keys[i] = key;
        order[i] = i;
      }
      double total_mass = 0.0;
      block_exclusive_sum(thread_mass, &total_mass);  // synchronises, so the keys are complete
      const double required_mass = row_threshold * total_mass;
      bitonic_sort_rank_order(keys, order, padded_len);

      const int run_len = (padded_len + blockDim.x - 1) / blockDim.x;
      const int run_begin = min(padded_len, static_cast<int>(threadIdx.x) * run_len);
      const int run_end = min(padded_len, run_begin + run_len);
      double run_mass = 0.0;
      for (int position = run_begin; position < run_end; ++position) {
        run_mass += sorted_mass(keys[position], order[position], row_scores, row_allowed);
      }
      double unused_total = 0.0;
      double prefix_mass = block_exclusive_sum(run_mass, &unused_total);
      // Mark kept positions by storing -(index + 1) in place: only this thread touches them.
      for (int position = run_begin; position < run_end; ++position) {
        const Key key = keys[position];
        const bool kept = key == kForcedKey<Score> || (key != kNoCandidateKey<Score> && prefix_mass < required_mass);
        prefix_mass += sorted_mass(key, order[position], row_scores, row_allowed);
        if (kept) order[position] = -order[position] - 1;
      }
      __syncthreads();  // every key has been read; the array becomes the keep flags
      for (int i = threadIdx.x; i < padded_len; i += blockDim.x) keep[i] = 0;
      __syncthreads();
      for (int position = threadIdx.x; position < padded_len; position += blockDim.x) {
        const int32_t marked = order[position];
        if (marked < 0) keep[-marked - 1] = 1;
      }
      __syncthreads();
    }

    // Compaction in index order: each thread owns a contiguous run of indices.
    const int run_len = (row_len + blockDim.x - 1) / blockDim.x;
    const int run_begin = min(row_len, static_cast<int>(threadIdx.x) * run_len);
    const int run_end = min(row_len, run_begin + run_len);
    int run_kept = 0;
    for (int i = run_begin; i < run_end; ++i) run_kept += keep[i] != 0;
    int total_kept = 0;
    int slot = block_exclusive_sum(run_kept, &total_kept);
    int32_t* row_indices = indices + row * row_len;
    for (int i = run_begin; i < run_end; ++i) {
      if (keep[i] != 0) row_indices[slot++] = i;
    }
    for (int i = total_kept + threadIdx.x; i < row_len; i += blockDim.x) row_indices[i] = -1;
    if (threadIdx.x == 0) count[row] = total_kept;
    __syncthreads();  // the next row overwrites the shared arrays
  }
}

// ------------------------------------------------------------------------------------------------
// layout_transpose
// ------------------------------------------------------------------------------------------------
// q_indices is as large as the dense [N, Mq] membership matrix, so it doubles as one:
//   1. memset q_indices to -1;
//   2. for every selected (query block m, KV block n), write m at q_indices[n][m] (one warp per
//      KV list; each cell has one writer, no atomics);
//   3. compact each row q_indices[n] in place (one warp per row): the marks are already in
//      ascending m, and a ballot gives each its slot; the tail is refilled with -1.
// Every launch is fully parallel and the output is independent of scheduling.

constexpr int kWarpsPerBlock = 8;

__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    mark_selecting_query_blocks_kernel(const int32_t* __restrict__ kv_num_blocks,
                                       const int32_t* __restrict__ kv_indices, int64_t num_lists,
                                       int64_t num_q_blocks, int64_t max_kv_per_q, int64_t num_kv_blocks,
                                       int32_t* __restrict__ q_indices) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first_warp = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warp_stride = int64_t{gridDim.x} * kWarpsPerBlock;
  for (int64_t list = first_warp; list < num_lists; list += warp_stride) {
    const int64_t head = list / num_q_blocks;
    const int32_t q_block = static_cast<int32_t>(list % num_q_blocks);
    const int64_t list_len = min(max(int64_t{kv_num_blocks[list]}, int64_t{0}), max_kv_per_q);
    const int32_t* selected = kv_indices + list * max_kv_per_q;
    int32_t* head_out = q_indices + head * num_kv_blocks * num_q_blocks;
    for (int64_t position = lane; position < list_len; position += kWarpSize) {
      const int32_t kv_block = selected[position];
      if (kv_block >= 0 && kv_block < num_kv_blocks) head_out[kv_block * num_q_blocks + q_block] = q_block;
    }
  }
}

__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    compact_query_lists_kernel(int64_t num_lists, int64_t num_q_blocks, int32_t* __restrict__ q_num_blocks,
                               int32_t* __restrict__ q_indices) {
  const int lane = threadIdx.x % kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t first_warp = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warp_stride = int64_t{gridDim.x} * kWarpsPerBlock;
  for (int64_t list = first_warp; list < num_lists; list += warp_stride) {  // warp-uniform loop
    int32_t* q_list = q_indices + list * num_q_blocks;
    int64_t kept = 0;
    for (int64_t base = 0; base < num_q_blocks; base += kWarpSize) {
      const int64_t position = base + lane;
      const int32_t mark = position < num_q_blocks ? q_list[position] : -1;
      // All lanes have loaded before any writes, and writes land below base + 32, so compacting
      // in place never clobbers an unread mark.
      const unsigned selecting = __ballot_sync(kFullWarpMask, mark >= 0);
      if (mark >= 0) q_list[kept + __popc(selecting & lanes_below)] = mark;
      kept += __popc(selecting);
    }
    for (int64_t position = kept + lane; position < num_q_blocks; position += kWarpSize) q_list[position] = -1;
    if (lane == 0) q_num_blocks[list] = static_cast<int32_t>(kept);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

template <typename Key>
cudaError_t block_mean_pool(const Key* keys, typename PooledType<Key>::type* out, int64_t batch_heads,
                            int64_t seq_len, int64_t head_dim, int64_t block_size, cudaStream_t stream) {
  if (batch_heads < 0 || seq_len < 0 || head_dim < 0 || block_size <= 0) return cudaErrorInvalidValue;
  KeyBlocks blocks{};
  blocks.blocks_per_head = ceil_div(seq_len, block_size);
  blocks.heads = batch_heads;
  blocks.head_dim = head_dim;
  blocks.block_size = block_size;
  blocks.seq_len = seq_len;
  return pool_key_blocks(keys, out, batch_heads * blocks.blocks_per_head, blocks, stream);
}

template <typename Key>
cudaError_t block_mean_pool_varlen(const Key* keys, typename PooledType<Key>::type* out, const int32_t* cu_seqlens,
                                   const int64_t* block_begin, int64_t num_seqs, int64_t total_blocks, int64_t heads,
                                   int64_t head_dim, int64_t block_size, cudaStream_t stream) {
  if (num_seqs < 0 || total_blocks < 0 || heads < 0 || head_dim < 0 || block_size <= 0) return cudaErrorInvalidValue;
  KeyBlocks blocks{};
  blocks.blocks_per_head = total_blocks;
  blocks.heads = heads;
  blocks.head_dim = head_dim;
  blocks.block_size = block_size;
  blocks.cu_seqlens = cu_seqlens;
  blocks.block_begin = block_begin;
  blocks.num_seqs = num_seqs;
  return pool_key_blocks(keys, out, heads * total_blocks, blocks, stream);
}

template <typename Score>
cudaError_t topk_rows(const Score* scores, int64_t rows, int64_t row_len, int64_t k, int32_t* out,
                      cudaStream_t stream) {
  if (rows < 0 || row_len < 0 || k < 0) return cudaErrorInvalidValue;
  if (rows == 0 || k == 0) return cudaSuccess;
  if (row_len == 0) return cudaMemsetAsync(out, 0xff, size_t(rows) * size_t(k) * sizeof(int32_t), stream);  // -1
  const auto kernel = topk_rows_kernel<Score>;
  RowSortLaunch launch;
  const cudaError_t status = prepare_row_sort(kernel, sizeof(SortKey<Score>) + sizeof(int32_t), row_len, &launch);
  if (status != cudaSuccess) return status;
  kernel<<<grid_for(rows, 1), launch.threads, launch.smem_bytes, stream>>>(
      scores, rows, static_cast<int>(row_len), launch.padded_len, k, out);
  return cudaGetLastError();
}

template <typename Score>
cudaError_t threshold_select(const Score* scores, const double* threshold, const bool* forced, const bool* allowed,
                             int64_t rows, int64_t row_len, int32_t* count, int32_t* indices, cudaStream_t stream) {
  if (rows < 0 || row_len < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (row_len == 0) return cudaMemsetAsync(count, 0, size_t(rows) * sizeof(int32_t), stream);
  const auto kernel = threshold_select_kernel<Score>;
  RowSortLaunch launch;
  const cudaError_t status = prepare_row_sort(kernel, sizeof(SortKey<Score>) + sizeof(int32_t), row_len, &launch);
  if (status != cudaSuccess) return status;
  kernel<<<grid_for(rows, 1), launch.threads, launch.smem_bytes, stream>>>(
      scores, threshold, forced, allowed, rows, static_cast<int>(row_len), launch.padded_len, count, indices);
  return cudaGetLastError();
}

template <typename Score>
cudaError_t max_selection_row_length(int64_t* max_row_len) {
  const size_t bytes_per_entry = sizeof(SortKey<Score>) + sizeof(int32_t);
  int64_t topk_max = 0;
  int64_t threshold_max = 0;
  cudaError_t status = max_padded_row_length(topk_rows_kernel<Score>, bytes_per_entry, &topk_max);
  if (status != cudaSuccess) return status;
  status = max_padded_row_length(threshold_select_kernel<Score>, bytes_per_entry, &threshold_max);
  if (status != cudaSuccess) return status;
  *max_row_len = std::min(topk_max, threshold_max);
  return cudaSuccess;
}

cudaError_t layout_transpose(const int32_t* kv_num_blocks, const int32_t* kv_indices, int64_t batch_heads,
                             int64_t num_q_blocks, int64_t max_kv_per_q, int64_t num_kv_blocks, int32_t* q_num_blocks,
                             int32_t* q_indices, cudaStream_t stream) {
  if (batch_heads < 0 || num_q_blocks < 0 || max_kv_per_q < 0 || num_kv_blocks < 0) return cudaErrorInvalidValue;
  // Block numbers are stored as int32.
  if (num_q_blocks > INT32_MAX || num_kv_blocks > INT32_MAX) return cudaErrorInvalidValue;
  const int64_t num_q_lists = batch_heads * num_kv_blocks;
  if (num_q_lists == 0) return cudaSuccess;
  const int64_t dense_cells = num_q_lists * num_q_blocks;
  if (dense_cells > 0) {
    cudaError_t status = cudaMemsetAsync(q_indices, 0xff, size_t(dense_cells) * sizeof(int32_t), stream);  // -1
    if (status != cudaSuccess) return status;
    const int64_t num_kv_lists = batch_heads * num_q_blocks;
    if (max_kv_per_q > 0) {
      mark_selecting_query_blocks_kernel<<<grid_for(num_kv_lists, kWarpsPerBlock), kWarpsPerBlock * kWarpSize, 0,
                                           stream>>>(kv_num_blocks, kv_indices, num_kv_lists, num_q_blocks,
                                                     max_kv_per_q, num_kv_blocks, q_indices);
      status = cudaGetLastError();
      if (status != cudaSuccess) return status;
    }
  }
  // Also writes the counts, which are all 0 when there are no query blocks.
  compact_query_lists_kernel<<<grid_for(num_q_lists, kWarpsPerBlock), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      num_q_lists, num_q_blocks, q_num_blocks, q_indices);
  return cudaGetLastError();
}

// Explicit instantiations: the dtypes the torch glue dispatches to.
template cudaError_t block_mean_pool<__half>(const __half*, float*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t block_mean_pool<__nv_bfloat16>(const __nv_bfloat16*, float*, int64_t, int64_t, int64_t, int64_t,
                                                    cudaStream_t);
template cudaError_t block_mean_pool<float>(const float*, float*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t block_mean_pool<double>(const double*, double*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t block_mean_pool_varlen<__half>(const __half*, float*, const int32_t*, const int64_t*, int64_t,
                                                    int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t block_mean_pool_varlen<__nv_bfloat16>(const __nv_bfloat16*, float*, const int32_t*,
                                                           const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                           cudaStream_t);
template cudaError_t block_mean_pool_varlen<float>(const float*, float*, const int32_t*, const int64_t*, int64_t,
                                                   int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t block_mean_pool_varlen<double>(const double*, double*, const int32_t*, const int64_t*, int64_t,
                                                    int64_t, int64_t, int64_t, int64_t, cudaStream_t);

template cudaError_t topk_rows<float>(const float*, int64_t, int64_t, int64_t, int32_t*, cudaStream_t);
template cudaError_t topk_rows<double>(const double*, int64_t, int64_t, int64_t, int32_t*, cudaStream_t);

template cudaError_t threshold_select<float>(const float*, const double*, const bool*, const bool*, int64_t, int64_t,
                                             int32_t*, int32_t*, cudaStream_t);
template cudaError_t threshold_select<double>(const double*, const double*, const bool*, const bool*, int64_t, int64_t,
                                              int32_t*, int32_t*, cudaStream_t);

template cudaError_t max_selection_row_length<float>(int64_t*);
template cudaError_t max_selection_row_length<double>(int64_t*);

}  // namespace sparse_attn::cuda
