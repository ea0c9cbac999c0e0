#include "kv_cache_host.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "../attention/attention_host.h"

namespace flash_attn_ext {
namespace {

void check_cache_pair(const char* op, const char* cache_name, const at::Tensor& cache, const char* new_name,
                      const at::Tensor& fresh, bool paged) {
  TORCH_CHECK_VALUE(cache.dim() == 4, op, ": ", cache_name,
                    " must be 4-D (batch, kv_heads, max_len, head_dim), got shape ", cache.sizes());
  TORCH_CHECK_VALUE(fresh.dim() == 4, op, ": ", new_name,
                    " must be 4-D (batch, kv_heads, new_len, head_dim), got shape ", fresh.sizes());
  if (is_quantized_cache_dtype(cache.scalar_type())) {  // quantized on the way in
    const auto st = fresh.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", new_name, " for a ",
                     cache.scalar_type(), " cache must be float32, bfloat16 or float16, got ", st);
  } else {
    TORCH_CHECK_TYPE(fresh.scalar_type() == cache.scalar_type(), op, ": ", new_name, " dtype ", fresh.scalar_type(),
                     " differs from ", cache_name, " dtype ", cache.scalar_type());
  }
  TORCH_CHECK_VALUE(fresh.device() == cache.device(), op, ": ", new_name, " is on ", fresh.device(), ", ", cache_name,
                    " on ", cache.device());
  TORCH_CHECK_VALUE(
      (paged || fresh.size(0) == cache.size(0)) && fresh.size(1) == cache.size(1) && fresh.size(3) == cache.size(3), op,
      ": ", new_name, " of shape ", fresh.sizes(), " does not match ", cache_name, " of shape ", cache.sizes(),
      " in batch, kv_heads or head_dim");
  for (const auto* t : {&cache, &fresh}) {
    TORCH_CHECK_VALUE(t->numel() == 0 || t->size(3) <= 1 || t->stride(3) == 1, op, ": ",
                      t == &cache ? cache_name : new_name, " must have a contiguous last dimension (stride 1)");
  }
}

void check_scale(const char* op, const char* name, const at::Tensor& scale, const char* cache_name,
                 const at::Tensor& cache) {
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.device() == cache.device(), op, ": ", name, " is on ", scale.device(), ", ", cache_name,
                    " on ", cache.device());
  TORCH_CHECK_VALUE(cache.dim() == 4 && scale.sizes().equals(cache.sizes().slice(0, 3)), op, ": ", name, " must have ",
                    cache_name, "'s shape without head_dim (", cache.sizes().slice(0, cache.dim() - 1), " for ",
                    cache_name, " of shape ", cache.sizes(), "), got ", scale.sizes());
}

// Device-checked calls (host_values false: CUDA-graph capture, cuda_device_checks='require')
// read nothing back, and an 8-bit cache needs host reads (the finite check of new rows, the
// lengths that size its dequantized copy).
void refuse_device_checked_quantized(const char* op, const CacheScales& scales, bool host_values) {
  TORCH_CHECK_NOT_IMPLEMENTED(host_values || !scales.defined(), op,
                              ": a quantized (int8 / fp8) cache is not served with device-side checks (CUDA-graph "
                              "capture, cuda_device_checks='require') yet");
}

}  // namespace

bool is_quantized_cache_dtype(at::ScalarType dtype) {
  return dtype == at::kChar || dtype == at::ScalarType::Float8_e4m3fn;
}

