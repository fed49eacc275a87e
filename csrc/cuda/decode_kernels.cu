// CUDA kernels of block-sparse decode; API, design and limits in decode_kernels.h.
//
// Split kernel, per CTA (128 threads), for each tile of kTileKeys keys of its share:
//   1. cp.async prefetch of the next K/V tile into the other shared-memory stage (double buffer);
//   2. scores: kScoreSlices threads per key, each a slice of the head dim, reduced by shuffles;
//      masked scores are -inf; each warp's row maxima go to shared memory;
//   3. online softmax: every thread derives the same new row maxima and rescale factors; the
//      threads that own a key write its probabilities to shared memory;
//   4. PV: each thread owns kPvDims output dims of every row over a strided subset of the tile's
//      keys (its "key lane"), so partial sums need no cross-thread reduction until the very end.
// Keys are addressed through a "key stream": the concatenation of the share's blocks, each
// min(kv_block_size, seq_len_kv) slots long, so small blocks pack densely into tiles. A slot whose
// key lies past seq_len_kv (ragged last block) or whose block index is invalid is zero-filled and
// masked. Slot -> key translation runs two tiles ahead, so the index loads overlap compute.
#include "decode_kernels.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace sparse_attn::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Above this, dynamic shared memory needs an explicit opt-in (cudaFuncSetAttribute).
constexpr size_t kDefaultDynamicSmemBytes = 48 * 1024;
constexpr int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();
constexpr int kCombineWarps = 4;
constexpr int kMaxHeadDim = 256;

extern __shared__ __align__(16) unsigned char decode_smem[];

// ------------------------------------------------------------------------------------------------
// Element conversions and asynchronous copies
// ------------------------------------------------------------------------------------------------

template <typename Element>
struct ElementOps;

template <>
struct ElementOps<__half> {
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  // Two packed elements, the first in the low half (little endian).
  __device__ static float2 unpack(uint32_t bits) {
    return __half22float2(__halves2half2(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu)),
                                         __ushort_as_half(static_cast<unsigned short>(bits >> 16))));
  }
};

template <>
struct ElementOps<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  // bf16 is the upper half of an fp32: widening is a shift, exact.
  __device__ static float2 unpack(uint32_t bits) {
    return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
  }
};

// N (4 or 8) consecutive elements from shared memory (8- or 16-byte aligned) as floats.
template <typename Element, int N>
__device__ __forceinline__ void load_as_float(const Element* src, float (&out)[N]) {
  static_assert(N == 4 || N == 8, "vector loads of 4 or 8 elements");
  uint32_t words[N / 2];
  if constexpr (N == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    words[0] = raw.x;
    words[1] = raw.y;
    words[2] = raw.z;
    words[3] = raw.w;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(src);
    words[0] = raw.x;
    words[1] = raw.y;
  }
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 pair = ElementOps<Element>::unpack(words[i]);
    out[2 * i] = pair.x;
    out[2 * i + 1] = pair.y;
  }
}

// 16-byte global -> shared copy that bypasses L1 (K/V are read once); `fill` false writes zeros
// without reading `src`.
__device__ __forceinline__ void copy_16_async(void* dst, const void* src, bool fill) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst_addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src), "r"(src_bytes)
               : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = fill ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void commit_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `kPending` of the most recently committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// ------------------------------------------------------------------------------------------------
// Split kernel
// ------------------------------------------------------------------------------------------------

// Compile-time shape of one instantiation: kRows query rows (4, 8 or 16) of head dim kHeadDim.
template <typename Element, int kHeadDim, int kRows>
struct DecodeConfig {
  // ~16 KiB per K or V tile: deep enough to keep HBM busy with two stages and 2-3 CTAs per SM.
  static constexpr int kTileKeys = kHeadDim <= 64 ? 128 : (kHeadDim <= 128 ? 64 : 32);
  // Shared-memory row pitch in elements: the 16-byte pad puts the rows that a quarter warp reads
  // at once (consecutive keys) into distinct banks.
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kChunksPerThread = kTileKeys * kChunks / kThreads;

