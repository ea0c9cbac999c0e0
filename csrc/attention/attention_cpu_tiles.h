// Tile helpers shared by the CPU forward and backward attention kernels: strided row views,
// loads that widen to the accumulation type, the visibility/user mask of a score tile, and
// the dropout keep-mask of a tile.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/attention_semantics.h"
#include "../common/dropout_philox.h"
#include "../cpu/tile_math.h"
#include "attention_rows.h"

namespace flash_attn_ext::cpu {

// Tile sizes: a 64 x 64 score tile and 64-row Q/K/V tiles (at most 64 x 256 x 4 B = 64 KiB
// each) stay in L2 while a tile's two GEMMs run.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

// A (batch, head, position, feature) tensor as the kernels address it (paged, packed or plain):
// the CPU and CUDA kernels share one view, rows::Strided (attention_rows.h).
template <typename T>
using Rows = rows::Strided<T>;

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// K or V rows (and their gradients): paged when p carries a block table, packed when p is varlen.
template <typename T>
Rows<T> kv_rows_of(const at::Tensor& t, const AttentionParams& p) {
  return rows::kv_view(rows_of<T>(t), p);
}

// Query-side rows (query, out, their gradients): packed when p is varlen.
template <typename T>
Rows<T> q_rows_of(const at::Tensor& t, const AttentionParams& p) {
  return rows::q_view(rows_of<T>(t), p);
}

// The score and dropout constants of a call, as the forward and backward tasks read them.
template <typename acc_t>
struct ScoreConstants {
  acc_t scale, cap;    // softmax scale; softcap (0: none)
  bool dropout;        // dropout_p > 0
  uint32_t threshold;  // dropout's keep threshold (dropout_philox.h)
  // 1 / (1 - dropout_p) (1 without dropout): dropout zeroes probabilities after the row sum, and
  // the kept ones are scaled once, where the sums are narrowed.
  acc_t keep_scale;
  explicit ScoreConstants(const AttentionParams& p)
      : scale(static_cast<acc_t>(p.scale)),
        cap(static_cast<acc_t>(p.softcap)),
        dropout(p.dropout_p > 0.0),
        threshold(dropout_threshold(p.dropout_p)),
        keep_scale(dropout ? acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p)) : acc_t(1)) {}
};

// What every task of a kernel call reads: the call, its user mask, the kernel's plan (what the
// call decided once) and the score constants. The forward's and backward's arguments extend it.
template <typename acc_t, typename Plan>
struct CallArgs {
  const AttentionParams& p;
  const MaskView& mask;
  const Plan& plan;
  ScoreConstants<acc_t> c;
};

// Soft-capping of a score tile in place, s = cap * tanh(s / cap) (p.softcap > 0; before the
// mask, as flash-attn and Gemma-2 apply it). slope, when given, receives 1 - tanh^2, the
// backward's factor from the capped to the raw score.
template <typename acc_t>
inline void softcap_tile(acc_t* s, int64_t ld, int64_t rows, int64_t cols, acc_t cap, acc_t* slope = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * ld;
    for (int64_t c = 0; c < cols; ++c) {
      sr[c] = apply_softcap(sr[c], cap);
      if (slope != nullptr) slope[r * ld + c] = softcap_slope(sr[c], cap);
    }
  }
}

// Asks the caches for `rows` rows of `dim` elements. Decode is bound by memory latency
// otherwise: a flash-attn (B, S, H, D) cache strides one head's rows by H * D elements (2 KiB
// for 8 heads of 128 bf16), two rows per 4 KiB page, which the hardware prefetchers do not
// follow, so each row of a tile was a demand miss (perf: ~90% of decode samples on the first
// load of a row).
template <typename T>
inline void prefetch_rows(const T* src, int64_t stride, int64_t rows, int64_t dim) {
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(src + r * stride);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
}

// dst[r * ld + d] = scale * src[r * src_stride + d]
template <typename src_t, typename acc_t>
inline void load_rows(const src_t* src, int64_t src_stride, int64_t rows, int64_t dim, acc_t scale, acc_t* dst,
                      int64_t ld) {
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<acc_t, float>) {
    return scale_rows(src, src_stride, rows, dim, scale, dst, ld);  // vectorised for this CPU
  }
  for (int64_t r = 0; r < rows; ++r) {
    const src_t* s = src + r * src_stride;
    acc_t* d = dst + r * ld;
    for (int64_t c = 0; c < dim; ++c) d[c] = scale * static_cast<acc_t>(s[c]);
  }
}

