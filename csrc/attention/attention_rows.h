// Row programs: the whole of attention for one query row (forward, dQ) or one key column
// (dK, dV), written once without torch so that the same code is
//   - the CUDA safety-net kernels (csrc/attention/*_cuda.cu): one warp per row, the 32 lanes
//     splitting the head dim and summing dot products with warp shuffles;
//   - checked on the host by tests/native/cpp/test_attention_rows.cpp with a single lane against a
//     brute-force float64 reference, on every CI run, without a GPU.
// They favour the obviously right over the fast: keys are visited one at a time with a
// scalar online softmax (running max m, running sum l), nothing of size L x S exists, and
// keys outside the window band are never visited. The tiled tensor-core kernels are checked
// against these on the GPU.
//
// Template parameters: T (element type, anything with a conversion to Acc: float, double,
// c10::Half, c10::BFloat16), Acc (float, or double for double inputs), kLanes (lanes that
// share a row), kPerLane (features each lane holds: features lane, lane + kLanes, ...;
// kLanes * kPerLane bounds the head dim), Reduce (Reduce::sum(x) adds x over the kLanes lanes
// and gives every lane the total).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/attention_semantics.h"
#include "../common/dropout_philox.h"

namespace flash_attn_ext::rows {

// A (batch, head, position, feature) tensor read through its strides; features contiguous.
// For a paged KV cache (AttentionParams::block_table), position i of sequence b is row
// i % block_size of block table[b * blocks_per_seq + i / block_size] (the first dim).
// For packed sequences (varlen), position i of sequence b is row seq_start[b] + i.
template <typename T>
struct Strided {
  T* data;
  int64_t stride_b, stride_h, stride_l;
  const int32_t* table = nullptr;
  int64_t block_size = 0, blocks_per_seq = 0;
  const int32_t* seq_start = nullptr;
  FAE_HOST_DEVICE T* row(int64_t b, int64_t h, int64_t i) const {
    if (seq_start != nullptr) return data + h * stride_h + (seq_start[b] + i) * stride_l;
    if (table != nullptr)
      return data + table[b * blocks_per_seq + i / block_size] * stride_b + h * stride_h + (i % block_size) * stride_l;
    return data + b * stride_b + h * stride_h + i * stride_l;
  }
  // Row 0 of (b, h) in a plain layout (no block table, not packed): kernels that serve only
  // those step from it by stride_l.
  FAE_HOST_DEVICE T* head(int64_t b, int64_t h) const { return data + b * stride_b + h * stride_h; }
  // How many rows from position i on are evenly strided by stride_l (to the end of a block).
  FAE_HOST_DEVICE int64_t run(int64_t i) const { return table != nullptr ? block_size - i % block_size : INT64_MAX; }
};

// The K/V view of p: paged when p carries a block table, packed when p is varlen.
template <typename T>
FAE_HOST_DEVICE Strided<T> kv_view(Strided<T> s, const AttentionParams& p) {
  s.table = p.block_table;
  s.block_size = p.block_size;
  s.blocks_per_seq = p.blocks_per_seq;
  s.seq_start = p.cu_seqlens_k;
  return s;
}

// The view of a query-side tensor (query, out, their gradients): packed when p is varlen.
template <typename T>
FAE_HOST_DEVICE Strided<T> q_view(Strided<T> s, const AttentionParams& p) {
  s.seq_start = p.cu_seqlens_q;
  return s;
}

struct SingleLane {  // the host build: one lane holds the whole row
  template <typename Acc>
  FAE_HOST_DEVICE static Acc sum(Acc x) {
    return x;
  }
};

FAE_HOST_DEVICE float exp_(float x) { return expf(x); }
FAE_HOST_DEVICE double exp_(double x) { return exp(x); }
FAE_HOST_DEVICE float log_(float x) { return logf(x); }
FAE_HOST_DEVICE double log_(double x) { return log(x); }

template <typename Acc>
FAE_HOST_DEVICE constexpr Acc neg_inf() {
  return -std::numeric_limits<Acc>::infinity();
}

FAE_HOST_DEVICE float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// IEEE binary16 and bfloat16 from their bits (masks are read as raw 16-bit words, so this
// header needs no half-precision type).
FAE_HOST_DEVICE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float mag = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf/NaN
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

FAE_HOST_DEVICE float bfloat16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// The user mask's contribution to score (b, h, i, j): 0 or -inf for bool masks, the value
// for float masks, 0 without a mask.
template <typename Acc>
FAE_HOST_DEVICE Acc mask_bias(const MaskView& m, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t at = b * m.stride_b + h * m.stride_h + i * m.stride_i + j * m.stride_j;
  switch (m.kind) {
    case MaskKind::kBool: return static_cast<const uint8_t*>(m.data)[at] ? Acc(0) : neg_inf<Acc>();
    case MaskKind::kFloat32: return static_cast<Acc>(static_cast<const float*>(m.data)[at]);
    case MaskKind::kFloat64: return static_cast<Acc>(static_cast<const double*>(m.data)[at]);
    case MaskKind::kFloat16: return static_cast<Acc>(half_bits_to_float(static_cast<const uint16_t*>(m.data)[at]));
    case MaskKind::kBFloat16: return static_cast<Acc>(bfloat16_bits_to_float(static_cast<const uint16_t*>(m.data)[at]));
    case MaskKind::kNone: break;
  }
  return Acc(0);
}

// scale * <q row, k row>, summed over the lanes.
template <typename T, typename Acc, int kLanes, int kPerLane, typename Reduce>
FAE_HOST_DEVICE Acc dot(const Acc (&q)[kPerLane], const T* k, int64_t dim, Acc scale, int lane) {
  Acc s = 0;
  FAE_UNROLL
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kLanes;
    if (d < dim) s += q[t] * static_cast<Acc>(k[d]);
  }
  return Reduce::sum(s) * scale;
}