CacheScales check_cache_scales(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const bool has_k = k_scale.has_value() && k_scale->defined(), has_v = v_scale.has_value() && v_scale->defined();
  const at::ScalarType kt = k_cache.scalar_type(), vt = v_cache.scalar_type();
  const bool k_quant = is_quantized_cache_dtype(kt), v_quant = is_quantized_cache_dtype(vt);
  if (!k_quant && !v_quant) {
    TORCH_CHECK_VALUE(!has_k && !has_v, op, ": k_cache_scale / v_cache_scale are for int8 or float8_e4m3fn caches; ",
                      "this cache is ", kt, " (drop the scales, or quantize the cache)");
    return {};
  }
  TORCH_CHECK_TYPE(kt == vt, op, ": k_cache (", kt, ") and v_cache (", vt, ") must have the same storage dtype");
  TORCH_CHECK_VALUE(has_k, op, ": k_cache is ", kt, ", so k_cache_scale (float32, one scale per position and head) ",
                    "is required");
  TORCH_CHECK_VALUE(has_v, op, ": v_cache is ", vt, ", so v_cache_scale (float32, one scale per position and head) ",
                    "is required");
  check_scale(op, "k_cache_scale", *k_scale, "k_cache", k_cache);
  check_scale(op, "v_cache_scale", *v_scale, "v_cache", v_cache);
  // The append writes one scale per (position, head): each must have its own memory.
  for (const auto& [name, t] :
       {std::make_pair("k_cache_scale", &*k_scale), std::make_pair("v_cache_scale", &*v_scale)}) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, ": ", name,
                      " has elements that share memory (an expanded tensor?); it needs one scale per position and "
                      "head");
    for (const at::Tensor* cache : {&k_cache, &v_cache}) {
      const auto status = at::get_overlap_status(*t, *cache);
      TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", name,
                        " shares memory with ", cache == &k_cache ? "k_cache" : "v_cache");
    }
  }
  const auto kv = at::get_overlap_status(*k_scale, *v_scale);
  TORCH_CHECK_VALUE(kv != at::MemOverlapStatus::Full && kv != at::MemOverlapStatus::Partial, op,
                    ": k_cache_scale and v_cache_scale share memory; each needs its own tensor");
  return {*k_scale, *v_scale, kt};
}

void check_finite_new_rows(const char* op, const at::Tensor& k_new, const at::Tensor& v_new) {
  for (const auto& [name, t] : {std::make_pair("k_new", &k_new), std::make_pair("v_new", &v_new)}) {
    TORCH_CHECK_VALUE(t->numel() == 0 || at::isfinite(*t).all().item<bool>(), op, ": ", name,
                      " has NaN or Inf values, which a quantized cache cannot store (a row's scale is its largest "
                      "magnitude); nothing was written");
  }
}

namespace {

at::Tensor dequantized(const at::Tensor& codes, const at::Tensor& scale, at::ScalarType dtype) {
  return (codes.to(at::kFloat) * scale.unsqueeze(-1)).to(dtype).contiguous();
}

}  // namespace

DequantizedKv dequantize_for_call(const KvcacheCall& call, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  at::ScalarType dtype) {
  const CacheScales& sc = call.scales;
  if (!call.table.defined()) {
    int64_t used = 0;
    for (const int64_t len : call.lens) used = std::max(used, len);
    return {dequantized(k_cache.narrow(2, 0, used), sc.k.narrow(2, 0, used), dtype),
            dequantized(v_cache.narrow(2, 0, used), sc.v.narrow(2, 0, used), dtype), at::Tensor()};
  }
  // The table entries each sequence reads (its first ceil(len / block_size) columns), their
  // distinct blocks, and the table renumbered onto those (entries never read: block 0).
  const BlockTable& t = call.table;
  const int64_t B = static_cast<int64_t>(call.lens.size());
  const at::Tensor host = t.table.to(at::kCPU).contiguous();
  const int32_t* e = host.data_ptr<int32_t>();
  std::vector<int32_t> blocks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j * t.block_size < call.lens[b]; ++j) blocks.push_back(e[b * t.blocks_per_seq + j]);
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  at::Tensor renumbered = at::zeros_like(host);
  int32_t* r = renumbered.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j * t.block_size < call.lens[b]; ++j) {
      const int32_t blk = e[b * t.blocks_per_seq + j];
      r[b * t.blocks_per_seq + j] =
          static_cast<int32_t>(std::lower_bound(blocks.begin(), blocks.end(), blk) - blocks.begin());
    }
  const at::Tensor index =
      at::tensor(std::vector<int64_t>(blocks.begin(), blocks.end()), at::kLong).to(k_cache.device());
  return {dequantized(k_cache.index_select(0, index), sc.k.index_select(0, index), dtype),
          dequantized(v_cache.index_select(0, index), sc.v.index_select(0, index), dtype),
          renumbered.to(t.table.device())};
}

