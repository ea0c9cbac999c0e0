// CPU decode path of the forward (attention_kvcache and attention_forward alike): few query
// rows per KV head (L * Hq / Hkv <= kDecodeRows), no user mask, no dropout. Decode reads the
// whole cache once per token, so it is bound by memory, and the general kernel's task order
// (one KV head at a time) walks a flash-attn (B, S, H, D) cache with a stride of H * D elements,
// which the hardware prefetchers do not follow. Here one task owns a key range of one sequence
// for *all* its KV heads and reads each key tile in memory order (position-major for
// (B, S, H, D), head-major for (B, H, S, D)), keeping every head's online-softmax state
// (running max, running sum, accumulator) at once. Tasks split the key band (Flash-Decoding)
// when sequences are fewer than threads; partial states merge exactly (merge_split_states).
// float and bf16 caches are read in place by the inner loops (csrc/cpu/decode_math.h), which
// widen in registers; fp16 and float64 tiles are widened into a buffer first. int8 and fp8
// caches are read in place too: a key's scores are its codes' dot products times its K scale,
// and each probability is multiplied by its V row's scale before P V, so nothing is
// dequantized into memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu/decode_math.h"
#include "../cpu/tile_math.h"
#include "attention_cpu_tiles.h"
#include "attention_forward_cpu.h"

