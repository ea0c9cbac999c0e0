// The tensor-core backward, FlashAttention-2 style, in two kernels with no atomics (so the
// result is bitwise repeatable, whatever the scheduling):
//
//   grad_kv: one block of 4 warps per (64-key tile, KV head, batch); each warp owns 16 keys.
//     K and V tiles stay in shared memory; for every query head of the GQA group and every
//     query tile of the key tile's visible row band (visible_row_range), Q and dO tiles
//     stream through two shared-memory buffers (cp.async), and
//       S^T = K Q^T, P^T = exp2(S^T scale_log2 - lse2), dP^T = V dO^T,
//       dS^T = P^T o (dP^T - delta), dV += P^T dO, dK += dS^T Q
//     run on mma.sync with float32 accumulators; dK, dV are written once at the end, summed
//     over the group (GQA without repeated K/V and without atomics).
//   grad_q: one block per (64-query tile, head, batch), the forward's shape; each warp owns 16
//     query rows, K/V tiles of the visible band stream through shared memory, and
//       S = Q K^T, P, dP = dO V^T, dS = P o (dP - delta), dQ += dS K.
//
// The price of no atomics is recomputing S and dP in grad_q (7 tile products instead of 5);
// an atomic dQ variant is future work once a GPU can measure the trade.
// delta = rowsum(dO * O) comes from the safety net's delta kernel. Probabilities are rebuilt
// from the forward's lse in base 2 (lse2 = lse log2(e)); rows that saw no key have lse = -inf
// and contribute nothing.
#pragma once

#include <algorithm>

#include "../cuda/mma_layout.h"
#include "../cuda/mma_primitives.cuh"
#include "attention_forward_mma_params.h"

#ifndef FAE_SIMT_EMULATION
#include "attention_backward_mma.h"
#endif

namespace flash_attn_ext::cuda {
namespace mma_detail {

template <int kHeadDim>
struct BackwardTiles {
  static constexpr int kBlockM = 64;  // query rows per step (grad_kv) / per block (grad_q)
  static constexpr int kBlockN = 64;  // keys per block (grad_kv) / per step (grad_q)
  static constexpr int kThreads = 128;
  static constexpr int kStride = kHeadDim + 8;
  static constexpr int kTile = 64 * kStride;
  // grad_kv: K, V, 2 x (Q, dO), lse2 and delta of the query tile (2 x 64 floats, 2 buffers).
  static constexpr size_t kSmemKV = 6 * kTile * sizeof(uint16_t) + 4 * 64 * sizeof(float);
  // grad_q: Q, dO, 2 x (K, V).
  static constexpr size_t kSmemQ = 6 * kTile * sizeof(uint16_t);
};

__device__ __forceinline__ float lse_log2(float lse) { return lse * 1.4426950408889634f; }

// A position relative to a tile's first, clamped to [0, n]: 32-bit bounds of a [begin, end)
// range (of rows or keys) inside the tile, so per-element masks compare ints.
__device__ __forceinline__ int tile_offset(int64_t x, int n) { return x < 0 ? 0 : (x > n ? n : static_cast<int>(x)); }

// Stores an m16 x D accumulator (rows row0 + 0..15 of this warp) into a (position, feature)
// slice in the 16-bit type T, times `factor`, rows at or past `n_rows` skipped.
template <typename T, int kDimTiles>
__device__ __forceinline__ void store_acc(uint16_t* slice, int64_t row_stride, int64_t row0, int64_t n_rows,
                                          const float (&acc)[kDimTiles][4], float factor, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + mma_layout::acc_element(lane, 2 * r).row;
    if (row >= n_rows) continue;
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(slice + row * row_stride + dt * 8 + mma_layout::acc_element(lane, 2 * r).col) =
          pack2<T>(acc[dt][2 * r] * factor, acc[dt][2 * r + 1] * factor);
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BackwardTiles<kHeadDim>::kThreads)
    attention_grad_kv_mma_kernel(const MmaBackwardParams bp) {
  using TL = BackwardTiles<kHeadDim>;
  constexpr int kBlockM = TL::kBlockM, kBlockN = TL::kBlockN, kStride = TL::kStride;
  constexpr int kDimTiles = kHeadDim / 8, kQueryTiles = kBlockM / 8;
  FAE_DYNAMIC_SMEM(uint16_t, smem);
  uint16_t* const sK = smem;
  uint16_t* const sV = sK + TL::kTile;
  uint16_t* const sQ0 = sV + TL::kTile;                                 // 2 buffers
  uint16_t* const sdO0 = sQ0 + 2 * TL::kTile;                           // 2 buffers
  float* const sRow0 = reinterpret_cast<float*>(sdO0 + 2 * TL::kTile);  // 2 x (lse2[64], delta[64])

  const AttentionParams& p = bp.p;
  const int64_t n_ntiles = (p.len_k + kBlockN - 1) / kBlockN;
  const int64_t blk = blockIdx.x;
  const int64_t nt = blk % n_ntiles, hk = blk / n_ntiles % p.heads_kv, b = blk / n_ntiles / p.heads_kv;
  const int64_t n0 = nt * kBlockN;
  const int64_t n_keys = p.len_k - n0 < kBlockN ? p.len_k - n0 : kBlockN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const mma_layout::RowCol la = mma_layout::ldsm_a(lane), lnk = mma_layout::ldsm_b_from_nk(lane);
  const mma_layout::RowCol lkn = mma_layout::ldsm_b_from_kn_trans(lane);

  const uint16_t* k = bp.k.head(b, hk);
  const uint16_t* v = bp.v.head(b, hk);
  load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sK, k, bp.k.stride_l, n0, n_keys, tid);
  load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sV, v, bp.v.stride_l, n0, n_keys, tid);