BlockTable check_block_table(const char* op, const std::optional<at::Tensor>& block_table, int64_t batch,
                             const at::Tensor& k_cache, const std::vector<int64_t>* used) {
  BlockTable r;
  if (!block_table.has_value() || !block_table->defined()) return r;
  const at::Tensor& t = *block_table;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": block_table must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == batch, op, ": block_table must have shape (", batch,
                    ", blocks_per_sequence), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == k_cache.device(), op, ": block_table is on ", t.device(), ", the cache on ",
                    k_cache.device());
  TORCH_CHECK_VALUE(k_cache.size(2) > 0, op, ": a paged cache needs block_size > 0");
  r.table = t.contiguous();
  r.block_size = k_cache.size(2);
  r.blocks_per_seq = t.size(1);
  if (used == nullptr) return r;
  const at::Tensor host = r.table.to(at::kCPU);
  const int32_t* entries = host.data_ptr<int32_t>();
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE((*used)[b] <= r.capacity(), op, ": sequence ", b, " needs ", (*used)[b],
                      " positions but block_table gives ", r.blocks_per_seq, " blocks of ", r.block_size,
                      "; nothing was written");
    for (int64_t blk = 0; blk * r.block_size < (*used)[b]; ++blk) {
      const int32_t e = entries[b * r.blocks_per_seq + blk];
      TORCH_CHECK_VALUE(e >= 0 && e < num_blocks, op, ": block_table[", b, ", ", blk, "] = ", e,
                        " is not a block of the cache (", num_blocks, " blocks); nothing was written");
    }
  }
  return r;
}

void apply_block_table(AttentionParams& p, const BlockTable& table) {
  if (!table.defined()) return;
  p.block_table = table.table.data_ptr<int32_t>();
  p.block_size = table.block_size;
  p.blocks_per_seq = table.blocks_per_seq;
  p.len_k = table.capacity();
}

namespace {

// What the host still checks of cache_seqlens and block_table when their values are checked on
// the device (host_values false): dtype, shape and device, and the table's layout, not its
// entries (nothing is copied to the host).
void check_lengths_layout(const char* op, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                          int64_t batch, const at::Tensor& k_cache, BlockTable* table_out) {
  check_cache_seqlens(op, cache_seqlens, batch, k_cache.device());
  const BlockTable table = check_block_table(op, block_table, batch, k_cache, nullptr);
  if (table_out != nullptr) *table_out = table;
}

}  // namespace