  // Scores: kScoreSlices lanes per key, in different quarter warps (lane = slice * kKeysPerWarp + key).
  static constexpr int kScoreSlices = kThreads / kTileKeys;
  static constexpr int kKeysPerWarp = kWarpSize / kScoreSlices;
  static constexpr int kSliceDims = kHeadDim / kScoreSlices;
  static constexpr int kSliceChunks = kSliceDims / 8;

  // PV: fewer dims per thread for more rows keeps the accumulators at <= 64 registers.
  static constexpr int kPvDims = kRows <= 4 ? 8 : 4;
  static constexpr int kPvColumns = kHeadDim / kPvDims;
  static constexpr int kPvKeyLanes = kThreads / kPvColumns;
  static constexpr int kPvThreads = kPvKeyLanes * kPvColumns;  // < kThreads only for head dim 96
  static constexpr int kPvKeysPerLane = (kTileKeys + kPvKeyLanes - 1) / kPvKeyLanes;

  // Shared memory (byte offsets, all multiples of 16).
  static constexpr size_t kTileBytes = size_t(kTileKeys) * kPitch * sizeof(Element);
  static constexpr size_t kStageBytes = 2 * kTileBytes;  // K tile, then V tile
  static constexpr size_t kSlotKeysOffset = 2 * kStageBytes;
  static constexpr size_t kQueryOffset = kSlotKeysOffset + 3 * kTileKeys * sizeof(int32_t);
  static constexpr size_t kProbOffset = kQueryOffset + size_t(kRows) * kHeadDim * sizeof(float);
  static constexpr size_t kWarpMaxOffset = kProbOffset + size_t(kTileKeys) * kRows * sizeof(float);
  static constexpr size_t kRowLimitOffset = kWarpMaxOffset + size_t(kWarps) * kRows * sizeof(float);
  static constexpr size_t kSmemBytes = kRowLimitOffset + kRows * sizeof(int32_t);
  // The final cross-lane reduction reuses the K/V stages.
  static constexpr size_t kReduceBytes = (size_t(kPvKeyLanes) * kRows * (kHeadDim + 1)) * sizeof(float);

  static_assert(kHeadDim % 8 == 0 && kRows % 4 == 0, "vectorised layout");
  static_assert(kThreads % kTileKeys == 0 && kHeadDim % kScoreSlices == 0 && kSliceDims % 8 == 0, "score slices");
  static_assert(kKeysPerWarp >= 8, "a quarter warp must read one slice of 8 distinct keys");
  static_assert((kTileKeys * kChunks) % kThreads == 0, "whole 16-byte chunks per thread");
  static_assert(kHeadDim % kPvDims == 0 && kPvKeyLanes >= 1, "PV columns");
  static_assert(kReduceBytes <= 2 * kStageBytes, "the final reduction fits into the K/V stages");
  static_assert(kQueryOffset % 16 == 0 && kProbOffset % 16 == 0 && kWarpMaxOffset % 16 == 0 &&
                    kRowLimitOffset % 16 == 0,
                "16-byte aligned sections");
};

template <typename Element>
struct SplitKernelParams {
  BlockSparseDecodeArgs<Element> args;
  int64_t group_size = 1;         // q_heads / kv_heads
  int64_t units_per_kv_head = 1;  // group_size / heads_per_cta
  int64_t num_kv_blocks = 0;      // ceil(seq_len_kv / kv_block_size)
  int64_t stream_stride = 1;      // key-stream slots per selected block
  float scale_log2 = 1.0f;        // softmax_scale * log2(e): scores live in base 2
  bool vector_loads = false;
};

// Shared memory admits three CTAs per H100 SM for 4 and 8 rows; the hint keeps the 4-row kernel
// within their registers (0 emits no hint: forcing 8 rows into 168 registers spills).
template <int kRows>
constexpr int kMinCtasPerSm = kRows <= 4 ? 3 : 0;

