// Validation shared by the CPU and CUDA kernels of the KV-cache ops. Both return the
// sequence lengths on the host, after checking every argument and every value of
// cache_seqlens, so a bad call raises before anything is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace flash_attn_ext {

// kv_cache_append: cache_seqlens (the write positions).
std::vector<int64_t> check_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& k_new, const at::Tensor& v_new,
                                           const at::Tensor& cache_seqlens, bool rolling);

// attention_kvcache: the key length each sequence attends to (cache_seqlens + L_new).
std::vector<int64_t> check_attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                             const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                             const std::optional<at::Tensor>& k_new,
                                             const std::optional<at::Tensor>& v_new, double scale,
                                             int64_t window_left, int64_t window_right);

// kv_cache_append through the dispatcher (the device's kernel), non-rolling: the append step
// of attention_kvcache.
void call_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, const at::Tensor& cache_seqlens);

// The first new position that survives a rolling append of L_new positions into S_max slots
// (only the last S_max are written, which keeps the slots written by one call disjoint).
inline int64_t rolling_first_written(bool rolling, int64_t L_new, int64_t S_max) {
  return rolling && L_new > S_max ? L_new - S_max : 0;
}

}  // namespace flash_attn_ext
