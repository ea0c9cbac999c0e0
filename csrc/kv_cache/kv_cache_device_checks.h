// Device-side checks of the KV-cache ops on CUDA: the values of cache_seqlens and block_table
// checked by a kernel instead of read back to the host, so a call makes no device -> host copy
// and no sync, and can be captured in a CUDA graph (the way decode is deployed).
//
// kernel_config(cuda_device_checks=...) chooses: auto (the default) checks on the host, where
// a bad call raises before anything is written, except while the current stream is capturing
// a graph (a host read cannot be captured); require always checks on the device; off always
// on the host, so a capture raises. A device-checked call cannot raise for a bad value: the
// sequence is skipped instead (none of its rows written, its outputs NaN) and the reason is
// kept in a per-device error word, which the next host-checked KV-cache call on that device,
// or flash_attn_ext.check_kvcache_errors(), raises (and clears).
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/kernel_config.h"
#include "kv_cache_host.h"

namespace flash_attn_ext::cuda {

// Whether this call of `op` on `device` checks on the device (see above). When it does not,
// the pending errors of earlier device-checked calls on the device are raised first.
bool use_device_checks(const char* op, const KernelConfig& config, const at::Device& device);

// Per-sequence values checked on the device, on the current stream: starts (int64 (B,)): the
// first new position's slot (reduced mod capacity when rolling), -1 for a skipped sequence;
// lens_k (int64 (B,), if asked for): the keys the sequence attends to, cache_seqlens + new_len,
// 0 for a skipped one. capacity: the positions a sequence holds (S_max or the table's).
struct DeviceLengths {
  at::Tensor starts, lens_k;
};
DeviceLengths check_lengths_on_device(const at::Tensor& cache_seqlens, int64_t new_len, int64_t capacity, bool rolling,
                                      const BlockTable& table, int64_t num_blocks, bool want_lens_k);

// NaN into out (B, H, L, D) and lse (B, H, L) for the sequences whose start is -1.
void poison_skipped(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& starts);

// Raises (RuntimeError naming `op`) and clears what device-checked calls on `device` skipped
// since the last check; a sync. Nothing to do, and no sync, if none ever ran there.
void raise_device_check_errors(const char* op, const at::Device& device);

}  // namespace flash_attn_ext::cuda