  // The (query head, query tile) steps: every head of the group over the key tile's row band.
  const RowRange band = visible_row_range(n0, n0 + n_keys, p.align_offset, p.window_left, p.window_right, p.len_q);
  const int64_t m_begin = band.begin / kBlockM * kBlockM;
  const int64_t tiles_per_head = band.end > band.begin ? (band.end - m_begin + kBlockM - 1) / kBlockM : 0;
  const int64_t G = p.group_size();
  const int64_t n_steps = tiles_per_head * G;

  // Loads step s's Q, dO tiles and its rows' lse2 / delta into buffer `buf`.
  const auto load_step = [&](int64_t s, int buf) {
    const int64_t h = hk * G + s / tiles_per_head, m0 = m_begin + (s % tiles_per_head) * kBlockM;
    const int64_t rows = p.len_q - m0;
    load_tile<kBlockM, kHeadDim, kStride, TL::kThreads>(sQ0 + buf * TL::kTile, bp.q.head(b, h), bp.q.stride_l, m0, rows,
                                                        tid);
    load_tile<kBlockM, kHeadDim, kStride, TL::kThreads>(sdO0 + buf * TL::kTile, bp.grad_out.head(b, h),
                                                        bp.grad_out.stride_l, m0, rows, tid);
    float* row_data = sRow0 + buf * 2 * kBlockM;
    for (int r = tid; r < kBlockM; r += TL::kThreads) {  // plain loads: the next barrier orders them
      const int64_t i = m0 + r, at = (b * p.heads_q + h) * p.len_q + i;
      row_data[r] = i < p.len_q ? lse_log2(bp.lse[at]) : -INFINITY;
      row_data[kBlockM + r] = i < p.len_q ? bp.delta[at] : 0.f;
    }
  };
  if (n_steps > 0) load_step(0, 0);
  cp_async_commit();

