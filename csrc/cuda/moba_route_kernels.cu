// CUDA kernel of MoBA routing; API, semantics and limits in moba_route_kernels.h.
//
// moba_route_kernel: one thread per query row, blockDim.x consecutive rows of one query head per
// CTA (grid-stride over (batch, head, row tile)). The CTA walks its rows' candidate blocks in
// tiles of kTileBlocks block means x kTileDims head-dim elements staged in shared memory (all
// threads read the same mean element: a broadcast); each thread accumulates kTileBlocks fp32
// (fp64) dot products in registers, then offers them in ascending block order to its
// insertion-sorted top-k list in shared memory ([slot][thread] layout, so a warp's accesses are
// consecutive words). Offering in ascending order and evicting only on a strictly larger score
// sends ties to the lower block index, deterministically.
#include "moba_route_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace sparse_attn::cuda {
namespace {

// Candidate blocks scored per shared tile: one register accumulator each per thread.
constexpr int kTileBlocks = 16;
// Head-dim elements per tile, so the tile size does not depend on head_dim.
constexpr int kTileDims = 128;
constexpr int kMaxRouteThreads = 128;
constexpr int kMinRouteThreads = 32;
// Shared memory for the top-k lists. With the static tile (8 KiB, 16 KiB for double) a CTA stays
// within the 48 KiB available without an opt-in; 32 threads fit the longest lists (64 double entries).
constexpr size_t kListSmemBudget = 32 * 1024;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 30;

extern __shared__ __align__(16) unsigned char dynamic_smem[];

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_accumulator(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_accumulator(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_accumulator(float x) { return x; }
__device__ __forceinline__ double to_accumulator(double x) { return x; }

// NaN and -inf scores are never ranked (as in topk_rows). Bit tests, so that fast-math
// compilation cannot fold them away.
__device__ __forceinline__ bool is_rankable(float x) {
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x7fffffffu) <= 0x7f800000u && bits != 0xff800000u;
}
__device__ __forceinline__ bool is_rankable(double x) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x));
  return (bits & 0x7fffffffffffffffull) <= 0x7ff0000000000000ull && bits != 0xfff0000000000000ull;
}

struct RouteShape {
  int64_t q_heads;
  int64_t group;  // q_heads / kv_heads
  int64_t max_q_len;  // rows per (sequence, query head) in out
  int64_t head_dim;
  int64_t block_size;
  int64_t topk;
  int64_t q_row_stride;       // elements between consecutive rows of one head
  int64_t q_head_stride;      // elements between query heads
  int64_t means_head_stride;  // elements between KV heads in block_means (blocks are head_dim apart)
  // Batched layout (cu_seqlens_q == nullptr): every sequence has max_q_len rows and kv_len keys.
  int64_t q_seq_stride;
  int64_t means_seq_stride;
  int64_t kv_len;
  // Packed layout: sequence s holds query rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and keys
  // [cu_seqlens_k[s], cu_seqlens_k[s + 1]); its block means start at block block_begin[s].
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int64_t* block_begin;
  int64_t tiles_per_head;   // ceil(max_q_len / blockDim.x)
  int64_t num_tiles;        // num_seqs * q_heads * tiles_per_head
  int ranked;               // top-k list length per row (moba_ranked_blocks of the longest sequence)
  bool causal;
};

// One sequence: where its rows and block means start, and its lengths.
struct RouteSequence {
  int64_t q_offset;
  int64_t means_offset;
  int64_t q_len;
  int64_t position_offset;  // kv_len - q_len: row r sits at position r + position_offset
  int64_t num_blocks;
};