template <typename Element, int kHeadDim, int kRows>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm<kRows>)
    decode_split_kernel(const SplitKernelParams<Element> params) {
  using Config = DecodeConfig<Element, kHeadDim, kRows>;
  using Ops = ElementOps<Element>;
  constexpr int kTileKeys = Config::kTileKeys;
  constexpr int kPitch = Config::kPitch;
  const BlockSparseDecodeArgs<Element>& args = params.args;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;

  // blockIdx.x = ((batch * kv_heads + kv_head) * num_splits + split) * units_per_kv_head + unit:
  // the head units of one KV head are neighbours, so when a group is split over several CTAs they
  // run together and share the K/V tiles through L2.
  int64_t linear = blockIdx.x;
  const int64_t unit = linear % params.units_per_kv_head;
  linear /= params.units_per_kv_head;
  const int64_t split = linear % args.num_splits;
  linear /= args.num_splits;
  const int64_t kv_head = linear % args.kv_heads;
  const int64_t batch = linear / args.kv_heads;
  const int64_t head0 = kv_head * params.group_size + unit * args.heads_per_cta;
  const int rows = static_cast<int>(args.heads_per_cta * args.seq_len_q);
  const int64_t rows_total = args.batch * args.q_heads * args.seq_len_q;
  // Local row r = (head - head0) * seq_len_q + query: the CTA's rows are consecutive output rows.
  const int64_t row0 = (batch * args.q_heads + head0) * args.seq_len_q;

  // This split's share of the block list (all heads of the CTA share one layout head).
  const int64_t layout_batch = args.layout_batch == 1 ? 0 : batch;
  const int64_t layout_head = head0 / (args.q_heads / args.layout_heads);
  const int64_t list = layout_batch * args.layout_heads + layout_head;
  const int64_t listed = args.kv_num_blocks[list];
  const int64_t count = listed < 0 ? 0 : (listed > args.max_blocks ? args.max_blocks : listed);
  const int64_t first = split * count / args.num_splits;
  const int64_t last = (split + 1) * count / args.num_splits;

  float* partial_out = args.partial_out + (split * rows_total + row0) * kHeadDim;
  float* partial_lse = args.partial_lse + split * rows_total + row0;
  if (first >= last) {  // empty share: contributes nothing to the combine
    for (int e = tid; e < rows * kHeadDim; e += kThreads) partial_out[e] = 0.0f;
    if (tid < rows) partial_lse[tid] = kNegInf;
    return;
  }

  unsigned char* smem = decode_smem;
  int32_t* slot_keys = reinterpret_cast<int32_t*>(smem + Config::kSlotKeysOffset);  // [3][kTileKeys]
  float* query_s = reinterpret_cast<float*>(smem + Config::kQueryOffset);          // [kRows][kHeadDim]
  float* prob_s = reinterpret_cast<float*>(smem + Config::kProbOffset);            // [kTileKeys][kRows]
  float* warp_max_s = reinterpret_cast<float*>(smem + Config::kWarpMaxOffset);     // [kWarps][kRows]
  int32_t* row_limit_s = reinterpret_cast<int32_t*>(smem + Config::kRowLimitOffset);  // [kRows]
  auto k_tile = [&](int stage) { return reinterpret_cast<Element*>(smem + stage * Config::kStageBytes); };
  auto v_tile = [&](int stage) {
    return reinterpret_cast<Element*>(smem + stage * Config::kStageBytes + Config::kTileBytes);
  };

  // Queries, pre-scaled into base 2; padding rows are zero and fully masked.
  for (int e = tid; e < kRows * kHeadDim; e += kThreads) {
    const int r = e / kHeadDim, d = e % kHeadDim;
    float value = 0.0f;
    if (r < rows) {
      const int64_t head = head0 + r / args.seq_len_q, query = r % args.seq_len_q;
      value = Ops::to_float(args.q[batch * args.q_stride_batch + head * args.q_stride_head +
                                   query * args.q_stride_seq + d]) *
              params.scale_log2;
    }
    query_s[e] = value;
  }
  // Last visible key per row: query i sits at key position i + seq_len_kv - seq_len_q (may be < 0).
  if (tid < kRows) {
    int32_t limit = -1;
    if (tid < rows) {
      limit = args.causal ? static_cast<int32_t>(args.seq_len_kv - args.seq_len_q + tid % args.seq_len_q)
                          : std::numeric_limits<int32_t>::max();
    }
    row_limit_s[tid] = limit;
  }

  const int64_t stream_len = (last - first) * params.stream_stride;
  const int64_t num_tiles = (stream_len + kTileKeys - 1) / kTileKeys;
  const int32_t* block_list = args.kv_indices + list * args.max_blocks + first;
  const bool narrow_stream = stream_len <= std::numeric_limits<uint32_t>::max();
  // Key of stream slot `slot` of tile `tile`, or -1 for a slot to zero-fill and mask.
  auto slot_key = [&](int64_t tile, int slot) -> int32_t {
    const int64_t position = tile * kTileKeys + slot;
    if (position >= stream_len) return -1;
    int64_t block_offset, within;
    if (narrow_stream) {  // 32-bit division is several times cheaper
      const uint32_t pos32 = static_cast<uint32_t>(position), stride32 = static_cast<uint32_t>(params.stream_stride);
      block_offset = pos32 / stride32;
      within = pos32 % stride32;
    } else {
      block_offset = position / params.stream_stride;
      within = position % params.stream_stride;
    }
    const int32_t block = __ldg(block_list + block_offset);
    if (block < 0 || block >= params.num_kv_blocks) return -1;
    const int64_t key = static_cast<int64_t>(block) * args.kv_block_size + within;
    return key < args.seq_len_kv ? static_cast<int32_t>(key) : -1;
  };

  const Element* k_head = args.k + batch * args.k_stride_batch + kv_head * args.k_stride_head;
  const Element* v_head = args.v + batch * args.v_stride_batch + kv_head * args.v_stride_head;
  // Starts loading the K/V rows of `keys` into `stage`. Asynchronous on the vector path, so the
  // caller commits a copy group; the scalar path has finished when it returns.
  auto load_tile = [&](int stage, const int32_t* keys) {
    Element* k_dst = k_tile(stage);
    Element* v_dst = v_tile(stage);
    if (params.vector_loads) {
      // Not unrolled: unrolling hoists every iteration's addresses out of the tile loop and costs
      // ~40 registers for nothing (the copies are asynchronous anyway).
#pragma unroll 1
      for (int i = 0; i < Config::kChunksPerThread; ++i) {
        // Consecutive threads take consecutive 16-byte chunks of a row: coalesced.
        const int chunk = tid + i * kThreads;
        const int row = chunk / Config::kChunks, col = (chunk % Config::kChunks) * 8;
        const int32_t key = keys[row];
        const bool valid = key >= 0;
        const Element* k_src = valid ? k_head + key * args.k_stride_seq + col : k_head;
        const Element* v_src = valid ? v_head + key * args.v_stride_seq + col : v_head;
        copy_16_async(k_dst + row * kPitch + col, k_src, valid);
        copy_16_async(v_dst + row * kPitch + col, v_src, valid);
      }
    } else {
      const Element zero = Ops::from_float(0.0f);
      for (int e = tid; e < kTileKeys * kHeadDim; e += kThreads) {
        const int row = e / kHeadDim, col = e % kHeadDim;
        const int32_t key = keys[row];
        k_dst[row * kPitch + col] = key >= 0 ? k_head[key * args.k_stride_seq + col] : zero;
        v_dst[row * kPitch + col] = key >= 0 ? v_head[key * args.v_stride_seq + col] : zero;
      }
    }
  };

  if (tid < kTileKeys) {
    slot_keys[tid] = slot_key(0, tid);
    slot_keys[kTileKeys + tid] = slot_key(1, tid);
  }
  __syncthreads();  // slot keys, queries and row limits are visible
  load_tile(0, slot_keys);
  commit_async_copies();

  // Scores: this thread's key and head-dim slice.
  const int slice = lane / Config::kKeysPerWarp;
  const int score_key = warp * Config::kKeysPerWarp + lane % Config::kKeysPerWarp;
  // PV: this thread's key lane and output columns.
  const bool pv_active = tid < Config::kPvThreads;
  const int pv_lane = tid / Config::kPvColumns;
  const int pv_col = (tid % Config::kPvColumns) * Config::kPvDims;

  float running_max[kRows];  // base-2 row maxima so far; identical in every thread
  float row_sum[kRows];      // this key lane's share of the softmax denominators
  float acc[kRows][Config::kPvDims];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    running_max[r] = kNegInf;
    row_sum[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < Config::kPvDims; ++j) acc[r][j] = 0.0f;
  }

  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int stage = static_cast<int>(tile & 1);
    // Index loads for tile + 2 are issued now and stored after the compute below.
    const int32_t future_key = tid < kTileKeys ? slot_key(tile + 2, tid) : -1;
    if (tile + 1 < num_tiles) load_tile(stage ^ 1, slot_keys + ((tile + 1) % 3) * kTileKeys);
    commit_async_copies();  // possibly empty: keeps "all but the newest group" = this tile
    wait_async_copies<1>();
    __syncthreads();  // tile `tile` is in shared memory for every thread

    // ---- scores (base 2) of this thread's key for every row
    float score[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) score[r] = 0.0f;
    const Element* k_row = k_tile(stage) + score_key * kPitch + slice * Config::kSliceDims;
