// The CUDA decode kernel of attention_kvcache (Flash-Decoding): few query rows per KV head
// against a long cache, for fp16/bf16 caches. Included by attention_decode_cuda.cu and, with
// FAE_SIMT_EMULATION, by tests/native/cpp/test_decode_kernel_emulated.cpp (runs it on the CPU).
//
// Why not the forward kernels: decode has one query row per head, so a grid over query rows
// (the safety net: a warp per row) has B * Hq warps for the whole cache and reads each KV head
// once per query head of its group. Here a block owns (sequence, KV head, key split): the
// G * L query rows of that KV head share one pass over its K/V, and the key range is split
// across blocks until the grid fills the GPU (B * Hkv alone rarely does). Each split writes a
// partial (max, sum, unnormalised output) and decode_combine_kernel merges them exactly.
//
// Decode is a stream of K/V bytes, so the kernel is built to keep bytes in flight: the band is
// walked in chunks of 32 keys (aligned to multiples of 32, so a paged cache whose block size is
// a multiple of 32 resolves its block once per chunk), each chunk's K and V rows copied into
// shared memory with 16-byte cp.async, two stages deep (chunk c + 1 lands while chunk c is
// computed on); every thread issues kDim / 32 copies per tensor per chunk, coalesced (a row's
// 16-byte pieces go to consecutive threads). Inside a block (128 threads, 4 warps):
//   scores  lane l takes key j0 + l, warp w features [w D/4, (w+1) D/4): 16-byte shared loads
//           of K (rows padded by 16 bytes, so the 8 lanes of a load phase hit distinct banks)
//           against every row's q (float, pre-scaled to base 2, broadcast); the four warps'
//           partial dots meet in shared memory;
//   softmax warp w takes rows w, w + 4, ...: one key per lane, chunk max, running max, exp2,
//           row sum, with each row's visible keys precomputed as [lo, hi) in 32-bit positions;
//   P V     thread t owns features 2f, 2f + 1 (f = t mod D/2) of every row for the keys
//           c = g (mod 256/D), g = t div (D/2), reading V as 4-byte pairs; the key groups'
//           accumulators are summed once, after the last chunk.
// Positions are 32-bit inside the kernel (the launcher checks the cache holds fewer than 2^31).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../attention/attention_forward_mma_params.h"
#include "../attention/attention_rows.h"
#include "../common/attention_semantics.h"
#include "../cuda/mma_primitives.cuh"  // cp.async (or, with FAE_SIMT_EMULATION, the host emulator)