__device__ __forceinline__ RouteSequence route_sequence(const RouteShape& shape, int64_t seq) {
  if (shape.cu_seqlens_q == nullptr) {
    return {seq * shape.q_seq_stride, seq * shape.means_seq_stride, shape.max_q_len, shape.kv_len - shape.max_q_len,
            (shape.kv_len + shape.block_size - 1) / shape.block_size};
  }
  const int64_t q_begin = shape.cu_seqlens_q[seq];
  const int64_t q_len = shape.cu_seqlens_q[seq + 1] - q_begin;
  const int64_t kv_len = shape.cu_seqlens_k[seq + 1] - shape.cu_seqlens_k[seq];
  const int64_t first_block = shape.block_begin[seq];
  // The host validated q_len <= max_q_len; min() keeps a bad offset from writing past out.
  return {q_begin * shape.q_row_stride, first_block * shape.head_dim, min(q_len, shape.max_q_len), kv_len - q_len,
          shape.block_begin[seq + 1] - first_block};
}

__device__ __forceinline__ int64_t current_block(const RouteShape& shape, const RouteSequence& seq, int64_t row) {
  return (row + seq.position_offset) / shape.block_size;
}

// Blocks a row ranks by score: causal rows the blocks entirely before their position
// ((i + 1) * block_size <= position  <=>  i < current block), others every block.
__device__ __forceinline__ int64_t candidate_blocks(const RouteShape& shape, const RouteSequence& seq, int64_t row) {
  return shape.causal ? current_block(shape, seq, row) : seq.num_blocks;
}

// One thread's top-k list in shared memory: entry j at [j * stride], in rank order.
template <typename Accum>
struct TopKList {
  Accum* scores;
  int32_t* blocks;
  int stride;
  int capacity;
  int size;

  // Candidates must arrive in ascending block order: an equal score then never displaces a kept block.
  __device__ void offer(Accum score, int32_t block) {
    if (!is_rankable(score)) return;
    int slot;
    if (size < capacity) {
      slot = size++;
    } else if (score > scores[(capacity - 1) * stride]) {
      slot = capacity - 1;  // evicts the last-ranked block
    } else {
      return;
    }
    for (; slot > 0 && scores[(slot - 1) * stride] < score; --slot) {
      scores[slot * stride] = scores[(slot - 1) * stride];
      blocks[slot * stride] = blocks[(slot - 1) * stride];
    }
    scores[slot * stride] = score;
    blocks[slot * stride] = block;
  }

  __device__ void sort_blocks_ascending() {
    for (int i = 1; i < size; ++i) {
      const int32_t block = blocks[i * stride];
      int j = i;
      for (; j > 0 && blocks[(j - 1) * stride] > block; --j) blocks[j * stride] = blocks[(j - 1) * stride];
      blocks[j * stride] = block;
    }
  }
};