// Score of (q row, key j): scaled, soft-capped (cap > 0), then the user mask applied; -inf
// means "not attended". `capped` receives the score before the mask (the backward's softcap
// slope needs it).
template <typename T, typename Acc, int kLanes, int kPerLane, typename Reduce>
FAE_HOST_DEVICE Acc score(const Acc (&q)[kPerLane], const T* k, int64_t dim, Acc scale, Acc cap, int lane,
                          const MaskView& mask, int64_t b, int64_t h, int64_t i, int64_t j, Acc* capped = nullptr) {
  Acc s = apply_softcap(dot<T, Acc, kLanes, kPerLane, Reduce>(q, k, dim, scale, lane), cap);
  if (capped != nullptr) *capped = s;
  if (mask.kind != MaskKind::kNone) s += mask_bias<Acc>(mask, b, h, i, j);
  return s;
}

template <typename T, typename Acc, int kLanes, int kPerLane>
FAE_HOST_DEVICE void load(Acc (&dst)[kPerLane], const T* src, int64_t dim, int lane) {
  FAE_UNROLL
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kLanes;
    dst[t] = d < dim ? static_cast<Acc>(src[d]) : Acc(0);
  }
}

template <typename T, typename Acc, int kLanes, int kPerLane>
FAE_HOST_DEVICE void store(T* dst, const Acc (&src)[kPerLane], Acc factor, int64_t dim, int lane) {
  FAE_UNROLL
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kLanes;
    if (d < dim) dst[d] = static_cast<T>(src[t] * factor);
  }
}

template <typename Acc>
FAE_HOST_DEVICE Acc dropout_scale(const AttentionParams& p) {
  return p.dropout_p > 0.0 ? static_cast<Acc>(1.0 / (1.0 - p.dropout_p)) : Acc(1);
}