#pragma unroll 2
    for (int c = 0; c < Config::kSliceChunks; ++c) {
      float key_values[8];
      load_as_float<Element, 8>(k_row + c * 8, key_values);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float* q = query_s + r * kHeadDim + slice * Config::kSliceDims + c * 8;
        const float4 q_lo = *reinterpret_cast<const float4*>(q);
        const float4 q_hi = *reinterpret_cast<const float4*>(q + 4);
        float s = score[r];
        s = fmaf(q_lo.x, key_values[0], s);
        s = fmaf(q_lo.y, key_values[1], s);
        s = fmaf(q_lo.z, key_values[2], s);
        s = fmaf(q_lo.w, key_values[3], s);
        s = fmaf(q_hi.x, key_values[4], s);
        s = fmaf(q_hi.y, key_values[5], s);
        s = fmaf(q_hi.z, key_values[6], s);
        s = fmaf(q_hi.w, key_values[7], s);
        score[r] = s;
      }
    }
#pragma unroll
    for (int mask = Config::kKeysPerWarp; mask < kWarpSize; mask <<= 1) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) score[r] += __shfl_xor_sync(kFullWarpMask, score[r], mask);
    }
    const int32_t key = slot_keys[(tile % 3) * kTileKeys + score_key];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool visible = key >= 0 && key <= row_limit_s[r];
      score[r] = visible ? score[r] : kNegInf;
      float warp_max = score[r];