// `out` is pre-filled with -1; each active thread writes its row's selected blocks.
template <typename Scalar>
__global__ void __launch_bounds__(kMaxRouteThreads)
    moba_route_kernel(const Scalar* __restrict__ q, const typename PooledType<Scalar>::type* __restrict__ block_means,
                      RouteShape shape, int32_t* __restrict__ out) {
  using Accum = typename PooledType<Scalar>::type;
  __shared__ Accum tile[kTileBlocks * kTileDims];
  Accum* list_scores = reinterpret_cast<Accum*>(dynamic_smem);
  int32_t* list_blocks = reinterpret_cast<int32_t*>(list_scores + shape.ranked * blockDim.x);
  const int rows_per_cta = static_cast<int>(blockDim.x);

  for (int64_t work = blockIdx.x; work < shape.num_tiles; work += gridDim.x) {
    const int64_t head = work / shape.tiles_per_head;  // sequence * q_heads + query head
    const RouteSequence seq = route_sequence(shape, head / shape.q_heads);
    const int64_t q_head = head % shape.q_heads;
    const int64_t first_row = (work % shape.tiles_per_head) * rows_per_cta;
    if (first_row >= seq.q_len) continue;  // uniform across the CTA: a short packed sequence
    const int64_t row = first_row + threadIdx.x;
    const bool active = row < seq.q_len;
    // Candidate counts grow with the row, so the CTA's last row bounds the tile loop.
    const int64_t last_row = min(first_row + rows_per_cta, seq.q_len) - 1;
    const int64_t cta_candidates = shape.ranked > 0 ? candidate_blocks(shape, seq, last_row) : 0;
    const int64_t row_candidates = active ? candidate_blocks(shape, seq, row) : 0;
    const Accum* head_means = block_means + seq.means_offset + (q_head / shape.group) * shape.means_head_stride;
    const Scalar* q_row =
        q + seq.q_offset + q_head * shape.q_head_stride + (active ? row : first_row) * shape.q_row_stride;
    TopKList<Accum> best{list_scores + threadIdx.x, list_blocks + threadIdx.x, rows_per_cta, shape.ranked, 0};

    for (int64_t tile_start = 0; tile_start < cta_candidates; tile_start += kTileBlocks) {
      const int64_t tile_len = min(int64_t{kTileBlocks}, cta_candidates - tile_start);
      Accum scores[kTileBlocks];
#pragma unroll
      for (int j = 0; j < kTileBlocks; ++j) scores[j] = Accum(0);
      for (int64_t dim_start = 0; dim_start < shape.head_dim; dim_start += kTileDims) {
        const int dims = static_cast<int>(min(int64_t{kTileDims}, shape.head_dim - dim_start));
        __syncthreads();  // every thread has finished reading the previous tile
        for (int e = threadIdx.x; e < kTileBlocks * kTileDims; e += rows_per_cta) {
          const int j = e / kTileDims, d = e % kTileDims;
          tile[e] = j < tile_len && d < dims ? head_means[(tile_start + j) * shape.head_dim + dim_start + d] : Accum(0);
        }
        __syncthreads();
        if (active) {
          for (int d = 0; d < dims; ++d) {
            const Accum q_d = to_accumulator(q_row[dim_start + d]);
#pragma unroll
            for (int j = 0; j < kTileBlocks; ++j) scores[j] += q_d * tile[j * kTileDims + d];
          }
        }
      }
      if (active) {
#pragma unroll
        for (int j = 0; j < kTileBlocks; ++j) {
          if (tile_start + j < row_candidates) best.offer(scores[j], static_cast<int32_t>(tile_start + j));
        }
      }
    }

    if (active) {
      best.sort_blocks_ascending();
      int32_t* row_out = out + (head * shape.max_q_len + row) * shape.topk;
      for (int i = 0; i < best.size; ++i) row_out[i] = best.blocks[i * best.stride];
      // Ranked blocks all precede the current one, so appending keeps the row ascending.
      if (shape.causal) row_out[best.size] = static_cast<int32_t>(current_block(shape, seq, row));
    }
  }
}

// Rows per CTA: as many as the top-k lists of the CTA allow within kListSmemBudget.
int route_threads(int64_t ranked, size_t bytes_per_entry) {
  int threads = kMaxRouteThreads;
  while (threads > kMinRouteThreads && static_cast<size_t>(ranked) * threads * bytes_per_entry > kListSmemBudget) {
    threads /= 2;
  }
  return threads;
}

