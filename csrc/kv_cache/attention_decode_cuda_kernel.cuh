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
// Inside a block (128 threads) the band is walked in chunks of 128 keys:
//   scores  thread t takes key j0 + t and dots its K row (16-byte loads) with every row's q
//           (float, pre-scaled to base 2, in shared memory);
//   softmax warp w takes rows w, w + 4, ...: chunk max, running max, exp2, row sum;
//   P V     thread t owns output features t (and t + 128 for D = 256) of every row and reads
//           the chunk's V rows coalesced (a warp reads 64 contiguous bytes of a row).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../attention/attention_forward_mma_params.h"
#include "../attention/attention_rows.h"
#include "../common/attention_semantics.h"

#ifdef FAE_SIMT_EMULATION
#include FAE_SIMT_EMULATION
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef FAE_DYNAMIC_SMEM
#define FAE_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif
#endif

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

constexpr int kThreads = 128;
constexpr int kChunk = 128;   // keys per chunk: one per thread in the score phase
constexpr int kMaxRows = 16;  // G * L query rows per KV head served here

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

template <int kDim>
constexpr size_t smem_bytes() {
  return (kMaxRows * kDim + kMaxRows * kChunk + 3 * kMaxRows) * sizeof(float);
}

// Eight 16-bit elements in one 16-byte load (rows are 16-byte aligned: the launcher checks).
__device__ __forceinline__ void load8_16(uint16_t (&dst)[8], const uint16_t* src) {
#ifdef FAE_SIMT_EMULATION
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// Split `split` of n_splits of the band, in whole chunks (empty when chunks are fewer).
__device__ __forceinline__ KeyRange split_range(KeyRange band, int split, int n_splits) {
  const int64_t chunks = band.end > band.begin ? (band.end - band.begin + kChunk - 1) / kChunk : 0;
  const int64_t c0 = chunks * split / n_splits, c1 = chunks * (split + 1) / n_splits;
  const int64_t begin = band.begin + c0 * kChunk;
  const int64_t end = band.begin + c1 * kChunk < band.end ? band.begin + c1 * kChunk : band.end;
  return {begin, begin < end ? end : begin};
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

// grid: B * Hkv * n_splits blocks (split fastest); block: kThreads.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) attention_decode_split_kernel(const DecodeParams dp) {
  constexpr int kPer = (kDim + kThreads - 1) / kThreads;  // output features per thread
  FAE_DYNAMIC_SMEM(float, smem);                          // smem_bytes<kDim>()
  float* const sQ = smem;                                 // [kMaxRows][kDim] q, scaled to base 2
  float* const sP = sQ + kMaxRows * kDim;                 // [kMaxRows][kChunk] scores, then probabilities
  float* const sM = sP + kMaxRows * kChunk;               // [kMaxRows] running max (base 2)
  float* const sL = sM + kMaxRows;                        // [kMaxRows] running sum
  float* const sAlpha = sL + kMaxRows;                    // [kMaxRows] this chunk's rescale factor

  const AttentionParams& P = dp.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t blk = blockIdx.x;
  const int split = static_cast<int>(blk % dp.n_splits);
  const int64_t hk = blk / dp.n_splits % P.heads_kv, b = blk / dp.n_splits / P.heads_kv;
  const AttentionParams pb = P.for_batch(b);
  const int64_t G = P.group_size(), L = P.len_q;
  const int R = static_cast<int>(G * L);  // row r: query head hk * G + r / L, position r % L

  for (int idx = tid; idx < R * kDim; idx += kThreads) {
    const int r = idx / kDim, d = idx % kDim;
    const int64_t h = hk * G + r / L, i = r % L;
    sQ[idx] = widen16<T>(dp.q.head(b, h)[i * dp.q.stride_l + d]) * dp.scale_log2;
  }
  if (tid < kMaxRows) {
    sM[tid] = -INFINITY;
    sL[tid] = 0.f;
  }
  const InRows K = rows::kv_view(dp.k, P);
  const InRows V = rows::kv_view(dp.v, P);
  const KeyRange band = visible_key_range(0, L, pb.align_offset, pb.window_left, pb.window_right, pb.len_k);
  const KeyRange range = split_range(band, split, dp.n_splits);

  float acc[kMaxRows][kPer];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r)
#pragma unroll
    for (int u = 0; u < kPer; ++u) acc[r][u] = 0.f;
  __syncthreads();

  for (int64_t j0 = range.begin; j0 < range.end; j0 += kChunk) {
    const int64_t n_keys = range.end - j0 < kChunk ? range.end - j0 : kChunk;
    // Scores: this thread's key against every row.
    {
      const int64_t j = j0 + tid;
      float s[kMaxRows];
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) s[r] = 0.f;
      if (tid < n_keys) {
        const uint16_t* krow = K.row(b, hk, j);
        for (int d0 = 0; d0 < kDim; d0 += 8) {
          uint16_t kv[8];
          load8_16(kv, krow + d0);
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
      }
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < R) {
          const bool seen = tid < n_keys && key_visible(r % L, j, pb.align_offset, pb.window_left, pb.window_right);
          sP[r * kChunk + tid] = seen ? s[r] : -INFINITY;
        }
      }
    }
    __syncthreads();
    // Online softmax, one warp per row.
    for (int r = warp; r < R; r += kThreads / 32) {
      float x[kChunk / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < kChunk / 32; ++u) {
        x[u] = sP[r * kChunk + lane + 32 * u];
        mx = fmaxf(mx, x[u]);
      }
      mx = warp_max(mx);
      const float m_old = sM[r], m_new = fmaxf(m_old, mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: p = 0
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < kChunk / 32; ++u) {
        const float e = exp2f(x[u] - base);
        sP[r * kChunk + lane + 32 * u] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read sM[r] before lane 0 replaces it
      if (lane == 0) {
        const float alpha = exp2f(m_old - base);  // 0 while m_old is -inf
        sAlpha[r] = alpha;
        sL[r] = sL[r] * alpha + sum;
        sM[r] = m_new;
      }
    }
    __syncthreads();
    // P V: this thread's features of every row.
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < R) {
        const float alpha = sAlpha[r];
#pragma unroll
        for (int u = 0; u < kPer; ++u) acc[r][u] *= alpha;
      }
    }
    for (int64_t c = 0; c < n_keys; ++c) {
      const uint16_t* vrow = V.row(b, hk, j0 + c);
      float vf[kPer];
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int d = tid + u * kThreads;
        vf[u] = d < kDim ? widen16<T>(vrow[d]) : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < R) {
          const float pr = sP[r * kChunk + c];
#pragma unroll
          for (int u = 0; u < kPer; ++u) acc[r][u] += pr * vf[u];
        }
      }
    }
    __syncthreads();  // sP and sAlpha are rewritten by the next chunk
  }

  // Epilogue: the output (one split) or this split's partial state.
  const int64_t rows_all = P.batch * P.heads_q * L;
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= R) continue;
    const int64_t h = hk * G + r / L, i = r % L;
    const int64_t row = (b * P.heads_q + h) * L + i;
    const float l = sL[r];
    if (dp.n_splits == 1) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      uint16_t* orow = dp.out.head(b, h) + i * dp.out.stride_l;
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int d = tid + u * kThreads;
        if (d < kDim) orow[d] = narrow16<T>(acc[r][u] * inv);
      }
      if (tid == 0) dp.lse[row] = l > 0.f ? (sM[r] + log2f(l)) * 0.69314718055994531f : -INFINITY;
    } else {
      float* prow = dp.part_acc + (split * rows_all + row) * kDim;
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int d = tid + u * kThreads;
        if (d < kDim) prow[d] = acc[r][u];
      }
      if (tid == 0) {
        dp.part_ml[(split * rows_all + row) * 2] = sM[r];
        dp.part_ml[(split * rows_all + row) * 2 + 1] = l;
      }
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
  if (threadIdx.x == 0) dp.lse[row] = l > 0.f ? (m + log2f(l)) * 0.69314718055994531f : -INFINITY;
}

}  // namespace decode_detail
}  // namespace flash_attn_ext::cuda
