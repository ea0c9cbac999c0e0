// CPU kernel of flash_attn_ext::attention_forward: FlashAttention-2's forward on the CPU.
//
// One task = one (batch, group of query heads, tile of query positions): for GQA the query
// heads sharing a K/V head are rows of one tile (see `pack`). The task streams the key/value
// tiles of its visible band (tiles outside the causal/window band are never touched) and keeps an
// online softmax per row: running max m, running sum l, and an accumulator rescaled by
// exp(m_old - m_new) whenever the max grows. Nothing of size L x S is allocated.
//
// Reading order: plan_forward (what a call decides once), ForwardWorker::run (one task's tile
// loop, one method per step), forward_kernel (the parallel loop and the split-KV merge).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <mutex>
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

// Query tiles of at most this many rows (decode, short chunks) compute S = Q K^T as row dot
// products: the scattered writes of a K^T tile cost more than the product itself there.
constexpr int64_t kFewRows = 8;

// Split-KV (Flash-Decoding): when (batch, head group, query span) tasks cannot keep every
// thread busy (decode of one sequence, MQA), each task's visible band is cut into key ranges
// of whole tiles, one task per range; each writes its unnormalised partial state (running max,
// running sum, accumulator) and a merge pass combines them exactly, as
// merge_attention_states does. Only worth it when the band is long: each split is >= 4 tiles.
// Tasks of one query tile (decode of a packed GQA/MQA group, short chunks) split too.
int64_t choose_splits(int64_t tasks, int64_t threads, int64_t len_k, int64_t rows_per_task) {
  if (tasks >= threads || rows_per_task > kBlockQ) return 1;
  const int64_t by_threads = (threads + tasks - 1) / tasks;
  const int64_t by_length = std::max<int64_t>(1, len_k / (4 * kBlockK));
  return std::min<int64_t>({by_threads, by_length, 64});
}

// What a forward call decides once: how its rows are cut into tasks and which tile back end
// multiplies them.
struct ForwardPlan {
  // GQA: a tile holds `pack` query heads of one group x `span` positions, so the group's K/V
  // tiles are loaded once for all of them (decode reads the cache once per group, not once per
  // query head).
  int64_t pack, span, n_spans, n_packs, max_rows;
  int64_t n_splits;  // split-KV ranges per task (1: none)
  TileBackend tiles;
  bool bf16_gemm;    // bf16 operands for both products (else float tiles, bf16/fp16 widened)
  int64_t dim_qk2;   // the bf16 products run over pairs: an odd head dim gets a zero
  int64_t n_ktiles;  // key tiles of the longest sequence
  bool cache_kt;     // per-thread K^T (and widened / packed V) tiles kept across query spans

  int64_t units(int64_t batch) const { return batch * n_packs * n_spans * n_splits; }
};

ForwardPlan plan_forward(const AttentionParams& p, c10::ScalarType dtype, int64_t acc_bytes) {
  ForwardPlan f{};
  const int64_t L = p.len_q;
  // Packing is used when it still leaves two tasks per thread, or when the whole group's rows
  // fit one tile (decode with more query rows per KV head than the decode path takes, e.g.
  // MQA): there unpacked tasks each read the whole cache again, and split-KV finds the
  // parallelism instead (measured: MQA decode at 32 query heads read the cache 32 times and
  // took 0.92 of MHA's time per token, benchmarks/NOTES.md #28).
  const int64_t threads = at::get_num_threads();
  const auto tasks_for = [&](int64_t pack) {
    const int64_t span = std::max<int64_t>(1, std::min(L, kBlockQ / pack));
    return p.batch * (p.heads_q / pack) * ((L + span - 1) / span);
  };
  const bool group_in_one_tile = p.group_size() * L <= kBlockQ;
  f.pack = p.group_size() > 1 && (group_in_one_tile || tasks_for(p.group_size()) >= 2 * threads) ? p.group_size() : 1;
  f.span = std::max<int64_t>(1, std::min(L, kBlockQ / f.pack));
  f.n_spans = (L + f.span - 1) / f.span;
  f.n_packs = p.heads_q / f.pack;
  f.max_rows = f.pack * f.span;
  // Packed sequences (varlen) are never split: their rows are prefills, not decode steps.
  f.n_splits =
      p.varlen() ? 1 : p.config.splits(choose_splits(p.batch * f.n_packs * f.n_spans, threads, p.len_k, f.max_rows));
  // The tile products' back end (tile_backend.h). bf16 on avx512_bf16 or brgemm: both products
  // on bf16 operands, Q and K as stored, P rounded to bf16 for P V as flash-attn does on GPUs;
  // the softmax stays float. Otherwise float tiles (bf16/fp16 widened), on our kernel or brgemm.
  f.tiles = choose_tiles(dtype, p.config.cpu_tiles).backend;
  f.bf16_gemm = dtype == at::kBFloat16 && f.tiles != TileBackend::kFloat;
  f.dim_qk2 = p.dim_qk + p.dim_qk % 2;
  // The per-thread K^T cache (ForwardWorker): when a head has several query spans, up to 8 MiB
  // per thread (longer sequences transpose per span; cpu_kt_cache=off always does).
  f.n_ktiles = (p.len_k + kBlockK - 1) / kBlockK;
  f.cache_kt = f.n_spans > 1 && f.n_ktiles * (p.dim_qk + p.dim_v) * kBlockK * acc_bytes <= (8 << 20) &&
               p.config.cpu_kt_cache != PathMode::kOff;
  return f;
}