// Forward of query row (b, h, i): out row and lse[(b * Hq + h) * L + i]. A row with no
// visible key gets zeros and lse = -inf; a NaN score makes the row (and only it) NaN.
template <typename T, typename Acc, int kLanes, int kPerLane, typename Reduce>
FAE_HOST_DEVICE void forward_row(const AttentionParams& p, const MaskView& mask, const Strided<const T>& q,
                                 const Strided<const T>& k, const Strided<const T>& v, const Strided<T>& out, Acc* lse,
                                 int64_t b, int64_t h, int64_t i, int lane) {
  const AttentionParams pb = p.for_batch(b);
  if (i >= pb.len_q) return;  // past a packed sequence's end
  const int64_t hk = p.kv_head(h), bh = b * p.heads_q + h;
  const Acc scale = static_cast<Acc>(p.scale), cap = static_cast<Acc>(p.softcap);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  Acc qr[kPerLane], acc[kPerLane];
  load<T, Acc, kLanes, kPerLane>(qr, q.row(b, h, i), p.dim_qk, lane);
  FAE_UNROLL
  for (int t = 0; t < kPerLane; ++t) acc[t] = 0;
  Acc m = neg_inf<Acc>(), l = 0;
  const int64_t j_end = end_visible_key(i, pb.align_offset, pb.window_right, pb.len_k);
  for (int64_t j = first_visible_key(i, pb.align_offset, pb.window_left, pb.len_k); j < j_end; ++j) {
    const Acc s =
        score<T, Acc, kLanes, kPerLane, Reduce>(qr, k.row(b, hk, j), p.dim_qk, scale, cap, lane, mask, b, h, i, j) +
        pb.alibi_bias<Acc>(b, h, i, j);
    if (s == neg_inf<Acc>()) continue;
    const Acc m_new = (s > m || s != s) ? s : m;
    const Acc alpha = exp_(m - m_new);  // 0 for the first visible key (m = -inf)
    Acc prob = exp_(s - m_new);
    l = l * alpha + prob;  // the row sum counts dropped probabilities too
    m = m_new;
    if (dropout && !dropout_keep(p.dropout_seed, p.dropout_offset, bh, i, j, threshold)) prob = 0;
    const T* vj = v.row(b, hk, j);
    FAE_UNROLL
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + t * kLanes;
      if (d < p.dim_v) acc[t] = acc[t] * alpha + prob * static_cast<Acc>(vj[d]);
    }
  }
  const Acc sink = p.sink_logit<Acc>(h);
  const Acc denominator = softmax_denominator(m, l, sink);
  const Acc factor = output_factor(denominator, dropout_scale<Acc>(p));
  store<T, Acc, kLanes, kPerLane>(out.row(b, h, i), acc, factor, p.dim_v, lane);
  if (lane == 0) lse[p.row_index(b, h, i)] = row_lse(m, l, sink);
}

// delta[row_index(b, h, i)] = <dO_i, O_i>, the row term of the softmax gradient.
template <typename T, typename Acc, int kLanes, int kPerLane, typename Reduce>
FAE_HOST_DEVICE void delta_row(const AttentionParams& p, const Strided<const T>& grad_out, const Strided<const T>& out,
                               Acc* delta, int64_t b, int64_t h, int64_t i, int lane) {
  if (i >= p.for_batch(b).len_q) return;
  const T* go = grad_out.row(b, h, i);
  const T* o = out.row(b, h, i);
  Acc s = 0;
  FAE_UNROLL
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kLanes;
    if (d < p.dim_v) s += static_cast<Acc>(go[d]) * static_cast<Acc>(o[d]);
  }
  s = Reduce::sum(s);
  if (lane == 0) delta[p.row_index(b, h, i)] = s;
}

// The gradient of score (i, j) given P_ij = exp(s - lse_i): dS = P (dP' - delta_i), with
// dP' = <dO_i, V_j> scaled by the dropout keep factor (0 when dropped). Also returns the
// dropped-and-scaled probability that multiplies dO_i in dV.
template <typename Acc>
struct ScoreGrad {
  Acc ds, p_dropped;
};