  float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDimTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  const int64_t key[2] = {n0 + warp * 16 + mma_layout::acc_element(lane, 0).row,
                          n0 + warp * 16 + mma_layout::acc_element(lane, 2).row};
  // The rows that see each of this lane's two keys (none for a key past len_k), so that per
  // step a pair's mask is two 32-bit compares against the tile's first row, not the 64-bit
  // window test per element.
  RowRange sees[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    sees[r] = key[r] < p.len_k
                  ? visible_row_range(key[r], key[r] + 1, p.align_offset, p.window_left, p.window_right, p.len_q)
                  : RowRange{0, 0};

  for (int64_t s = 0; s < n_steps; ++s) {
    const int cur = static_cast<int>(s & 1);
    const int64_t m0 = m_begin + (s % tiles_per_head) * kBlockM;
    cp_async_wait_all();
    __syncthreads();  // step s landed; every warp is done with the other buffer
    if (s + 1 < n_steps) load_step(s + 1, cur ^ 1);
    cp_async_commit();
    const uint16_t* sQ = sQ0 + cur * TL::kTile;
    const uint16_t* sdO = sdO0 + cur * TL::kTile;
    const float* lse2 = sRow0 + cur * 2 * kBlockM;
    const float* delta = lse2 + kBlockM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
    float st[kQueryTiles][4], dpt[kQueryTiles][4];
#pragma unroll
    for (int qt = 0; qt < kQueryTiles; ++qt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[qt][e] = dpt[qt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t ak[4], av[4];
      ldmatrix_x4(ak, smem_u32(sK + (warp * 16 + la.row) * kStride + ks * 16 + la.col));
      ldmatrix_x4(av, smem_u32(sV + (warp * 16 + la.row) * kStride + ks * 16 + la.col));
#pragma unroll
      for (int np = 0; np < kBlockM / 16; ++np) {
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, smem_u32(sQ + (np * 16 + lnk.row) * kStride + ks * 16 + lnk.col));
        ldmatrix_x4(bo, smem_u32(sdO + (np * 16 + lnk.row) * kStride + ks * 16 + lnk.col));
        mma_16816<T>(st[2 * np], ak, bq[0], bq[1]);
        mma_16816<T>(st[2 * np + 1], ak, bq[2], bq[3]);
        mma_16816<T>(dpt[2 * np], av, bo[0], bo[1]);
        mma_16816<T>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P^T and dS^T in place of S^T and dP^T; invisible pairs (window, sequence ends, rows
    // that saw nothing) get 0.
    int lo[2], hi[2];  // rows [lo, hi) of this tile see key[r]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lo[r] = tile_offset(sees[r].begin - m0, kBlockM);
      hi[r] = tile_offset(sees[r].end - m0, kBlockM);
    }
#pragma unroll
    for (int qt = 0; qt < kQueryTiles; ++qt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = qt * 8 + mma_layout::acc_element(lane, e).col;  // query within the tile
        const float l2 = lse2[c];
        const bool visible = c >= lo[e >> 1] && c < hi[e >> 1] && l2 != -INFINITY;
        const float prob = visible ? exp2_fast(fmaf(st[qt][e], bp.scale_log2, -l2)) : 0.f;
        st[qt][e] = prob;
        dpt[qt][e] = visible ? prob * (dpt[qt][e] - delta[c]) : 0.f;  // 0 even for a NaN dP or delta
      }
    }

    // dV += P^T dO and dK += dS^T Q (scale applied at the end), over the tile's 64 queries.
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      acc_to_a<T>(ap, st[2 * kk], st[2 * kk + 1]);
      acc_to_a<T>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, smem_u32(sdO + (kk * 16 + lkn.row) * kStride + dp * 16 + lkn.col));
        ldmatrix_x4_trans(bq, smem_u32(sQ + (kk * 16 + lkn.row) * kStride + dp * 16 + lkn.col));
        mma_16816<T>(dv[2 * dp], ap, bo[0], bo[1]);
        mma_16816<T>(dv[2 * dp + 1], ap, bo[2], bo[3]);
        mma_16816<T>(dk[2 * dp], ads, bq[0], bq[1]);
        mma_16816<T>(dk[2 * dp + 1], ads, bq[2], bq[3]);
      }
    }
  }
  cp_async_wait_all();

  const float scale = bp.scale_log2 * 0.69314718055994531f;  // back to the softmax scale
  store_acc<T, kDimTiles>(bp.grad_k.head(b, hk), bp.grad_k.stride_l, n0 + warp * 16, p.len_k, dk, scale, lane);
  store_acc<T, kDimTiles>(bp.grad_v.head(b, hk), bp.grad_v.stride_l, n0 + warp * 16, p.len_k, dv, 1.f, lane);
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BackwardTiles<kHeadDim>::kThreads)
    attention_grad_q_mma_kernel(const MmaBackwardParams bp) {
  using TL = BackwardTiles<kHeadDim>;
  constexpr int kBlockM = TL::kBlockM, kBlockN = TL::kBlockN, kStride = TL::kStride;
  constexpr int kDimTiles = kHeadDim / 8, kKeyTiles = kBlockN / 8;
  FAE_DYNAMIC_SMEM(uint16_t, smem);
  uint16_t* const sQ = smem;
  uint16_t* const sdO = sQ + TL::kTile;
  uint16_t* const sK0 = sdO + TL::kTile;  // 2 buffers
  uint16_t* const sV0 = sK0 + 2 * TL::kTile;

  const AttentionParams& p = bp.p;
  const int64_t n_mtiles = (p.len_q + kBlockM - 1) / kBlockM;
  const int64_t blk = blockIdx.x;
  const int64_t mt = blk % n_mtiles, h = blk / n_mtiles % p.heads_q, b = blk / n_mtiles / p.heads_q;
  const int64_t hk = p.kv_head(h);
  const int64_t m0 = mt * kBlockM;
  const int64_t q_rows = p.len_q - m0 < kBlockM ? p.len_q - m0 : kBlockM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const mma_layout::RowCol la = mma_layout::ldsm_a(lane), lnk = mma_layout::ldsm_b_from_nk(lane);
  const mma_layout::RowCol lkn = mma_layout::ldsm_b_from_kn_trans(lane);

  load_tile<kBlockM, kHeadDim, kStride, TL::kThreads>(sQ, bp.q.head(b, h), bp.q.stride_l, m0, q_rows, tid);
  load_tile<kBlockM, kHeadDim, kStride, TL::kThreads>(sdO, bp.grad_out.head(b, h), bp.grad_out.stride_l, m0, q_rows,
                                                      tid);
  const uint16_t* k = bp.k.head(b, hk);
  const uint16_t* v = bp.v.head(b, hk);
  const KeyRange band = visible_key_range(m0, m0 + q_rows, p.align_offset, p.window_left, p.window_right, p.len_k);
  const int64_t n_begin = band.begin / kBlockN * kBlockN;
  const int64_t n_tiles = band.end > band.begin ? (band.end - n_begin + kBlockN - 1) / kBlockN : 0;
  if (n_tiles > 0) {
    load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sK0, k, bp.k.stride_l, n_begin, p.len_k - n_begin, tid);
    load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sV0, v, bp.v.stride_l, n_begin, p.len_k - n_begin, tid);
  }
  cp_async_commit();

  // This lane's two rows: lse2 and delta in registers.
  int64_t row[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = m0 + warp * 16 + mma_layout::acc_element(lane, 2 * r).row;
    const int64_t at = (b * p.heads_q + h) * p.len_q + row[r];
    lse2[r] = row[r] < p.len_q ? lse_log2(bp.lse[at]) : -INFINITY;
    delta[r] = row[r] < p.len_q ? bp.delta[at] : 0.f;
  }
  // The keys each of this lane's two rows sees, for 32-bit masks per tile (as in grad_kv).
  KeyRange seen[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    seen[r] = {first_visible_key(row[r], p.align_offset, p.window_left, p.len_k),
               end_visible_key(row[r], p.align_offset, p.window_right, p.len_k)};
  float dq[kDimTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDimTiles; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  for (int64_t it = 0; it < n_tiles; ++it) {
    const int cur = static_cast<int>(it & 1);
    const int64_t n0 = n_begin + it * kBlockN;
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < n_tiles) {
      const int64_t n1 = n0 + kBlockN;
      load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sK0 + (cur ^ 1) * TL::kTile, k, bp.k.stride_l, n1,
                                                          p.len_k - n1, tid);
      load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sV0 + (cur ^ 1) * TL::kTile, v, bp.v.stride_l, n1,
                                                          p.len_k - n1, tid);
    }
    cp_async_commit();
    const uint16_t* sK = sK0 + cur * TL::kTile;
    const uint16_t* sV = sV0 + cur * TL::kTile;

    // S = Q K^T and dP = dO V^T for this warp's 16 rows.
    float s[kKeyTiles][4], dp[kKeyTiles][4];
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[t][e] = dp[t][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t aq[4], ao[4];
      ldmatrix_x4(aq, smem_u32(sQ + (warp * 16 + la.row) * kStride + ks * 16 + la.col));
      ldmatrix_x4(ao, smem_u32(sdO + (warp * 16 + la.row) * kStride + ks * 16 + la.col));
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, smem_u32(sK + (np * 16 + lnk.row) * kStride + ks * 16 + lnk.col));
        ldmatrix_x4(bv, smem_u32(sV + (np * 16 + lnk.row) * kStride + ks * 16 + lnk.col));
        mma_16816<T>(s[2 * np], aq, bk[0], bk[1]);
        mma_16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
        mma_16816<T>(dp[2 * np], ao, bv[0], bv[1]);
        mma_16816<T>(dp[2 * np + 1], ao, bv[2], bv[3]);
      }
    }
    // dS = P o (dP - delta), P rebuilt from lse; invisible pairs give 0.
    int lo[2], hi[2];  // keys [lo, hi) of this tile are seen by row[r]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lo[r] = tile_offset(seen[r].begin - n0, kBlockN);
      hi[r] = tile_offset(seen[r].end - n0, kBlockN);
    }
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int c = t * 8 + mma_layout::acc_element(lane, e).col;  // key within the tile
        const bool visible = c >= lo[r] && c < hi[r] && lse2[r] != -INFINITY;
        const float prob = visible ? exp2_fast(fmaf(s[t][e], bp.scale_log2, -lse2[r])) : 0.f;
        s[t][e] = visible ? prob * (dp[t][e] - delta[r]) : 0.f;  // 0 even for a NaN dP or delta
      }
    }
    // dQ += dS K.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t ads[4];
      acc_to_a<T>(ads, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < kHeadDim / 16; ++dt) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, smem_u32(sK + (kk * 16 + lkn.row) * kStride + dt * 16 + lkn.col));
        mma_16816<T>(dq[2 * dt], ads, bk[0], bk[1]);
        mma_16816<T>(dq[2 * dt + 1], ads, bk[2], bk[3]);
      }
    }
  }
  cp_async_wait_all();
  store_acc<T, kDimTiles>(bp.grad_q.head(b, h), bp.grad_q.stride_l, m0 + warp * 16, p.len_q, dq,
                          bp.scale_log2 * 0.69314718055994531f, lane);
}

}  // namespace mma_detail

