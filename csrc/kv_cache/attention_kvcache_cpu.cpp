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

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                         const std::optional<at::Tensor>& k_new,
                                                         const std::optional<at::Tensor>& v_new, double scale,
                                                         int64_t window_left, int64_t window_right,
                                                         const std::optional<at::Tensor>& block_table, double softcap,
                                                         const std::optional<at::Tensor>& alibi_slopes) {
  KvcacheCall call =
      prepare_attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left, window_right,
                                block_table, softcap, alibi_slopes, DeviceLimits{}, &append_validated);
  call.params.seqlens_k = call.lens.data();
  run_attention_forward_cpu(call.params, MaskView{}, q, k_cache, v_cache, call.out, call.lse);
  return {call.out, call.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) { m.impl("attention_kvcache", &attention_kvcache_cpu); }

}  // namespace flash_attn_ext::cpu