// Fills out with -1 and launches the routing kernel (with ranked == 0 it writes only each row's
// current block); shape's launch fields (tiles, ranked) are set here.
template <typename Scalar>
cudaError_t launch_route(const Scalar* q, const typename PooledType<Scalar>::type* block_means, RouteShape shape,
                         int64_t num_seqs, int64_t ranked, int32_t* out, cudaStream_t stream) {
  using Accum = typename PooledType<Scalar>::type;
  const int64_t out_rows = num_seqs * shape.q_heads * shape.max_q_len;
  if (out_rows == 0) return cudaSuccess;
  cudaError_t status = cudaMemsetAsync(out, 0xff, static_cast<size_t>(out_rows * shape.topk) * sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  const size_t bytes_per_entry = sizeof(Accum) + sizeof(int32_t);
  const int threads = route_threads(ranked, bytes_per_entry);
  shape.tiles_per_head = ceil_div(shape.max_q_len, threads);
  shape.num_tiles = num_seqs * shape.q_heads * shape.tiles_per_head;
  shape.ranked = static_cast<int>(ranked);
  const size_t smem_bytes = static_cast<size_t>(ranked) * threads * bytes_per_entry;
  const unsigned grid = static_cast<unsigned>(std::min(shape.num_tiles, kMaxGridBlocks));
  moba_route_kernel<Scalar><<<grid, threads, smem_bytes, stream>>>(q, block_means, shape, out);
  return cudaGetLastError();
}

RouteShape route_shape(int64_t q_heads, int64_t kv_heads, int64_t max_q_len, int64_t head_dim, int64_t block_size,
                       int64_t topk, bool causal) {
  RouteShape shape{};
  shape.q_heads = q_heads;
  shape.group = q_heads / kv_heads;
  shape.max_q_len = max_q_len;
  shape.head_dim = head_dim;
  shape.block_size = block_size;
  shape.topk = topk;
  shape.causal = causal;
  return shape;
}

// Whether a batched routing's sizes are valid, and the number of blocks each row ranks.
bool batched_route_ranked(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t kv_len,
                          int64_t head_dim, int64_t block_size, int64_t topk, bool causal, int64_t* ranked) {
  const bool valid_shape = batch >= 0 && q_heads >= 0 && kv_heads >= 1 && q_heads % kv_heads == 0 && q_len >= 0 &&
                           q_len <= kv_len && head_dim >= 0 && block_size >= 1 && topk >= 1;
  if (!valid_shape) return false;
  const int64_t num_blocks = ceil_div(kv_len, block_size);
  *ranked = moba_ranked_blocks(num_blocks, topk, causal);
  return num_blocks <= std::numeric_limits<int32_t>::max() && *ranked <= kMaxMobaRankedBlocks;
}

// Scores and ranks q [batch, q_heads, q_len, head_dim] against block means [batch, kv_heads, num_means, head_dim].
template <typename Scalar>
cudaError_t route_batched(const Scalar* q, const typename PooledType<Scalar>::type* block_means, int64_t batch,
                          int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t num_means,
                          int64_t head_dim, int64_t block_size, int64_t topk, bool causal, int64_t ranked,
                          int32_t* out, cudaStream_t stream) {
  RouteShape shape = route_shape(q_heads, kv_heads, q_len, head_dim, block_size, topk, causal);
  shape.q_row_stride = head_dim;
  shape.q_head_stride = q_len * head_dim;
  shape.means_head_stride = num_means * head_dim;
  shape.q_seq_stride = q_heads * q_len * head_dim;
  shape.means_seq_stride = kv_heads * num_means * head_dim;
  shape.kv_len = kv_len;
  return launch_route(q, block_means, shape, batch, ranked, out, stream);
}

}  // namespace

template <typename Scalar>
cudaError_t moba_route(const Scalar* q, const Scalar* k, typename PooledType<Scalar>::type* block_means, int64_t batch,
                       int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                       int64_t block_size, int64_t topk, bool causal, int32_t* out, cudaStream_t stream) {
  int64_t ranked = 0;
  if (!batched_route_ranked(batch, q_heads, kv_heads, q_len, kv_len, head_dim, block_size, topk, causal, &ranked)) {
    return cudaErrorInvalidValue;
  }
  if (batch * q_heads * q_len == 0) return cudaSuccess;
  if (ranked > 0) {  // otherwise every row selects only its current block: no scores needed
    const cudaError_t status = block_mean_pool(k, block_means, batch * kv_heads, kv_len, head_dim, block_size, stream);
    if (status != cudaSuccess) return status;
  }
  return route_batched(q, static_cast<const typename PooledType<Scalar>::type*>(block_means), batch, q_heads, kv_heads,
                       q_len, kv_len, ceil_div(kv_len, block_size), head_dim, block_size, topk, causal, ranked, out,
                       stream);
}

