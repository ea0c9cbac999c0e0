// CPU kernel of flash_attn_ext::attention_backward: FlashAttention-2's backward on the CPU.
//
// delta = rowsum(dO * O) first; then one task per (batch, kv head) (or per share of its key
// tiles, when there are few) walks its key tiles; for each key tile it recomputes
// P = exp(S - lse) for the query tiles of every query head of the group that can see the tile
// (visible_row_range), and accumulates
//   dV += P_dropped^T dO,  dS = P * (dP - delta) with dP = dO V^T,  dK += dS^T Q,  dQ += dS K.
// dK/dV of a key tile are summed over the group's query heads (no repeated K/V) and written
// once; dQ goes to an accumulator owned by the task's split. No two threads write the same
// memory: no atomics, and the result is bitwise repeatable for a fixed thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu/tile_backend.h"
#include "../cpu/tile_math.h"
#include "../cpu/tile_math_bf16.h"
#include "attention_cpu_tiles.h"
#include "attention_forward_cpu.h"
#include "attention_host.h"

namespace flash_attn_ext::cpu {
namespace {

// Key tiles seen by at most this many query rows take the row-dot-product products (below).
constexpr int64_t kFewRows = 8;

// bf16 of a float tile, transposed: (cols x rows_pad) from rows x cols; scratch holds the
// rounded rows first.
inline void floats_to_bf16_transposed(const float* src, int64_t lds, int64_t rows, int64_t cols, int64_t rows_pad,
                                      uint16_t* dst, int64_t ldd, uint16_t* scratch) {
  floats_to_bf16(src, lds, rows, cols, cols, scratch, cols);
  transpose_tile_u16(scratch, cols, rows, cols, rows_pad, dst, ldd);
}

template <typename scalar_t>
void backward_kernel(const AttentionParams& p, const MaskView& mask, const at::Tensor& dout, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = p.len_q, S = p.len_k, Dk = p.dim_qk, Dv = p.dim_v, G = p.group_size();
  // Packed sequences (varlen): rows at their offsets, loops bounded by each sequence's lengths
  // (for_batch); L and S are then the longest sequence's.
  const auto do_rows = q_rows_of<const scalar_t>(dout, p);
  const auto q_rows = q_rows_of<const scalar_t>(q, p);
  const auto k_rows = kv_rows_of<const scalar_t>(k, p);
  const auto v_rows = kv_rows_of<const scalar_t>(v, p);
  const auto o_rows = q_rows_of<const scalar_t>(out, p);
  const auto dq_rows = q_rows_of<scalar_t>(dq, p);
  const auto dk_rows = kv_rows_of<scalar_t>(dk, p);
  const auto dv_rows = kv_rows_of<scalar_t>(dv, p);
  const acc_t* lse_data = lse.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(p.scale), cap = static_cast<acc_t>(p.softcap);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = dropout ? acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p)) : acc_t(1);
  const auto acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  // delta[row_index(b, h, i)] = sum_d dO[i, d] * O[i, d]  (= rowsum(P * dP), the softmax
  // Jacobian term), laid out as the lse.
  at::Tensor delta = at::empty(lse.sizes(), acc_options);
  acc_t* delta_data = delta.data_ptr<acc_t>();
  at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const int64_t len_q = p.for_batch(b).len_q;
      if constexpr (std::is_same_v<scalar_t, float>) {  // vectorised for this CPU
        row_dots(do_rows.row(b, h, 0), do_rows.stride_l, o_rows.row(b, h, 0), o_rows.stride_l, len_q, Dv,
                 delta_data + p.row_index(b, h, 0));
        continue;
      }
      for (int64_t i = 0; i < len_q; ++i) {
        const scalar_t* g = do_rows.row(b, h, i);
        const scalar_t* o = o_rows.row(b, h, i);
        acc_t sum = 0;
        for (int64_t d = 0; d < Dv; ++d) sum += static_cast<acc_t>(g[d]) * static_cast<acc_t>(o[d]);
        delta_data[p.row_index(b, h, i)] = sum;
      }
    }
  });

  // Work units are (batch, kv head). With fewer units than 2x the threads (small batch, MQA),
  // each unit's key tiles are dealt round-robin to n_splits tasks (round-robin balances the
  // causal band), each with its own dQ accumulator, summed in a fixed order afterwards: still
  // no atomics, and bitwise repeatable for a given thread count.
  const int64_t units = p.batch * p.heads_kv;
  const int64_t n_kblocks = (S + kBlockK - 1) / kBlockK;
  const int64_t want_tasks = 2 * static_cast<int64_t>(at::get_num_threads());
  // Each extra split costs a float dQ copy: at most ~512 MiB of them in all.
  const int64_t split_bytes = p.batch * p.heads_q * L * Dk * static_cast<int64_t>(sizeof(acc_t));
  const int64_t max_splits = std::max<int64_t>(1, (int64_t{512} << 20) / std::max<int64_t>(1, split_bytes));
  const int64_t n_splits =
      units >= want_tasks ? 1
                          : std::max<int64_t>(1, std::min({n_kblocks, (want_tasks + units - 1) / units, max_splits}));
  // dQ accumulates over key tiles in the accumulation type, then is narrowed once.
  at::Tensor dq_acc = at::zeros({n_splits, p.batch * p.heads_q, L, Dk}, acc_options);
  const int64_t split_stride = p.batch * p.heads_q * L * Dk;

  // The tile products' back end (tile_backend.h). bf16 on avx512_bf16 or brgemm: the five
  // products on bf16 operands with P and dS rounded to bf16, as flash-attn's GPU backward does;
  // the softmax algebra stays float. Otherwise float tiles (bf16/fp16 widened).
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  const TileBackend tiles = choose_tiles(q.scalar_type(), p.config.cpu_tiles).backend;
  const bool use_bf16 = kBf16 && tiles != TileBackend::kFloat;
  // dV and dQ (and dK on the bf16 tiles; the float tiles pre-scale Q) accumulate unscaled: the
  // softmax scale and the dropout's 1 / (1 - p) are applied once, when the sums are narrowed.
  // brgemm has no alpha, and an alpha on an accumulating product costs it a pass through
  // scratch (measured: the brgemm backward 13-19% slower than vdpbf16ps before, NOTES.md #27).
  const acc_t dk_factor = use_bf16 ? scale : acc_t(1), dv_factor = keep_scale, dq_factor = scale;
  const int64_t Dk2 = Dk + Dk % 2, Dv2 = Dv + Dv % 2;  // pairs: odd dims get a zero

  // GQA loop order. One pass over the key tiles for all G query heads packs each K/V tile once,
  // but each key tile then sweeps G heads' Q, dO and dQ, a working set G times MHA's that falls
  // out of the L2 cache. Past kGroupSweepBytes, one pass per query head (the K/V tiles packed G
  // times, as MHA does) with dK/dV summed in a float (S x D) buffer per task.
  constexpr int64_t kGroupSweepBytes = int64_t{1} << 20;
  const int64_t sweep_bytes = G * L * (2 * Dk + Dv) * static_cast<int64_t>(sizeof(acc_t));
  // cpu_bwd_head_passes = require / off forces either (the tests run both).
  const PathMode forced = p.config.cpu_bwd_head_passes;
  const bool head_passes =
      G > 1 && (forced == PathMode::kAuto ? sweep_bytes > kGroupSweepBytes : forced == PathMode::kRequire);
  const int64_t heads_per_pass = head_passes ? 1 : G;
  // Head passes keep every packed K/V tile of the unit (one slot per key tile) for the group's
  // later heads, so GQA packs K/V once per group, not once per query head; up to 8 MiB per thread.
  const int64_t tile_bytes = use_bf16 ? (Dk2 / 2 * kBlockK + Dv2 / 2 * kBlockK + kBlockK / 2 * Dk) * 4
                                      : (2 * kBlockK * Dk + Dv * kBlockK) * static_cast<int64_t>(sizeof(acc_t));
  const bool keep_kv_tiles = head_passes && n_kblocks * tile_bytes <= (int64_t{8} << 20);
  const int64_t kv_slots = keep_kv_tiles ? n_kblocks : 1;

  at::parallel_for(0, units * n_splits, 1, [&](int64_t begin, int64_t end) {
    const int64_t nf = use_bf16 ? 0 : kv_slots;
    std::vector<acc_t> k_tiles(nf * kBlockK * Dk), kt_tiles(nf * Dk * kBlockK), vt_tiles(nf * Dv * kBlockK);
    // bf16 operands: A tiles as bf16 rows, B tiles packed by pairs of their K dimension.
    const int64_t nb = use_bf16 ? 1 : 0;
    const int64_t nbs = nb * kv_slots;
    std::vector<uint32_t> kt_bfs(nbs * Dk2 / 2 * kBlockK), vt_bfs(nbs * Dv2 / 2 * kBlockK);
    std::vector<uint32_t> k_pairss(nbs * kBlockK / 2 * Dk);
    std::vector<uint32_t> q_pairs(nb * kBlockQ / 2 * Dk), do_pairs(nb * kBlockQ / 2 * Dv);
    std::vector<uint16_t> q_bf(nb * kBlockQ * Dk2), do_bf(nb * kBlockQ * Dv2);
    std::vector<uint16_t> pt_bf(nb * kBlockK * kBlockQ), ds_bf(nb * kBlockQ * kBlockK), scratch(nb * kBlockQ * kBlockK);
    std::vector<const uint16_t*> row_ptrs(nb * std::max(kBlockK, kBlockQ));
    std::vector<acc_t> dk_acc(kBlockK * Dk), dv_acc(kBlockK * Dv);
    std::vector<acc_t> dk_unit(head_passes ? S * Dk : 0), dv_unit(head_passes ? S * Dv : 0);
    std::vector<acc_t> q_tile(kBlockQ * Dk), do_tile(kBlockQ * Dv);
    std::vector<acc_t> p_tile(kBlockQ * kBlockK), dp_tile(kBlockQ * kBlockK);
    std::vector<acc_t> pd_tile(dropout ? kBlockQ * kBlockK : 0);
    std::vector<acc_t> slope_tile(p.softcap > 0.0 ? kBlockQ * kBlockK : 0);
    std::vector<uint8_t> keep(dropout ? kBlockQ * kBlockK : 0);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t unit = task / n_splits, split = task % n_splits;
      const int64_t b = unit / p.heads_kv, hk = unit % p.heads_kv;
      const AttentionParams pb = p.for_batch(b);
      acc_t* dq_acc_data = dq_acc.data_ptr<acc_t>() + split * split_stride;
      if (head_passes) {
        std::fill(dk_unit.begin(), dk_unit.end(), acc_t(0));
        std::fill(dv_unit.begin(), dv_unit.end(), acc_t(0));
      }
      for (int64_t h0 = hk * G; h0 < (hk + 1) * G; h0 += heads_per_pass) {
        for (int64_t j0 = split * kBlockK; j0 < pb.len_k; j0 += n_splits * kBlockK) {
          const int64_t cols = std::min(kBlockK, pb.len_k - j0);
          const RowRange band =
              visible_row_range(j0, j0 + cols, pb.align_offset, pb.window_left, pb.window_right, pb.len_q);
          acc_t* dk_t = head_passes ? dk_unit.data() + j0 * Dk : dk_acc.data();
          acc_t* dv_t = head_passes ? dv_unit.data() + j0 * Dv : dv_acc.data();
          if (!head_passes) {
            std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
            std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
          }
          const int64_t cols2 = cols + cols % 2;
          // A key tile that few query rows see (decode-like shapes, e.g. L = 1): the float path
          // takes S = Q K^T and dP = dO V^T as row dot products on K and V as stored, since
          // transposing both tiles cost more than the products (the transposes were 86% of the
          // backward's own samples at L = 1, S = 239).
          const bool few_rows = band.end - band.begin <= kFewRows;
          const int64_t slot = keep_kv_tiles ? j0 / kBlockK : 0;
          const bool pack = !keep_kv_tiles || h0 == hk * G;  // else the group's first pass packed it
          acc_t* k_tile = k_tiles.data() + slot * kBlockK * Dk;
          acc_t* kt_tile = kt_tiles.data() + slot * Dk * kBlockK;
          acc_t* vt_tile = vt_tiles.data() + slot * Dv * kBlockK;
          uint32_t* kt_bf = kt_bfs.data() + slot * (Dk2 / 2 * kBlockK);
          uint32_t* vt_bf = vt_bfs.data() + slot * (Dv2 / 2 * kBlockK);
          uint32_t* k_pairs = k_pairss.data() + slot * (kBlockK / 2 * Dk);
          if (pack && band.begin < band.end && use_bf16) {
            if constexpr (kBf16) {
              for (int64_t c = 0; c < cols; ++c) row_ptrs[c] = bf16_bits(k_rows.row(b, hk, j0 + c));
              pack_bf16_transposed(row_ptrs.data(), cols, Dk, kt_bf, kBlockK);  // S = Q K^T
              pack_bf16_row_pairs(row_ptrs.data(), cols, Dk, k_pairs, Dk);      // dQ = dS K
              for (int64_t c = 0; c < cols; ++c) row_ptrs[c] = bf16_bits(v_rows.row(b, hk, j0 + c));
              pack_bf16_transposed(row_ptrs.data(), cols, Dv, vt_bf, kBlockK);  // dP = dO V^T
            }
          } else if (pack && band.begin < band.end) {
            load_rows(k_rows.row(b, hk, j0), k_rows.stride_l, cols, Dk, acc_t(1), k_tile, Dk);
            if (few_rows) {  // V rows as stored (in vt_tile's slot): S and dP as row dot products
              load_rows(v_rows.row(b, hk, j0), v_rows.stride_l, cols, Dv, acc_t(1), vt_tile, Dv);
            } else {
              load_rows_transposed(k_rows.row(b, hk, j0), k_rows.stride_l, cols, Dk, kt_tile, kBlockK);
              load_rows_transposed(v_rows.row(b, hk, j0), v_rows.stride_l, cols, Dv, vt_tile, kBlockK);
            }
          }
          for (int64_t h = h0; h < h0 + heads_per_pass && band.begin < band.end; ++h) {
            const int64_t bh = b * p.heads_q + h;
            for (int64_t i0 = band.begin; i0 < band.end; i0 += kBlockQ) {
              const int64_t rows = std::min(kBlockQ, band.end - i0);
              const int64_t rows2 = rows + rows % 2;
              acc_t* pt = p_tile.data();
              if (use_bf16) {
                if constexpr (kBf16) {
                  copy_bf16_rows(q_rows, b, h, i0, rows, Dk, q_bf.data(), Dk2, row_ptrs.data());
                  pack_bf16_row_pairs(row_ptrs.data(), rows, Dk, q_pairs.data(), Dk);  // dK = dS^T Q
                  copy_bf16_rows(do_rows, b, h, i0, rows, Dv, do_bf.data(), Dv2, row_ptrs.data());
                  pack_bf16_row_pairs(row_ptrs.data(), rows, Dv, do_pairs.data(), Dv);  // dV = P^T dO
                  tiles_gemm_bf16(tiles, rows, cols, Dk2, static_cast<float>(scale), q_bf.data(), Dk2, kt_bf, kBlockK,
                                  pt, kBlockK, /*accumulate=*/false);
                }
              } else {
                load_rows(q_rows.row(b, h, i0), q_rows.stride_l, rows, Dk, scale, q_tile.data(), Dk);
                load_rows(do_rows.row(b, h, i0), do_rows.stride_l, rows, Dv, acc_t(1), do_tile.data(), Dv);
                // P = exp(softcap(scale * Q K^T) + mask - lse), exactly the forward's probabilities.
                if (few_rows)
                  tile_gemm_nt(rows, cols, Dk, q_tile.data(), Dk, k_tile, Dk, pt, kBlockK);
                else
                  tiles_gemm(tiles, false, rows, cols, Dk, acc_t(1), q_tile.data(), Dk, kt_tile, kBlockK, pt, kBlockK,
                             /*accumulate=*/false);
              }
              if (cap > acc_t(0)) softcap_tile(pt, kBlockK, rows, cols, cap, slope_tile.data());
              mask_tile(pt, kBlockK, rows, cols, i0, j0, b, h, pb, mask);
              for (int64_t r = 0; r < rows; ++r) {
                const acc_t l = lse_data[p.row_index(b, h, i0 + r)];
                acc_t* pr = pt + r * kBlockK;
                if (l == -std::numeric_limits<acc_t>::infinity()) {
                  std::fill(pr, pr + cols, acc_t(0));  // a row that sees nothing has zero gradient
                } else if (l != l) {                   // a NaN row (NaN in its query): NaN where it sees, 0 elsewhere
                  for (int64_t c = 0; c < cols; ++c)
                    pr[c] = pr[c] == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : l;
                } else {
                  exp_shift_sum(pr, cols, l);
                }
              }
              const acc_t* p_used = pt;  // the probabilities that multiplied V in the forward
              if (dropout) {
                dropout_keep_tile(keep.data(), kBlockK, rows, cols, i0, j0, bh, p, threshold);
                for (int64_t r = 0; r < rows; ++r)
                  for (int64_t c = 0; c < cols; ++c)
                    pd_tile[r * kBlockK + c] = keep[r * kBlockK + c] ? pt[r * kBlockK + c] : acc_t(0);
                p_used = pd_tile.data();
              }
              // dV += (P o Z)^T dO  (times 1 / (1 - p_drop) when narrowed)
              acc_t* dpt = dp_tile.data();
              if (use_bf16) {
                if constexpr (kBf16) {
                  floats_to_bf16_transposed(p_used, kBlockK, rows, cols, rows2, pt_bf.data(), kBlockQ, scratch.data());
                  tiles_gemm_bf16(tiles, cols, Dv, rows2, 1.0f, pt_bf.data(), kBlockQ, do_pairs.data(), Dv, dv_t, Dv,
                                  /*accumulate=*/true);
                  tiles_gemm_bf16(tiles, rows, cols, Dv2, 1.0f, do_bf.data(), Dv2, vt_bf, kBlockK, dpt, kBlockK,
                                  /*accumulate=*/false);
                }
              } else {
                tiles_gemm(tiles, true, cols, Dv, rows, acc_t(1), p_used, kBlockK, do_tile.data(), Dv, dv_t, Dv,
                           /*accumulate=*/true);
                // dP = dO V^T, then through dropout, then dS = P * (dP - delta) (times the softcap
                // slope: the gradient of the raw score).
                if (few_rows)
                  tile_gemm_nt(rows, cols, Dv, do_tile.data(), Dv, vt_tile, Dv, dpt, kBlockK);
                else
                  tiles_gemm(tiles, false, rows, cols, Dv, acc_t(1), do_tile.data(), Dv, vt_tile, kBlockK, dpt, kBlockK,
                             /*accumulate=*/false);
              }
              for (int64_t r = 0; r < rows; ++r) {
                const acc_t d = delta_data[p.row_index(b, h, i0 + r)];
                acc_t* dr = dpt + r * kBlockK;
                const acc_t* pr = pt + r * kBlockK;
                // A NaN delta (NaN in this row's query or dO) would make dS = 0 * NaN at the pairs
                // the row does not see: there P = 0 gives dS = 0. Selected per row: the select in
                // every row's loop cost 6-9% of the backward.
                const bool nan_row = d != d;
                if (dropout) {
                  const uint8_t* kr = keep.data() + r * kBlockK;
                  for (int64_t c = 0; c < cols; ++c)
                    dr[c] =
                        nan_row && pr[c] == acc_t(0) ? acc_t(0) : pr[c] * ((kr[c] ? dr[c] * keep_scale : acc_t(0)) - d);
                } else if (nan_row) {
                  for (int64_t c = 0; c < cols; ++c) dr[c] = pr[c] == acc_t(0) ? acc_t(0) : pr[c] * (dr[c] - d);
                } else {
                  for (int64_t c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - d);
                }
                if (cap > acc_t(0)) {
                  const acc_t* sl = slope_tile.data() + r * kBlockK;
                  for (int64_t c = 0; c < cols; ++c) dr[c] *= sl[c];
                }
              }
              if (use_bf16) {
                if constexpr (kBf16) {
                  // dK += scale dS^T Q ; dQ += scale dS K, with dS rounded to bf16 once
                  floats_to_bf16(dpt, kBlockK, rows, cols, cols2, ds_bf.data(), kBlockK);
                  transpose_tile_u16(ds_bf.data(), kBlockK, rows, cols, rows2, pt_bf.data(), kBlockQ);
                  tiles_gemm_bf16(tiles, cols, Dk, rows2, 1.0f, pt_bf.data(), kBlockQ, q_pairs.data(), Dk, dk_t, Dk,
                                  /*accumulate=*/true);
                  tiles_gemm_bf16(tiles, rows, Dk, cols2, 1.0f, ds_bf.data(), kBlockK, k_pairs, Dk,
                                  dq_acc_data + (bh * L + i0) * Dk, Dk, /*accumulate=*/true);
                }
              } else {
                // dK += dS^T (scale Q)  (q_tile already carries the scale)
                tiles_gemm(tiles, true, cols, Dk, rows, acc_t(1), dpt, kBlockK, q_tile.data(), Dk, dk_t, Dk,
                           /*accumulate=*/true);
                // dQ += dS K (scaled when narrowed)
                tiles_gemm(tiles, false, rows, Dk, cols, acc_t(1), dpt, kBlockK, k_tile, Dk,
                           dq_acc_data + (bh * L + i0) * Dk, Dk, /*accumulate=*/true);
              }
            }
          }
          if (!head_passes) {
            store_rows(dk_acc.data(), Dk, cols, Dk, dk_rows.row(b, hk, j0), dk_rows.stride_l, dk_factor);
            store_rows(dv_acc.data(), Dv, cols, Dv, dv_rows.row(b, hk, j0), dv_rows.stride_l, dv_factor);
          }
        }
      }
      if (head_passes) {  // this split's key tiles have all G heads' terms: narrow them once
        for (int64_t j0 = split * kBlockK; j0 < pb.len_k; j0 += n_splits * kBlockK) {
          const int64_t cols = std::min(kBlockK, pb.len_k - j0);
          store_rows(dk_unit.data() + j0 * Dk, Dk, cols, Dk, dk_rows.row(b, hk, j0), dk_rows.stride_l, dk_factor);
          store_rows(dv_unit.data() + j0 * Dv, Dv, cols, Dv, dv_rows.row(b, hk, j0), dv_rows.stride_l, dv_factor);
        }
      }
      if (n_splits == 1) {  // this task's query heads are complete: narrow their dQ now
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          const int64_t bh = b * p.heads_q + h;
          store_rows(dq_acc_data + bh * L * Dk, Dk, pb.len_q, Dk, dq_rows.row(b, h, 0), dq_rows.stride_l, dq_factor);
        }
      }
    }
    tiles_release(tiles);
  });
  if (n_splits > 1) {  // sum the splits' partial dQ in split order, then narrow
    const acc_t* acc = dq_acc.data_ptr<acc_t>();
    at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> rows(L * Dk);
      for (int64_t bh = begin; bh < end; ++bh) {
        std::copy(acc + bh * L * Dk, acc + (bh + 1) * L * Dk, rows.begin());
        for (int64_t s = 1; s < n_splits; ++s) {
          const acc_t* part = acc + s * split_stride + bh * L * Dk;
          for (int64_t e = 0; e < L * Dk; ++e) rows[e] += part[e];
        }
        store_rows(rows.data(), Dk, p.for_batch(bh / p.heads_q).len_q, Dk,
                   dq_rows.row(bh / p.heads_q, bh % p.heads_q, 0), dq_rows.stride_l, dq_factor);
      }
    });
  }
}

}  // namespace

void run_attention_backward_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& grad_out,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                                const at::Tensor& dv) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(p, mask, grad_out, q, k, v, out, lse, dq, dk, dv); });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  BackwardCall call =
      prepare_attention_backward(grad_out, q, k, v, out, lse, rng_state, attn_mask, dropout_p, scale, window_left,
                                 window_right, bottom_right, softcap, alibi_slopes, DeviceLimits{});
  if (call.nothing_to_run) return {call.dq, call.dk, call.dv};
  const at::Tensor rng = rng_state.cpu();
  call.params.dropout_seed = static_cast<uint64_t>(rng.data_ptr<int64_t>()[0]);
  call.params.dropout_offset = static_cast<uint64_t>(rng.data_ptr<int64_t>()[1]);
  run_attention_backward_cpu(call.params, call.mask, grad_out, q, k, v, out, lse, call.dq, call.dk, call.dv);
  return {call.dq, call.dk, call.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) { m.impl("attention_backward", &attention_backward_cpu); }

}  // namespace flash_attn_ext::cpu
