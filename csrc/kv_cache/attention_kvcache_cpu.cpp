// CPU kernel of flash_attn_ext::attention_kvcache: decode (L = 1) or chunked prefill (L > 1)
// against a KV cache with per-sequence lengths. It is the fused forward kernel with
// AttentionParams::seqlens_k set: each sequence's band is computed from its own length, so
// key tiles past a sequence's end are never read. Everything is validated before the optional
// in-place append writes to the caches. An int8 / fp8 cache is read in place by the decode
// kernel; calls it declines (chunked prefill: more than 8 query rows per KV head) get the
// rows they read dequantized into the query's dtype first (dequantize_for_call: one pass over
// them, against L times as much arithmetic in the tiles that follow).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../attention/attention_forward_cpu.h"
#include "../attention/attention_host.h"
#include "kv_cache_host.h"

namespace flash_attn_ext::cpu {
namespace {

void run_kvcache_cpu(KvcacheCall& call, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  AttentionParams& p = call.params;
  p.seqlens_k = call.lens.data();
  if (!call.scales.defined()) {
    run_attention_forward_cpu(p, MaskView{}, q, k_cache, v_cache, call.out, call.lse);
    return;
  }
  if (run_attention_decode_cpu(p, MaskView{}, q, k_cache, v_cache, call.out, call.lse, call.scales.k, call.scales.v))
    return;
  const DequantizedKv kv = dequantize_for_call(call, k_cache, v_cache, q.scalar_type());
  if (kv.table.defined()) p.block_table = kv.table.data_ptr<int32_t>();
  run_attention_forward_cpu(p, MaskView{}, q, kv.k, kv.v, call.out, call.lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("attention_kvcache", &attention_kvcache_op<&append_validated, &cpu_limits, &run_kvcache_cpu>);
}

}  // namespace flash_attn_ext::cpu
