// CUDA kernel of flash_attn_ext::attention_kvcache: the optional append (kv_cache_append's
// CUDA kernel), then the split-KV decode kernels (attention_decode_cuda.h) when they serve
// the call, else the forward row kernel, both with per-sequence key lengths on the device, so
// each query row visits only its own sequence's visible keys. Validation, which reads
// cache_seqlens on the host, comes first: a bad call writes nothing.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../attention/attention_forward_cuda.h"
#include "../attention/attention_host.h"
#include "attention_decode_cuda.h"
#include "kv_cache_host.h"

#include <algorithm>

namespace flash_attn_ext::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, double scale, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& block_table, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  check_softcap("flash_attn_ext.attention_kvcache", softcap);
  BlockTable table;
  std::vector<int64_t> lens_before;
  const std::vector<int64_t> lens = check_attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                            scale, window_left, window_right, block_table, &table, &lens_before);
  check_cuda_head_dims("flash_attn_ext.attention_kvcache", q.size(3), v_cache.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionParams p = make_attention_params(q, k_cache, v_cache, 0.0, scale, window_left, window_right,
                                            /*bottom_right=*/true, softcap);
  set_alibi_slopes("flash_attn_ext.attention_kvcache", p, alibi_slopes, q.device());  // checked before the append
  if (k_new.has_value()) append_validated(k_cache, v_cache, *k_new, *v_new, lens_before, /*rolling=*/false, table);
  const at::Tensor lens_dev = at::tensor(lens, at::kLong).to(q.device());
  apply_block_table(p, table);  // a device pointer: the table lives on the cache's device
  p.seqlens_k = lens_dev.data_ptr<int64_t>();
  at::Tensor out = empty_attention_output(q, p.dim_v);
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  const int64_t max_len = lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
  if (!try_attention_decode_cuda(p, q, k_cache, v_cache, out, lse, max_len))
    run_attention_forward_cuda(p, MaskView{}, q, k_cache, v_cache, out, lse, nullptr);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) {
  m.impl("attention_kvcache", &attention_kvcache_cuda);
}

}  // namespace flash_attn_ext::cuda