// The call-wide inputs of the forward's tasks.
template <typename scalar_t>
struct ForwardArgs : CallArgs<at::opmath_type<scalar_t>, ForwardPlan> {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> q, k, v;
  Rows<scalar_t> out;
  acc_t* lse;
  SplitStates<acc_t>& parts;  // split-KV partial states (plan.n_splits > 1)
};

// One thread's share of the forward: its tile buffers, its K^T cache, and the steps of one
// task's tile loop (run). A task is one (split, batch, head pack, query span): it streams the
// key tiles of its visible band through an online softmax.
template <typename scalar_t>
class ForwardWorker {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  static constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  // fp16 (and bf16 on the float tiles): the widened V tiles are cached with the K^T tiles.
  // Widened once per span instead, V's conversions cost more than the P V product itself (fp16
  // forward at D=128 ran at 1.8x PyTorch's time, benchmarks/NOTES.md #29).
  static constexpr bool kWidenV = !std::is_same_v<scalar_t, acc_t>;

  struct Task {
    int64_t split, b, h0, hk, i0, n_pos, rows;  // row g * n_pos + r: head h0 + g, position i0 + r
    AttentionParams pb;                         // per-sequence lengths (KV cache, varlen)
    bool use_bf16;
  };
  // Where P V finds this tile's V: float rows (ld apart), or packed bf16 pairs.
  struct VOperand {
    const acc_t* rows = nullptr;
    int64_t ld = 0;
    const uint32_t* pairs = nullptr;
  };

 public:
  explicit ForwardWorker(const ForwardArgs<scalar_t>& args) : a_(args), f_(args.plan) {
    const int64_t Dk = a_.p.dim_qk, Dv = a_.p.dim_v, R = f_.max_rows;
    const bool bf = f_.bf16_gemm;
    q_tile_.resize(R * Dk), kt_tile_.resize(Dk * kBlockK), v_tile_.resize(kBlockK * Dv);
    q_bf_.resize(bf ? R * f_.dim_qk2 : 0), p_bf_.resize(bf ? R * kBlockK : 0);
    kt_bf_.resize(bf ? f_.dim_qk2 / 2 * kBlockK : 0), v_bf_.resize(bf ? kBlockK / 2 * Dv : 0);
    row_ptrs_.resize(bf ? kBlockK : 0);
    s_tile_.resize(R * kBlockK), o_acc_.resize(R * Dv), m_run_.resize(R), l_run_.resize(R);
    m_new_.resize(R), alpha_.resize(R);
    keep_.resize(a_.c.dropout ? R * kBlockK : 0);
  }