namespace flash_attn_ext::cpu {
namespace {

constexpr int64_t kDecodeRows = kMaxDecodeRows;  // query rows per KV head (L * group size) served here
constexpr int64_t kDecodeTile = 32;              // keys per tile: all heads' K or V tile stays in L2

int64_t decode_splits(int64_t batch, int64_t threads, int64_t len_k) {
  if (batch >= 2 * threads) return 1;
  const int64_t by_threads = (2 * threads + batch - 1) / batch;  // two ranges per thread
  const int64_t by_length = std::max<int64_t>(1, len_k / (8 * kDecodeTile));
  return std::min<int64_t>({by_threads, by_length, 64});
}

// Calls f(hk, c) for every head hk < heads and tile row c < cols, in memory order: position-
// major when a position's heads are adjacent ((B, S, H, D) caches), head-major otherwise.
template <typename F>
void for_memory_order(bool heads_inner, int64_t heads, int64_t cols, F&& f) {
  if (heads_inner) {
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t hk = 0; hk < heads; ++hk) f(hk, c);
  } else {
    for (int64_t hk = 0; hk < heads; ++hk)
      for (int64_t c = 0; c < cols; ++c) f(hk, c);
  }
}

// How the inner loops read K/V of a storage type: float and bf16 in place (decode_math.h),
// others (fp16, float64) widened into a tile buffer first.
template <typename scalar_t>
struct DirectRead {
  using type = void;
};
template <>
struct DirectRead<float> {
  using type = float;
};
template <>
struct DirectRead<c10::BFloat16> {
  using type = uint16_t;  // decode_math.h takes bf16 as its raw bits
};
template <>
struct DirectRead<int8_t> {
  using type = int8_t;
};
template <>
struct DirectRead<c10::Float8_e4m3fn> {
  using type = Fp8E4M3;  // its raw byte
};

// scalar_t: the query's (and output's) dtype; cache_t: the cache's storage, scalar_t or, with
// scales, int8_t / c10::Float8_e4m3fn.
template <typename scalar_t, typename cache_t = scalar_t>
void decode_kernel(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& k_scale = {},
                   const at::Tensor& v_scale = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  using direct_t = typename DirectRead<cache_t>::type;
  constexpr bool kQuantized = !std::is_same_v<scalar_t, cache_t>;
  constexpr bool kDirect = !std::is_void_v<direct_t>;
  // What the inner loops see: the cache itself, or the widened tile buffer.
  using read_t = std::conditional_t<kDirect, direct_t, acc_t>;
  // bf16 read in place: q and the accumulators are kept pair-split (decode_math.h).
  constexpr bool kPairSplit = std::is_same_v<read_t, uint16_t>;
  // bf16 scores with AVX512-BF16 where the CPU has it (cpu_bf16_dot=off: the
  // widening loop instead; the tests run both).
  const bool bf16_dot = kPairSplit && has_bf16_dot() && p.config.cpu_bf16_dot != PathMode::kOff;
  // 8-bit caches: the AVX2 widening loops unless cpu_q8_avx2=off (the tests run both).
  [[maybe_unused]] const bool q8_avx2 = p.config.cpu_q8_avx2 != PathMode::kOff;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t L = p.len_q, G = p.group_size(), Hkv = p.heads_kv, Dk = p.dim_qk, Dv = p.dim_v;
  const int64_t R = G * L;  // rows of one KV head: row g * L + i is query head hk * G + g, position i
  const int64_t n_splits = p.config.splits(decode_splits(p.batch, at::get_num_threads(), p.len_k));
  const int64_t n_rows_all = p.batch * p.heads_q * L;
  SplitStates<acc_t> parts(n_splits, n_rows_all, Dv);
  const auto q_rows = rows_of<const scalar_t>(q);
  const auto k_rows = kv_rows_of<const cache_t>(k, p);
  const auto v_rows = kv_rows_of<const cache_t>(v, p);
  // The scales as (B, Hkv, S, 1) rows, addressed like the cache (paged included).
  Rows<const float> k_scales{}, v_scales{};
  if constexpr (kQuantized) {
    k_scales = kv_rows_of<const float>(k_scale.unsqueeze(-1), p);
    v_scales = kv_rows_of<const float>(v_scale.unsqueeze(-1), p);
  }
  const auto o_rows = rows_of<scalar_t>(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(p.scale);
  // Memory order of a key tile: heads inner when a position's heads are adjacent.
  const bool k_heads_inner = k_rows.stride_h < k_rows.stride_l;
  const bool v_heads_inner = v_rows.stride_h < v_rows.stride_l;

  at::parallel_for(0, p.batch * n_splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_all(bf16_dot ? 0 : Hkv * R * Dk), s_all(Hkv * R * kDecodeTile), acc(Hkv * R * Dv),
        m_run(Hkv * R), l_run(Hkv * R);
    std::vector<acc_t> k_all(kDirect ? 0 : Hkv * kDecodeTile * Dk), v_all(kDirect ? 0 : Hkv * kDecodeTile * Dv);
    std::vector<const read_t*> row_ptrs(kDecodeTile), k_ptrs(Hkv * kDecodeTile);
    std::vector<const acc_t*> q_ptrs(Hkv * kDecodeTile);
    std::vector<uint16_t> q_bf16(bf16_dot ? Hkv * R * Dk : 0);
    std::vector<const uint16_t*> q_bf16_ptrs(Hkv * kDecodeTile);
    std::vector<acc_t*> s_ptrs(Hkv * kDecodeTile);
    std::vector<const void*> prefetch_rows(Hkv * kDecodeTile);
    // Row c of head hk of the current tile, as the inner loops read it.
    const auto row = [&](const Rows<const cache_t>& src, const std::vector<acc_t>& widened, int64_t dim, int64_t b,
                         int64_t hk, int64_t j0, int64_t c) -> const read_t* {
      if constexpr (kDirect)
        return reinterpret_cast<const read_t*>(src.row(b, hk, j0 + c));
      else
        return widened.data() + (hk * kDecodeTile + c) * dim;
    };
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / n_splits, split = unit % n_splits;
      const AttentionParams pb = p.for_batch(b);
      const KeyRange band =
          split_band(visible_key_range(0, L, pb.align_offset, pb.window_left, pb.window_right, pb.len_k), split,
                     n_splits, kDecodeTile);
      if (!bf16_dot) {
        for (int64_t hk = 0; hk < Hkv; ++hk)
          for (int64_t g = 0; g < G; ++g)  // Q pre-multiplied by the softmax scale
            load_rows(q_rows.row(b, hk * G + g, 0), q_rows.stride_l, L, Dk, scale, q_all.data() + (hk * R + g * L) * Dk,
                      Dk);
        if constexpr (kPairSplit)
          for (int64_t r = 0; r < Hkv * R; ++r) to_pair_split(q_all.data() + r * Dk, Dk);
      } else {  // vdpbf16ps takes q as it is (bf16, unscaled; the scale goes on the sums)
        for (int64_t hk = 0; hk < Hkv; ++hk)
          for (int64_t g = 0; g < G; ++g)
            for (int64_t i = 0; i < L; ++i)
              std::memcpy(q_bf16.data() + (hk * R + g * L + i) * Dk, q_rows.row(b, hk * G + g, i),
                          Dk * sizeof(uint16_t));
      }
      std::fill(m_run.begin(), m_run.end(), kNegInf);
      std::fill(l_run.begin(), l_run.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));

      for (int64_t j0 = band.begin; j0 < band.end; j0 += kDecodeTile) {
        const int64_t cols = std::min(kDecodeTile, band.end - j0);
        // Every head's tile widened into dst (fp16 / float64 only), read in memory order;
        // row c of head hk at dst[(hk * T + c) * dim].
        const auto widen_all = [&](const Rows<const cache_t>& src, bool heads_inner, int64_t dim, acc_t* dst) {
          if (heads_inner) {
            for (int64_t c = 0; c < cols; ++c)
              for (int64_t hk = 0; hk < Hkv; ++hk)
                load_rows(src.row(b, hk, j0 + c), src.stride_l, 1, dim, acc_t(1), dst + (hk * kDecodeTile + c) * dim,
                          dim);
          } else {
            for (int64_t hk = 0; hk < Hkv; ++hk)
              load_tile(src, b, hk, j0, cols, dim, acc_t(1), dst + hk * kDecodeTile * dim, dim);
          }
        };
        if constexpr (!kDirect) widen_all(k_rows, k_heads_inner, Dk, k_all.data());
        // Scores of every head, key rows listed in the cache's memory order, so the hardware
        // prefetchers see one stream; the tile's V rows are requested meanwhile, in their order.
        int64_t n = 0;
        const auto add_key = [&](int64_t hk, int64_t c) {
          if (bf16_dot)
            q_bf16_ptrs[n] = q_bf16.data() + hk * R * Dk;
          else
            q_ptrs[n] = q_all.data() + hk * R * Dk;
          k_ptrs[n] = row(k_rows, k_all, Dk, b, hk, j0, c);
          s_ptrs[n++] = s_all.data() + hk * R * kDecodeTile + c;
        };
        // Requested while the scores run: this tile's V rows. (Adding the next tile's K rows
        // measured slower, 0.49-0.54 of copy instead of 0.52-0.71: the hardware prefetchers
        // already follow K, read in memory order, and the extra requests crowd the queues.)
        int64_t n_pf = 0;
        if constexpr (kDirect)
          for_memory_order(v_heads_inner, Hkv, cols,
                           [&](int64_t hk, int64_t c) { prefetch_rows[n_pf++] = v_rows.row(b, hk, j0 + c); });
        for_memory_order(k_heads_inner, Hkv, cols, add_key);
        const PrefetchList prefetch{prefetch_rows.data(), n_pf, Dv * static_cast<int64_t>(sizeof(cache_t))};
        if constexpr (kPairSplit) {
          if (bf16_dot) {
            dot_rows_bf16_dot(n, q_bf16_ptrs.data(), k_ptrs.data(), s_ptrs.data(), R, Dk, kDecodeTile,
                              static_cast<float>(scale), prefetch);
          } else {
            dot_rows(n, q_ptrs.data(), k_ptrs.data(), s_ptrs.data(), R, Dk, kDecodeTile, prefetch);
          }
        } else if constexpr (kQuantized) {
          dot_rows(n, q_ptrs.data(), k_ptrs.data(), s_ptrs.data(), R, Dk, kDecodeTile, prefetch, q8_avx2);
        } else {
          dot_rows(n, q_ptrs.data(), k_ptrs.data(), s_ptrs.data(), R, Dk, kDecodeTile, prefetch);
        }
        if constexpr (kQuantized)  // each key's scores times its scale
          for (int64_t hk = 0; hk < Hkv; ++hk)
            for (int64_t c = 0; c < cols; ++c) {
              const acc_t ks = *k_scales.row(b, hk, j0 + c);
              acc_t* s = s_all.data() + hk * R * kDecodeTile + c;
              for (int64_t r = 0; r < R; ++r) s[r * kDecodeTile] *= ks;
            }
        for (int64_t hk = 0; hk < Hkv; ++hk) {
          acc_t* s = s_all.data() + hk * R * kDecodeTile;
          if (p.softcap > 0.0) softcap_tile(s, kDecodeTile, R, cols, static_cast<acc_t>(p.softcap));
          for (int64_t g = 0; g < G; ++g)  // the window / causal edges of the band
            mask_tile(s + g * L * kDecodeTile, kDecodeTile, L, cols, 0, j0, b, hk * G + g, pb, MaskView{});
          for (int64_t r = 0; r < R; ++r) {
            acc_t* sr = s + r * kDecodeTile;
            const int64_t at = hk * R + r;
            const acc_t m_tile = row_max(sr, cols);
            const acc_t m_old = m_run[at];
            const acc_t m_new = (m_tile > m_old || m_tile != m_tile) ? m_tile : m_old;
            if (m_new == kNegInf) {
              std::fill(sr, sr + cols, acc_t(0));
              continue;
            }
            const acc_t alpha = std::exp(m_old - m_new);
            l_run[at] = l_run[at] * alpha + exp_shift_sum(sr, cols, m_new);
            m_run[at] = m_new;
            if (alpha != acc_t(1)) scale_row(acc.data() + at * Dv, Dv, alpha);
          }
        }
        if constexpr (!kDirect) widen_all(v_rows, v_heads_inner, Dv, v_all.data());
        if constexpr (kQuantized)  // each probability times its V row's scale (l_run has the unscaled ones)
          for (int64_t hk = 0; hk < Hkv; ++hk)
            for (int64_t c = 0; c < cols; ++c) {
              const acc_t vs = *v_scales.row(b, hk, j0 + c);
              acc_t* s = s_all.data() + hk * R * kDecodeTile + c;
              for (int64_t r = 0; r < R; ++r) s[r * kDecodeTile] *= vs;
            }
        for (int64_t hk = 0; hk < Hkv; ++hk) {
          for (int64_t c = 0; c < cols; ++c) row_ptrs[c] = row(v_rows, v_all, Dv, b, hk, j0, c);
          if constexpr (kQuantized)
            axpy_rows(s_all.data() + hk * R * kDecodeTile, kDecodeTile, R, cols, row_ptrs.data(), Dv,
                      acc.data() + hk * R * Dv, q8_avx2);
          else
            axpy_rows(s_all.data() + hk * R * kDecodeTile, kDecodeTile, R, cols, row_ptrs.data(), Dv,
                      acc.data() + hk * R * Dv);
        }
      }

      for (int64_t hk = 0; hk < Hkv; ++hk) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t at = hk * R + r, h = hk * G + r / L, i = r % L;
          const int64_t row = (b * p.heads_q + h) * L + i;
          if constexpr (kPairSplit) from_pair_split(acc.data() + at * Dv, Dv);
          if (n_splits > 1) {
            parts.store(split, row, m_run[at], l_run[at], acc.data() + at * Dv);
            continue;
          }
          const acc_t sink = p.sink_logit<acc_t>(h);
          const acc_t l = softmax_denominator(m_run[at], l_run[at], sink);
          scale_row(acc.data() + at * Dv, Dv, output_factor(l, acc_t(1)));
          lse_data[row] = row_lse(m_run[at], l_run[at], sink);
          store_rows(acc.data() + at * Dv, Dv, 1, Dv, o_rows.row(b, h, i), o_rows.stride_l);
        }
      }
    }
  });
  if (n_splits > 1) merge_split_states<scalar_t, acc_t>(parts, p, L, acc_t(1), o_rows, lse_data);
}

}  // namespace

