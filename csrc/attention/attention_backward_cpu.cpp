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
//
// Bias gradients (grad_attn_mask / grad_alibi_slopes / grad_relative_bias) are dS itself, taken
// before the softcap slope, summed into the bias's shape as dS is formed. They keep the
// one-writer rule: units whose dS sum into the same mask gradient (a mask broadcast over the
// batch or the heads) are one task's, run in a fixed order; a mask broadcast over the keys, whose
// rows sum over key tiles of several splits, the slopes and the relative bias (per batch entry and
// head: O(B Hq (L + S))) get a copy per split, summed in split order at the end.
//
// Reading order: compute_delta, plan_backward (what a call decides once), BackwardWorker::run
// (one task's loops) and query_tile (one query tile against one key tile, one method per
// step), backward_kernel (the parallel loop and the sum of the split dQ copies).
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

// delta[row_index(b, h, i)] = sum_d dO[i, d] * O[i, d]  (= rowsum(P * dP), the softmax
// Jacobian term), laid out as the lse.
template <typename scalar_t, typename acc_t>
void compute_delta(const AttentionParams& p, const Rows<const scalar_t>& do_rows, const Rows<const scalar_t>& o_rows,
                   acc_t* delta) {
  at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const int64_t len_q = p.for_batch(b).len_q;
      if constexpr (std::is_same_v<scalar_t, float>) {  // vectorised for this CPU
        row_dots(do_rows.row(b, h, 0), do_rows.stride_l, o_rows.row(b, h, 0), o_rows.stride_l, len_q, p.dim_v,
                 delta + p.row_index(b, h, 0));
        continue;
      }
      for (int64_t i = 0; i < len_q; ++i) {
        const scalar_t* g = do_rows.row(b, h, i);
        const scalar_t* o = o_rows.row(b, h, i);
        acc_t sum = 0;
        for (int64_t d = 0; d < p.dim_v; ++d) sum += static_cast<acc_t>(g[d]) * static_cast<acc_t>(o[d]);
        delta[p.row_index(b, h, i)] = sum;
      }
    }
  });
}

// What a backward call decides once: how the (batch, kv head) units are split over threads,
// the GQA loop order, and the tile back end.
struct BackwardPlan {
  // Units whose mask gradients meet (a mask broadcast over B or H) are grouped, one group per
  // task: the task loops over every batch (loop_batch) / kv head (loop_kv_heads) of its group.
  bool loop_batch, loop_kv_heads;
  int64_t n_groups;
  int64_t n_splits;  // tasks per group (key tiles dealt round-robin), each with its own dQ copy
  TileBackend tiles;
  bool bf16;         // the five products on bf16 operands
  bool head_passes;  // GQA: one pass over the key tiles per query head
  int64_t heads_per_pass;
  bool keep_kv_tiles;       // head passes keep every packed K/V tile of the unit for later heads
  int64_t kv_slots;         // packed K/V tiles kept per thread
  int64_t dim_qk2, dim_v2;  // pairs: odd dims get a zero
};

// mask_sizes: the mask's (B, H, L, S) sizes when its gradient is asked for, else empty.
BackwardPlan plan_backward(const AttentionParams& p, c10::ScalarType dtype, int64_t acc_bytes,
                           at::IntArrayRef mask_sizes) {
  BackwardPlan f{};
  const int64_t L = p.len_q, Dk = p.dim_qk, Dv = p.dim_v, G = p.group_size();
  f.loop_batch = !mask_sizes.empty() && mask_sizes[0] == 1 && p.batch > 1;
  f.loop_kv_heads = !mask_sizes.empty() && mask_sizes[1] == 1 && p.heads_kv > 1;
  f.n_groups = (f.loop_batch ? 1 : p.batch) * (f.loop_kv_heads ? 1 : p.heads_kv);
  // Work units are (batch, kv head) groups. With fewer of them than 2x the threads (small
  // batch, MQA, a broadcast mask gradient), each one's key tiles are dealt round-robin to
  // n_splits tasks (round-robin balances the causal band), each with its own dQ accumulator,
  // summed in a fixed order afterwards: still no atomics, and bitwise repeatable for a given
  // thread count.
  const int64_t units = f.n_groups;
  const int64_t n_kblocks = (p.len_k + kBlockK - 1) / kBlockK;
  const int64_t want_tasks = 2 * static_cast<int64_t>(at::get_num_threads());
  // Each extra split costs a float dQ copy: at most ~512 MiB of them in all.
  const int64_t split_bytes = p.batch * p.heads_q * L * Dk * acc_bytes;
  const int64_t max_splits = std::max<int64_t>(1, (int64_t{512} << 20) / std::max<int64_t>(1, split_bytes));
  f.n_splits = units >= want_tasks
                   ? 1
                   : std::max<int64_t>(1, std::min({n_kblocks, (want_tasks + units - 1) / units, max_splits}));
  // The tile products' back end (tile_backend.h). bf16 on avx512_bf16 or brgemm: the five
  // products on bf16 operands with P and dS rounded to bf16, as flash-attn's GPU backward does;
  // the softmax algebra stays float. Otherwise float tiles (bf16/fp16 widened).
  f.tiles = choose_tiles(dtype, p.config.cpu_tiles).backend;
  f.bf16 = dtype == at::kBFloat16 && f.tiles != TileBackend::kFloat;
  f.dim_qk2 = Dk + Dk % 2, f.dim_v2 = Dv + Dv % 2;
  // GQA loop order. One pass over the key tiles for all G query heads packs each K/V tile once,
  // but each key tile then sweeps G heads' Q, dO and dQ, a working set G times MHA's that falls
  // out of the L2 cache. Past kGroupSweepBytes, one pass per query head (the K/V tiles packed G
  // times, as MHA does) with dK/dV summed in a float (S x D) buffer per task.
  constexpr int64_t kGroupSweepBytes = int64_t{1} << 20;
  const int64_t sweep_bytes = G * L * (2 * Dk + Dv) * acc_bytes;
  // cpu_bwd_head_passes = require / off forces either (the tests run both).
  const PathMode forced = p.config.cpu_bwd_head_passes;
  f.head_passes = G > 1 && (forced == PathMode::kAuto ? sweep_bytes > kGroupSweepBytes : forced == PathMode::kRequire);
  f.heads_per_pass = f.head_passes ? 1 : G;
  // Head passes keep every packed K/V tile of the unit (one slot per key tile) for the group's
  // later heads, so GQA packs K/V once per group, not once per query head; up to 8 MiB per thread.
  const int64_t tile_bytes = f.bf16 ? (f.dim_qk2 / 2 * kBlockK + f.dim_v2 / 2 * kBlockK + kBlockK / 2 * Dk) * 4
                                    : (2 * kBlockK * Dk + Dv * kBlockK) * acc_bytes;
  f.keep_kv_tiles = f.head_passes && n_kblocks * tile_bytes <= (int64_t{8} << 20);
  f.kv_slots = f.keep_kv_tiles ? n_kblocks : 1;
  return f;
}