  void run(int64_t unit) {
    const Task t = task_of(unit);
    if (t.i0 >= t.pb.len_q) return;  // past a packed sequence's end
    load_q(t);
    std::fill(m_run_.begin(), m_run_.end(), kNegInf);
    std::fill(l_run_.begin(), l_run_.end(), acc_t(0));
    std::fill(o_acc_.begin(), o_acc_.end(), acc_t(0));
    const AttentionParams& pb = t.pb;
    const KeyRange band =
        split_band(visible_key_range(t.i0, t.i0 + t.n_pos, pb.align_offset, pb.window_left, pb.window_right, pb.len_k),
                   t.split, f_.n_splits, kBlockK);
    for (int64_t j0 = band.begin; j0 < band.end; j0 += kBlockK) {
      const int64_t cols = std::min(kBlockK, band.end - j0);
      if (t.rows <= kFewRows && j0 + kBlockK < band.end) {  // decode: fetch the next K/V tile now
        const int64_t next = std::min(kBlockK, band.end - j0 - kBlockK);
        prefetch_tile(a_.k, t.b, t.hk, j0 + kBlockK, next, a_.p.dim_qk);
        prefetch_tile(a_.v, t.b, t.hk, j0 + kBlockK, next, a_.p.dim_v);
      }
      const VOperand v = t.use_bf16 ? scores_bf16(t, j0, cols) : scores_float(t, j0, cols);
      mask_scores(t, j0, cols);
      online_softmax(t.rows, cols);
      accumulate_pv(t, v, cols);
    }
    if (f_.n_splits > 1) {
      store_partial(t);
    } else {
      store_output(t);
    }
  }

 private:
  Task task_of(int64_t unit) const {
    Task t;
    t.split = unit % f_.n_splits;
    const int64_t task = unit / f_.n_splits, sp = task % f_.n_spans;
    t.b = task / f_.n_spans / f_.n_packs;
    t.h0 = (task / f_.n_spans % f_.n_packs) * f_.pack;
    t.hk = a_.p.kv_head(t.h0);
    t.i0 = sp * f_.span;
    t.pb = a_.p.for_batch(t.b);
    t.n_pos = std::min(f_.span, t.pb.len_q - t.i0);
    t.rows = f_.pack * t.n_pos;
    t.use_bf16 = f_.bf16_gemm && t.rows > kFewRows;
    return t;
  }

  void load_q(const Task& t) {
    const int64_t Dk = a_.p.dim_qk;
    if (t.use_bf16) {  // Q as stored (bf16 bits), a zero column for an odd head dim
      if constexpr (kBf16)
        for (int64_t g = 0; g < f_.pack; ++g)
          copy_bf16_rows(a_.q, t.b, t.h0 + g, t.i0, t.n_pos, Dk, q_bf_.data() + g * t.n_pos * f_.dim_qk2, f_.dim_qk2);
      return;
    }
    // Q is pre-multiplied by the softmax scale: one multiply per element of Q instead of S.
    for (int64_t g = 0; g < f_.pack; ++g)
      load_rows(a_.q.row(t.b, t.h0 + g, t.i0), a_.q.stride_l, t.n_pos, Dk, a_.c.scale,
                q_tile_.data() + g * t.n_pos * Dk, Dk);
  }

  // The slot of key tile j0 of (b, hk) in the per-thread K^T cache, emptied when the head
  // changes (parallel_for hands each thread consecutive spans of a head, so each tile is
  // transposed once per thread instead of once per span); -1: not cached (cache off, or a band
  // that starts off the tile grid). Slot t holds kt_cols_[t] keys.
  int64_t cache_slot(int64_t b, int64_t hk, int64_t j0) {
    if (!f_.cache_kt || j0 % kBlockK != 0) return -1;
    if (kt_cols_.empty()) kt_cols_.assign(f_.n_ktiles, 0);
    if (b != cache_b_ || hk != cache_hk_) {
      std::fill(kt_cols_.begin(), kt_cols_.end(), 0);
      cache_b_ = b, cache_hk_ = hk;
    }
    return j0 / kBlockK;
  }

