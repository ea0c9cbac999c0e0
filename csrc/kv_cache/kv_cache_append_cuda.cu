// CUDA kernel of flash_attn_ext::kv_cache_append: one launch writes K and V of every new
// position into its slot, in place, no allocation. One warp per (sequence, head, position)
// copies the K row then the V row, lanes striding the features (coalesced). Validation, which
// reads cache_seqlens on the host, runs before the launch, so a bad call writes nothing.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/cuda_rows.cuh"
#include "kv_cache_host.h"

namespace flash_attn_ext::cuda {
namespace {

struct CacheRows {
  char* data;
  int64_t stride_b, stride_h, stride_l;  // in elements
  int64_t dim;
};

template <typename Word>  // the element as an opaque word of its size: a copy needs no dtype
__device__ void copy_row(const CacheRows& dst, const CacheRows& src, int64_t entry, int64_t b, int64_t h, int64_t slot,
                         int64_t t, int lane) {
  Word* d = reinterpret_cast<Word*>(dst.data) + entry * dst.stride_b + h * dst.stride_h + slot * dst.stride_l;
  const Word* s = reinterpret_cast<const Word*>(src.data) + b * src.stride_b + h * src.stride_h + t * src.stride_l;
  for (int64_t e = lane; e < dst.dim; e += kWarp) d[e] = s[e];
}

template <typename Word>
__global__ void __launch_bounds__(kThreadsPerBlock)
    append_kernel(CacheRows k_cache, CacheRows v_cache, CacheRows k_new, CacheRows v_new, const int64_t* lens,
                  int64_t batch, int64_t heads, int64_t t_begin, int64_t t_end, int64_t max_len, bool rolling,
                  const int32_t* blocks, int64_t blocks_per_seq) {
  const int64_t span = t_end - t_begin, n = batch * heads * span;
  for (int64_t r = global_warp(); r < n; r += warp_count()) {
    const int64_t t = t_begin + r % span, h = r / span % heads, b = r / span / heads;
    const int64_t pos = lens[b] + t;
    // The slot's (cache entry, row): the sequence's own, or a block of a paged cache (max_len
    // is then the block size).
    const int64_t entry = blocks != nullptr ? blocks[b * blocks_per_seq + pos / max_len] : b;
    const int64_t slot = blocks != nullptr || rolling ? pos % max_len : pos;
    copy_row<Word>(k_cache, k_new, entry, b, h, slot, t, lane_id());
    copy_row<Word>(v_cache, v_new, entry, b, h, slot, t, lane_id());
  }
}

CacheRows cache_rows(const at::Tensor& t) {
  return {static_cast<char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.size(3)};
}

}  // namespace

void append_validated(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                      const at::Tensor& v_new, const std::vector<int64_t>& lens, bool rolling,
                      const BlockTable& table) {
  const int64_t B = k_new.size(0), H = k_cache.size(1), S_max = k_cache.size(2), L_new = k_new.size(2);
  if (B == 0 || H == 0 || L_new == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor lens_dev = at::tensor(lens, at::kLong).to(k_cache.device());
  const int64_t t_begin = rolling_first_written(rolling, L_new, S_max);
  const int64_t n = B * H * (L_new - t_begin);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto word) {
    using Word = decltype(word);
    append_kernel<Word><<<warp_grid(n), kThreadsPerBlock, 0, stream>>>(
        cache_rows(k_cache), cache_rows(v_cache), cache_rows(k_new), cache_rows(v_new), lens_dev.data_ptr<int64_t>(), B,
        H, t_begin, L_new, S_max, rolling, table.defined() ? table.table.data_ptr<int32_t>() : nullptr,
        table.blocks_per_seq);
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

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) { m.impl("kv_cache_append", &kv_cache_append_op<&append_validated>); }

}  // namespace flash_attn_ext::cuda