#pragma unroll
      for (int mask = 1; mask < Config::kKeysPerWarp; mask <<= 1)
        warp_max = fmaxf(warp_max, __shfl_xor_sync(kFullWarpMask, warp_max, mask));
      if (lane == 0) warp_max_s[warp * kRows + r] = warp_max;
    }
    __syncthreads();  // warp maxima are visible

    // ---- online softmax: new maxima, rescale factors, probabilities of this thread's key
    float rescale[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float tile_max = warp_max_s[r];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) tile_max = fmaxf(tile_max, warp_max_s[w * kRows + r]);
      const float new_max = fmaxf(running_max[r], tile_max);
      // A row with no visible key yet keeps max -inf; subtracting 0 instead avoids -inf - -inf.
      const float reference = new_max == kNegInf ? 0.0f : new_max;
      rescale[r] = exp2f(running_max[r] - reference);
      running_max[r] = new_max;
      score[r] = exp2f(score[r] - reference);
    }
    if (slice == 0) {
#pragma unroll
      for (int r = 0; r < kRows; r += 4) {
        *reinterpret_cast<float4*>(prob_s + score_key * kRows + r) =
            make_float4(score[r], score[r + 1], score[r + 2], score[r + 3]);
      }
    }
    __syncthreads();  // probabilities are visible

    // ---- PV over this thread's key lane
    if (pv_active) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        row_sum[r] *= rescale[r];