namespace flash_attn_ext::cuda {

// Arguments of the decode kernels; torch-free so the emulated test builds them too.
// k, v: the cache (paged when p has a table, through rows::kv_view); p's per-sequence lengths
// (seqlens_k) and block table are device pointers; out is written when n_splits == 1 (else by
// the combine kernel).
struct DecodeParams : MmaParams {
  int n_splits;
  float* part_acc;  // [split][B * Hq * L][Dv], unnormalised
  float* part_ml;   // [split][B * Hq * L][2]: running max (base 2), row sum
};

namespace decode_detail {

using mma_detail::cp_async_16;
using mma_detail::cp_async_commit;
using mma_detail::cp_async_wait_all;
using mma_detail::cp_async_wait_one;
using mma_detail::exp2_fast;
using mma_detail::smem_u32;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;    // keys per chunk: one per lane in the score and softmax phases
constexpr int kMaxRows = 16;  // G * L query rows per KV head served here

// The block's shared memory (byte offsets) and work split for head dim kDim.
template <int kDim>
struct Layout {
  static constexpr int kRow = kDim + 8;                              // padded row of a staged chunk, in 16-bit words
  static constexpr int kPieces = kDim / 8;                           // 16-byte pieces per row
  static constexpr int kRowsPerPass = kThreads / kPieces;            // rows one pass of the block's copies covers
  static constexpr int kCopies = kChunk / kRowsPerPass;              // copies per thread per tensor per chunk
  static constexpr int kSlice = kDim / kWarps;                       // features per warp in the score phase
  static constexpr int kPairs = kDim / 2;                            // P V: threads per key group
  static constexpr int kGroups = kThreads / kPairs;                  // P V: key groups
  static constexpr size_t kStage = 2 * kChunk * kRow * 2;            // one chunk: K rows, then V rows
  static constexpr size_t kQ = 2 * kStage;                           // [kMaxRows][kDim] float
  static constexpr size_t kS = kQ + kMaxRows * kDim * 4;             // [kWarps][kMaxRows][kChunk] partial scores
  static constexpr size_t kP = kS + kWarps * kMaxRows * kChunk * 4;  // [kMaxRows][kChunk] probabilities
  static constexpr size_t kM = kP + kMaxRows * kChunk * 4;           // [kMaxRows] each: max, sum, alpha; lo, hi
  static constexpr size_t kBytes = kM + 5 * kMaxRows * 4;
  static_assert(kDim % 64 == 0 && kCopies * kRowsPerPass == kChunk && kGroups >= 1, "head dim 64, 128 or 256");
  // After the last chunk the stages hold the key groups' accumulators for their sum.
  static_assert(kGroups == 1 || kGroups * kMaxRows * kDim * 4 <= kQ, "the reduction fits in the stages");
};

template <int kDim>
constexpr size_t smem_bytes() {
  return Layout<kDim>::kBytes;
}

#ifdef FAE_SIMT_EMULATION
template <typename T>
inline float widen16(uint16_t bits) {
  return emu::to_float(bits, T{});
}
template <typename T>
inline uint16_t narrow16(float x) {
  return emu::from_float(x, T{});
}
#else
template <typename T>
__device__ __forceinline__ float widen16(uint16_t bits);
template <>
__device__ __forceinline__ float widen16<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
template <>
__device__ __forceinline__ float widen16<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
template <typename T>
__device__ __forceinline__ uint16_t narrow16(float x);
template <>
__device__ __forceinline__ uint16_t narrow16<__half>(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
template <>
__device__ __forceinline__ uint16_t narrow16<__nv_bfloat16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
#endif

// Eight 16-bit elements in one 16-byte load (16-byte aligned: rows and padded rows are).
__device__ __forceinline__ void load8_16(uint16_t (&dst)[8], const uint16_t* src) {
#ifdef FAE_SIMT_EMULATION
  emu::require_aligned(src, 16, "16-byte load");
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
__device__ __forceinline__ uint32_t load2_16(const uint16_t* src) {
#ifdef FAE_SIMT_EMULATION
  emu::require_aligned(src, 4, "4-byte load");
  uint32_t w;
  std::memcpy(&w, src, 4);
  return w;
#else
  return *reinterpret_cast<const uint32_t*>(src);
#endif
}
__device__ __forceinline__ void store2_16(uint16_t* dst, uint16_t lo, uint16_t hi) {
  const uint32_t w = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
#ifdef FAE_SIMT_EMULATION
  emu::require_aligned(dst, 4, "4-byte store");
  std::memcpy(dst, &w, 4);
#else
  *reinterpret_cast<uint32_t*>(dst) = w;
#endif
}

// Split `split` of n_splits of the band, in whole chunks aligned to multiples of kChunk (empty
// when the chunks are fewer than the splits).
__device__ __forceinline__ KeyRange split_range(KeyRange band, int split, int n_splits) {
  if (band.end <= band.begin) return {band.begin, band.begin};
  const int64_t first = band.begin / kChunk * kChunk;
  const int64_t chunks = (band.end - first + kChunk - 1) / kChunk;
  const int64_t c0 = chunks * split / n_splits, c1 = chunks * (split + 1) / n_splits;
  const int64_t begin = first + c0 * kChunk > band.begin ? first + c0 * kChunk : band.begin;
  const int64_t end = first + c1 * kChunk < band.end ? first + c1 * kChunk : band.end;
  return {begin, begin < end ? end : begin};
}

// The natural-log lse of a row from its base-2 max and sum: -inf for a row that saw nothing,
// NaN for a row a NaN score reached (as the other kernels and the reference give).
__device__ __forceinline__ float lse_of(float m2, float l) {
  if (l != l) return l;
  return l > 0.f ? (m2 + log2f(l)) * 0.69314718055994531f : -INFINITY;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Sequence b's K and V rows of KV head hk, for the chunk copies: row j is at k + offset(j)
// (elements), through the block table when the cache is paged.
struct CacheRows {
  const uint16_t *k, *v;
  int64_t k_sb, k_sl, v_sb, v_sl;
  const int32_t* table;  // this sequence's blocks, or null
  int32_t block_size;
  bool chunk_in_one_block;  // block_size % kChunk == 0: a chunk never straddles two blocks

  __device__ __forceinline__ CacheRows(const InRows& K, const InRows& V, const AttentionParams& P, int64_t b,
                                       int64_t hk) {
    table = P.block_table != nullptr ? P.block_table + b * P.blocks_per_seq : nullptr;
    k = K.data + hk * K.stride_h + (table != nullptr ? 0 : b * K.stride_b);
    v = V.data + hk * V.stride_h + (table != nullptr ? 0 : b * V.stride_b);
    k_sb = K.stride_b, k_sl = K.stride_l, v_sb = V.stride_b, v_sl = V.stride_l;
    block_size = table != nullptr ? static_cast<int32_t>(P.block_size) : 1;
    chunk_in_one_block = block_size % kChunk == 0;
  }
};

// Issues the copies of chunk [j0, j0 + kChunk) into stage (K rows, then V rows) and commits
// them as one group; keys outside [begin, end) are zero-filled without a read (so nothing past
// the sequence, or through an unused block-table entry, is touched, and P V multiplies zeros).
template <int kDim>
__device__ __forceinline__ void issue_chunk(uint16_t* stage, const CacheRows& c, int32_t j0, int32_t begin,
                                            int32_t end) {
  using L = Layout<kDim>;
  const int tid = threadIdx.x, piece = tid % L::kPieces;
  int32_t page = 0;
  if (c.table != nullptr && c.chunk_in_one_block) {
    const int32_t blk = j0 / c.block_size;
    page = j0 < end ? c.table[blk] : 0;
  }
#pragma unroll
  for (int u = 0; u < L::kCopies; ++u) {
    const int r = tid / L::kPieces + u * L::kRowsPerPass;
    const int32_t j = j0 + r;
    const bool ok = j >= begin && j < end;
    int64_t ko = 0, vo = 0;
    if (ok) {
      if (c.table == nullptr) {
        ko = j * c.k_sl, vo = j * c.v_sl;
      } else {
        const int32_t blk = j / c.block_size, in_block = j - blk * c.block_size;
        const int64_t pg = c.chunk_in_one_block ? page : c.table[blk];
        ko = pg * c.k_sb + in_block * c.k_sl, vo = pg * c.v_sb + in_block * c.v_sl;
      }
    }
    cp_async_16(smem_u32(stage + r * L::kRow + piece * 8), c.k + ko + piece * 8, ok);
    cp_async_16(smem_u32(stage + (kChunk + r) * L::kRow + piece * 8), c.v + vo + piece * 8, ok);
  }
  cp_async_commit();
}

// Blocks per SM the split kernel is built for: four (so <= 128 registers) where shared memory
// allows, two at D = 256 (94 KB per block).
template <int kDim>
constexpr int kMinBlocks = kDim == 256 ? 2 : 4;

// grid: B * Hkv * n_splits blocks (split fastest); block: kThreads.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kDim>) attention_decode_split_kernel(const DecodeParams dp) {
  using L = Layout<kDim>;
  FAE_DYNAMIC_SMEM(unsigned char, smem);                               // smem_bytes<kDim>()
  uint16_t* const sStage = reinterpret_cast<uint16_t*>(smem);          // [2] chunks of K rows then V rows
  float* const sQ = reinterpret_cast<float*>(smem + L::kQ);            // [kMaxRows][kDim] q, scaled to base 2
  float* const sS = reinterpret_cast<float*>(smem + L::kS);            // [kWarps][kMaxRows][kChunk] partial scores
  float* const sP = reinterpret_cast<float*>(smem + L::kP);            // [kMaxRows][kChunk] probabilities
  float* const sM = reinterpret_cast<float*>(smem + L::kM);            // [kMaxRows] running max (base 2)
  float* const sL = sM + kMaxRows;                                     // [kMaxRows] running sum
  float* const sAlpha = sL + kMaxRows;                                 // [kMaxRows] this chunk's rescale factor
  int32_t* const sLo = reinterpret_cast<int32_t*>(sAlpha + kMaxRows);  // [kMaxRows] row's keys: [lo, hi)
  int32_t* const sHi = sLo + kMaxRows;

  const AttentionParams& P = dp.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t blk = blockIdx.x;
  const int split = static_cast<int>(blk % dp.n_splits);
  const int64_t hk = blk / dp.n_splits % P.heads_kv, b = blk / dp.n_splits / P.heads_kv;
  const AttentionParams pb = P.for_batch(b);
  const int64_t G = P.group_size(), Lq = P.len_q;
  const int R = static_cast<int>(G * Lq);  // row r: query head hk * G + r / Lq, position r % Lq
  const KeyRange band = visible_key_range(0, Lq, pb.align_offset, pb.window_left, pb.window_right, pb.len_k);
  const KeyRange range = split_range(band, split, dp.n_splits);
  const int32_t begin = static_cast<int32_t>(range.begin), end = static_cast<int32_t>(range.end);
  const int32_t first = begin / kChunk * kChunk;
  const int n_chunks = end > begin ? (end - first + kChunk - 1) / kChunk : 0;

  // The first chunk's copies go out before anything else.
  const CacheRows cache(dp.k, dp.v, P, b, hk);
  if (n_chunks > 0) issue_chunk<kDim>(sStage, cache, first, begin, end);

  for (int idx = tid; idx < R * kDim; idx += kThreads) {
    const int r = idx / kDim, d = idx % kDim;
    const int64_t h = hk * G + r / Lq, i = r % Lq;
    sQ[idx] = widen16<T>(dp.q.head(b, h)[i * dp.q.stride_l + d]) * dp.scale_log2;
  }
  if (tid < kMaxRows) {
    sM[tid] = -INFINITY;
    sL[tid] = 0.f;
    const int64_t i = tid % Lq;
    const int64_t lo = first_visible_key(i, pb.align_offset, pb.window_left, pb.len_k);
    const int64_t hi = end_visible_key(i, pb.align_offset, pb.window_right, pb.len_k);
    sLo[tid] = static_cast<int32_t>(lo > range.begin ? lo : range.begin);
    sHi[tid] = static_cast<int32_t>(hi < range.end ? hi : range.end);
  }

  const int f = tid % L::kPairs, g = tid / L::kPairs;  // P V: feature pair, key group
  float acc[kMaxRows][2];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r][0] = acc[r][1] = 0.f;

  for (int c = 0; c < n_chunks; ++c) {
    const int32_t j0 = first + c * kChunk;
    const uint16_t* const sK = sStage + (c % 2) * (2 * kChunk * L::kRow);
    const uint16_t* const sV = sK + kChunk * L::kRow;
    if (c + 1 < n_chunks) {  // the next chunk lands in the other stage, freed at the end of chunk c - 1
      issue_chunk<kDim>(sStage + ((c + 1) % 2) * (2 * kChunk * L::kRow), cache, j0 + kChunk, begin, end);
      cp_async_wait_one();
    } else {
      cp_async_wait_all();
    }
    __syncthreads();  // chunk c (every thread's copies) and, on the first chunk, sQ / sM / sLo
    // Scores: key j0 + lane, this warp's slice of the features, against every row.
    {
      float s[kMaxRows];
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) s[r] = 0.f;
#pragma unroll
      for (int u = 0; u < L::kSlice / 8; ++u) {
        const int d0 = warp * L::kSlice + 8 * u;
        uint16_t kv[8];
        load8_16(kv, sK + lane * L::kRow + d0);
        float kf[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[e] = widen16<T>(kv[e]);
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < R) {
#pragma unroll
            for (int e = 0; e < 8; ++e) s[r] += sQ[r * kDim + d0 + e] * kf[e];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r)
        if (r < R) sS[(warp * kMaxRows + r) * kChunk + lane] = s[r];
    }
    __syncthreads();
    // Online softmax, one warp per row, one key per lane.
    for (int r = warp; r < R; r += kWarps) {
      const int32_t j = j0 + lane;
      float x = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) x += sS[(w * kMaxRows + r) * kChunk + lane];
      if (j < sLo[r] || j >= sHi[r]) x = -INFINITY;
      const float m_old = sM[r], m_new = fmaxf(m_old, warp_max(x));
      const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: p = 0
      const float e = exp2_fast(x - base);
      sP[r * kChunk + lane] = e;
      const float sum = warp_sum(e);
      __syncwarp();  // every lane has read sM[r] before lane 0 replaces it
      if (lane == 0) {
        const float alpha = exp2_fast(m_old - base);  // 0 while m_old is -inf
        sAlpha[r] = alpha;
        sL[r] = sL[r] * alpha + sum;
        sM[r] = m_new;
      }
    }
    __syncthreads();
    // P V: this thread's feature pair of every row, over its key group's keys of the chunk.
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < R) {
        const float alpha = sAlpha[r];
        acc[r][0] *= alpha;
        acc[r][1] *= alpha;
      }
    }
#pragma unroll
    for (int u = 0; u < kChunk / L::kGroups; ++u) {
      const int k = g + u * L::kGroups;
      const uint32_t w = load2_16(sV + k * L::kRow + 2 * f);
      const float v0 = widen16<T>(static_cast<uint16_t>(w)), v1 = widen16<T>(static_cast<uint16_t>(w >> 16));
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < R) {
          const float pr = sP[r * kChunk + k];
          acc[r][0] += pr * v0;
          acc[r][1] += pr * v1;
        }
      }
    }
    __syncthreads();  // this stage, sS, sP and sAlpha are rewritten by the next chunk
  }

  if (n_chunks == 0) __syncthreads();  // sM / sL, else published by the loop's first barrier

  // Epilogue: the output (one split) or this split's partial state. With several key groups
  // their accumulators are summed first, through the (now idle) stages; group g then stores
  // rows g, g + kGroups, ...
  const int64_t rows_all = P.batch * P.heads_q * Lq;
  const auto store_row = [&](int r, float o0, float o1) {
    const int64_t h = hk * G + r / Lq, i = r % Lq;
    const int64_t row = (b * P.heads_q + h) * Lq + i;
    const float l = sL[r];
    if (dp.n_splits == 1) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      store2_16(dp.out.head(b, h) + i * dp.out.stride_l + 2 * f, narrow16<T>(o0 * inv), narrow16<T>(o1 * inv));
      if (f == 0) dp.lse[row] = lse_of(sM[r], l);
    } else {
      float* prow = dp.part_acc + (split * rows_all + row) * kDim;
      prow[2 * f] = o0;
      prow[2 * f + 1] = o1;
      if (f == 0) {
        dp.part_ml[(split * rows_all + row) * 2] = sM[r];
        dp.part_ml[(split * rows_all + row) * 2 + 1] = l;
      }
    }
  };
  if constexpr (L::kGroups == 1) {
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r)
      if (r < R) store_row(r, acc[r][0], acc[r][1]);
  } else {
    float* const sRed = reinterpret_cast<float*>(smem);  // [kGroups][kMaxRows][kDim]
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < R) {
        sRed[(g * kMaxRows + r) * kDim + 2 * f] = acc[r][0];
        sRed[(g * kMaxRows + r) * kDim + 2 * f + 1] = acc[r][1];
      }
    }
    __syncthreads();
    for (int r = g; r < R; r += L::kGroups) {
      float o0 = 0.f, o1 = 0.f;
#pragma unroll
      for (int q = 0; q < L::kGroups; ++q) {
        o0 += sRed[(q * kMaxRows + r) * kDim + 2 * f];
        o1 += sRed[(q * kMaxRows + r) * kDim + 2 * f + 1];
      }
      store_row(r, o0, o1);
    }
  }
}