// dst[d * ld + r] = src[r * src_stride + d]: K^T / V^T tiles, so every tile GEMM streams
// its B operand along contiguous rows.
template <typename src_t, typename acc_t>
inline void load_rows_transposed(const src_t* src, int64_t src_stride, int64_t rows, int64_t dim, acc_t* dst,
                                 int64_t ld) {
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<acc_t, float>) {
    return transpose_tile(src, src_stride, rows, dim, dst, ld);  // 8 x 8 register blocks
  }
  for (int64_t r = 0; r < rows; ++r) {
    const src_t* s = src + r * src_stride;
    for (int64_t c = 0; c < dim; ++c) dst[c * ld + r] = static_cast<acc_t>(s[c]);
  }
}

// load_rows / load_rows_transposed / prefetch_rows of key rows [j0, j0 + cols) of (b, h), in
// runs of evenly strided rows (the whole tile unless a paged cache's block ends inside it).
template <typename src_t, typename acc_t>
inline void load_tile(const Rows<const src_t>& rows, int64_t b, int64_t h, int64_t j0, int64_t cols, int64_t dim,
                      acc_t scale, acc_t* dst, int64_t ld) {
  for (int64_t c = 0; c < cols;) {
    const int64_t n = std::min(cols - c, rows.run(j0 + c));
    load_rows(rows.row(b, h, j0 + c), rows.stride_l, n, dim, scale, dst + c * ld, ld);
    c += n;
  }
}

template <typename src_t, typename acc_t>
inline void load_tile_transposed(const Rows<const src_t>& rows, int64_t b, int64_t h, int64_t j0, int64_t cols,
                                 int64_t dim, acc_t* dst, int64_t ld) {
  for (int64_t c = 0; c < cols;) {
    const int64_t n = std::min(cols - c, rows.run(j0 + c));
    load_rows_transposed(rows.row(b, h, j0 + c), rows.stride_l, n, dim, dst + c, ld);
    c += n;
  }
}

template <typename T>
inline void prefetch_tile(const Rows<const T>& rows, int64_t b, int64_t h, int64_t j0, int64_t cols, int64_t dim) {
  for (int64_t c = 0; c < cols;) {
    const int64_t n = std::min(cols - c, rows.run(j0 + c));
    prefetch_rows(rows.row(b, h, j0 + c), rows.stride_l, n, dim);
    c += n;
  }
}

// dst[r * dst_stride + d] = factor * src[r * ld + d], narrowed to the output dtype.
template <typename dst_t, typename acc_t>
inline void store_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t dim, dst_t* dst, int64_t dst_stride,
                       acc_t factor = acc_t(1)) {
  if constexpr (std::is_same_v<dst_t, float> && std::is_same_v<acc_t, float>) {
    return scale_rows(src, ld, rows, dim, factor, dst, dst_stride);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = src + r * ld;
    dst_t* d = dst + r * dst_stride;
    if (factor == acc_t(1)) {
      for (int64_t c = 0; c < dim; ++c) d[c] = static_cast<dst_t>(s[c]);
    } else {
      for (int64_t c = 0; c < dim; ++c) d[c] = static_cast<dst_t>(factor * s[c]);
    }
  }
}

template <typename mask_t, typename acc_t>
inline void add_user_mask(acc_t* s, int64_t ld, int64_t rows, int64_t cols, const mask_t* m, int64_t stride_i,
                          int64_t stride_j) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const mask_t* mr = m + r * stride_i;
    acc_t* sr = s + r * ld;
    for (int64_t c = 0; c < cols; ++c) {
      if constexpr (std::is_same_v<mask_t, bool>) {
        if (!mr[c * stride_j]) sr[c] = kNegInf;
      } else {
        sr[c] += static_cast<acc_t>(mr[c * stride_j]);
      }
    }
  }
}