// The call-wide inputs of the backward's tasks.
template <typename scalar_t>
struct BackwardArgs : CallArgs<at::opmath_type<scalar_t>, BackwardPlan> {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> dout, q, k, v;
  Rows<scalar_t> dq, dk, dv;
  const acc_t *lse, *delta;
  acc_t* dq_acc;  // (n_splits, B * Hq, L, Dk), in the accumulation type
  int64_t split_stride;
  // dV and dQ (and dK on the bf16 tiles; the float tiles pre-scale Q) accumulate unscaled: the
  // softmax scale and the dropout's 1 / (1 - p) are applied once, when the sums are narrowed.
  // brgemm has no alpha, and an alpha on an accumulating product costs it a pass through
  // scratch (measured: the brgemm backward 13-19% slower than vdpbf16ps before, NOTES.md #27).
  acc_t dk_factor, dv_factor, dq_factor;
  // The gradient of a mask that broadcasts (nullptr: none): (parts, Bm, Hm, Lm, Sm), strides 0
  // along the dims it sums over; a mask broadcast over the keys (dmask_sum_keys) has one part
  // per split (dmask_part_stride).
  acc_t* dmask = nullptr;
  int64_t dmask_sb = 0, dmask_sh = 0, dmask_si = 0, dmask_part_stride = 0;
  bool dmask_sum_keys = false;
  // A mask of the scores' own shape (nothing to sum: each element is one dS) gets its gradient
  // written once, in its dtype, straight into the result (no accumulator, no zeroing pass: the
  // rows a key tile's band leaves out are zeroed when the tile is visited).
  void* dmask_out = nullptr;
  MaskKind dmask_out_kind = MaskKind::kNone;
  int64_t dmask_out_sb = 0, dmask_out_sh = 0, dmask_out_si = 0;
  // The slopes' gradient (nullptr: not asked): (n_splits, B, Hq), one part per split.
  acc_t* dslopes = nullptr;
  // The relative bias's gradient (nullptr: not asked): (n_splits, B, Hq, L + S - 1).
  acc_t* drelative = nullptr;
};

// One thread's share of the backward: its tile buffers and the steps of one task, which walks
// its share of a (batch, kv head) unit's key tiles and, per key tile, the query tiles of every
// query head of the group that can see it.
template <typename scalar_t>
class BackwardWorker {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  static constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;

  // One key tile's packed operands (float tiles, or bf16 pairs) in the worker's slot for it.
  struct KvTile {
    acc_t *k, *kt, *vt;  // K rows, K^T, V^T (V rows as stored when few rows see the tile)
    uint32_t *kt_bf, *vt_bf, *k_pairs;
  };
  // The key tile a query tile meets: keys j0.. of (b, hk), its operands, its dK/dV sums.
  struct KeyTile {
    int64_t b, hk, split, j0, cols;
    const AttentionParams* pb;
    bool few_rows;
    KvTile kv;
    acc_t *dk, *dv;
    acc_t* dq_acc;  // this task's split of the dQ accumulator
  };