  // S = Q K^T on bf16 operands (scaled in the product); K^T and V packed by pairs, or found in
  // the cache.
  VOperand scores_bf16(const Task& t, int64_t j0, int64_t cols) {
    VOperand v;
    if constexpr (kBf16) {
      const int64_t Dk2 = f_.dim_qk2, Dv = a_.p.dim_v;
      uint32_t* kt_dst = kt_bf_.data();
      uint32_t* v_dst = v_bf_.data();
      bool packed = false;
      if (const int64_t slot = cache_slot(t.b, t.hk, j0); slot >= 0) {
        const int64_t kt_size = Dk2 / 2 * kBlockK, v_size = kBlockK / 2 * Dv;
        if (bf_cache_.empty()) bf_cache_.resize(f_.n_ktiles * (kt_size + v_size));
        kt_dst = bf_cache_.data() + slot * (kt_size + v_size);
        v_dst = kt_dst + kt_size;
        packed = kt_cols_[slot] >= cols;
        kt_cols_[slot] = std::max(kt_cols_[slot], cols);
      }
      if (!packed) {
        for (int64_t c = 0; c < cols; ++c) row_ptrs_[c] = bf16_bits(a_.k.row(t.b, t.hk, j0 + c));
        pack_bf16_transposed(row_ptrs_.data(), cols, a_.p.dim_qk, kt_dst, kBlockK);
        for (int64_t c = 0; c < cols; ++c) row_ptrs_[c] = bf16_bits(a_.v.row(t.b, t.hk, j0 + c));
        pack_bf16_row_pairs(row_ptrs_.data(), cols, Dv, v_dst, Dv);
      }
      v.pairs = v_dst;
      tiles_gemm_bf16(f_.tiles, t.rows, cols, Dk2, static_cast<float>(a_.c.scale), q_bf_.data(), Dk2, kt_dst, kBlockK,
                      s_tile_.data(), kBlockK, /*accumulate=*/false);
    }
    return v;
  }

