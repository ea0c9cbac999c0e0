// CPU kernel of flash_attn_ext::attention_forward: FlashAttention-2's forward on the CPU.
//
// One task = one (batch, group of query heads, tile of query positions): for GQA the query
// heads sharing a K/V head are rows of one tile (see `pack`). The task streams the key/value
// tiles of its visible band (tiles outside the causal/window band are never touched) and keeps an
// online softmax per row: running max m, running sum l, and an accumulator rescaled by
// exp(m_old - m_new) whenever the max grows. Nothing of size L x S is allocated.
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

template <typename scalar_t>
void forward_kernel(const AttentionParams& p, const MaskView& mask, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t L = p.len_q, Dk = p.dim_qk, Dv = p.dim_v;
  // GQA: a tile holds `pack` query heads of one group x `span` positions, so the group's K/V
  // tiles are loaded once for all of them (decode reads the cache once per group, not once
  // per query head). Packing is used when it still leaves two tasks per thread, or when the
  // whole group's rows fit one tile (decode with more query rows per KV head than the decode
  // path takes, e.g. MQA): there unpacked tasks each read the whole cache again, and split-KV
  // finds the parallelism instead (measured: MQA decode at 32 query heads read the cache 32
  // times and took 0.92 of MHA's time per token, benchmarks/NOTES.md #28).
  const int64_t threads = at::get_num_threads();
  const auto tasks_for = [&](int64_t pack) {
    const int64_t span = std::max<int64_t>(1, std::min(L, kBlockQ / pack));
    return p.batch * (p.heads_q / pack) * ((L + span - 1) / span);
  };
  const bool group_in_one_tile = p.group_size() * L <= kBlockQ;
  const int64_t pack =
      p.group_size() > 1 && (group_in_one_tile || tasks_for(p.group_size()) >= 2 * threads) ? p.group_size() : 1;
  const int64_t span = std::max<int64_t>(1, std::min(L, kBlockQ / pack));
  const int64_t n_spans = (L + span - 1) / span;
  const int64_t n_packs = p.heads_q / pack;
  const int64_t max_rows = pack * span;
  // Packed sequences (varlen) are never split: their rows are prefills, not decode steps.
  const int64_t n_splits =
      p.varlen() ? 1 : p.config.splits(choose_splits(p.batch * n_packs * n_spans, threads, p.len_k, max_rows));
  // Partial states of split tasks: per (split, row of (b, h, i)): m, l and the Dv accumulator.
  const int64_t n_rows_all = p.batch * p.heads_q * L;
  SplitStates<acc_t> parts(n_splits, n_rows_all, Dv);
  const auto q_rows = q_rows_of<const scalar_t>(q, p);
  const auto k_rows = kv_rows_of<const scalar_t>(k, p);
  const auto v_rows = kv_rows_of<const scalar_t>(v, p);
  const auto o_rows = q_rows_of<scalar_t>(out, p);
  acc_t* lse_data = lse.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(p.scale), cap = static_cast<acc_t>(p.softcap);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  // Dropout zeroes probabilities after the row sum; the 1/(1-p) of the kept ones is applied
  // once, at the end, with 1/l.
  const acc_t keep_scale = dropout ? acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p)) : acc_t(1);
  // The tile products' back end (tile_backend.h). bf16 on avx512_bf16 or brgemm: both products
  // on bf16 operands, Q and K as stored, P rounded to bf16 for P V as flash-attn does on GPUs;
  // the softmax stays float. Otherwise float tiles (bf16/fp16 widened), on our kernel or brgemm.
  const TileBackend tiles = choose_tiles(q.scalar_type(), p.config.cpu_tiles).backend;
  const bool bf16_gemm = std::is_same_v<scalar_t, c10::BFloat16> && tiles != TileBackend::kFloat;
  const int64_t Dk2 = Dk + Dk % 2;  // the bf16 products run over pairs: odd dims get a zero
  // The per-thread K^T cache (below): when a head has several query spans, up to 8 MiB per thread
  // (longer sequences transpose per span, as before; cpu_kt_cache=off always does).
  const int64_t n_ktiles = (p.len_k + kBlockK - 1) / kBlockK;
  const bool cache_kt = n_spans > 1 &&
                        n_ktiles * (Dk + Dv) * kBlockK * static_cast<int64_t>(sizeof(acc_t)) <= (8 << 20) &&
                        p.config.cpu_kt_cache != PathMode::kOff;

  at::parallel_for(0, p.batch * n_packs * n_spans * n_splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(max_rows * Dk), kt_tile(Dk * kBlockK), v_tile(kBlockK * Dv);
    std::vector<uint16_t> q_bf(bf16_gemm ? max_rows * Dk2 : 0), p_bf(bf16_gemm ? max_rows * kBlockK : 0);
    std::vector<uint32_t> kt_bf(bf16_gemm ? Dk2 / 2 * kBlockK : 0), v_bf(bf16_gemm ? kBlockK / 2 * Dv : 0);
    std::vector<const uint16_t*> row_ptrs(bf16_gemm ? kBlockK : 0);
    // K^T tiles of the current (sequence, KV head), kept across the query spans a thread runs
    // in a row (parallel_for hands each thread consecutive spans of a head): each tile is
    // transposed once per thread instead of once per span. Tile t holds kt_cols[t] keys.
    std::vector<acc_t> kt_cache;
    // fp16 (and bf16 on the float tiles): the widened V tiles too, kept with the K^T tiles. Widened
    // once per span instead, V's conversions cost more than the P V product itself (fp16 forward
    // at D=128 ran at 1.8x PyTorch's time, benchmarks/NOTES.md #29).
    constexpr bool kWidenV = !std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> v_cache;
    std::vector<uint32_t> bf_cache;  // bf16: packed K^T and V pairs per tile
    std::vector<int64_t> kt_cols;
    int64_t cache_b = -1, cache_hk = -1;
    // The cache slot of key tile j0 of (b, hk), emptied when the head changes; -1: not cached
    // (cache off, or a band that starts off the tile grid).
    const auto cache_slot = [&](int64_t b, int64_t hk, int64_t j0) -> int64_t {
      if (!cache_kt || j0 % kBlockK != 0) return -1;
      if (kt_cols.empty()) kt_cols.assign(n_ktiles, 0);
      if (b != cache_b || hk != cache_hk) {
        std::fill(kt_cols.begin(), kt_cols.end(), 0);
        cache_b = b, cache_hk = hk;
      }
      return j0 / kBlockK;
    };
    std::vector<acc_t> s_tile(max_rows * kBlockK), o_acc(max_rows * Dv);
    std::vector<acc_t> m_run(max_rows), l_run(max_rows);
    std::vector<uint8_t> keep(dropout ? max_rows * kBlockK : 0);

    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t split = unit % n_splits, task = unit / n_splits;
      const int64_t sp = task % n_spans;
      const int64_t b = task / n_spans / n_packs, h0 = (task / n_spans % n_packs) * pack;
      const int64_t hk = p.kv_head(h0);
      const int64_t i0 = sp * span;
      const AttentionParams pb = p.for_batch(b);  // per-sequence lengths (KV cache, varlen)
      if (i0 >= pb.len_q) continue;               // past a packed sequence's end
      const int64_t n_pos = std::min(span, pb.len_q - i0);
      const int64_t rows = pack * n_pos;  // row g * n_pos + r: head h0 + g, position i0 + r

      const bool use_bf16 = bf16_gemm && rows > kFewRows;
      if (use_bf16) {  // Q as stored (bf16 bits), a zero column for an odd head dim
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
          for (int64_t g = 0; g < pack; ++g)
            copy_bf16_rows(q_rows, b, h0 + g, i0, n_pos, Dk, q_bf.data() + g * n_pos * Dk2, Dk2);
      } else {
        // Q is pre-multiplied by the softmax scale: one multiply per element of Q instead of S.
        for (int64_t g = 0; g < pack; ++g)
          load_rows(q_rows.row(b, h0 + g, i0), q_rows.stride_l, n_pos, Dk, scale, q_tile.data() + g * n_pos * Dk, Dk);
      }
      std::fill(m_run.begin(), m_run.end(), kNegInf);
      std::fill(l_run.begin(), l_run.end(), acc_t(0));
      std::fill(o_acc.begin(), o_acc.end(), acc_t(0));

      const KeyRange band =
          split_band(visible_key_range(i0, i0 + n_pos, pb.align_offset, pb.window_left, pb.window_right, pb.len_k),
                     split, n_splits, kBlockK);
      for (int64_t j0 = band.begin; j0 < band.end; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, band.end - j0);
        if (rows <= kFewRows && j0 + kBlockK < band.end) {  // decode: fetch the next K/V tile now
          const int64_t next = std::min(kBlockK, band.end - j0 - kBlockK);
          prefetch_tile(k_rows, b, hk, j0 + kBlockK, next, Dk);
          prefetch_tile(v_rows, b, hk, j0 + kBlockK, next, Dv);
        }
        acc_t* s = s_tile.data();
        const acc_t* v_cached = nullptr;        // this tile's widened V rows in the per-thread cache
        const int64_t cols2 = cols + cols % 2;  // P V over key pairs
        const uint32_t* v_p = v_bf.data();
        if (use_bf16) {
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            uint32_t* kt_dst = kt_bf.data();
            uint32_t* v_dst = v_bf.data();
            bool packed = false;
            if (const int64_t t = cache_slot(b, hk, j0); t >= 0) {  // the packed K^T and V tiles
              const int64_t kt_size = Dk2 / 2 * kBlockK, v_size = kBlockK / 2 * Dv;
              if (bf_cache.empty()) bf_cache.resize(n_ktiles * (kt_size + v_size));
              kt_dst = bf_cache.data() + t * (kt_size + v_size);
              v_dst = kt_dst + kt_size;
              packed = kt_cols[t] >= cols;
              kt_cols[t] = std::max(kt_cols[t], cols);
            }
            if (!packed) {
              for (int64_t c = 0; c < cols; ++c) row_ptrs[c] = bf16_bits(k_rows.row(b, hk, j0 + c));
              pack_bf16_transposed(row_ptrs.data(), cols, Dk, kt_dst, kBlockK);
              for (int64_t c = 0; c < cols; ++c) row_ptrs[c] = bf16_bits(v_rows.row(b, hk, j0 + c));
              pack_bf16_row_pairs(row_ptrs.data(), cols, Dv, v_dst, Dv);
            }
            v_p = v_dst;
            tiles_gemm_bf16(tiles, rows, cols, Dk2, static_cast<float>(scale), q_bf.data(), Dk2, kt_dst, kBlockK, s,
                            kBlockK, /*accumulate=*/false);
          }
        } else if (rows <= kFewRows) {  // decode: row dot products on K as stored, no transpose
          load_tile(k_rows, b, hk, j0, cols, Dk, acc_t(1), kt_tile.data(), Dk);
          tile_gemm_nt(rows, cols, Dk, q_tile.data(), Dk, kt_tile.data(), Dk, s, kBlockK);
        } else {
          acc_t* kt = kt_tile.data();
          if (const int64_t t = cache_slot(b, hk, j0); t >= 0) {
            if (kt_cache.empty()) kt_cache.resize(n_ktiles * Dk * kBlockK);
            kt = kt_cache.data() + t * Dk * kBlockK;
            if constexpr (kWidenV) {
              if (v_cache.empty()) v_cache.resize(n_ktiles * kBlockK * Dv);
              acc_t* vc = v_cache.data() + t * kBlockK * Dv;
              if (kt_cols[t] < cols) load_tile(v_rows, b, hk, j0, cols, Dv, acc_t(1), vc, Dv);
              v_cached = vc;
            }
            if (kt_cols[t] < cols) {
              load_tile_transposed(k_rows, b, hk, j0, cols, Dk, kt, kBlockK);
              kt_cols[t] = cols;
            }
          } else {
            load_tile_transposed(k_rows, b, hk, j0, cols, Dk, kt, kBlockK);
          }
          tiles_gemm(tiles, false, rows, cols, Dk, acc_t(1), q_tile.data(), Dk, kt, kBlockK, s, kBlockK,
                     /*accumulate=*/false);
        }
        // float V rows evenly strided (not split by a paged block): the P V product reads them
        // in place, no copy.
        const acc_t* v_in = v_tile.data();
        int64_t ld_v = Dv;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (!use_bf16 && v_rows.run(j0) >= cols) v_in = v_rows.row(b, hk, j0), ld_v = v_rows.stride_l;
        }
        if (v_cached != nullptr) v_in = v_cached;
        if (!use_bf16 && v_in == v_tile.data()) load_tile(v_rows, b, hk, j0, cols, Dv, acc_t(1), v_tile.data(), Dv);
        if (cap > acc_t(0)) softcap_tile(s, kBlockK, rows, cols, cap);
        for (int64_t g = 0; g < pack; ++g) {  // masks and dropout depend on the head
          mask_tile(s + g * n_pos * kBlockK, kBlockK, n_pos, cols, i0, j0, b, h0 + g, pb, mask);
          if (dropout)
            dropout_keep_tile(keep.data() + g * n_pos * kBlockK, kBlockK, n_pos, cols, i0, j0, b * p.heads_q + h0 + g,
                              p, threshold);
        }

        for (int64_t r = 0; r < rows; ++r) {
          acc_t* sr = s + r * kBlockK;
          const acc_t m_tile = row_max(sr, cols);
          const acc_t m_old = m_run[r];
          const acc_t m_new = (m_tile > m_old || m_tile != m_tile) ? m_tile : m_old;
          if (m_new == kNegInf) {  // nothing visible in this row yet
            std::fill(sr, sr + cols, acc_t(0));
            continue;
          }
          const acc_t alpha = std::exp(m_old - m_new);  // 0 on the first visible tile
          const acc_t sum = exp_shift_sum(sr, cols, m_new);
          l_run[r] = l_run[r] * alpha + sum;
          m_run[r] = m_new;
          // The first visible tile (m_old = -inf) has nothing to rescale: o_acc is still 0.
          if (alpha != acc_t(1) && m_old != kNegInf) scale_row(o_acc.data() + r * Dv, Dv, alpha);
          if (dropout) {
            const uint8_t* kr = keep.data() + r * kBlockK;
            for (int64_t c = 0; c < cols; ++c) sr[c] = kr[c] ? sr[c] : acc_t(0);
          }
        }
        if (use_bf16) {
          if constexpr (std::is_same_v<acc_t, float>) {
            floats_to_bf16(s, kBlockK, rows, cols, cols2, p_bf.data(), kBlockK);
            tiles_gemm_bf16(tiles, rows, Dv, cols2, 1.0f, p_bf.data(), kBlockK, v_p, Dv, o_acc.data(), Dv,
                            /*accumulate=*/true);
          }
        } else {
          tiles_gemm(tiles, false, rows, Dv, cols, acc_t(1), s, kBlockK, v_in, ld_v, o_acc.data(), Dv,
                     /*accumulate=*/true);
        }
      }

      if (n_splits > 1) {  // leave the partial state to the merge pass
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = (b * p.heads_q + h0 + r / n_pos) * L + i0 + r % n_pos;
          parts.store(split, row, m_run[r], l_run[r], o_acc.data() + r * Dv);
        }
        continue;
      }
      // Normalised as stored. Rows that saw no key (l == 0) return zeros and lse = -inf.
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t l = l_run[r];
        const int64_t h = h0 + r / n_pos, i = i0 + r % n_pos;
        const int64_t at = p.row_index(b, h, i);
        store_rows(o_acc.data() + r * Dv, Dv, 1, Dv, o_rows.row(b, h, i), o_rows.stride_l,
                   l > acc_t(0) ? keep_scale / l : acc_t(0));
        lse_data[at] = l > acc_t(0) ? m_run[r] + std::log(l) : kNegInf;
        if (l != l) lse_data[at] = l;  // NaN inputs: keep the NaN, not a zero row
      }
    }
    tiles_release(tiles);
  });
  if (n_splits == 1) return;

  merge_split_states<scalar_t, acc_t>(parts, p.heads_q, L, keep_scale, o_rows, lse_data);
}

}  // namespace