#pragma unroll
        for (int j = 0; j < Config::kPvDims; ++j) acc[r][j] *= rescale[r];
      }
      const Element* v_stage = v_tile(stage);
#pragma unroll 1
      for (int i = 0; i < Config::kPvKeysPerLane; ++i) {
        const int t = pv_lane + i * Config::kPvKeyLanes;
        if (t < kTileKeys) {
          float values[Config::kPvDims];
          load_as_float<Element, Config::kPvDims>(v_stage + t * kPitch + pv_col, values);
          float prob[kRows];
#pragma unroll
          for (int r = 0; r < kRows; r += 4) {
            const float4 p4 = *reinterpret_cast<const float4*>(prob_s + t * kRows + r);
            prob[r] = p4.x;
            prob[r + 1] = p4.y;
            prob[r + 2] = p4.z;
            prob[r + 3] = p4.w;
          }
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            row_sum[r] += prob[r];
#pragma unroll
            for (int j = 0; j < Config::kPvDims; ++j) acc[r][j] = fmaf(prob[r], values[j], acc[r][j]);
          }
        }
      }
    }
    if (tid < kTileKeys) slot_keys[((tile + 2) % 3) * kTileKeys + tid] = future_key;
    __syncthreads();  // this stage, the probabilities and the maxima may be overwritten
  }
  wait_async_copies<0>();  // only empty groups can remain; the stages are reused below
  __syncthreads();

  // ---- sum the key lanes and normalise: reduce_acc [key lane][row][dim], reduce_sum [key lane][row]
  float* reduce_acc = reinterpret_cast<float*>(smem);
  float* reduce_sum = reduce_acc + Config::kPvKeyLanes * kRows * kHeadDim;
  if (pv_active) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float* dst = reduce_acc + (pv_lane * kRows + r) * kHeadDim + pv_col;
