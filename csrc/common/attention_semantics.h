// The one definition of attention semantics (SPEC.md section 2), shared by every kernel.
//
// CPU and CUDA kernels include this header; nothing here depends on torch, so the same
// functions are unit-tested on the CPU (tests/native/cpp/test_semantics.cpp) and
// compiled for the device by nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "kernel_config.h"

namespace flash_attn_ext {

// Shapes and options of one attention call. Tensors are (batch, head, position, feature),
// read through their strides (the kernels carry pointers and strides beside this struct),
// so (B, L, H, D) tensors are served by a transposed view without a copy.
struct AttentionParams {
  int64_t batch = 0, heads_q = 0, heads_kv = 0;
  int64_t len_q = 0, len_k = 0;
  int64_t dim_qk = 0, dim_v = 0;

  // window_left/right: -1 is unbounded. causal == right 0.
  int64_t window_left = -1, window_right = -1;
  // Alignment offset o: 0 (top-left, SDPA's is_causal) or len_k - len_q (bottom-right).
  int64_t align_offset = 0;

  double scale = 1.0;

  // Per-sequence key lengths (KV cache): when set, sequence b attends to keys
  // [0, seqlens_k[b]) of its len_k-long buffer, aligned by its own length.
  const int64_t* seqlens_k = nullptr;
  bool bottom_right = false;

  // Paged KV cache (vLLM / flash-attn block_table): when set, key position j of sequence b is
  // row j % block_size of cache block block_table[b * blocks_per_seq + j / block_size]; the K/V
  // tensors are (num_blocks, heads_kv, block_size, dim) and len_k = blocks_per_seq * block_size.
  const int32_t* block_table = nullptr;
  int64_t block_size = 0, blocks_per_seq = 0;

  double dropout_p = 0.0;  // double: 1/(1-p) must be exact for float64 inputs
  uint64_t dropout_seed = 0, dropout_offset = 0;

  // Soft-capping (Gemma-2, Grok): scores become softcap * tanh(s / softcap) before the user
  // mask and the softmax; 0 = off.
  double softcap = 0.0;

  // Packed variable-length sequences (flash-attn's varlen API): when set, sequence b holds
  // query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of a (total_q, heads, dim) tensor and
  // key rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]); len_q / len_k are the longest sequence
  // (they bound the loops; for_batch gives each sequence its own), and the log-sum-exp is
  // (heads_q, total_q), as flash-attn returns it.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0;

  // ALiBi (flash-attn's alibi_slopes): score (b, h, i, j) gains -slope * |i + o - j|, slope =
  // alibi_slopes[b * alibi_batch_stride + h] (float32; stride 0 for per-head slopes), o the
  // sequence's alignment offset. Added with the user mask, after the softcap.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  // A relative-position bias (T5's bucketed table, or any bias that depends on j - i only):
  // score (b, h, i, j) gains relative_bias[h * relative_bias_stride + j - i + len_q - 1], a
  // (Hq, L + S - 1) float32 tensor (float64 when relative_bias_f64) holding each head's bias
  // for every distance the call meets. Added with the user mask, after the softcap. Dense
  // attention only (the varlen and KV-cache ops have no such argument).
  const void* relative_bias = nullptr;
  bool relative_bias_f64 = false;
  int64_t relative_bias_stride = 0;

  // Learned attention sinks (gpt-oss): one logit per query head that joins every row's softmax
  // denominator and adds nothing to the output (softmax_denominator / row_lse below). (Hq,)
  // float32, or float64 when sinks_f64; nullptr: none.
  const void* sinks = nullptr;
  bool sinks_f64 = false;

  // Which interchangeable paths the kernels may take (kernel_config.h): the process-wide
  // setting as the op entry found it.
  KernelConfig config;