 public:
  explicit BackwardWorker(const BackwardArgs<scalar_t>& args) : a_(args), f_(args.plan) {
    const int64_t Dk = a_.p.dim_qk, Dv = a_.p.dim_v, S = a_.p.len_k;
    const int64_t nf = f_.bf16 ? 0 : f_.kv_slots;
    k_tiles_.resize(nf * kBlockK * Dk), kt_tiles_.resize(nf * Dk * kBlockK), vt_tiles_.resize(nf * Dv * kBlockK);
    // bf16 operands: A tiles as bf16 rows, B tiles packed by pairs of their K dimension.
    const int64_t nb = f_.bf16 ? 1 : 0, nbs = nb * f_.kv_slots;
    kt_bfs_.resize(nbs * f_.dim_qk2 / 2 * kBlockK), vt_bfs_.resize(nbs * f_.dim_v2 / 2 * kBlockK);
    k_pairss_.resize(nbs * kBlockK / 2 * Dk);
    q_pairs_.resize(nb * kBlockQ / 2 * Dk), do_pairs_.resize(nb * kBlockQ / 2 * Dv);
    q_bf_.resize(nb * kBlockQ * f_.dim_qk2), do_bf_.resize(nb * kBlockQ * f_.dim_v2);
    pt_bf_.resize(nb * kBlockK * kBlockQ), ds_bf_.resize(nb * kBlockQ * kBlockK),
        scratch_.resize(nb * kBlockQ * kBlockK);
    row_ptrs_.resize(nb * std::max(kBlockK, kBlockQ));
    dk_acc_.resize(kBlockK * Dk), dv_acc_.resize(kBlockK * Dv);
    dk_unit_.resize(f_.head_passes ? S * Dk : 0), dv_unit_.resize(f_.head_passes ? S * Dv : 0);
    q_tile_.resize(kBlockQ * Dk), do_tile_.resize(kBlockQ * Dv);
    p_tile_.resize(kBlockQ * kBlockK), dp_tile_.resize(kBlockQ * kBlockK);
    pd_tile_.resize(a_.c.dropout ? kBlockQ * kBlockK : 0);
    slope_tile_.resize(a_.c.cap > acc_t(0) ? kBlockQ * kBlockK : 0);
    keep_.resize(a_.c.dropout ? kBlockQ * kBlockK : 0);
  }

  // Task (group, split): the group's (batch, kv head) units, in order, each over this split's
  // key tiles.
  void run(int64_t task) {
    const AttentionParams& p = a_.p;
    const int64_t group = task / f_.n_splits, split = task % f_.n_splits;
    const int64_t groups_hk = f_.loop_kv_heads ? 1 : p.heads_kv;
    const int64_t gb = group / groups_hk, ghk = group % groups_hk;
    for (int64_t b = f_.loop_batch ? 0 : gb; b < (f_.loop_batch ? p.batch : gb + 1); ++b)
      for (int64_t hk = f_.loop_kv_heads ? 0 : ghk; hk < (f_.loop_kv_heads ? p.heads_kv : ghk + 1); ++hk)
        run_unit(b, hk, split);
  }