#pragma unroll
      for (int j = 0; j < Config::kPvDims; j += 4)
        *reinterpret_cast<float4*>(dst + j) = make_float4(acc[r][j], acc[r][j + 1], acc[r][j + 2], acc[r][j + 3]);
      if (pv_col == 0) reduce_sum[pv_lane * kRows + r] = row_sum[r];
    }
  }
  __syncthreads();
  for (int e = tid; e < rows * kHeadDim; e += kThreads) {
    const int r = e / kHeadDim, d = e % kHeadDim;
    float numerator = 0.0f, denominator = 0.0f;
    for (int l = 0; l < Config::kPvKeyLanes; ++l) {
      numerator += reduce_acc[(l * kRows + r) * kHeadDim + d];
      denominator += reduce_sum[l * kRows + r];
    }
    // A row that saw a key has denominator >= 1 (its maximum contributes exp2(0)); a NaN score
    // makes it NaN, which passes on (as in the CPU twin) rather than reading as "no key".
    partial_out[e] = denominator != 0.0f ? numerator / denominator : 0.0f;
  }
  if (tid == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) {
        float denominator = 0.0f;
        for (int l = 0; l < Config::kPvKeyLanes; ++l) denominator += reduce_sum[l * kRows + r];
        partial_lse[r] = denominator != 0.0f ? running_max[r] + log2f(denominator) : kNegInf;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Combine kernel: one warp per output row
// ------------------------------------------------------------------------------------------------

// fmaxf drops a NaN operand; a split whose LSE is NaN (NaN scores) must make the row NaN instead.
// Bit tests, so that fast-math compilation cannot fold the NaN checks away.
__device__ __forceinline__ bool is_nan_bits(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ float nan_max(float a, float b) {
  return is_nan_bits(a) ? a : (is_nan_bits(b) ? b : fmaxf(a, b));
}

template <typename Element>
__global__ void __launch_bounds__(kCombineWarps* kWarpSize)
    combine_splits_kernel(const float* __restrict__ partial_out, const float* __restrict__ partial_lse,
                          int64_t num_splits, int64_t rows_total, int head_dim, Element* __restrict__ out,
                          float* __restrict__ lse) {
  constexpr int kDimsPerLane = kMaxHeadDim / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kCombineWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / kWarpSize; row < rows_total;
       row += warps_total) {
    float max_lse = kNegInf;
    for (int64_t s = lane; s < num_splits; s += kWarpSize) {
      max_lse = nan_max(max_lse, partial_lse[s * rows_total + row]);
    }
#pragma unroll
    for (int mask = kWarpSize / 2; mask > 0; mask >>= 1)
      max_lse = nan_max(max_lse, __shfl_xor_sync(kFullWarpMask, max_lse, mask));

    float acc[kDimsPerLane];
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) acc[j] = 0.0f;
    float total = 0.0f;
    if (max_lse != kNegInf) {  // uniform across the warp
      for (int64_t s = 0; s < num_splits; ++s) {
        // Empty splits have lse -inf and weight 0.
        const float weight = exp2f(partial_lse[s * rows_total + row] - max_lse);
        total += weight;
        const float* src = partial_out + (s * rows_total + row) * head_dim;
#pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) {
          const int d = lane + j * kWarpSize;
          if (d < head_dim) acc[j] = fmaf(weight, src[d], acc[j]);
        }
      }
    }
    const float inv_total = total != 0.0f ? 1.0f / total : 0.0f;  // NaN passes on
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) {
      const int d = lane + j * kWarpSize;
      if (d < head_dim) out[row * head_dim + d] = ElementOps<Element>::from_float(acc[j] * inv_total);
    }
    if (lane == 0) lse[row] = total != 0.0f ? (max_lse + log2f(total)) * kLn2 : kNegInf;
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

