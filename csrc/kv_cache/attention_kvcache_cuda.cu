// CUDA kernel of flash_attn_ext::attention_kvcache: the optional append (kv_cache_append's
// CUDA kernel), then the split-KV decode kernels (attention_decode_cuda.h) when they serve
// the call, else the forward row kernel, both with per-sequence key lengths on the device, so
// each query row visits only its own sequence's visible keys. Validation, which reads
// cache_seqlens on the host, comes first: a bad call writes nothing. A device-checked call
// (kv_cache_device_checks.h: a CUDA graph capture, or cuda_device_checks='require') reads
// nothing back: its check kernel gives the lengths, and the splits are sized for the capacity.
// An int8 / fp8 cache is dequantized (the rows any sequence reads) into the query's dtype and
// attended by the same kernels: correct, not the in-kernel read the CPU decode kernel does
// (that is still to be written for the CUDA decode kernel; none of this has run on a GPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../attention/attention_forward_cuda.h"
#include "../attention/attention_host.h"
#include "attention_decode_cuda.h"
#include "kv_cache_append_cuda.h"
#include "kv_cache_device_checks.h"
#include "kv_cache_host.h"

#include <algorithm>

namespace flash_attn_ext::cuda {
namespace {

// The attention of a prepared call, key lengths on the device; max_len_k bounds them.
void run_with_lengths(KvcacheCall& call, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const int64_t* lens_k, int64_t max_len_k) {
  AttentionParams& p = call.params;
  p.seqlens_k = lens_k;
  if (!try_attention_decode_cuda(p, q, k_cache, v_cache, call.out, call.lse, max_len_k))
    run_attention_forward_cuda(p, MaskView{}, q, k_cache, v_cache, call.out, call.lse, nullptr);
}

void run_kvcache_cuda(KvcacheCall& call, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lens_dev = at::tensor(call.lens, at::kLong).to(q.device());
  const int64_t max_len = call.lens.empty() ? 0 : *std::max_element(call.lens.begin(), call.lens.end());
  if (call.scales.defined()) {
    const DequantizedKv kv = dequantize_for_call(call, k_cache, v_cache, q.scalar_type());
    if (kv.table.defined()) call.params.block_table = kv.table.data_ptr<int32_t>();  // on the device
    run_with_lengths(call, q, kv.k, kv.v, lens_dev.data_ptr<int64_t>(), max_len);
    return;
  }
  run_with_lengths(call, q, k_cache, v_cache, lens_dev.data_ptr<int64_t>(), max_len);
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& block_table, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& k_cache_scale, const std::optional<at::Tensor>& v_cache_scale) {
  constexpr const char* kOp = "flash_attn_ext.attention_kvcache";
  if (!use_device_checks(kOp, current_kernel_config(), q.device()))
    return attention_kvcache_op<&append_validated, &cuda_limits, &run_kvcache_cuda>(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left, window_right, block_table, softcap,
        alibi_slopes, sinks, k_cache_scale, v_cache_scale);
  KvcacheCall call = prepare_attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left,
                                               window_right, block_table, softcap, alibi_slopes, sinks, cuda_limits(),
                                               /*append=*/nullptr, k_cache_scale, v_cache_scale,
                                               /*host_values=*/false);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t capacity = call.params.len_k;  // S_max, or the block table's positions per sequence
  const int64_t L_new = k_new.has_value() ? k_new->size(2) : 0;
  const DeviceLengths d = check_lengths_on_device(cache_seqlens, L_new, capacity, /*rolling=*/false, call.table,
                                                  k_cache.size(0), /*want_lens_k=*/true);
  if (k_new.has_value())
    append_rows(k_cache, v_cache, *k_new, *v_new, d.starts, capacity, /*rolling=*/false, call.table);
  if (q.size(0) > 0) {
    run_with_lengths(call, q, k_cache, v_cache, d.lens_k.data_ptr<int64_t>(), capacity);
    poison_skipped(call.out, call.lse, d.starts);
  }
  return {call.out, call.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) { m.impl("attention_kvcache", &attention_kvcache_cuda); }

}  // namespace flash_attn_ext::cuda