 private:
  void run_unit(int64_t b, int64_t hk, int64_t split) {
    const AttentionParams& p = a_.p;
    const int64_t Dk = p.dim_qk, Dv = p.dim_v, G = p.group_size(), n_splits = f_.n_splits;
    const AttentionParams pb = p.for_batch(b);
    acc_t* dq_acc = a_.dq_acc + split * a_.split_stride;
    if (f_.head_passes) {
      std::fill(dk_unit_.begin(), dk_unit_.end(), acc_t(0));
      std::fill(dv_unit_.begin(), dv_unit_.end(), acc_t(0));
    }
    for (int64_t h0 = hk * G; h0 < (hk + 1) * G; h0 += f_.heads_per_pass) {
      for (int64_t j0 = split * kBlockK; j0 < pb.len_k; j0 += n_splits * kBlockK) {
        const int64_t cols = std::min(kBlockK, pb.len_k - j0);
        const RowRange band =
            visible_row_range(j0, j0 + cols, pb.align_offset, pb.window_left, pb.window_right, pb.len_q);
        if (!f_.head_passes) {
          std::fill(dk_acc_.begin(), dk_acc_.end(), acc_t(0));
          std::fill(dv_acc_.begin(), dv_acc_.end(), acc_t(0));
        }
        // A key tile that few query rows see (decode-like shapes, e.g. L = 1): the float path
        // takes S = Q K^T and dP = dO V^T as row dot products on K and V as stored, since
        // transposing both tiles cost more than the products (the transposes were 86% of the
        // backward's own samples at L = 1, S = 239).
        const KeyTile kt{b,
                         hk,
                         split,
                         j0,
                         cols,
                         &pb,
                         band.end - band.begin <= kFewRows,
                         kv_tile(f_.keep_kv_tiles ? j0 / kBlockK : 0),
                         f_.head_passes ? dk_unit_.data() + j0 * Dk : dk_acc_.data(),
                         f_.head_passes ? dv_unit_.data() + j0 * Dv : dv_acc_.data(),
                         dq_acc};
        if (a_.dmask_out != nullptr)
          for (int64_t h = h0; h < h0 + f_.heads_per_pass; ++h) zero_mask_gradient_outside(b, h, j0, cols, band);
        if (band.begin < band.end && (!f_.keep_kv_tiles || h0 == hk * G))  // else the group's first pass packed it
          pack_kv(kt);
        for (int64_t h = h0; h < h0 + f_.heads_per_pass && band.begin < band.end; ++h)
          for (int64_t i0 = band.begin; i0 < band.end; i0 += kBlockQ)
            query_tile(kt, h, i0, std::min(kBlockQ, band.end - i0));
        if (!f_.head_passes) store_dkdv(b, hk, j0, cols, dk_acc_.data(), dv_acc_.data());
      }
    }
    if (f_.head_passes) {  // this split's key tiles have all G heads' terms: narrow them once
      for (int64_t j0 = split * kBlockK; j0 < pb.len_k; j0 += n_splits * kBlockK) {
        store_dkdv(b, hk, j0, std::min(kBlockK, pb.len_k - j0), dk_unit_.data() + j0 * Dk, dv_unit_.data() + j0 * Dv);
      }
    }
    if (n_splits == 1) {  // this task's query heads are complete: narrow their dQ now
      const auto& dq_rows = a_.dq;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const int64_t bh = b * p.heads_q + h;
        store_rows(dq_acc + bh * p.len_q * Dk, Dk, pb.len_q, Dk, dq_rows.row(b, h, 0), dq_rows.stride_l, a_.dq_factor);
      }
    }
  }

  KvTile kv_tile(int64_t slot) {
    const int64_t Dk = a_.p.dim_qk, Dv = a_.p.dim_v;
    return {k_tiles_.data() + slot * kBlockK * Dk,
            kt_tiles_.data() + slot * Dk * kBlockK,
            vt_tiles_.data() + slot * Dv * kBlockK,
            kt_bfs_.data() + slot * (f_.dim_qk2 / 2 * kBlockK),
            vt_bfs_.data() + slot * (f_.dim_v2 / 2 * kBlockK),
            k_pairss_.data() + slot * (kBlockK / 2 * Dk)};
  }

  // The key tile's K and V operands, as the products below read them.
  void pack_kv(const KeyTile& t) {
    const int64_t Dk = a_.p.dim_qk, Dv = a_.p.dim_v;
    if (f_.bf16) {
      if constexpr (kBf16) {
        for (int64_t c = 0; c < t.cols; ++c) row_ptrs_[c] = bf16_bits(a_.k.row(t.b, t.hk, t.j0 + c));
        pack_bf16_transposed(row_ptrs_.data(), t.cols, Dk, t.kv.kt_bf, kBlockK);  // S = Q K^T
        pack_bf16_row_pairs(row_ptrs_.data(), t.cols, Dk, t.kv.k_pairs, Dk);      // dQ = dS K
        for (int64_t c = 0; c < t.cols; ++c) row_ptrs_[c] = bf16_bits(a_.v.row(t.b, t.hk, t.j0 + c));
        pack_bf16_transposed(row_ptrs_.data(), t.cols, Dv, t.kv.vt_bf, kBlockK);  // dP = dO V^T
      }
      return;
    }
    load_rows(a_.k.row(t.b, t.hk, t.j0), a_.k.stride_l, t.cols, Dk, acc_t(1), t.kv.k, Dk);
    if (t.few_rows) {  // V rows as stored (in vt's slot): S and dP as row dot products
      load_rows(a_.v.row(t.b, t.hk, t.j0), a_.v.stride_l, t.cols, Dv, acc_t(1), t.kv.vt, Dv);
    } else {
      load_rows_transposed(a_.k.row(t.b, t.hk, t.j0), a_.k.stride_l, t.cols, Dk, t.kv.kt, kBlockK);
      load_rows_transposed(a_.v.row(t.b, t.hk, t.j0), a_.v.stride_l, t.cols, Dv, t.kv.vt, kBlockK);
    }
  }

  // One (query tile, key tile) step: P, then dV, dP, dS, dK and dQ.
  void query_tile(const KeyTile& t, int64_t h, int64_t i0, int64_t rows) {
    load_query_side(t, h, i0, rows);
    probabilities(t, h, i0, rows);
    const acc_t* p_used = dropped_probabilities(t, h, i0, rows);
    grad_v_and_dp(t, rows, p_used);
    grad_scores(t, h, i0, rows);
    grad_k_and_q(t, h, i0, rows);
  }

  // Q and dO rows of the query tile (bf16 rows and pairs, or float with Q pre-scaled), and the
  // raw scores S = scale Q K^T into p_tile_.
  void load_query_side(const KeyTile& t, int64_t h, int64_t i0, int64_t rows) {
    const int64_t Dk = a_.p.dim_qk, Dv = a_.p.dim_v;
    acc_t* pt = p_tile_.data();
    if (f_.bf16) {
      if constexpr (kBf16) {
        copy_bf16_rows(a_.q, t.b, h, i0, rows, Dk, q_bf_.data(), f_.dim_qk2, row_ptrs_.data());
        pack_bf16_row_pairs(row_ptrs_.data(), rows, Dk, q_pairs_.data(), Dk);  // dK = dS^T Q
        copy_bf16_rows(a_.dout, t.b, h, i0, rows, Dv, do_bf_.data(), f_.dim_v2, row_ptrs_.data());
        pack_bf16_row_pairs(row_ptrs_.data(), rows, Dv, do_pairs_.data(), Dv);  // dV = P^T dO
        tiles_gemm_bf16(f_.tiles, rows, t.cols, f_.dim_qk2, static_cast<float>(a_.c.scale), q_bf_.data(), f_.dim_qk2,
                        t.kv.kt_bf, kBlockK, pt, kBlockK, /*accumulate=*/false);
      }
      return;
    }
    load_rows(a_.q.row(t.b, h, i0), a_.q.stride_l, rows, Dk, a_.c.scale, q_tile_.data(), Dk);
    load_rows(a_.dout.row(t.b, h, i0), a_.dout.stride_l, rows, Dv, acc_t(1), do_tile_.data(), Dv);
    if (t.few_rows)
      tile_gemm_nt(rows, t.cols, Dk, q_tile_.data(), Dk, t.kv.k, Dk, pt, kBlockK);
    else
      tiles_gemm(f_.tiles, false, rows, t.cols, Dk, acc_t(1), q_tile_.data(), Dk, t.kv.kt, kBlockK, pt, kBlockK,
                 /*accumulate=*/false);
  }

  // P = exp(softcap(S) + mask - lse) in place, exactly the forward's probabilities.
  void probabilities(const KeyTile& t, int64_t h, int64_t i0, int64_t rows) {
    acc_t* pt = p_tile_.data();
    if (a_.c.cap > acc_t(0)) softcap_tile(pt, kBlockK, rows, t.cols, a_.c.cap, slope_tile_.data());
    mask_tile(pt, kBlockK, rows, t.cols, i0, t.j0, t.b, h, *t.pb, a_.mask);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t l = a_.lse[a_.p.row_index(t.b, h, i0 + r)];
      acc_t* pr = pt + r * kBlockK;
      if (l == kNegInf) {
        std::fill(pr, pr + t.cols, acc_t(0));  // a row that sees nothing has zero gradient
      } else if (l != l) {                     // a NaN row (NaN in its query): NaN where it sees, 0 elsewhere
        for (int64_t c = 0; c < t.cols; ++c) pr[c] = pr[c] == kNegInf ? acc_t(0) : l;
      } else {
        exp_shift_sum(pr, t.cols, l);
      }
    }
  }

  // The probabilities that multiplied V in the forward: P, or P with the dropped entries zeroed.
  const acc_t* dropped_probabilities(const KeyTile& t, int64_t h, int64_t i0, int64_t rows) {
    if (!a_.c.dropout) return p_tile_.data();
    dropout_keep_tile(keep_.data(), kBlockK, rows, t.cols, i0, t.j0, t.b * a_.p.heads_q + h, a_.p, a_.c.threshold);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < t.cols; ++c)
        pd_tile_[r * kBlockK + c] = keep_[r * kBlockK + c] ? p_tile_[r * kBlockK + c] : acc_t(0);
    return pd_tile_.data();
  }

  // dV += (P o Z)^T dO (times 1 / (1 - p_drop) when narrowed); dP = dO V^T into dp_tile_.
  void grad_v_and_dp(const KeyTile& t, int64_t rows, const acc_t* p_used) {
    const int64_t Dv = a_.p.dim_v, rows2 = rows + rows % 2;
    acc_t* dpt = dp_tile_.data();
    if (f_.bf16) {
      if constexpr (kBf16) {
        floats_to_bf16_transposed(p_used, kBlockK, rows, t.cols, rows2, pt_bf_.data(), kBlockQ, scratch_.data());
        tiles_gemm_bf16(f_.tiles, t.cols, Dv, rows2, 1.0f, pt_bf_.data(), kBlockQ, do_pairs_.data(), Dv, t.dv, Dv,
                        /*accumulate=*/true);
        tiles_gemm_bf16(f_.tiles, rows, t.cols, f_.dim_v2, 1.0f, do_bf_.data(), f_.dim_v2, t.kv.vt_bf, kBlockK, dpt,
                        kBlockK, /*accumulate=*/false);
      }
      return;
    }
    tiles_gemm(f_.tiles, true, t.cols, Dv, rows, acc_t(1), p_used, kBlockK, do_tile_.data(), Dv, t.dv, Dv,
               /*accumulate=*/true);
    if (t.few_rows)
      tile_gemm_nt(rows, t.cols, Dv, do_tile_.data(), Dv, t.kv.vt, Dv, dpt, kBlockK);
    else
      tiles_gemm(f_.tiles, false, rows, t.cols, Dv, acc_t(1), do_tile_.data(), Dv, t.kv.vt, kBlockK, dpt, kBlockK,
                 /*accumulate=*/false);
  }

  // dS = P * (dP - delta) in place of dP, dP through the dropout first, then times the softcap
  // slope (the gradient of the raw score).
  void grad_scores(const KeyTile& t, int64_t h, int64_t i0, int64_t rows) {
    const int64_t cols = t.cols;
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t d = a_.delta[a_.p.row_index(t.b, h, i0 + r)];
      acc_t* dr = dp_tile_.data() + r * kBlockK;
      const acc_t* pr = p_tile_.data() + r * kBlockK;
      // A NaN delta (NaN in this row's query or dO) would make dS = 0 * NaN at the pairs the row
      // does not see: there P = 0 gives dS = 0. Selected per row: the select in every row's loop
      // cost 6-9% of the backward.
      const bool nan_row = d != d;
      if (a_.c.dropout) {
        const uint8_t* kr = keep_.data() + r * kBlockK;
        const acc_t ks = a_.c.keep_scale;
        for (int64_t c = 0; c < cols; ++c)
          dr[c] = nan_row && pr[c] == acc_t(0) ? acc_t(0) : pr[c] * ((kr[c] ? dr[c] * ks : acc_t(0)) - d);
      } else if (nan_row) {
        for (int64_t c = 0; c < cols; ++c) dr[c] = pr[c] == acc_t(0) ? acc_t(0) : pr[c] * (dr[c] - d);
      } else {
        for (int64_t c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - d);
      }
      // The mask and ALiBi are added after the cap: their gradient is dS before its slope.
      if (a_.dmask != nullptr) add_mask_gradient(t, h, i0 + r, dr);
      if (a_.dmask_out != nullptr) store_mask_gradient(t.b, h, i0 + r, t.j0, t.cols, dr);
      if (a_.dslopes != nullptr) add_slope_gradient(t, h, i0 + r, dr);
      if (a_.drelative != nullptr) add_relative_gradient(t, h, i0 + r, dr);
      if (a_.c.cap > acc_t(0)) {
        const acc_t* sl = slope_tile_.data() + r * kBlockK;
        for (int64_t c = 0; c < cols; ++c) dr[c] *= sl[c];
      }
    }
  }

  // Row i's dS over the key tile into the mask's gradient: one element per key, or their sum
  // (a mask broadcast over the keys), summed over the rows / heads / batches it broadcasts along
  // by the one task that owns them.
  void add_mask_gradient(const KeyTile& t, int64_t h, int64_t i, const acc_t* ds) {
    acc_t* g = a_.dmask + t.split * a_.dmask_part_stride + t.b * a_.dmask_sb + h * a_.dmask_sh + i * a_.dmask_si;
    if (a_.dmask_sum_keys) {
      acc_t sum = 0;
      for (int64_t c = 0; c < t.cols; ++c) sum += ds[c];
      g[0] += sum;
    } else {
      g += t.j0;  // the accumulator's rows are contiguous
      for (int64_t c = 0; c < t.cols; ++c) g[c] += ds[c];
    }
  }

  // Row i's dS over keys j0 .. j0 + cols, as the gradient of a mask of the scores' shape
  // (ds nullptr: zeros).
  void store_mask_gradient(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, const acc_t* ds) {
    const int64_t offset = b * a_.dmask_out_sb + h * a_.dmask_out_sh + i * a_.dmask_out_si + j0;
    const auto store = [&](auto* g) {
      using T = std::remove_pointer_t<decltype(g)>;
      if (ds == nullptr) return std::fill(g + offset, g + offset + cols, T(0));
      for (int64_t c = 0; c < cols; ++c) g[offset + c] = static_cast<T>(ds[c]);
    };
    switch (a_.dmask_out_kind) {
      case MaskKind::kFloat32: store(static_cast<float*>(a_.dmask_out)); break;
      case MaskKind::kFloat64: store(static_cast<double*>(a_.dmask_out)); break;
      case MaskKind::kFloat16: store(static_cast<c10::Half*>(a_.dmask_out)); break;
      case MaskKind::kBFloat16: store(static_cast<c10::BFloat16*>(a_.dmask_out)); break;
      default: break;
    }
  }

  // The rows of keys j0 .. j0 + cols outside the tile's band see none of them: zero gradient.
  void zero_mask_gradient_outside(int64_t b, int64_t h, int64_t j0, int64_t cols, const RowRange& band) {
    for (int64_t i = 0; i < band.begin; ++i) store_mask_gradient(b, h, i, j0, cols, nullptr);
    for (int64_t i = band.end; i < a_.p.len_q; ++i) store_mask_gradient(b, h, i, j0, cols, nullptr);
  }

  // d slope_(b, h) = -sum_ij dS_ij |i + o - j| (the bias is -slope |i + o - j|), into this
  // split's copy.
  void add_slope_gradient(const KeyTile& t, int64_t h, int64_t i, const acc_t* ds) {
    const int64_t d0 = i + t.pb->align_offset - t.j0;  // i + o - j at the tile's first key
    acc_t sum = 0;
    for (int64_t c = 0; c < t.cols; ++c) sum += ds[c] * static_cast<acc_t>(std::abs(d0 - c));
    a_.dslopes[(t.split * a_.p.batch + t.b) * a_.p.heads_q + h] -= sum;
  }

  // Row i's dS at distances j - i of the key tile into this split's copy of (b, h)'s relative
  // bias gradient (contiguous: one distance per key).
  void add_relative_gradient(const KeyTile& t, int64_t h, int64_t i, const acc_t* ds) {
    const AttentionParams& p = a_.p;
    const int64_t distances = p.len_q + p.len_k - 1;
    acc_t* g = a_.drelative + ((t.split * p.batch + t.b) * p.heads_q + h) * distances + t.j0 - i + p.len_q - 1;
    for (int64_t c = 0; c < t.cols; ++c) g[c] += ds[c];
  }

  // dK += dS^T Q and dQ += dS K (the scale applied when narrowed, or carried by the float Q).
  void grad_k_and_q(const KeyTile& t, int64_t h, int64_t i0, int64_t rows) {
    const int64_t Dk = a_.p.dim_qk, rows2 = rows + rows % 2, cols2 = t.cols + t.cols % 2;
    const acc_t* ds = dp_tile_.data();
    acc_t* dq = t.dq_acc + ((t.b * a_.p.heads_q + h) * a_.p.len_q + i0) * Dk;
    if (f_.bf16) {
      if constexpr (kBf16) {  // dS rounded to bf16 once
        floats_to_bf16(ds, kBlockK, rows, t.cols, cols2, ds_bf_.data(), kBlockK);
        transpose_tile_u16(ds_bf_.data(), kBlockK, rows, t.cols, rows2, pt_bf_.data(), kBlockQ);
        tiles_gemm_bf16(f_.tiles, t.cols, Dk, rows2, 1.0f, pt_bf_.data(), kBlockQ, q_pairs_.data(), Dk, t.dk, Dk,
                        /*accumulate=*/true);
        tiles_gemm_bf16(f_.tiles, rows, Dk, cols2, 1.0f, ds_bf_.data(), kBlockK, t.kv.k_pairs, Dk, dq, Dk,
                        /*accumulate=*/true);
      }
      return;
    }
    tiles_gemm(f_.tiles, true, t.cols, Dk, rows, acc_t(1), ds, kBlockK, q_tile_.data(), Dk, t.dk, Dk,
               /*accumulate=*/true);
    tiles_gemm(f_.tiles, false, rows, Dk, t.cols, acc_t(1), ds, kBlockK, t.kv.k, Dk, dq, Dk, /*accumulate=*/true);
  }

  // The dK / dV sums of keys j0 .. j0 + cols of (b, hk), scaled and narrowed into the gradients.
  void store_dkdv(int64_t b, int64_t hk, int64_t j0, int64_t cols, const acc_t* dk, const acc_t* dv) {
    const int64_t Dk = a_.p.dim_qk, Dv = a_.p.dim_v;
    store_rows(dk, Dk, cols, Dk, a_.dk.row(b, hk, j0), a_.dk.stride_l, a_.dk_factor);
    store_rows(dv, Dv, cols, Dv, a_.dv.row(b, hk, j0), a_.dv.stride_l, a_.dv_factor);
  }

  const BackwardArgs<scalar_t>& a_;
  const BackwardPlan& f_;
  // Packed K/V tiles (kv_slots of them: float, or bf16 pairs).
  std::vector<acc_t> k_tiles_, kt_tiles_, vt_tiles_;
  std::vector<uint32_t> kt_bfs_, vt_bfs_, k_pairss_;
  // Query-side tiles: bf16 rows and pairs, or float.
  std::vector<uint32_t> q_pairs_, do_pairs_;
  std::vector<uint16_t> q_bf_, do_bf_, pt_bf_, ds_bf_, scratch_;
  std::vector<const uint16_t*> row_ptrs_;
  std::vector<acc_t> q_tile_, do_tile_, p_tile_, dp_tile_, pd_tile_, slope_tile_;
  std::vector<uint8_t> keep_;
  // dK/dV sums: of one key tile, or (head passes) of the unit's whole key range.
  std::vector<acc_t> dk_acc_, dv_acc_, dk_unit_, dv_unit_;
};

