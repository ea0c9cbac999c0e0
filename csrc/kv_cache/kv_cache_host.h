// Validation shared by the CPU and CUDA kernels of the KV-cache ops. Both return the
// sequence lengths on the host, after checking every argument and every value of
// cache_seqlens, so a bad call raises before anything is written. With host_values false (the
// CUDA device-checked calls, kv_cache_device_checks.h) they check everything but the values of
// cache_seqlens and block_table, read nothing back from the device, and return no lengths.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "../attention/attention_host.h"
#include "../common/attention_semantics.h"

namespace flash_attn_ext {

// A paged cache's block table, validated: (batch, blocks_per_seq) int32 on the cache's device,
// contiguous, every entry a sequence uses within [0, num_blocks). The caches are
// (num_blocks, kv_heads, block_size, dim) views.
struct BlockTable {
  at::Tensor table;
  int64_t block_size = 0, blocks_per_seq = 0;
  bool defined() const { return table.defined(); }
  int64_t capacity() const { return block_size * blocks_per_seq; }  // positions per sequence
};

// The per-(position, head) scales of a quantized cache (int8 or float8_e4m3fn), validated:
// float32, the cache's (B, Hkv, S_max) view without head_dim, on the cache's device (any
// strides). Undefined for a float cache. kind: the caches' storage dtype.
struct CacheScales {
  at::Tensor k, v;
  at::ScalarType kind = at::ScalarType::Undefined;
  bool defined() const { return k.defined(); }
};

// Whether dtype is a quantized cache's storage (int8, float8_e4m3fn).
bool is_quantized_cache_dtype(at::ScalarType dtype);

// Checks the caches' dtype against the scales: a quantized cache needs both scales, a float
// cache takes none; shapes, dtype and device as CacheScales says. Raises ValueError / TypeError
// naming the argument.
CacheScales check_cache_scales(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);

// New K/V written into a quantized cache must be finite (a NaN or Inf would poison the whole
// row's scale): raises ValueError before anything is written. A reduction (a sync on CUDA).
void check_finite_new_rows(const char* op, const at::Tensor& k_new, const at::Tensor& v_new);

// Validates block_table (if given) for `batch` sequences that use positions [0, used[b]);
// used nullptr: its dtype, shape and device only (the entries are checked on the device).
BlockTable check_block_table(const char* op, const std::optional<at::Tensor>& block_table, int64_t batch,
                             const at::Tensor& k_cache, const std::vector<int64_t>* used);

// Points p at the table (a device pointer for CUDA kernels) and sets len_k to its capacity.
void apply_block_table(AttentionParams& p, const BlockTable& table);

// kv_cache_append: cache_seqlens (the write positions).
std::vector<int64_t> check_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& k_new, const at::Tensor& v_new,
                                           const at::Tensor& cache_seqlens, bool rolling,
                                           const std::optional<at::Tensor>& block_table, BlockTable* table_out,
                                           const CacheScales& scales, bool host_values = true);

// attention_kvcache, k_new / v_new included: the key length each sequence attends to
// (cache_seqlens + L_new); *lens_before_out gets cache_seqlens itself (the write positions).
std::vector<int64_t> check_attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                             const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                             const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
                                             int64_t window_right, const std::optional<at::Tensor>& block_table,
                                             BlockTable* table_out, const CacheScales& scales,
                                             std::vector<int64_t>* lens_before_out = nullptr, bool host_values = true);

// The copy of kv_cache_append, for arguments already validated (check_kv_cache_append or
// check_attention_kvcache): lens are the write positions, read once on the host by the check.
// attention_kvcache appends through these, so a decode step reads cache_seqlens (a device ->
// host sync on CUDA) once, not once per validation. With scales defined the rows are quantized
// on the way (kv_cache_quantize.h).
namespace cpu {
void append_validated(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                      const at::Tensor& v_new, const std::vector<int64_t>& lens, bool rolling, const BlockTable& table,
                      const CacheScales& scales);
}
namespace cuda {
void append_validated(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                      const at::Tensor& v_new, const std::vector<int64_t>& lens, bool rolling, const BlockTable& table,
                      const CacheScales& scales);
}

using AppendValidatedFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::vector<int64_t>&, bool, const BlockTable&, const CacheScales&);

// The op kv_cache_append on one device: validates everything (before any write), then copies
// with that device's append_validated. Registered by kv_cache_append_{cpu,cuda}.
template <AppendValidatedFn AppendValidated>
void kv_cache_append_op(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                        const at::Tensor& v_new, const at::Tensor& cache_seqlens, bool rolling,
                        const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_cache_scale,
                        const std::optional<at::Tensor>& v_cache_scale) {
  BlockTable table;
  const CacheScales scales =
      check_cache_scales("flash_attn_ext.kv_cache_append", k_cache, v_cache, k_cache_scale, v_cache_scale);
  const std::vector<int64_t> lens =
      check_kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, rolling, block_table, &table, scales);
  AppendValidated(k_cache, v_cache, k_new, v_new, lens, rolling, table, scales);
}

// The prologue of attention_kvcache shared by its CPU and CUDA entries: every check (the
// device's limits included), the params (kernel configuration included; seqlens_k left for the
// entry to point at lens, on the host or a device copy), the optional append through the
// device's append_validated, the block table applied, and the outputs out (B, Hq, L, Dv) and
// lse (B, Hq, L), uninitialised. With host_values false, lens stays empty and nothing is
// appended (append may be null): the CUDA device-checked entry appends at starts it checks on
// the device.
struct KvcacheCall {
  AttentionParams params;
  std::vector<int64_t> lens;  // the key length each sequence attends to (cache_seqlens + L_new)
  BlockTable table;
  CacheScales scales;  // a quantized cache's (undefined for a float cache)
  at::Tensor out, lse;
};
KvcacheCall prepare_attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                      const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
                                      int64_t window_right, const std::optional<at::Tensor>& block_table,
                                      double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                      const std::optional<at::Tensor>& sinks, const DeviceLimits& limits,
                                      AppendValidatedFn append, const std::optional<at::Tensor>& k_cache_scale,
                                      const std::optional<at::Tensor>& v_cache_scale, bool host_values = true);

// The rows of a quantized cache a prepared call reads, dequantized into `dtype` (code * scale,
// rounded to dtype), for the kernels that read float tiles (CPU chunked prefill, the CUDA
// kernels): plain caches up to the longest sequence; paged ones (block tables, and the
// one-position blocks of cache_leftpad) only the blocks the sequences use, gathered into a
// compact pool, with `table` the call's block table renumbered onto it. Point the params at
// table (apply it) before running; undefined when the call is not paged.
struct DequantizedKv {
  at::Tensor k, v, table;
};
DequantizedKv dequantize_for_call(const KvcacheCall& call, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  at::ScalarType dtype);

// The op attention_kvcache on one device: the shared prologue with the device's append and
// limits, then Run, the device's kernels on the prepared call (the entry points
// call.params.seqlens_k at call.lens or a device copy of it). Registered by
// attention_kvcache_{cpu,cuda}.
using KvcacheRunFn = void (*)(KvcacheCall& call, const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache);
template <AppendValidatedFn Append, DeviceLimits (*Limits)(), KvcacheRunFn Run>
std::tuple<at::Tensor, at::Tensor> attention_kvcache_op(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& block_table, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& k_cache_scale, const std::optional<at::Tensor>& v_cache_scale) {
  KvcacheCall call = prepare_attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left,
                                               window_right, block_table, softcap, alibi_slopes, sinks, Limits(),
                                               Append, k_cache_scale, v_cache_scale);
  Run(call, q, k_cache, v_cache);
  return {call.out, call.lse};
}

// The first new position that survives a rolling append of L_new positions into S_max slots
// (only the last S_max are written, which keeps the slots written by one call disjoint).
inline int64_t rolling_first_written(bool rolling, int64_t L_new, int64_t S_max) {
  return rolling && L_new > S_max ? L_new - S_max : 0;
}

}  // namespace flash_attn_ext