std::vector<int64_t> check_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& k_new, const at::Tensor& v_new,
                                           const at::Tensor& cache_seqlens, bool rolling,
                                           const std::optional<at::Tensor>& block_table, BlockTable* table_out,
                                           const CacheScales& scales, bool host_values) {
  constexpr const char* kOp = "flash_attn_ext.kv_cache_append";
  const bool paged = block_table.has_value() && block_table->defined();
  TORCH_CHECK_VALUE(!(paged && rolling), kOp, ": a paged cache (block_table) cannot also be rolling");
  TORCH_CHECK_VALUE(!paged || block_table->dim() == 2, kOp,
                    ": block_table must be 2-D (batch, blocks_per_sequence), got ",
                    paged ? block_table->sizes() : at::IntArrayRef{});
  check_cache_pair(kOp, "k_cache", k_cache, "k_new", k_new, paged);
  check_cache_pair(kOp, "v_cache", v_cache, "v_new", v_new, paged);
  TORCH_CHECK_VALUE(k_cache.sizes().slice(0, 3).equals(v_cache.sizes().slice(0, 3)), kOp, ": k_cache ", k_cache.sizes(),
                    " and v_cache ", v_cache.sizes(), " differ in batch, kv_heads or max_len");
  TORCH_CHECK_VALUE(k_cache.device() == v_cache.device(), kOp, ": k_cache is on ", k_cache.device(), ", v_cache on ",
                    v_cache.device());
  TORCH_CHECK_VALUE(k_new.size(2) == v_new.size(2), kOp, ": k_new has ", k_new.size(2), " new positions, v_new ",
                    v_new.size(2));
  const int64_t B = paged ? k_new.size(0) : k_cache.size(0), L_new = k_new.size(2);
  const int64_t S_max = paged ? k_cache.size(2) * block_table->size(-1) : k_cache.size(2);
  TORCH_CHECK_VALUE(k_new.size(0) == v_new.size(0), kOp, ": k_new and v_new differ in batch");
  TORCH_CHECK_VALUE(!rolling || S_max > 0 || L_new == 0, kOp, ": a rolling cache needs max_len > 0");
  TORCH_CHECK_VALUE(!scales.defined() || k_new.scalar_type() == v_new.scalar_type(), kOp, ": k_new (",
                    k_new.scalar_type(), ") and v_new (", v_new.scalar_type(), ") must have the same dtype");
  refuse_device_checked_quantized(kOp, scales, host_values);
  if (scales.defined()) check_finite_new_rows(kOp, k_new, v_new);
  if (!host_values) {
    check_lengths_layout(kOp, cache_seqlens, block_table, B, k_cache, table_out);
    return {};
  }
  const std::vector<int64_t> lens = read_cache_seqlens(kOp, cache_seqlens, B, k_cache.device());
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0, kOp, ": cache_seqlens[", b, "] = ", lens[b], " is negative");
    TORCH_CHECK_VALUE(!paged || lens[b] + L_new <= S_max, kOp, ": sequence ", b, " needs ", lens[b] + L_new,
                      " positions (cache_seqlens[", b, "] = ", lens[b], " + ", L_new, " new) but block_table gives ",
                      block_table->size(-1), " blocks of ", k_cache.size(2), "; nothing was written");
    if (!rolling) {
      TORCH_CHECK_VALUE(lens[b] + L_new <= S_max, kOp, ": appending ", L_new, " positions at cache_seqlens[", b,
                        "] = ", lens[b], " overflows the cache (max_len ", S_max,
                        "); nothing was written. Use a larger cache or rolling=True");
    }
  }
  std::vector<int64_t> used(lens);
  for (auto& u : used) u += L_new;
  BlockTable table = check_block_table(kOp, block_table, B, k_cache, &used);
  if (table_out != nullptr) *table_out = table;
  return lens;
}