template <typename Acc>
FAE_HOST_DEVICE ScoreGrad<Acc> score_grad(Acc prob, Acc dp, Acc delta_i, bool keep, Acc keep_scale) {
  const Acc k = keep ? keep_scale : Acc(0);
  return {prob * (dp * k - delta_i), prob * k};
}

// dQ row (b, h, i) = scale * sum_j dS_ij K_j. Rows with lse = -inf saw no key: zeros.
template <typename T, typename Acc, int kLanes, int kPerLane, typename Reduce>
FAE_HOST_DEVICE void grad_query_row(const AttentionParams& p, const MaskView& mask, const Strided<const T>& grad_out,
                                    const Strided<const T>& q, const Strided<const T>& k, const Strided<const T>& v,
                                    const Acc* lse, const Acc* delta, const Strided<T>& grad_q, int64_t b, int64_t h,
                                    int64_t i, int lane) {
  const AttentionParams pb = p.for_batch(b);
  if (i >= pb.len_q) return;  // past a packed sequence's end
  const int64_t hk = p.kv_head(h), bh = b * p.heads_q + h;
  const Acc scale = static_cast<Acc>(p.scale), keep_scale = dropout_scale<Acc>(p);
  const Acc cap = static_cast<Acc>(p.softcap);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const Acc lse_i = lse[p.row_index(b, h, i)], delta_i = delta[p.row_index(b, h, i)];
  Acc qr[kPerLane], dor[kPerLane], dq[kPerLane];
  load<T, Acc, kLanes, kPerLane>(qr, q.row(b, h, i), p.dim_qk, lane);
  load<T, Acc, kLanes, kPerLane>(dor, grad_out.row(b, h, i), p.dim_v, lane);
  FAE_UNROLL
  for (int t = 0; t < kPerLane; ++t) dq[t] = 0;
  const int64_t j_end = lse_i == neg_inf<Acc>() ? 0 : end_visible_key(i, pb.align_offset, pb.window_right, pb.len_k);
  for (int64_t j = first_visible_key(i, pb.align_offset, pb.window_left, pb.len_k); j < j_end; ++j) {
    const T* kj = k.row(b, hk, j);
    Acc capped;
    const Acc s =
        score<T, Acc, kLanes, kPerLane, Reduce>(qr, kj, p.dim_qk, scale, cap, lane, mask, b, h, i, j, &capped) +
        pb.alibi_bias<Acc>(b, h, i, j);
    if (s == neg_inf<Acc>()) continue;
    const Acc dp = dot<T, Acc, kLanes, kPerLane, Reduce>(dor, v.row(b, hk, j), p.dim_v, Acc(1), lane);
    const bool keep = !dropout || dropout_keep(p.dropout_seed, p.dropout_offset, bh, i, j, threshold);
    const Acc ds = score_grad(exp_(s - lse_i), dp, delta_i, keep, keep_scale).ds * softcap_slope(capped, cap);
    FAE_UNROLL
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + t * kLanes;
      if (d < p.dim_qk) dq[t] += ds * static_cast<Acc>(kj[d]);
    }
  }
  store<T, Acc, kLanes, kPerLane>(grad_q.row(b, h, i), dq, scale, p.dim_qk, lane);
}