// Merges the splits' partial states of one row per block: out = sum_s w_s acc_s / sum_s w_s l_s
// with w_s = 2^(m_s - max_s m_s); rows that see nothing get zeros and lse = -inf.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const DecodeParams dp) {
  const AttentionParams& P = dp.p;
  const int64_t row = blockIdx.x, L = P.len_q;
  const int64_t rows_all = P.batch * P.heads_q * L;
  const int64_t b = row / (P.heads_q * L), h = row / L % P.heads_q, i = row % L;
  float m = -INFINITY;
  for (int s = 0; s < dp.n_splits; ++s) m = fmaxf(m, dp.part_ml[(s * rows_all + row) * 2]);
  const float base = m == -INFINITY ? 0.f : m;
  float l = 0.f;
  for (int s = 0; s < dp.n_splits; ++s)
    l += exp2f(dp.part_ml[(s * rows_all + row) * 2] - base) * dp.part_ml[(s * rows_all + row) * 2 + 1];
  const float inv = l > 0.f ? 1.f / l : 0.f;
  uint16_t* orow = dp.out.head(b, h) + i * dp.out.stride_l;
  for (int d = threadIdx.x; d < kDim; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < dp.n_splits; ++s)
      o += exp2f(dp.part_ml[(s * rows_all + row) * 2] - base) * dp.part_acc[(s * rows_all + row) * kDim + d];
    orow[d] = narrow16<T>(o * inv);
  }
  if (threadIdx.x == 0) dp.lse[row] = lse_of(m, l);
}

}  // namespace decode_detail
}  // namespace flash_attn_ext::cuda