bool run_attention_decode_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& k_scale, const at::Tensor& v_scale) {
  if (p.config.cpu_decode == PathMode::kOff) return false;
  const char* why = nullptr;
  static_assert(kMaxDecodeRows == 8, "the 'too many query rows' reason names it");
  if (mask.kind != MaskKind::kNone)
    why = "attn_mask";
  else if (p.relative_bias != nullptr)
    why = "relative_bias";
  else if (p.dropout_p > 0.0)
    why = "dropout";
  else if (p.varlen())
    why = "varlen";
  else if (p.len_q * p.group_size() > kDecodeRows)
    why = "too many query rows per KV head (len_q * group size above 8, kMaxDecodeRows)";
  else if (p.heads_kv == 0 || p.batch == 0)
    why = "empty";
  else if (k_scale.defined() && q.scalar_type() == at::kDouble)
    why = "a quantized cache with a float64 query";
  TORCH_CHECK_VALUE(why == nullptr || p.config.cpu_decode != PathMode::kRequire,
                    "flash_attn_ext: kernel_config(cpu_decode='require') but the CPU decode kernel cannot serve this "
                    "call: ",
                    why);
  if (why != nullptr) return false;
  if (k_scale.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_decode_cpu_quantized", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (k.scalar_type() == at::kChar)
          decode_kernel<scalar_t, int8_t>(p, q, k, v, out, lse, k_scale, v_scale);
        else
          decode_kernel<scalar_t, c10::Float8_e4m3fn>(p, q, k, v, out, lse, k_scale, v_scale);
      }
    });
    return true;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_decode_cpu",
                                  [&] { decode_kernel<scalar_t>(p, q, k, v, out, lse); });
  return true;
}

}  // namespace flash_attn_ext::cpu