template <typename scalar_t>
void backward_kernel(const AttentionParams& p, const MaskView& mask, const at::Tensor& dout, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor& grad_lse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                     BiasGradients* bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = p.len_q, Dk = p.dim_qk;
  // Packed sequences (varlen): rows at their offsets, loops bounded by each sequence's lengths
  // (for_batch); L and S are then the longest sequence's.
  const auto do_rows = q_rows_of<const scalar_t>(dout, p);
  const auto dq_rows = q_rows_of<scalar_t>(dq, p);
  const auto acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor delta = at::empty(lse.sizes(), acc_options);
  compute_delta<scalar_t, acc_t>(p, do_rows, q_rows_of<const scalar_t>(out, p), delta.data_ptr<acc_t>());
  // d lse_i / d s_ij = P_ij: a gradient g into lse adds P * g to dS = P * (dP - delta).
  if (grad_lse.defined()) delta.sub_(grad_lse);

  const bool want_mask = bias != nullptr && bias->mask.defined();
  const bool want_slopes = bias != nullptr && bias->slopes.defined();
  const bool want_relative = bias != nullptr && bias->relative.defined();
  const BackwardPlan plan =
      plan_backward(p, q.scalar_type(), sizeof(acc_t), want_mask ? bias->mask.sizes() : at::IntArrayRef());
  // dQ accumulates over key tiles in the accumulation type, then is narrowed once.
  at::Tensor dq_acc = at::zeros({plan.n_splits, p.batch * p.heads_q, L, Dk}, acc_options);
  const ScoreConstants<acc_t> c(p);
  BackwardArgs<scalar_t> args{{p, mask, plan, c},
                              do_rows,
                              q_rows_of<const scalar_t>(q, p),
                              kv_rows_of<const scalar_t>(k, p),
                              kv_rows_of<const scalar_t>(v, p),
                              dq_rows,
                              kv_rows_of<scalar_t>(dk, p),
                              kv_rows_of<scalar_t>(dv, p),
                              lse.data_ptr<acc_t>(),
                              delta.data_ptr<acc_t>(),
                              dq_acc.data_ptr<acc_t>(),
                              p.batch * p.heads_q * L * Dk,
                              plan.bf16 ? c.scale : acc_t(1),
                              c.keep_scale,
                              c.scale};
  // The bias gradients: a full-shape mask's written straight into the result; the others'
  // accumulators zeroed (dS is added where it is formed): a broadcast mask's in its own shape,
  // one part per split when the sum over its keys crosses splits; the slopes' as
  // (n_splits, B, Hq); the relative bias's as (n_splits * B, Hq, L + S - 1).
  at::Tensor dmask, dslopes;
  const auto full_shape = [&](at::IntArrayRef m) {
    return (m[0] == p.batch || p.batch == 1) && (m[1] == p.heads_q || p.heads_q == 1) && m[2] == L && m[3] == p.len_k;
  };
  if (want_mask && full_shape(bias->mask.sizes())) {
    bias->grad_mask = at::empty(bias->mask.sizes(), bias->mask.options().memory_format(at::MemoryFormat::Contiguous));
    const auto m = bias->mask.sizes();
    args.dmask_out = bias->grad_mask.data_ptr();
    args.dmask_out_kind = make_mask_view(bias->grad_mask).kind;
    args.dmask_out_sb = m[0] == 1 ? 0 : bias->grad_mask.stride(0);
    args.dmask_out_sh = m[1] == 1 ? 0 : bias->grad_mask.stride(1);
    args.dmask_out_si = bias->grad_mask.stride(2);
  } else if (want_mask) {
    const auto m = bias->mask.sizes();
    const int64_t parts = m[3] == 1 ? plan.n_splits : 1;
    dmask = at::zeros({parts, m[0], m[1], m[2], m[3]}, acc_options);
    args.dmask = dmask.data_ptr<acc_t>();
    args.dmask_sb = m[0] == 1 ? 0 : dmask.stride(1);
    args.dmask_sh = m[1] == 1 ? 0 : dmask.stride(2);
    args.dmask_si = m[2] == 1 ? 0 : dmask.stride(3);
    args.dmask_sum_keys = m[3] == 1;
    args.dmask_part_stride = parts > 1 ? dmask.stride(0) : 0;
  }
  if (want_slopes) {
    dslopes = at::zeros({plan.n_splits, p.batch, p.heads_q}, acc_options);
    args.dslopes = dslopes.data_ptr<acc_t>();
  }
  at::Tensor drelative;
  if (want_relative) {
    drelative = at::zeros({plan.n_splits * p.batch, p.heads_q, p.len_q + p.len_k - 1}, acc_options);
    args.drelative = drelative.data_ptr<acc_t>();
  }
  at::parallel_for(0, plan.n_groups * plan.n_splits, 1, [&](int64_t begin, int64_t end) {
    BackwardWorker<scalar_t> worker(args);
    for (int64_t task = begin; task < end; ++task) worker.run(task);
    tiles_release(plan.tiles);
  });
  if (plan.n_splits > 1) {  // sum the splits' partial dQ in split order, then narrow
    const acc_t* acc = dq_acc.data_ptr<acc_t>();
    at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> rows(L * Dk);
      for (int64_t bh = begin; bh < end; ++bh) {
        std::copy(acc + bh * L * Dk, acc + (bh + 1) * L * Dk, rows.begin());
        for (int64_t s = 1; s < plan.n_splits; ++s) {
          const acc_t* part = acc + s * args.split_stride + bh * L * Dk;
          for (int64_t e = 0; e < L * Dk; ++e) rows[e] += part[e];
        }
        store_rows(rows.data(), Dk, p.for_batch(bh / p.heads_q).len_q, Dk,
                   dq_rows.row(bh / p.heads_q, bh % p.heads_q, 0), dq_rows.stride_l, args.dq_factor);
      }
    });
  }
  // The bias gradients' parts summed in order (elementwise adds: deterministic), then in the
  // shapes and dtypes of what they are the gradients of.
  const auto sum_parts = [](const at::Tensor& parts) {  // over dim 0, part 0 first
    for (int64_t s = 1; s < parts.size(0); ++s) parts[0].add_(parts[s]);
    return parts[0];
  };
  if (want_mask && args.dmask_out == nullptr) bias->grad_mask = sum_parts(dmask).to(bias->mask.scalar_type());
  if (want_slopes) {
    at::Tensor g = sum_parts(dslopes);  // (B, Hq)
    if (bias->slopes.dim() == 1) g = sum_parts(g);
    bias->grad_slopes = g.to(bias->slopes.scalar_type()).contiguous();
  }
  if (want_relative) bias->grad_relative = sum_parts(drelative).to(bias->relative.scalar_type());
}

}  // namespace

