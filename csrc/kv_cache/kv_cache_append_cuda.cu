// CUDA kernel of flash_attn_ext::kv_cache_append: one launch writes K and V of every new
// position into its slot, in place, no allocation. One warp per (sequence, head, position)
// copies the K row then the V row, lanes striding the features (coalesced). Validation, which
// reads cache_seqlens on the host, runs before the launch, so a bad call writes nothing; a
// device-checked call (kv_cache_device_checks.h) skips the sequences its check kernel rejects.
// Into an int8 / fp8 cache each warp quantizes its row instead (kv_cache_quantize.h): the lanes'
// largest magnitude reduced across the warp, then the codes and lane 0 the scale. (Compiled
// in CI; not yet run on a GPU.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/cuda_rows.cuh"
#include "kv_cache_append_cuda.h"
#include "kv_cache_device_checks.h"
#include "kv_cache_host.h"
#include "kv_cache_quantize.h"

#include <algorithm>

namespace flash_attn_ext::cuda {
namespace {

// A cache or a new-rows tensor as rows of opaque words, for the copy.
struct WordRows {
  char* data;
  int64_t stride_b, stride_h, stride_l;  // in elements
  int64_t dim;
};

template <typename Word>  // the element as an opaque word of its size: a copy needs no dtype
__device__ void copy_row(const WordRows& dst, const WordRows& src, int64_t entry, int64_t b, int64_t h, int64_t slot,
                         int64_t t, int lane) {
  Word* d = reinterpret_cast<Word*>(dst.data) + entry * dst.stride_b + h * dst.stride_h + slot * dst.stride_l;
  const Word* s = reinterpret_cast<const Word*>(src.data) + b * src.stride_b + h * src.stride_h + t * src.stride_l;
  for (int64_t e = lane; e < dst.dim; e += kWarp) d[e] = s[e];
}

// Indices are 32-bit (the launcher checks they fit), so the per-row divisions are the inline
// 32-bit ones: 64-bit divisions are called subroutines (a call and a stack frame each).
template <typename Word>
__global__ void __launch_bounds__(kThreadsPerBlock)
    append_kernel(WordRows k_cache, WordRows v_cache, WordRows k_new, WordRows v_new, const int64_t* lens,
                  uint32_t batch, uint32_t heads, uint32_t t_begin, uint32_t t_end, uint32_t max_len, bool rolling,
                  const int32_t* blocks, int64_t blocks_per_seq) {
  const uint32_t span = t_end - t_begin, n = batch * heads * span;
  for (uint32_t r = static_cast<uint32_t>(global_warp()); r < n; r += static_cast<uint32_t>(warp_count())) {
    const uint32_t t = t_begin + r % span, bh = r / span, h = bh % heads, b = bh / heads;
    if (lens[b] < 0) continue;  // skipped by the device-side check
    const uint32_t pos = static_cast<uint32_t>(lens[b]) + t;
    // The slot's (cache entry, row): the sequence's own, or a block of a paged cache (max_len
    // is then the block size).
    const uint32_t q = pos / max_len, in_block = pos - q * max_len;
    const int64_t entry = blocks != nullptr ? blocks[b * blocks_per_seq + q] : b;
    const int64_t slot = blocks != nullptr || rolling ? in_block : pos;
    copy_row<Word>(k_cache, k_new, entry, b, h, slot, t, lane_id());
    copy_row<Word>(v_cache, v_new, entry, b, h, slot, t, lane_id());
  }
}

// A scale tensor (entries, heads, positions), float32.
struct ScaleRows {
  float* data;
  int64_t stride_b, stride_h, stride_l;
};

template <typename src_t>
__device__ void quantize_row(const WordRows& dst, const ScaleRows& scales, const WordRows& src, int64_t entry,
                             int64_t b, int64_t h, int64_t slot, int64_t t, int lane, quant::Kind kind) {
  uint8_t* d = reinterpret_cast<uint8_t*>(dst.data) + entry * dst.stride_b + h * dst.stride_h + slot * dst.stride_l;
  const src_t* s = reinterpret_cast<const src_t*>(src.data) + b * src.stride_b + h * src.stride_h + t * src.stride_l;
  float amax = 0.0f;
  for (int64_t e = lane; e < dst.dim; e += kWarp) amax = fmaxf(amax, fabsf(static_cast<float>(s[e])));
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  const float scale = quant::row_scale(amax, kind);
  for (int64_t e = lane; e < dst.dim; e += kWarp) d[e] = quant::encode(static_cast<float>(s[e]), scale, kind);
  if (lane == 0) scales.data[entry * scales.stride_b + h * scales.stride_h + slot * scales.stride_l] = scale;
}

// append_kernel's quantizing form: the same rows and slots, src_t the new rows' dtype.
template <typename src_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    append_quantize_kernel(WordRows k_cache, WordRows v_cache, WordRows k_new, WordRows v_new, ScaleRows k_scale,
                           ScaleRows v_scale, quant::Kind kind, const int64_t* lens, uint32_t batch, uint32_t heads,
                           uint32_t t_begin, uint32_t t_end, uint32_t max_len, bool rolling, const int32_t* blocks,
                           int64_t blocks_per_seq) {
  const uint32_t span = t_end - t_begin, n = batch * heads * span;
  for (uint32_t r = static_cast<uint32_t>(global_warp()); r < n; r += static_cast<uint32_t>(warp_count())) {
    const uint32_t t = t_begin + r % span, bh = r / span, h = bh % heads, b = bh / heads;
    if (lens[b] < 0) continue;
    const uint32_t pos = static_cast<uint32_t>(lens[b]) + t;
    const uint32_t q = pos / max_len, in_block = pos - q * max_len;
    const int64_t entry = blocks != nullptr ? blocks[b * blocks_per_seq + q] : b;
    const int64_t slot = blocks != nullptr || rolling ? in_block : pos;
    quantize_row<src_t>(k_cache, k_scale, k_new, entry, b, h, slot, t, lane_id(), kind);
    quantize_row<src_t>(v_cache, v_scale, v_new, entry, b, h, slot, t, lane_id(), kind);
  }
}

ScaleRows scale_rows(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

WordRows cache_rows(const at::Tensor& t) {
  return {static_cast<char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.size(3)};
}

}  // namespace

void append_rows(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                 const at::Tensor& starts, int64_t max_pos, bool rolling, const BlockTable& table,
                 const CacheScales& scales) {
  const int64_t B = k_new.size(0), H = k_cache.size(1), S_max = k_cache.size(2), L_new = k_new.size(2);
  if (B == 0 || H == 0 || L_new == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const int64_t t_begin = rolling_first_written(rolling, L_new, S_max);
  const int64_t n = B * H * (L_new - t_begin);
  const int64_t last_warp = n + int64_t{warp_grid(n)} * kWarpsPerBlock;  // the warp loop's counter stays below
  TORCH_CHECK_VALUE(std::max({last_warp, max_pos, S_max}) < (int64_t{1} << 32),
                    "flash_attn_ext.kv_cache_append: the CUDA kernel indexes with 32 bits, and this call needs more (",
                    n, " rows to write, positions up to ", max_pos, "); nothing was written. Append in smaller pieces");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (scales.defined()) {
    const quant::Kind kind = scales.kind == at::kChar ? quant::Kind::kInt8 : quant::Kind::kFp8E4M3;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_new.scalar_type(), "kv_cache_append_quantize", [&] {
      append_quantize_kernel<scalar_t><<<warp_grid(n), kThreadsPerBlock, 0, stream>>>(
          cache_rows(k_cache), cache_rows(v_cache), cache_rows(k_new), cache_rows(v_new), scale_rows(scales.k),
          scale_rows(scales.v), kind, starts.data_ptr<int64_t>(), static_cast<uint32_t>(B), static_cast<uint32_t>(H),
          static_cast<uint32_t>(t_begin), static_cast<uint32_t>(L_new), static_cast<uint32_t>(S_max), rolling,
          table.defined() ? table.table.data_ptr<int32_t>() : nullptr, table.blocks_per_seq);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const auto launch = [&](auto word) {
    using Word = decltype(word);
    append_kernel<Word><<<warp_grid(n), kThreadsPerBlock, 0, stream>>>(
        cache_rows(k_cache), cache_rows(v_cache), cache_rows(k_new), cache_rows(v_new), starts.data_ptr<int64_t>(),
        static_cast<uint32_t>(B), static_cast<uint32_t>(H), static_cast<uint32_t>(t_begin),
        static_cast<uint32_t>(L_new), static_cast<uint32_t>(S_max), rolling,
        table.defined() ? table.table.data_ptr<int32_t>() : nullptr, table.blocks_per_seq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (k_cache.element_size()) {
    case 1: launch(uint8_t{}); break;
    case 2: launch(uint16_t{}); break;
    case 4: launch(uint32_t{}); break;
    case 8: launch(uint64_t{}); break;
    default:
      TORCH_CHECK_TYPE(false, "flash_attn_ext.kv_cache_append: unsupported element size ", k_cache.element_size());
  }
}

void append_validated(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                      const at::Tensor& v_new, const std::vector<int64_t>& lens, bool rolling, const BlockTable& table,
                      const CacheScales& scales) {
  const int64_t B = k_new.size(0), H = k_cache.size(1), S_max = k_cache.size(2), L_new = k_new.size(2);
  if (B == 0 || H == 0 || L_new == 0) return;
  // A rolling cache's lengths count every position ever appended; only their remainder mod
  // S_max names a slot, so that is what the kernel gets (its positions stay below 2 S_max).
  std::vector<int64_t> starts = lens;
  if (rolling)
    for (auto& x : starts) x %= S_max;
  const int64_t max_pos = *std::max_element(starts.begin(), starts.end()) + L_new;
  append_rows(k_cache, v_cache, k_new, v_new, at::tensor(starts, at::kLong).to(k_cache.device()), max_pos, rolling,
              table, scales);
}

namespace {

// The op: host-checked (kv_cache_append_op) unless this call checks on the device, where the
// check kernel gives each sequence its start (or skips it) and the append follows on the stream.
void kv_cache_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, const at::Tensor& cache_seqlens, bool rolling,
                          const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& k_cache_scale,
                          const std::optional<at::Tensor>& v_cache_scale) {
  constexpr const char* kOp = "flash_attn_ext.kv_cache_append";
  if (!use_device_checks(kOp, current_kernel_config(), k_cache.device()))
    return kv_cache_append_op<&append_validated>(k_cache, v_cache, k_new, v_new, cache_seqlens, rolling, block_table,
                                                 k_cache_scale, v_cache_scale);
  const CacheScales scales = check_cache_scales(kOp, k_cache, v_cache, k_cache_scale, v_cache_scale);
  BlockTable table;
  check_kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, rolling, block_table, &table, scales,
                        /*host_values=*/false);
  if (k_new.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const int64_t S_max = k_cache.size(2), L_new = k_new.size(2);
  const int64_t capacity = table.defined() ? table.capacity() : S_max;
  const DeviceLengths d = check_lengths_on_device(cache_seqlens, L_new, capacity, rolling, table, k_cache.size(0),
                                                  /*want_lens_k=*/false);
  // The positions the kernel can meet: below capacity, or (rolling) a start below S_max plus L_new.
  append_rows(k_cache, v_cache, k_new, v_new, d.starts, rolling ? S_max + L_new : capacity, rolling, table, scales);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) { m.impl("kv_cache_append", &kv_cache_append_cuda); }

}  // namespace flash_attn_ext::cuda
