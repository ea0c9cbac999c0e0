// CPU kernel of flash_attn_ext::attention_kvcache: decode (L = 1) or chunked prefill (L > 1)
// against a KV cache with per-sequence lengths. It is the fused forward kernel with
// AttentionParams::seqlens_k set: each sequence's band is computed from its own length, so
// key tiles past a sequence's end are never read. Everything is validated before the optional
// in-place append writes to the caches.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "../attention/attention_forward_cpu.h"
#include "../attention/attention_host.h"

namespace flash_attn_ext::cpu {
namespace {

constexpr const char* kOp = "flash_attn_ext.attention_kvcache";

void append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
            const at::Tensor& v_new, const at::Tensor& cache_seqlens) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flash_attn_ext::kv_cache_append", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, bool)>();
  op.call(k_cache, v_cache, k_new, v_new, cache_seqlens, false);
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
    int64_t window_right) {
  check_attention_inputs(kOp, q, k_cache, v_cache, std::nullopt, 0.0, scale, window_left, window_right);
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), kOp,
                    ": pass both k_new and v_new, or neither");
  const int64_t B = q.size(0), S_max = k_cache.size(2);
  const int64_t L_new = k_new.has_value() ? k_new->size(2) : 0;
  std::vector<int64_t> lens = read_cache_seqlens(kOp, cache_seqlens, B, q.device());
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] + L_new <= S_max, kOp, ": cache_seqlens[", b, "] = ",
                      lens[b], " with ", L_new, " new positions does not fit the cache (max_len ",
                      S_max, "); nothing was written");
    lens[b] += L_new;  // the keys this call attends to
  }
  if (k_new.has_value()) append(k_cache, v_cache, *k_new, *v_new, cache_seqlens);

  AttentionParams p = make_attention_params(q, k_cache, v_cache, 0.0, scale, window_left,
                                            window_right, /*bottom_right=*/true);
  p.seqlens_k = lens.data();
  at::Tensor out = empty_attention_output(q, p.dim_v);
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  run_attention_forward_cpu(p, MaskView{}, q, k_cache, v_cache, out, lse);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("attention_kvcache", &attention_kvcache_cpu);
}

}  // namespace flash_attn_ext::cpu
