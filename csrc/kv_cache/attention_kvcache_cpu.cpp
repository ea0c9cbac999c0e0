// CPU kernel of flash_attn_ext::attention_kvcache: decode (L = 1) or chunked prefill (L > 1)
// against a KV cache with per-sequence lengths. It is the fused forward kernel with
// AttentionParams::seqlens_k set: each sequence's band is computed from its own length, so
// key tiles past a sequence's end are never read. Everything is validated before the optional
// in-place append writes to the caches. An int8 / fp8 cache is read in place by the decode
// kernel; calls it declines (chunked prefill: more than 8 query rows per KV head) get the
// rows they can read dequantized into the query's dtype first (one pass over them, against
// L times as much arithmetic in the tiles that follow).
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
  // The positions any sequence reads (a paged cache: every block).
  int64_t used = -1;
  if (!call.table.defined()) {
    used = 0;
    for (const int64_t len : call.lens) used = std::max(used, len);
  }
  const at::Tensor k = dequantize_cache(k_cache, call.scales.k, q.scalar_type(), used);
  const at::Tensor v = dequantize_cache(v_cache, call.scales.v, q.scalar_type(), used);
  run_attention_forward_cpu(p, MaskView{}, q, k, v, call.out, call.lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("attention_kvcache", &attention_kvcache_op<&append_validated, &cpu_limits, &run_kvcache_cpu>);
}

}  // namespace flash_attn_ext::cpu
