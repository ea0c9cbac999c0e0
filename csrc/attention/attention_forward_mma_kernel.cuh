// The tensor-core forward kernel, FlashAttention-2 style. Included only by the per-head-dim
// instantiation units (attention_forward_mma_hdim*.cu).
//
// One block of 4 warps per (64-query tile, head, batch). The Q tile is copied to shared
// memory once; K/V tiles of the query tile's visible band (visible_key_range: tiles outside
// the causal/window band are never loaded) stream through two shared-memory buffers with
// cp.async, the next tile's copy overlapping the current tile's math. Each warp owns 16
// query rows: S = Q K^T and O += P V run on mma.sync m16n8k16 (float32 accumulation), with
// fragments loaded by ldmatrix (.trans for V; Q's kept in registers where they fit); the online
// softmax (base 2, running max and sum per row, one FFMA + ex2 per score) stays in registers,
// the P fragments of S feeding the PV product directly. The key tiles that every row of the
// block sees whole run as a loop phase without mask code; the band's edge tiles mask with
// 32-bit column compares. O leaves through shared memory in 16-byte row pieces.
// Shared-memory rows are padded by 16 bytes so ldmatrix's eight row reads hit distinct banks.
//
// With FAE_SIMT_EMULATION defined, the warp-level primitives (../cuda/mma_primitives.cuh)
// come from the host emulator named by that macro, and the unchanged kernel body runs on the
// CPU, one std::thread per CUDA thread (tests/native/cpp/test_mma_kernels_emulated.cpp).
#pragma once

#include <cmath>
#include <cstdint>

#include "../cuda/mma_layout.h"
#include "../cuda/mma_primitives.cuh"
#include "attention_forward_mma_params.h"

#ifndef FAE_SIMT_EMULATION
#include "attention_forward_mma.h"
#endif

namespace flash_attn_ext::cuda {
namespace mma_detail {

template <int kHeadDim>
struct Tiles {
  static constexpr int kBlockM = 64;                         // query rows per block
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;  // keys per tile
  static constexpr int kThreads = 128;                       // 4 warps x 16 rows
  static constexpr int kStride = kHeadDim + 8;               // padded row, in elements
  static constexpr int kSmemQ = kBlockM * kStride;
  static constexpr int kSmemKV = kBlockN * kStride;
  static constexpr size_t kSmemBytes = (kSmemQ + 4 * kSmemKV) * sizeof(uint16_t);
  // Blocks per SM asked of the register allocator (__launch_bounds__' second argument). Shared
  // memory on sm_90 (228 KB) allows 8 / 4 / 3 / 2 / 3 / 2 blocks at D = 32 / 64 / 96 / 128 /
  // 192 / 256. D <= 64 are held to 4 (128 registers; unbounded, D = 64 takes 168, 3 blocks).
  // D = 96 and 192 would need 168 registers for 3 and spill inside the key loop at that
  // budget, so they run 2 blocks (8 warps per SM, as D = 128 does).
  static constexpr int kMinBlocks = kHeadDim <= 64 ? 4 : 2;
  // The warp's Q fragments stay in registers across the key loop (D / 4 per lane) instead of
  // being re-read from shared memory for every key tile, where the registers are free: at
  // D = 32 and at D = 128 (where shared memory, not registers, holds it to 2 blocks). At D = 64
  // they would spill under the 128-register budget; at D = 96 (237 registers without them) and
  // D >= 192 (the O accumulators alone are 96-128 registers) there is no room.
  static constexpr bool kQInRegisters = kHeadDim == 32 || kHeadDim == 128;
};

// Tag types of the two loop phases: key tiles that every row of the block sees whole, and
// the band's edge tiles (window, causal diagonal, sequence end), masked per element.
struct InteriorTile {
  static constexpr bool kMasked = false;
};
struct EdgeTile {
  static constexpr bool kMasked = true;
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(Tiles<kHeadDim>::kThreads, Tiles<kHeadDim>::kMinBlocks)
    attention_forward_mma_kernel(const MmaParams mp) {
  using TL = Tiles<kHeadDim>;
  constexpr int kBlockM = TL::kBlockM, kBlockN = TL::kBlockN, kStride = TL::kStride;
  constexpr int kDimTiles = kHeadDim / 8;  // n8 tiles of the output row
  constexpr int kKeyTiles = kBlockN / 8;   // n8 tiles of the score row
  constexpr int kSteps = kHeadDim / 16;    // k16 steps of Q K^T
  FAE_DYNAMIC_SMEM(uint16_t, smem);
  uint16_t* const sQ = smem;
  uint16_t* const sK0 = smem + TL::kSmemQ;
  uint16_t* const sV0 = sK0 + 2 * TL::kSmemKV;

  const AttentionParams& p = mp.p;
  const int64_t n_mtiles = (p.len_q + kBlockM - 1) / kBlockM;
  const int64_t blk = blockIdx.x;
  const int64_t mt = blk % n_mtiles, h = blk / n_mtiles % p.heads_q, b = blk / n_mtiles / p.heads_q;
  const int64_t hk = p.kv_head(h);
  const int64_t m0 = mt * kBlockM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const uint16_t* q = mp.q.head(b, h);
  const uint16_t* k = mp.k.head(b, hk);
  const uint16_t* v = mp.v.head(b, hk);
  const int64_t q_rows = p.len_q - m0 < kBlockM ? p.len_q - m0 : kBlockM;

  // Q in its own commit group, so its fragments can be read while the first K/V tile lands.
  load_tile<kBlockM, kHeadDim, kStride, TL::kThreads>(sQ, q, mp.q.stride_l, m0, q_rows, tid);
  cp_async_commit();
  const KeyRange band = visible_key_range(m0, m0 + q_rows, p.align_offset, p.window_left, p.window_right, p.len_k);
  const int64_t n_begin = band.begin / kBlockN * kBlockN;
  const int64_t n_tiles = band.end > band.begin ? (band.end - n_begin + kBlockN - 1) / kBlockN : 0;
  if (n_tiles > 0) {
    load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sK0, k, mp.k.stride_l, n_begin, p.len_k - n_begin, tid);
    load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sV0, v, mp.v.stride_l, n_begin, p.len_k - n_begin, tid);
  }
  cp_async_commit();
  // Tiles [full_begin, full_end) lie inside the keys every row of the block sees (phantom rows
  // past len_q included, which only narrows it), and inside the sequence.
  const KeyRange common =
      common_visible_key_range(m0, m0 + kBlockM, p.align_offset, p.window_left, p.window_right, p.len_k);
  int64_t full_begin = 0, full_end = 0;
  if (common.end - common.begin >= kBlockN) {
    full_begin = (common.begin - n_begin + kBlockN - 1) / kBlockN;  // common.begin >= band.begin >= n_begin
    full_end = (common.end - n_begin) / kBlockN;
  }