  // S = (scale Q) K^T on float tiles: row dot products on K as stored for decode-sized tiles
  // (no transpose), else against a K^T tile (cached when the plan allows); then V's operand.
  VOperand scores_float(const Task& t, int64_t j0, int64_t cols) {
    const int64_t Dk = a_.p.dim_qk, Dv = a_.p.dim_v;
    acc_t* s = s_tile_.data();
    const acc_t* v_cached = nullptr;  // this tile's widened V rows in the per-thread cache
    if (t.rows <= kFewRows) {
      load_tile(a_.k, t.b, t.hk, j0, cols, Dk, acc_t(1), kt_tile_.data(), Dk);
      tile_gemm_nt(t.rows, cols, Dk, q_tile_.data(), Dk, kt_tile_.data(), Dk, s, kBlockK);
    } else {
      acc_t* kt = kt_tile_.data();
      if (const int64_t slot = cache_slot(t.b, t.hk, j0); slot >= 0) {
        if (kt_cache_.empty()) kt_cache_.resize(f_.n_ktiles * Dk * kBlockK);
        kt = kt_cache_.data() + slot * Dk * kBlockK;
        if constexpr (kWidenV) {
          if (v_cache_.empty()) v_cache_.resize(f_.n_ktiles * kBlockK * Dv);
          acc_t* vc = v_cache_.data() + slot * kBlockK * Dv;
          if (kt_cols_[slot] < cols) load_tile(a_.v, t.b, t.hk, j0, cols, Dv, acc_t(1), vc, Dv);
          v_cached = vc;
        }
        if (kt_cols_[slot] < cols) {
          load_tile_transposed(a_.k, t.b, t.hk, j0, cols, Dk, kt, kBlockK);
          kt_cols_[slot] = cols;
        }
      } else {
        load_tile_transposed(a_.k, t.b, t.hk, j0, cols, Dk, kt, kBlockK);
      }
      tiles_gemm(f_.tiles, false, t.rows, cols, Dk, acc_t(1), q_tile_.data(), Dk, kt, kBlockK, s, kBlockK,
                 /*accumulate=*/false);
    }
    if (v_cached != nullptr) return {v_cached, Dv, nullptr};
    // float V rows evenly strided (not split by a paged block): the P V product reads them in
    // place, no copy.
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (a_.v.run(j0) >= cols) return {a_.v.row(t.b, t.hk, j0), a_.v.stride_l, nullptr};
    }
    load_tile(a_.v, t.b, t.hk, j0, cols, Dv, acc_t(1), v_tile_.data(), Dv);
    return {v_tile_.data(), Dv, nullptr};
  }

  // Soft-capping, then the band / ALiBi / user mask and the dropout keep-mask, which depend on
  // the head of each row group.
  void mask_scores(const Task& t, int64_t j0, int64_t cols) {
    acc_t* s = s_tile_.data();
    if (a_.c.cap > acc_t(0)) softcap_tile(s, kBlockK, t.rows, cols, a_.c.cap);
    for (int64_t g = 0; g < f_.pack; ++g) {
      mask_tile(s + g * t.n_pos * kBlockK, kBlockK, t.n_pos, cols, t.i0, j0, t.b, t.h0 + g, t.pb, a_.mask);
      if (a_.c.dropout)
        dropout_keep_tile(keep_.data() + g * t.n_pos * kBlockK, kBlockK, t.n_pos, cols, t.i0, j0,
                          t.b * a_.p.heads_q + t.h0 + g, a_.p, a_.c.threshold);
    }
  }

  // The online softmax: per row, the new running max, the accumulator rescaled by
  // exp(m_old - m_new) (all rows' factors in one vector pass), the tile's probabilities (in
  // place of its scores, dropped ones zeroed after the row sum) and the running sum.
  void online_softmax(int64_t rows, int64_t cols) {
    acc_t* m_new = m_new_.data();
    acc_t* alpha = alpha_.data();
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t m_tile = row_max(s_tile_.data() + r * kBlockK, cols);
      const acc_t m_old = m_run_[r];
      m_new[r] = (m_tile > m_old || m_tile != m_tile) ? m_tile : m_old;
      // 0 on the first visible tile; rows with nothing visible yet (m_new = -inf) skip it
      alpha[r] = m_new[r] == kNegInf ? acc_t(0) : m_old - m_new[r];
    }
    exp_nonpositive(alpha, rows);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* sr = s_tile_.data() + r * kBlockK;
      const acc_t m_old = m_run_[r];
      if (m_new[r] == kNegInf) {  // nothing visible in this row yet
        std::fill(sr, sr + cols, acc_t(0));
        continue;
      }
      const acc_t sum = exp_shift_sum(sr, cols, m_new[r]);
      l_run_[r] = l_run_[r] * alpha[r] + sum;
      m_run_[r] = m_new[r];
      // The first visible tile (m_old = -inf) has nothing to rescale: o_acc is still 0.
      if (alpha[r] != acc_t(1) && m_old != kNegInf) scale_row(o_acc_.data() + r * a_.p.dim_v, a_.p.dim_v, alpha[r]);
      if (a_.c.dropout) {
        const uint8_t* kr = keep_.data() + r * kBlockK;
        for (int64_t c = 0; c < cols; ++c) sr[c] = kr[c] ? sr[c] : acc_t(0);
      }
    }
  }

  // O += P V: P rounded to bf16 against V's pairs, or on float tiles.
  void accumulate_pv(const Task& t, const VOperand& v, int64_t cols) {
    const int64_t Dv = a_.p.dim_v;
    if (t.use_bf16) {
      if constexpr (std::is_same_v<acc_t, float>) {
        const int64_t cols2 = cols + cols % 2;  // P V over key pairs
        floats_to_bf16(s_tile_.data(), kBlockK, t.rows, cols, cols2, p_bf_.data(), kBlockK);
        tiles_gemm_bf16(f_.tiles, t.rows, Dv, cols2, 1.0f, p_bf_.data(), kBlockK, v.pairs, Dv, o_acc_.data(), Dv,
                        /*accumulate=*/true);
      }
      return;
    }
    tiles_gemm(f_.tiles, false, t.rows, Dv, cols, acc_t(1), s_tile_.data(), kBlockK, v.rows, v.ld, o_acc_.data(), Dv,
               /*accumulate=*/true);
  }

  // Split-KV: the partial state (m, l, unnormalised accumulator) of each row, for the merge.
  void store_partial(const Task& t) {
    for (int64_t r = 0; r < t.rows; ++r) {
      const int64_t row = (t.b * a_.p.heads_q + t.h0 + r / t.n_pos) * a_.p.len_q + t.i0 + r % t.n_pos;
      a_.parts.store(t.split, row, m_run_[r], l_run_[r], o_acc_.data() + r * a_.p.dim_v);
    }
  }

  // Normalised as stored (the head's sink counted in the denominator and lse). Rows that saw no
  // key return zeros and lse = -inf (the sink logit with sinks); NaN inputs keep the NaN.
  void store_output(const Task& t) {
    const int64_t Dv = a_.p.dim_v;
    for (int64_t r = 0; r < t.rows; ++r) {
      const int64_t h = t.h0 + r / t.n_pos, i = t.i0 + r % t.n_pos;
      const acc_t sink = a_.p.template sink_logit<acc_t>(h);
      const acc_t l = softmax_denominator(m_run_[r], l_run_[r], sink);
      store_rows(o_acc_.data() + r * Dv, Dv, 1, Dv, a_.out.row(t.b, h, i), a_.out.stride_l,
                 output_factor(l, a_.c.keep_scale));
      a_.lse[a_.p.row_index(t.b, h, i)] = row_lse(m_run_[r], l_run_[r], sink);
    }
  }

  const ForwardArgs<scalar_t>& a_;
  const ForwardPlan& f_;
  // Tiles of the current task (float and, for bf16 operands, bf16 bits / packed pairs).
  std::vector<acc_t> q_tile_, kt_tile_, v_tile_, s_tile_, o_acc_, m_run_, l_run_, m_new_, alpha_;
  std::vector<uint16_t> q_bf_, p_bf_;
  std::vector<uint32_t> kt_bf_, v_bf_;
  std::vector<const uint16_t*> row_ptrs_;
  std::vector<uint8_t> keep_;
  // The K^T cache of the current (sequence, KV head): float K^T tiles, widened V tiles, or
  // packed bf16 K^T + V pairs per tile.
  std::vector<acc_t> kt_cache_, v_cache_;
  std::vector<uint32_t> bf_cache_;
  std::vector<int64_t> kt_cols_;
  int64_t cache_b_ = -1, cache_hk_ = -1;
};