// Sets invisible entries of the score tile s (rows i0.., keys j0..) to -inf: first the
// window/causal band (skipped when the whole tile is inside it), then the ALiBi bias and the
// user mask.
template <typename acc_t>
inline void mask_tile(acc_t* s, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, int64_t b, int64_t h,
                      const AttentionParams& p, const MaskView& mask) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (!tile_fully_visible(i0, i0 + rows, j0, j0 + cols, p.align_offset, p.window_left, p.window_right)) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const int64_t lo =
          std::clamp<int64_t>(first_visible_key(i, p.align_offset, p.window_left, p.len_k) - j0, 0, cols);
      const int64_t hi =
          std::clamp<int64_t>(end_visible_key(i, p.align_offset, p.window_right, p.len_k) - j0, lo, cols);
      acc_t* sr = s + r * ld;
      std::fill(sr, sr + lo, kNegInf);
      std::fill(sr + hi, sr + cols, kNegInf);
    }
  }
  if (p.alibi_slopes != nullptr) {  // -slope * |i + o - j| (masked entries stay -inf)
    const acc_t slope = static_cast<acc_t>(p.alibi_slopes[b * p.alibi_batch_stride + h]);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* sr = s + r * ld;
      const int64_t center = i0 + r + p.align_offset - j0;
      for (int64_t c = 0; c < cols; ++c) sr[c] -= slope * static_cast<acc_t>(center > c ? center - c : c - center);
    }
  }
  if (p.relative_bias != nullptr) {  // bias[h, j - i + L - 1]: contiguous along a row's keys
    const int64_t origin = h * p.relative_bias_stride + j0 - i0 + p.len_q - 1;
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* sr = s + r * ld;
      if (p.relative_bias_f64) {
        const double* br = static_cast<const double*>(p.relative_bias) + origin - r;
        for (int64_t c = 0; c < cols; ++c) sr[c] += static_cast<acc_t>(br[c]);
      } else {
        const float* br = static_cast<const float*>(p.relative_bias) + origin - r;
        for (int64_t c = 0; c < cols; ++c) sr[c] += static_cast<acc_t>(br[c]);
      }
    }
  }
  if (mask.kind == MaskKind::kNone) return;
  const int64_t base = b * mask.stride_b + h * mask.stride_h + i0 * mask.stride_i + j0 * mask.stride_j;
  switch (mask.kind) {
    case MaskKind::kBool:
      add_user_mask(s, ld, rows, cols, static_cast<const bool*>(mask.data) + base, mask.stride_i, mask.stride_j);
      break;
    case MaskKind::kFloat32:
      add_user_mask(s, ld, rows, cols, static_cast<const float*>(mask.data) + base, mask.stride_i, mask.stride_j);
      break;
    case MaskKind::kFloat64:
      add_user_mask(s, ld, rows, cols, static_cast<const double*>(mask.data) + base, mask.stride_i, mask.stride_j);
      break;
    case MaskKind::kFloat16:
      add_user_mask(s, ld, rows, cols, static_cast<const c10::Half*>(mask.data) + base, mask.stride_i, mask.stride_j);
      break;
    case MaskKind::kBFloat16:
      add_user_mask(s, ld, rows, cols, static_cast<const c10::BFloat16*>(mask.data) + base, mask.stride_i,
                    mask.stride_j);
      break;
    case MaskKind::kNone: break;
  }
}

// keep[r * ld + c] = 1 if element (bh, i0 + r, j0 + c) survives dropout.
inline void dropout_keep_tile(uint8_t* keep, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, int64_t bh,
                              const AttentionParams& p, uint32_t threshold) {
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* kr = keep + r * ld;
    for (int64_t j4 = j0 >> 2; (j4 << 2) < j0 + cols; ++j4) {
      const uint32_t bits = dropout_keep_bits4(p.dropout_seed, p.dropout_offset, bh, i0 + r, j4, threshold);
      for (int t = 0; t < 4; ++t) {
        const int64_t c = (j4 << 2) + t - j0;
        if (c >= 0 && c < cols) kr[c] = (bits >> t) & 1u;
      }
    }
  }
}

// bf16 tensors as the bf16 tile GEMM (csrc/cpu/tile_math_bf16.h) reads them: raw bits.
template <typename T>
const uint16_t* bf16_bits(const T* x) {
  return reinterpret_cast<const uint16_t*>(x);
}

