// The launcher of kv_cache_append's CUDA kernel, shared by the host-checked op
// (append_validated, kv_cache_host.h) and the device-checked entries (kv_cache_device_checks.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "kv_cache_host.h"

namespace flash_attn_ext::cuda {

// Writes every new position of k_new / v_new into the caches on the current stream. starts:
// int64 (B,) on the device, each sequence's first slot (already reduced mod S_max when
// rolling); a negative start skips the sequence. max_pos bounds start + L_new over the batch:
// the kernel indexes with 32 bits, and a call needing more raises before any write. scales
// defined: the caches are int8 / fp8 and each row is quantized.
void append_rows(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                 const at::Tensor& starts, int64_t max_pos, bool rolling, const BlockTable& table,
                 const CacheScales& scales = {});

}  // namespace flash_attn_ext::cuda