// dK and dV of key column (b, hk, j), summed over the query heads of its GQA group and the
// rows that can see it (visible_row_range): each column is owned by one program, so the
// reduction over the group needs no atomics and is bitwise repeatable.
template <typename T, typename Acc, int kLanes, int kPerLane, typename Reduce>
FAE_HOST_DEVICE void grad_key_value_column(const AttentionParams& p, const MaskView& mask,
                                           const Strided<const T>& grad_out, const Strided<const T>& q,
                                           const Strided<const T>& k, const Strided<const T>& v, const Acc* lse,
                                           const Acc* delta, const Strided<T>& grad_k, const Strided<T>& grad_v,
                                           int64_t b, int64_t hk, int64_t j, int lane) {
  const AttentionParams pb = p.for_batch(b);
  if (p.varlen() && j >= pb.len_k) return;  // past a packed sequence's end: another's rows
  const Acc scale = static_cast<Acc>(p.scale), keep_scale = dropout_scale<Acc>(p);
  const Acc cap = static_cast<Acc>(p.softcap);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  Acc kr[kPerLane], vr[kPerLane], dk[kPerLane], dv[kPerLane];
  load<T, Acc, kLanes, kPerLane>(kr, k.row(b, hk, j), p.dim_qk, lane);
  load<T, Acc, kLanes, kPerLane>(vr, v.row(b, hk, j), p.dim_v, lane);
  FAE_UNROLL
  for (int t = 0; t < kPerLane; ++t) dk[t] = dv[t] = 0;
  // Keys past a sequence's length (KV cache) are seen by no query.
  const RowRange rows = j < pb.len_k
                            ? visible_row_range(j, j + 1, pb.align_offset, pb.window_left, pb.window_right, pb.len_q)
                            : RowRange{0, 0};
  const int64_t G = p.group_size();
  for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
    const int64_t bh = b * p.heads_q + h;
    for (int64_t i = rows.begin; i < rows.end; ++i) {
      const Acc lse_i = lse[p.row_index(b, h, i)];
      if (lse_i == neg_inf<Acc>()) continue;
      const T* qi = q.row(b, h, i);
      const T* doi = grad_out.row(b, h, i);
      Acc capped;
      const Acc s =
          score<T, Acc, kLanes, kPerLane, Reduce>(kr, qi, p.dim_qk, scale, cap, lane, mask, b, h, i, j, &capped) +
          pb.alibi_bias<Acc>(b, h, i, j);
      if (s == neg_inf<Acc>()) continue;
      const Acc dp = dot<T, Acc, kLanes, kPerLane, Reduce>(vr, doi, p.dim_v, Acc(1), lane);
      const bool keep = !dropout || dropout_keep(p.dropout_seed, p.dropout_offset, bh, i, j, threshold);
      ScoreGrad<Acc> g = score_grad(exp_(s - lse_i), dp, delta[p.row_index(b, h, i)], keep, keep_scale);
      g.ds *= softcap_slope(capped, cap);
      FAE_UNROLL
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kLanes;
        if (d < p.dim_qk) dk[t] += g.ds * static_cast<Acc>(qi[d]);
        if (d < p.dim_v) dv[t] += g.p_dropped * static_cast<Acc>(doi[d]);
      }
    }
  }
  store<T, Acc, kLanes, kPerLane>(grad_k.row(b, hk, j), dk, scale, p.dim_qk, lane);
  store<T, Acc, kLanes, kPerLane>(grad_v.row(b, hk, j), dv, Acc(1), p.dim_v, lane);
}

// merge_attention_states of one row: partial results over disjoint key sets combine through
// their log-sum-exps, lse = log(exp(a) + exp(b)), out = w_a out_a + w_b out_b with
// w_x = exp(x - lse). A side that saw no key (-inf) weighs 0; both empty give weights 0 and
// lse = -inf (the attention kernels' empty-row convention); a NaN lse makes the row NaN.
template <typename Acc>
struct MergeWeights {
  Acc a, b, lse;
};

template <typename Acc>
FAE_HOST_DEVICE MergeWeights<Acc> merge_weights(Acc lse_a, Acc lse_b) {
  const Acc m = lse_a > lse_b ? lse_a : lse_b;
  if (m != m || lse_a != lse_a || lse_b != lse_b) {
    const Acc nan = lse_a != lse_a ? lse_a : (lse_b != lse_b ? lse_b : m);
    return {nan, nan, nan};
  }
  if (m == neg_inf<Acc>()) return {Acc(0), Acc(0), neg_inf<Acc>()};
  const Acc ea = exp_(lse_a - m), eb = exp_(lse_b - m);
  return {ea / (ea + eb), eb / (ea + eb), m + log_(ea + eb)};
}

}  // namespace flash_attn_ext::rows