std::vector<int64_t> check_attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                             const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                             const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
                                             int64_t window_right, const std::optional<at::Tensor>& block_table,
                                             BlockTable* table_out, const CacheScales& scales,
                                             std::vector<int64_t>* lens_before_out, bool host_values) {
  constexpr const char* kOp = "flash_attn_ext.attention_kvcache";
  const bool paged = block_table.has_value() && block_table->defined();
  refuse_device_checked_quantized(kOp, scales, host_values);
  // A quantized cache's dtype is checked by check_cache_scales, the rest as a float cache's.
  check_attention_inputs(kOp, q, k_cache, v_cache, std::nullopt, 0.0, scale, window_left, window_right, paged,
                         /*quantized_kv=*/scales.defined());
  TORCH_CHECK_VALUE(!paged || block_table->dim() == 2, kOp,
                    ": block_table must be 2-D (batch, blocks_per_sequence), got ",
                    paged ? block_table->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), kOp, ": pass both k_new and v_new, or neither");
  const int64_t B = q.size(0);
  const int64_t S_max = paged ? k_cache.size(2) * block_table->size(-1) : k_cache.size(2);
  const int64_t L_new = k_new.has_value() ? k_new->size(2) : 0;
  if (k_new.has_value()) {  // what kv_cache_append would check of the tokens appended in this call
    check_cache_pair(kOp, "k_cache", k_cache, "k_new", *k_new, paged);
    check_cache_pair(kOp, "v_cache", v_cache, "v_new", *v_new, paged);
    TORCH_CHECK_VALUE(k_new->size(0) == B && v_new->size(0) == B, kOp, ": k_new and v_new need batch ", B,
                      " (q's), got ", k_new->size(0), " and ", v_new->size(0));
    TORCH_CHECK_VALUE(v_new->size(2) == L_new, kOp, ": k_new has ", L_new, " new positions, v_new ", v_new->size(2));
    if (scales.defined()) {
      TORCH_CHECK_TYPE(k_new->scalar_type() == q.scalar_type() && v_new->scalar_type() == q.scalar_type(), kOp,
                       ": k_new and v_new must have the query's dtype ", q.scalar_type(), ", got ",
                       k_new->scalar_type(), " and ", v_new->scalar_type());
      check_finite_new_rows(kOp, *k_new, *v_new);
    }
  }
  if (!host_values) {
    check_lengths_layout(kOp, cache_seqlens, block_table, B, k_cache, table_out);
    return {};
  }
  std::vector<int64_t> lens = read_cache_seqlens(kOp, cache_seqlens, B, q.device());
  if (lens_before_out != nullptr) *lens_before_out = lens;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0, kOp, ": cache_seqlens[", b, "] = ", lens[b], " is negative");
    // A paged sequence runs out of its block_table row, not of the cache: say so (flash-attn's
    // callers match "block_table").
    TORCH_CHECK_VALUE(!paged || lens[b] + L_new <= S_max, kOp, ": sequence ", b, " needs ", lens[b] + L_new,
                      " positions (cache_seqlens[", b, "] = ", lens[b], " + ", L_new, " new) but block_table gives ",
                      block_table->size(-1), " blocks of ", k_cache.size(2), "; nothing was written");
    TORCH_CHECK_VALUE(lens[b] + L_new <= S_max, kOp, ": cache_seqlens[", b, "] = ", lens[b], " with ", L_new,
                      " new positions does not fit the cache (max_len ", S_max, "); nothing was written");
    lens[b] += L_new;
  }
  BlockTable table = check_block_table(kOp, block_table, B, k_cache, &lens);
  if (table_out != nullptr) *table_out = table;
  return lens;
}

KvcacheCall prepare_attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                      const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
                                      int64_t window_right, const std::optional<at::Tensor>& block_table,
                                      double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                      const std::optional<at::Tensor>& sinks, const DeviceLimits& limits,
                                      AppendValidatedFn append, const std::optional<at::Tensor>& k_cache_scale,
                                      const std::optional<at::Tensor>& v_cache_scale, bool host_values) {
  constexpr const char* kOp = "flash_attn_ext.attention_kvcache";
  check_softcap(kOp, softcap);
  std::vector<int64_t> lens_before;
  KvcacheCall call;
  BlockTable& table = call.table;
  call.scales = check_cache_scales(kOp, k_cache, v_cache, k_cache_scale, v_cache_scale);
  call.lens = check_attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left,
                                      window_right, block_table, &table, call.scales, &lens_before, host_values);
  check_head_dims(kOp, q.size(3), v_cache.size(3), limits);
  AttentionParams& p = call.params;
  p = make_attention_params(q, k_cache, v_cache, 0.0, scale, window_left, window_right, /*bottom_right=*/true, softcap);
  set_alibi_slopes(kOp, p, alibi_slopes, q.device());  // checked before the append writes
  set_sinks(kOp, p, sinks, q.device());
  if (k_new.has_value() && host_values)
    append(k_cache, v_cache, *k_new, *v_new, lens_before, /*rolling=*/false, table, call.scales);
  apply_block_table(p, table);  // on CUDA a device pointer: the table lives on the cache's device
  call.out = empty_attention_output(q, p.dim_v);
  call.lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  return call;
}

}  // namespace flash_attn_ext
