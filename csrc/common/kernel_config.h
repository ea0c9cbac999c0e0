// Which of the kernels' interchangeable paths a call may take: one typed struct, read once per
// call by the op entry (make_attention_params puts it in AttentionParams::config) and handed to
// the kernels in their params. No kernel reads the environment or a global: they read p.config.
//
// The process-wide setting lives in kernel_config.cpp, the one file that reads the environment
// (its FLASH_ATTN_EXT_* variables are the documented defaults, parsed once). Python sets it with
// flash_attn_ext.kernel_config(...), a context manager in the spirit of
// torch.nn.attention.sdpa_kernel. Torch-free, so CUDA kernels carry it in their params too.
#pragma once

#include <cstdint>

namespace flash_attn_ext {

// A fast path's setting: auto (taken where eligible, else the general kernel), off (never: to
// compare the two), require (raise, with the path's reason, where it cannot serve the call).
enum class PathMode : int8_t { kAuto = 0, kOff = 1, kRequire = 2 };

// The CPU kernels' tile back end (csrc/cpu/tile_backend.h): a back end by name, or auto.
enum class CpuTiles : int8_t { kAuto = -1, kFloat = 0, kAvx512Bf16 = 1, kBrgemm = 2 };

struct KernelConfig {
  PathMode cuda_fast = PathMode::kAuto;     // CUDA tensor-core forward / backward, CUDA decode kernel
  PathMode cpu_decode = PathMode::kAuto;    // CPU decode kernel (all KV heads of a key tile at once)
  PathMode cpu_bf16_dot = PathMode::kAuto;  // vdpbf16ps scores in the CPU decode (auto | off)
  PathMode cpu_q8_avx2 = PathMode::kAuto;   // AVX2 widening of 8-bit caches in the CPU decode (auto | off)
  PathMode cpu_kt_cache = PathMode::kAuto;  // the CPU forward's per-thread K^T cache (auto | off)
  // CPU backward with GQA: auto by working set; require = one pass per query head; off = one
  // sweep of the whole group per key tile.
  PathMode cpu_bwd_head_passes = PathMode::kAuto;
  // Where the KV-cache ops check the values of cache_seqlens and block_table on CUDA: auto = on
  // the host (one device -> host copy per call), on the device while the stream is capturing a
  // CUDA graph (where a host read cannot happen); require = always on the device (no sync);
  // off = always on the host (a capture then raises). csrc/kv_cache/kv_cache_device_checks.h.
  PathMode cuda_device_checks = PathMode::kAuto;
  CpuTiles cpu_tiles = CpuTiles::kAuto;
  int32_t num_splits = 0;  // split-KV key ranges per task: 0 = the kernel's own choice

  // The split count a kernel uses: the forced one, else its own choice.
  int64_t splits(int64_t automatic) const { return num_splits > 0 ? num_splits : automatic; }
};

// The process-wide setting now (a copy; op entries take one per call).
KernelConfig current_kernel_config();

}  // namespace flash_attn_ext