template <typename scalar_t>
void forward_kernel(const AttentionParams& p, const MaskView& mask, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const ForwardPlan plan = plan_forward(p, q.scalar_type(), sizeof(acc_t));
  SplitStates<acc_t> parts(plan.n_splits, p.batch * p.heads_q * p.len_q, p.dim_v);
  const ForwardArgs<scalar_t> args{{p, mask, plan, ScoreConstants<acc_t>(p)},
                                   q_rows_of<const scalar_t>(q, p),
                                   kv_rows_of<const scalar_t>(k, p),
                                   kv_rows_of<const scalar_t>(v, p),
                                   q_rows_of<scalar_t>(out, p),
                                   lse.data_ptr<acc_t>(),
                                   parts};
  at::parallel_for(0, plan.units(p.batch), 1, [&](int64_t begin, int64_t end) {
    ForwardWorker<scalar_t> worker(args);
    for (int64_t unit = begin; unit < end; ++unit) worker.run(unit);
    tiles_release(plan.tiles);
  });
  if (plan.n_splits > 1) merge_split_states<scalar_t, acc_t>(parts, p, p.len_q, args.c.keep_scale, args.out, args.lse);
}

}  // namespace

// Draws the dropout seed from PyTorch's default CPU generator (so torch.manual_seed
// reproduces it) and returns it as the op's rng_state (seed, offset) for the backward.
at::Tensor draw_rng_state(double dropout_p, const at::TensorOptions& options) {
  if (dropout_p <= 0.0) return at::empty({0}, options.dtype(at::kLong));
  uint64_t seed = 0;
  {
    auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  at::Tensor state = at::empty({2}, options.dtype(at::kLong));
  state.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  state.data_ptr<int64_t>()[1] = 0;
  return state;
}

void set_dropout_seed(AttentionParams& p, const at::Tensor& rng_state) {
  if (p.dropout_p <= 0.0) return;
  const at::Tensor rng = rng_state.cpu();
  p.dropout_seed = static_cast<uint64_t>(rng.data_ptr<int64_t>()[0]);
  p.dropout_offset = static_cast<uint64_t>(rng.data_ptr<int64_t>()[1]);
}

void run_attention_forward_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  if (out.numel() == 0 && lse.numel() == 0) return;
  if (run_attention_decode_cpu(p, mask, q, k, v, out, lse)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(p, mask, q, k, v, out, lse); });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    double dropout_p, double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& relative_bias) {
  ForwardCall call =
      prepare_attention_forward(q, k, v, attn_mask, dropout_p, scale, window_left, window_right, bottom_right, softcap,
                                alibi_slopes, sinks, DeviceLimits{}, relative_bias);
  at::Tensor rng_state = draw_rng_state(dropout_p, q.options());
  set_dropout_seed(call.params, rng_state);
  run_attention_forward_cpu(call.params, call.mask, q, k, v, call.out, call.lse);
  return {call.out, call.lse, rng_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) { m.impl("attention_forward", &attention_forward_cpu); }

}  // namespace flash_attn_ext::cpu