  FAE_HOST_DEVICE int64_t group_size() const { return heads_q / heads_kv; }
  // GQA/MQA: query head h reads key/value head h / (Hq / Hkv) (contiguous groups).
  FAE_HOST_DEVICE int64_t kv_head(int64_t h) const { return h / group_size(); }
  // The parameters as sequence b sees them (its query and key lengths and alignment).
  FAE_HOST_DEVICE AttentionParams for_batch(int64_t b) const;
  FAE_HOST_DEVICE bool varlen() const { return cu_seqlens_q != nullptr; }
  // Index of row (b, h, i) in the log-sum-exp (and the backward's delta): (B, Hq, L), or
  // (Hq, total_q) for packed sequences.
  FAE_HOST_DEVICE int64_t row_index(int64_t b, int64_t h, int64_t i) const {
    return varlen() ? h * total_q + cu_seqlens_q[b] + i : (b * heads_q + h) * len_q + i;
  }
  FAE_HOST_DEVICE bool has_sinks() const { return sinks != nullptr; }
  // Query head h's sink logit; -inf (no sink) without sinks.
  template <typename Acc>
  FAE_HOST_DEVICE Acc sink_logit(int64_t h) const {
    if (sinks == nullptr) return -static_cast<Acc>(INFINITY);
    return sinks_f64 ? static_cast<Acc>(static_cast<const double*>(sinks)[h])
                     : static_cast<Acc>(static_cast<const float*>(sinks)[h]);
  }
  // The ALiBi bias of score (b, h, i, j) (0 without slopes); call on for_batch(b)'s params,
  // whose align_offset is the sequence's own.
  template <typename Acc>
  FAE_HOST_DEVICE Acc alibi_bias(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (alibi_slopes == nullptr) return Acc(0);
    const int64_t d = i + align_offset - j;
    return -static_cast<Acc>(alibi_slopes[b * alibi_batch_stride + h]) * static_cast<Acc>(d < 0 ? -d : d);
  }
};

// A user attention mask, read through strides (0 for broadcast dims), on top of the window.
// bool: true = may attend; floating: added to the scaled scores.
enum class MaskKind : int { kNone = 0, kBool, kFloat32, kFloat64, kFloat16, kBFloat16 };

struct MaskView {
  const void* data = nullptr;
  MaskKind kind = MaskKind::kNone;
  int64_t stride_b = 0, stride_h = 0, stride_i = 0, stride_j = 0;
};

FAE_HOST_DEVICE int64_t alignment_offset(int64_t len_q, int64_t len_k, bool bottom_right) {
  return bottom_right ? len_k - len_q : 0;
}

FAE_HOST_DEVICE AttentionParams AttentionParams::for_batch(int64_t b) const {
  AttentionParams r = *this;
  if (cu_seqlens_q != nullptr) {
    r.len_q = cu_seqlens_q[b + 1] - cu_seqlens_q[b];
    r.len_k = cu_seqlens_k[b + 1] - cu_seqlens_k[b];
    r.align_offset = alignment_offset(r.len_q, r.len_k, bottom_right);
  } else if (seqlens_k != nullptr) {
    r.len_k = seqlens_k[b];
    r.align_offset = alignment_offset(len_q, r.len_k, bottom_right);
  }
  return r;
}

// Soft-capping of a scaled score, and its slope d(capped)/d(score) = 1 - (capped / cap)^2,
// from the capped value (what the backward recomputes). cap <= 0: identity, slope 1.
FAE_HOST_DEVICE float tanh_(float x) { return tanhf(x); }
FAE_HOST_DEVICE double tanh_(double x) { return tanh(x); }

template <typename Acc>
FAE_HOST_DEVICE Acc apply_softcap(Acc s, Acc cap) {
  return cap > Acc(0) ? cap * tanh_(s / cap) : s;
}

template <typename Acc>
FAE_HOST_DEVICE Acc softcap_slope(Acc capped, Acc cap) {
  if (!(cap > Acc(0))) return Acc(1);
  const Acc t = capped / cap;
  return Acc(1) - t * t;
}

FAE_HOST_DEVICE float exp_of(float x) { return expf(x); }
FAE_HOST_DEVICE double exp_of(double x) { return exp(x); }
FAE_HOST_DEVICE float log_of(float x) { return logf(x); }
FAE_HOST_DEVICE double log_of(double x) { return log(x); }

// The end of a row's online softmax: its visible keys gave running max m and running sum
// l = sum_j e^(s_j - m); `sink` is the head's sink logit (-inf: none). The output is the
// accumulator divided by softmax_denominator and the row's log-sum-exp is row_lse, both
// counting the sink once: out = sum_j e^(s_j - m) v_j / (l + e^(sink - m)). A row that saw no
// key gives zeros (denominator +inf with a sink, 0 without) and lse = sink (-inf without). A
// NaN (in l or the sink) stays NaN. Every kernel ends its rows through these two, split-KV merges
// included (the sink is counted at the merge, not per split).
template <typename Acc>
FAE_HOST_DEVICE Acc softmax_denominator(Acc m, Acc l, Acc sink) {
  const Acc inf = static_cast<Acc>(INFINITY);
  if (sink == -inf || l != l) return l;
  if (m == -inf) return sink != sink ? sink : inf;
  return l + exp_of(sink - m);
}

// The factor the accumulator of such a row is multiplied by: keep_scale / denominator, 0 for a
// row that saw nothing (denominator 0 or +inf), NaN for a NaN denominator (a NaN sink must not
// turn into a zero row).
template <typename Acc>
FAE_HOST_DEVICE Acc output_factor(Acc denominator, Acc keep_scale) {
  if (denominator != denominator) return denominator;
  return denominator > Acc(0) ? keep_scale / denominator : Acc(0);
}

template <typename Acc>
FAE_HOST_DEVICE Acc row_lse(Acc m, Acc l, Acc sink) {
  const Acc inf = static_cast<Acc>(INFINITY);
  if (l != l) return l;
  const Acc keys = l > Acc(0) ? m + log_of(l) : -inf;
  if (sink == -inf) return keys;
  if (sink != sink || keys == -inf) return sink;
  const Acc hi = keys > sink ? keys : sink;
  return hi + log_of(exp_of(keys - hi) + exp_of(sink - hi));
}

// Key j is visible to query i iff i + o - left <= j <= i + o + right (a bound of -1 is open).
FAE_HOST_DEVICE bool key_visible(int64_t i, int64_t j, int64_t offset, int64_t left, int64_t right) {
  const int64_t center = i + offset;
  return (left < 0 || j >= center - left) && (right < 0 || j <= center + right);
}

// First visible key of query i (clamped to [0, len_k]).
FAE_HOST_DEVICE int64_t first_visible_key(int64_t i, int64_t offset, int64_t left, int64_t len_k) {
  if (left < 0) return 0;
  const int64_t j = i + offset - left;
  return j < 0 ? 0 : (j > len_k ? len_k : j);
}

// One past the last visible key of query i (clamped to [0, len_k]).
FAE_HOST_DEVICE int64_t end_visible_key(int64_t i, int64_t offset, int64_t right, int64_t len_k) {
  if (right < 0) return len_k;
  const int64_t j = i + offset + right + 1;
  return j < 0 ? 0 : (j > len_k ? len_k : j);
}

// Keys any query in [row_begin, row_end) can see: [begin, end). Both bounds are monotone
// in i, so the band of a tile of rows is the union of its first and last row's ranges.
// Key tiles outside it are skipped entirely, not masked. Empty when begin >= end.
struct KeyRange {
  int64_t begin, end;
};

FAE_HOST_DEVICE KeyRange visible_key_range(int64_t row_begin, int64_t row_end, int64_t offset, int64_t left,
                                           int64_t right, int64_t len_k) {
  KeyRange r;
  r.begin = first_visible_key(row_begin, offset, left, len_k);
  r.end = end_visible_key(row_end - 1, offset, right, len_k);
  if (r.end < r.begin) r.end = r.begin;
  return r;
}

// Keys every query in [row_begin, row_end) sees: [begin, end), empty when begin >= end (the
// intersection of the first and last row's ranges, by the same monotonicity). Key tiles inside
// it need no per-element mask; a kernel runs them as a loop phase of their own.
FAE_HOST_DEVICE KeyRange common_visible_key_range(int64_t row_begin, int64_t row_end, int64_t offset, int64_t left,
                                                  int64_t right, int64_t len_k) {
  KeyRange r;
  r.begin = first_visible_key(row_end - 1, offset, left, len_k);
  r.end = end_visible_key(row_begin, offset, right, len_k);
  if (r.end < r.begin) r.end = r.begin;
  return r;
}

// Queries that can see some key in [key_begin, key_end): [begin, end) within [0, len_q).
// Used by the backward pass, which walks query tiles for a fixed key tile.
struct RowRange {
  int64_t begin, end;
};

FAE_HOST_DEVICE RowRange visible_row_range(int64_t key_begin, int64_t key_end, int64_t offset, int64_t left,
                                           int64_t right, int64_t len_q) {
  // j <= i + o + right  <=>  i >= j - o - right ; j >= i + o - left  <=>  i <= j - o + left
  RowRange r;
  int64_t b = right < 0 ? 0 : key_begin - offset - right;
  int64_t e = left < 0 ? len_q : key_end - 1 - offset + left + 1;
  r.begin = b < 0 ? 0 : (b > len_q ? len_q : b);
  r.end = e < 0 ? 0 : (e > len_q ? len_q : e);
  if (r.end < r.begin) r.end = r.begin;
  return r;
}

// Does every (query, key) pair of the tile satisfy the window? Then the per-element
// predicate is skipped for that tile.
FAE_HOST_DEVICE bool tile_fully_visible(int64_t row_begin, int64_t row_end, int64_t key_begin, int64_t key_end,
                                        int64_t offset, int64_t left, int64_t right) {
  // The tightest constraints come from the corners of the tile.
  return key_visible(row_end - 1, key_begin, offset, left, right) &&
         key_visible(row_begin, key_end - 1, offset, left, right);
}

}  // namespace flash_attn_ext