void run_attention_backward_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& grad_out,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& dq,
                                const at::Tensor& dk, const at::Tensor& dv, BiasGradients* bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(p, mask, grad_out, q, k, v, out, lse, grad_lse, dq, dk, dv, bias);
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& grad_lse, bool grad_attn_mask,
    bool grad_alibi_slopes, const std::optional<at::Tensor>& relative_bias, bool grad_relative_bias) {
  BackwardCall call =
      prepare_attention_backward(grad_out, q, k, v, out, lse, rng_state, attn_mask, dropout_p, scale, window_left,
                                 window_right, bottom_right, softcap, alibi_slopes, grad_lse, DeviceLimits{},
                                 grad_attn_mask, grad_alibi_slopes, relative_bias, grad_relative_bias);
  const auto or_empty = [&](const at::Tensor& g) { return g.defined() ? g : no_bias_gradient(q); };
  if (call.nothing_to_run)
    return {call.dq,
            call.dk,
            call.dv,
            or_empty(call.grad_mask),
            or_empty(call.grad_slopes),
            or_empty(call.grad_relative_bias)};
  set_dropout_seed(call.params, rng_state);
  BiasGradients bias;
  if (grad_attn_mask) bias.mask = *attn_mask;
  if (grad_alibi_slopes) bias.slopes = *alibi_slopes;
  if (grad_relative_bias) bias.relative = *relative_bias;
  run_attention_backward_cpu(call.params, call.mask, grad_out, q, k, v, out, lse, call.grad_lse, call.dq, call.dk,
                             call.dv, &bias);
  return {
      call.dq, call.dk, call.dv, or_empty(bias.grad_mask), or_empty(bias.grad_slopes), or_empty(bias.grad_relative)};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) { m.impl("attention_backward", &attention_backward_cpu); }

}  // namespace flash_attn_ext::cpu
