// CPU kernel of flash_attn_ext::attention_kvcache: decode (L = 1) or chunked prefill (L > 1)
// against a KV cache with per-sequence lengths. It is the fused forward kernel with
// AttentionParams::seqlens_k set: each sequence's band is computed from its own length, so
// key tiles past a sequence's end are never read. Everything is validated before the optional
// in-place append writes to the caches.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../attention/attention_forward_cpu.h"
#include "../attention/attention_host.h"
#include "kv_cache_host.h"

namespace flash_attn_ext::cpu {
namespace {

void run_kvcache_cpu(KvcacheCall& call, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  call.params.seqlens_k = call.lens.data();
  run_attention_forward_cpu(call.params, MaskView{}, q, k_cache, v_cache, call.out, call.lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("attention_kvcache", &attention_kvcache_op<&append_validated, &cpu_limits, &run_kvcache_cpu>);
}

}  // namespace flash_attn_ext::cpu