#ifndef FAE_SIMT_EMULATION
template <typename T, int kHeadDim>
bool launch_attention_backward_mma(const MmaBackwardParams& bp, int64_t smem_limit, cudaStream_t stream) {
  using TL = mma_detail::BackwardTiles<kHeadDim>;
  // D=128 needs ~103 KB: more than sm_86/89/120 give a block (99 KB); the safety net serves those.
  if (static_cast<int64_t>(std::max(TL::kSmemKV, TL::kSmemQ)) > smem_limit) return false;
  const auto kv_kernel = mma_detail::attention_grad_kv_mma_kernel<T, kHeadDim>;
  const auto q_kernel = mma_detail::attention_grad_q_mma_kernel<T, kHeadDim>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(TL::kSmemKV)));
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(q_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(TL::kSmemQ)));
  const int64_t kv_blocks = (bp.p.len_k + TL::kBlockN - 1) / TL::kBlockN * bp.p.heads_kv * bp.p.batch;
  if (kv_blocks > 0) {
    kv_kernel<<<static_cast<unsigned int>(kv_blocks), TL::kThreads, TL::kSmemKV, stream>>>(bp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t q_blocks = (bp.p.len_q + TL::kBlockM - 1) / TL::kBlockM * bp.p.heads_q * bp.p.batch;
  if (q_blocks > 0) {
    q_kernel<<<static_cast<unsigned int>(q_blocks), TL::kThreads, TL::kSmemQ, stream>>>(bp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}
#endif  // FAE_SIMT_EMULATION

}  // namespace flash_attn_ext::cuda