  const mma_layout::RowCol lq = mma_layout::ldsm_a(lane), lk = mma_layout::ldsm_b_from_nk(lane);
  const mma_layout::RowCol lv = mma_layout::ldsm_b_from_kn_trans(lane);
  // The warp's Q fragments (kQInRegisters), read once the Q group has landed.
  uint32_t qf[TL::kQInRegisters ? kSteps : 1][4];
  cp_async_wait_one();
  __syncthreads();
  if constexpr (TL::kQInRegisters) {
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks)
      ldmatrix_x4(qf[ks], smem_u32(sQ + (warp * 16 + lq.row) * kStride + ks * 16 + lq.col));
  }

  float o[kDimTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDimTiles; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  // Running max per row in raw score units (scale > 0, mma_ineligible: the max commutes with
  // the scale, so exponents are one FFMA, s * scale_log2 - max * scale_log2), and this lane's
  // partial row sums; rows g and g + 8 of the warp's 16.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int64_t row[2] = {m0 + warp * 16 + mma_layout::acc_element(lane, 0).row,
                          m0 + warp * 16 + mma_layout::acc_element(lane, 2).row};

  const auto step = [&](auto phase, int64_t it) {
    constexpr bool kMasked = decltype(phase)::kMasked;
    const int cur = static_cast<int>(it & 1);
    const int64_t n0 = n_begin + it * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed, and every warp is done with the other buffer
    if (it + 1 < n_tiles) {
      const int64_t n1 = n0 + kBlockN;
      load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sK0 + (cur ^ 1) * TL::kSmemKV, k, mp.k.stride_l, n1,
                                                          p.len_k - n1, tid);
      load_tile<kBlockN, kHeadDim, kStride, TL::kThreads>(sV0 + (cur ^ 1) * TL::kSmemKV, v, mp.v.stride_l, n1,
                                                          p.len_k - n1, tid);
    }
    cp_async_commit();
    const uint16_t* sK = sK0 + cur * TL::kSmemKV;
    const uint16_t* sV = sV0 + cur * TL::kSmemKV;