// Rows i0.. of (b, h) as bf16 bits into dst (a zero column when ld > dim: an odd dim's pairs
// stay whole for tile_gemm_bf16); ptrs, when given, receives each copied row (the packers' input).
template <typename T>
void copy_bf16_rows(const Rows<const T>& src, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t dim,
                    uint16_t* dst, int64_t ld, const uint16_t** ptrs = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* d = dst + r * ld;
    std::memcpy(d, src.row(b, h, i0 + r), dim * sizeof(uint16_t));
    if (ld > dim) d[dim] = 0;
    if (ptrs != nullptr) ptrs[r] = d;
  }
}

// Split `split` of n_splits's share of a key band, in whole tiles of `tile` keys (empty when
// the band has fewer tiles than splits).
inline KeyRange split_band(KeyRange band, int64_t split, int64_t n_splits, int64_t tile) {
  if (n_splits <= 1) return band;
  const int64_t tiles = (band.end - band.begin + tile - 1) / tile;
  const int64_t per = (tiles + n_splits - 1) / n_splits;
  const int64_t lo = std::min(band.end, band.begin + split * per * tile);
  return {lo, std::min(band.end, lo + per * tile)};
}

// Split-KV partial states: per (split, row) of the n_rows rows (b * H + h) * L + i whose key
// band was cut into n_splits ranges, the running max m, running sum l and unnormalised
// accumulator (dim values) of that split's range. Nothing is allocated when n_splits == 1.
template <typename acc_t>
struct SplitStates {
  int64_t n_splits, n_rows, dim;
  std::vector<acc_t> ml, acc;  // (m, l) pairs; accumulators
  SplitStates(int64_t splits, int64_t rows, int64_t d)
      : n_splits(splits),
        n_rows(rows),
        dim(d),
        ml(splits > 1 ? splits * rows * 2 : 0),
        acc(splits > 1 ? splits * rows * d : 0) {}
  void store(int64_t split, int64_t row, acc_t m, acc_t l, const acc_t* a) {
    ml[(split * n_rows + row) * 2] = m;
    ml[(split * n_rows + row) * 2 + 1] = l;
    std::copy(a, a + dim, acc.data() + (split * n_rows + row) * dim);
  }
  acc_t m(int64_t split, int64_t row) const { return ml[(split * n_rows + row) * 2]; }
  acc_t l(int64_t split, int64_t row) const { return ml[(split * n_rows + row) * 2 + 1]; }
  const acc_t* acc_of(int64_t split, int64_t row) const { return acc.data() + (split * n_rows + row) * dim; }
};

// Split-KV merge, exactly as merge_attention_states: M = max_s m_s, l = sum_s l_s e^(m_s - M),
// out = keep_scale / l * sum_s acc_s e^(m_s - M); rows of p.heads_q heads and L positions. The
// head's sink (p.sinks) joins the merged denominator once, as in a single pass.
template <typename scalar_t, typename acc_t>
void merge_split_states(const SplitStates<acc_t>& parts, const AttentionParams& p, int64_t L, acc_t keep_scale,
                        const Rows<scalar_t>& o_rows, acc_t* lse_data) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t Dv = parts.dim, heads = p.heads_q;
  at::parallel_for(0, parts.n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(Dv);
    for (int64_t row = begin; row < end; ++row) {
      acc_t m = kNegInf, l = 0;
      bool nan = false;
      for (int64_t sp = 0; sp < parts.n_splits; ++sp) {
        const acc_t ms = parts.m(sp, row), ls = parts.l(sp, row);
        nan = nan || ms != ms || ls != ls;
        if (ms > m) m = ms;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (m != kNegInf) {
        for (int64_t sp = 0; sp < parts.n_splits; ++sp) {
          const acc_t ms = parts.m(sp, row);
          if (ms == kNegInf) continue;
          const acc_t w = std::exp(ms - m);
          l += w * parts.l(sp, row);
          const acc_t* a = parts.acc_of(sp, row);
          for (int64_t d = 0; d < Dv; ++d) acc[d] += w * a[d];
        }
      }
      if (nan) l = std::numeric_limits<acc_t>::quiet_NaN();
      const int64_t b = row / L / heads, h = row / L % heads, i = row % L;
      const acc_t sink = p.sink_logit<acc_t>(h);
      const acc_t denominator = softmax_denominator(m, l, sink);
      const acc_t factor = output_factor(denominator, keep_scale);
      scalar_t* o = o_rows.row(b, h, i);
      for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(nan ? l : acc[d] * factor);
      lse_data[row] = row_lse(m, l, sink);
    }
  });
}

}  // namespace flash_attn_ext::cpu