// Draws the dropout seed from PyTorch's default CPU generator (so torch.manual_seed
// reproduces it) and returns it as the op's rng_state (seed, offset) for the backward.
at::Tensor draw_rng_state(double dropout_p, const at::TensorOptions& options) {
  uint64_t seed = 0;
  if (dropout_p > 0.0) {
    auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  at::Tensor state = at::empty({2}, options.dtype(at::kLong));
  state.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  state.data_ptr<int64_t>()[1] = 0;
  return state;
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
    const std::optional<at::Tensor>& alibi_slopes) {
  ForwardCall call = prepare_attention_forward(q, k, v, attn_mask, dropout_p, scale, window_left, window_right,
                                               bottom_right, softcap, alibi_slopes, DeviceLimits{});
  at::Tensor rng_state = draw_rng_state(dropout_p, q.options());
  call.params.dropout_seed = static_cast<uint64_t>(rng_state.data_ptr<int64_t>()[0]);
  call.params.dropout_offset = static_cast<uint64_t>(rng_state.data_ptr<int64_t>()[1]);
  run_attention_forward_cpu(call.params, call.mask, q, k, v, call.out, call.lse);
  return {call.out, call.lse, rng_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) { m.impl("attention_forward", &attention_forward_cpu); }

}  // namespace flash_attn_ext::cpu