template <typename Element, int kHeadDim, int kRows>
cudaError_t launch_split_kernel(const SplitKernelParams<Element>& params, int64_t grid, cudaStream_t stream) {
  constexpr size_t smem_bytes = DecodeConfig<Element, kHeadDim, kRows>::kSmemBytes;
  const auto kernel = decode_split_kernel<Element, kHeadDim, kRows>;
  if (smem_bytes > kDefaultDynamicSmemBytes) {
    int device = 0, optin_smem = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return status;
    status = cudaDeviceGetAttribute(&optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (status != cudaSuccess) return status;
    if (smem_bytes > static_cast<size_t>(optin_smem)) return cudaErrorInvalidValue;
    // The need is fixed per instantiation, so concurrent callers all set the same value.
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (status != cudaSuccess) return status;
  }
  kernel<<<static_cast<unsigned>(grid), kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <typename Element, int kHeadDim>
cudaError_t dispatch_rows(const SplitKernelParams<Element>& params, int64_t rows, int64_t grid, cudaStream_t stream) {
  if (rows <= 4) return launch_split_kernel<Element, kHeadDim, 4>(params, grid, stream);
  if (rows <= 8) return launch_split_kernel<Element, kHeadDim, 8>(params, grid, stream);
  return launch_split_kernel<Element, kHeadDim, 16>(params, grid, stream);
}

bool aligned_16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

}  // namespace

template <typename Element>
cudaError_t block_sparse_decode(const BlockSparseDecodeArgs<Element>& args, cudaStream_t stream) {
  static_assert(kDecodeMaxRowsPerCta == 16, "dispatch_rows instantiates row classes up to 16");
  if (args.batch < 0 || args.q_heads < 0 || args.seq_len_q < 0 || args.seq_len_kv < 0) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.q_heads == 0 || args.seq_len_q == 0) return cudaSuccess;
  if (!decode_supports_head_dim(args.head_dim)) return cudaErrorInvalidValue;
  if (args.kv_heads <= 0 || args.q_heads % args.kv_heads != 0) return cudaErrorInvalidValue;
  const int64_t group_size = args.q_heads / args.kv_heads;
  if (args.heads_per_cta <= 0 || group_size % args.heads_per_cta != 0 ||
      args.heads_per_cta * args.seq_len_q > kDecodeMaxRowsPerCta) {
    return cudaErrorInvalidValue;
  }
  const bool layout_per_q_head = args.layout_heads == args.q_heads;
  if (!(layout_per_q_head || args.layout_heads == args.kv_heads || args.layout_heads == 1)) return cudaErrorInvalidValue;
  // The heads of a CTA must read one block list.
  if (layout_per_q_head && group_size > 1 && args.heads_per_cta != 1) return cudaErrorInvalidValue;
  if (!(args.layout_batch == args.batch || args.layout_batch == 1)) return cudaErrorInvalidValue;
  if (args.max_blocks < 0 || args.kv_block_size <= 0 || args.num_splits <= 0) return cudaErrorInvalidValue;
  if (args.seq_len_kv > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;

  SplitKernelParams<Element> params;
  params.args = args;
  params.group_size = group_size;
  params.units_per_kv_head = group_size / args.heads_per_cta;
  params.num_kv_blocks = (args.seq_len_kv + args.kv_block_size - 1) / args.kv_block_size;
  // One block of the stream holds min(block, seq_len_kv) slots: a block larger than the cache
  // (there is then only block 0) must not produce a mostly empty stream.
  params.stream_stride = std::max<int64_t>(1, std::min(args.kv_block_size, args.seq_len_kv));
  params.scale_log2 = args.softmax_scale * kLog2e;
  params.vector_loads = aligned_16(args.k) && aligned_16(args.v) && args.k_stride_batch % 8 == 0 &&
                        args.k_stride_head % 8 == 0 && args.k_stride_seq % 8 == 0 && args.v_stride_batch % 8 == 0 &&
                        args.v_stride_head % 8 == 0 && args.v_stride_seq % 8 == 0;

  const int64_t ctas_per_split = args.batch * args.kv_heads * params.units_per_kv_head;
  if (args.num_splits > kMaxGridBlocks / ctas_per_split) return cudaErrorInvalidValue;
  const int64_t grid = ctas_per_split * args.num_splits;
  const int64_t rows = args.heads_per_cta * args.seq_len_q;

  cudaError_t status = cudaSuccess;
  switch (args.head_dim) {
    case 64:
      status = dispatch_rows<Element, 64>(params, rows, grid, stream);
      break;
    case 96:
      status = dispatch_rows<Element, 96>(params, rows, grid, stream);
      break;
    case 128:
      status = dispatch_rows<Element, 128>(params, rows, grid, stream);
      break;
    default:  // 256, checked above
      status = dispatch_rows<Element, 256>(params, rows, grid, stream);
      break;
  }
  if (status != cudaSuccess) return status;

  const int64_t rows_total = args.batch * args.q_heads * args.seq_len_q;
  const int64_t combine_grid = std::min<int64_t>((rows_total + kCombineWarps - 1) / kCombineWarps, int64_t{1} << 20);
  combine_splits_kernel<Element><<<static_cast<unsigned>(combine_grid), kCombineWarps * kWarpSize, 0, stream>>>(
      args.partial_out, args.partial_lse, args.num_splits, rows_total, static_cast<int>(args.head_dim), args.out,
      args.lse);
  return cudaGetLastError();
}

template cudaError_t block_sparse_decode<__half>(const BlockSparseDecodeArgs<__half>&, cudaStream_t);
template cudaError_t block_sparse_decode<__nv_bfloat16>(const BlockSparseDecodeArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace sparse_attn::cuda
