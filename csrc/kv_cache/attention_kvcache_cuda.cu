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

void run_kvcache_cuda(KvcacheCall& call, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lens_dev = at::tensor(call.lens, at::kLong).to(q.device());
  AttentionParams& p = call.params;
  p.seqlens_k = lens_dev.data_ptr<int64_t>();
  const int64_t max_len = call.lens.empty() ? 0 : *std::max_element(call.lens.begin(), call.lens.end());
  if (!try_attention_decode_cuda(p, q, k_cache, v_cache, call.out, call.lse, max_len))
    run_attention_forward_cuda(p, MaskView{}, q, k_cache, v_cache, call.out, call.lse, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) {
  m.impl("attention_kvcache", &attention_kvcache_op<&append_validated, &cuda_limits, &run_kvcache_cuda>);
}

}  // namespace flash_attn_ext::cuda