    // S = Q K^T for this warp's 16 rows, in raw units.
    float s[kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t a[4];
      if constexpr (TL::kQInRegisters) {
        a[0] = qf[ks][0], a[1] = qf[ks][1], a[2] = qf[ks][2], a[3] = qf[ks][3];
      } else {
        ldmatrix_x4(a, smem_u32(sQ + (warp * 16 + lq.row) * kStride + ks * 16 + lq.col));
      }
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t bf[4];
        ldmatrix_x4(bf, smem_u32(sK + (np * 16 + lk.row) * kStride + ks * 16 + lk.col));
        mma_16816<T>(s[2 * np], a, bf[0], bf[1]);
        mma_16816<T>(s[2 * np + 1], a, bf[2], bf[3]);
      }
    }

    // Edge tiles: hide what the window or the sequence end hides.
    if constexpr (kMasked) {
      // Each row's visible keys (the shared semantics, in 64 bits, once per edge tile) as this
      // tile's columns [lo, hi) within [0, kBlockN]; the elements compare 32-bit columns.
      int lo[2], hi[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t f = first_visible_key(row[r], p.align_offset, p.window_left, p.len_k) - n0;
        const int64_t e = end_visible_key(row[r], p.align_offset, p.window_right, p.len_k) - n0;
        lo[r] = static_cast<int>(f < 0 ? 0 : (f > kBlockN ? kBlockN : f));
        hi[r] = static_cast<int>(e < 0 ? 0 : (e > kBlockN ? kBlockN : e));
      }
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = nt * 8 + mma_layout::acc_element(lane, e).col;
          if (j < lo[e >> 1] || j >= hi[e >> 1]) s[nt][e] = -INFINITY;
        }
      }
    }

    // Online softmax: new running max per row (over the row's 4 threads), rescale, exponentiate.
    float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
      m_new[0] = fmaxf(m_new[0], fmaxf(s[nt][0], s[nt][1]));
      m_new[1] = fmaxf(m_new[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float alpha[2], base[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 1));
      m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 2));
      base[r] = m_new[r] == -INFINITY ? 0.f : m_new[r] * mp.scale_log2;  // a row with nothing visible yet
      alpha[r] = exp2_fast(fmaf(m_run[r], mp.scale_log2, -base[r]));     // 0 when m_run is -inf
      m_run[r] = m_new[r];
    }
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = exp2_fast(fmaf(s[nt][e], mp.scale_log2, -base[e >> 1]));
      sum[0] += s[nt][0] + s[nt][1];
      sum[1] += s[nt][2] + s[nt][3];
    }
    // Each thread keeps a partial row sum (its columns); alpha is the same across the row's
    // threads, so the partial sums are reduced once, at the end.
    l_run[0] = l_run[0] * alpha[0] + sum[0];
    l_run[1] = l_run[1] * alpha[1] + sum[1];
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P V: the S accumulators of two adjacent n8 tiles are the A fragment of one k16 step.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, smem_u32(sV + (kk * 16 + lv.row) * kStride + dp * 16 + lv.col));
        mma_16816<T>(o[2 * dp], a, bf[0], bf[1]);
        mma_16816<T>(o[2 * dp + 1], a, bf[2], bf[3]);
      }
    }
  };

  // The interior phase is a loop of its own, without mask code (FA2's masking steps apart
  // from the rest); the band's edges run the masked copy of the step.
  for (int64_t it = 0; it < n_tiles;) {
    if (it == full_begin && full_begin < full_end) {
      do step(InteriorTile{}, it);
      while (++it < full_end);
    } else {
      step(EdgeTile{}, it);
      ++it;
    }
  }
  cp_async_wait_all();  // nothing left in flight at exit (e.g. the K/V group of an empty band)

  // Epilogue: O / l in the input dtype, staged through the warp's own 16 rows of the Q tile
  // (which no other warp reads, and which this warp is done with) so that the global stores
  // are whole 16-byte row pieces; lse = ln(2) (m * scale_log2 + log2 l). Rows with nothing
  // visible get zeros and -inf.
  uint16_t* const sO = sQ + warp * 16 * kStride;
  __syncwarp();  // every lane's last Q fragment read (D >= 192 reads Q from sO's rows) is done
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int srow = mma_layout::acc_element(lane, 2 * r).row;
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(sO + srow * kStride + dt * 8 + mma_layout::acc_element(lane, 2 * r).col) =
          pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (lane % 4 == 0 && row[r] < p.len_q) {  // one writer per row
      const float lse =
          l != l ? l : (l > 0.f ? (m_run[r] * mp.scale_log2 + log2f(l)) * 0.69314718055994531f : -INFINITY);
      mp.lse[(b * p.heads_q + h) * p.len_q + row[r]] = lse;
    }
  }
  __syncwarp();  // the warp's rows are staged
  uint16_t* out = mp.out.head(b, h);
  constexpr int kChunks = kHeadDim / 8;  // 16-byte pieces per row
#pragma unroll
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int64_t grow = m0 + warp * 16 + r;
    if (grow < p.len_q) copy_16(out + grow * mp.out.stride_l + col, sO + r * kStride + col);
  }
}

}  // namespace mma_detail

#ifndef FAE_SIMT_EMULATION
template <typename T, int kHeadDim>
bool launch_attention_forward_mma(const MmaParams& mp, int64_t smem_limit, cudaStream_t stream) {
  using TL = mma_detail::Tiles<kHeadDim>;
  if (static_cast<int64_t>(TL::kSmemBytes) > smem_limit) return false;  // e.g. D=256 beyond 99 KB parts
  const auto kernel = mma_detail::attention_forward_mma_kernel<T, kHeadDim>;
  if (TL::kSmemBytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(TL::kSmemBytes)));
  }
  const int64_t blocks = (mp.p.len_q + TL::kBlockM - 1) / TL::kBlockM * mp.p.heads_q * mp.p.batch;
  kernel<<<static_cast<unsigned int>(blocks), TL::kThreads, TL::kSmemBytes, stream>>>(mp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}
#endif  // FAE_SIMT_EMULATION

}  // namespace flash_attn_ext::cuda