template <typename Scalar>
cudaError_t moba_route_means(const Scalar* q, const typename PooledType<Scalar>::type* block_means, int64_t batch,
                             int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t num_means,
                             int64_t head_dim, int64_t block_size, int64_t topk, bool causal, int32_t* out,
                             cudaStream_t stream) {
  int64_t ranked = 0;
  if (!batched_route_ranked(batch, q_heads, kv_heads, q_len, kv_len, head_dim, block_size, topk, causal, &ranked) ||
      num_means < moba_needed_means(kv_len, block_size, causal)) {
    return cudaErrorInvalidValue;
  }
  if (batch * q_heads * q_len == 0) return cudaSuccess;
  return route_batched(q, block_means, batch, q_heads, kv_heads, q_len, kv_len, num_means, head_dim, block_size, topk,
                       causal, ranked, out, stream);
}

template <typename Scalar>
cudaError_t moba_route_varlen(const Scalar* q, const Scalar* k, typename PooledType<Scalar>::type* block_means,
                              const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, const int64_t* block_begin,
                              int64_t num_seqs, int64_t total_blocks, int64_t max_blocks, int64_t q_heads,
                              int64_t kv_heads, int64_t max_q_len, int64_t head_dim, int64_t block_size, int64_t topk,
                              bool causal, int32_t* out, cudaStream_t stream) {
  const bool valid_shape = num_seqs >= 0 && total_blocks >= 0 && max_blocks >= 0 && q_heads >= 0 && kv_heads >= 1 &&
                           q_heads % kv_heads == 0 && max_q_len >= 0 && head_dim >= 0 && block_size >= 1 && topk >= 1;
  if (!valid_shape) return cudaErrorInvalidValue;
  const int64_t ranked = moba_ranked_blocks(max_blocks, topk, causal);
  if (max_blocks > std::numeric_limits<int32_t>::max() || ranked > kMaxMobaRankedBlocks) return cudaErrorInvalidValue;
  if (num_seqs * q_heads * max_q_len == 0) return cudaSuccess;
  if (ranked > 0) {
    const cudaError_t status =
        block_mean_pool_varlen(k, block_means, cu_seqlens_k, block_begin, num_seqs, total_blocks, kv_heads, head_dim,
                               block_size, stream);
    if (status != cudaSuccess) return status;
  }
  RouteShape shape = route_shape(q_heads, kv_heads, max_q_len, head_dim, block_size, topk, causal);
  shape.q_row_stride = q_heads * head_dim;
  shape.q_head_stride = head_dim;
  shape.means_head_stride = total_blocks * head_dim;
  shape.cu_seqlens_q = cu_seqlens_q;
  shape.cu_seqlens_k = cu_seqlens_k;
  shape.block_begin = block_begin;
  return launch_route(q, block_means, shape, num_seqs, ranked, out, stream);
}

#define SPARSE_ATTN_INSTANTIATE_MOBA_ROUTE(Scalar)                                                                  \
  template cudaError_t moba_route<Scalar>(const Scalar*, const Scalar*, PooledType<Scalar>::type*, int64_t, int64_t,  \
                                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int32_t*,      \
                                          cudaStream_t);                                                             \
  template cudaError_t moba_route_means<Scalar>(const Scalar*, const PooledType<Scalar>::type*, int64_t, int64_t,   \
                                                int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, \
                                                int32_t*, cudaStream_t);                                             \
  template cudaError_t moba_route_varlen<Scalar>(const Scalar*, const Scalar*, PooledType<Scalar>::type*,            \
                                                 const int32_t*, const int32_t*, const int64_t*, int64_t, int64_t,   \
                                                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, \
                                                 int32_t*, cudaStream_t);

SPARSE_ATTN_INSTANTIATE_MOBA_ROUTE(__half)
SPARSE_ATTN_INSTANTIATE_MOBA_ROUTE(__nv_bfloat16)
SPARSE_ATTN_INSTANTIATE_MOBA_ROUTE(float)
SPARSE_ATTN_INSTANTIATE_MOBA_ROUTE(double)

}  // namespace sparse_attn::cuda
