// CPU kernel of flash_attn_ext::kv_cache_append: copies each sequence's new K/V rows into
// its cache slots in place, K and V in one pass, no allocation; into an int8 / fp8 cache each
// row is quantized on the way with its own scale (kv_cache_quantize.h). Every argument,
// including every value of cache_seqlens, is validated before the first write, so a bad call
// leaves the caches untouched.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kv_cache_host.h"
#include "kv_cache_quantize.h"

namespace flash_attn_ext::cpu {
namespace {

// One new row (dim elements of src_t) quantized into dst, its scale into *scale.
template <typename src_t>
void quantize_row(const src_t* src, int64_t dim, uint8_t* dst, float* scale, quant::Kind kind) {
  float amax = 0.0f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(static_cast<float>(src[d])));
  const float s = quant::row_scale(amax, kind);
  for (int64_t d = 0; d < dim; ++d) dst[d] = quant::encode(static_cast<float>(src[d]), s, kind);
  *scale = s;
}

}  // namespace

void append_validated(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                      const at::Tensor& v_new, const std::vector<int64_t>& lens, bool rolling, const BlockTable& table,
                      const CacheScales& scales) {
  const int64_t B = k_new.size(0), H = k_cache.size(1), S_max = k_cache.size(2);
  const int32_t* blocks = table.defined() ? table.table.data_ptr<int32_t>() : nullptr;
  const int64_t L_new = k_new.size(2);
  if (B == 0 || H == 0 || L_new == 0) return;
  // In rolling mode only the last S_max new positions survive; writing only them keeps the
  // slots disjoint, so the (b, h) rows can be copied in any order.
  const int64_t t_begin = rolling_first_written(rolling, L_new, S_max);
  const int64_t elem = k_cache.element_size();
  // The slot of new position t of sequence b: (cache entry, row) of a sequence or of a block.
  const auto slot_of = [&](int64_t b, int64_t t) {
    const int64_t pos = lens[b] + t;
    const int64_t entry = blocks ? blocks[b * table.blocks_per_seq + pos / S_max] : b;
    const int64_t slot = blocks ? pos % S_max : (rolling ? pos % S_max : pos);
    return std::make_pair(entry, slot);
  };

  if (scales.defined()) {
    const quant::Kind kind = scales.kind == at::kChar ? quant::Kind::kInt8 : quant::Kind::kFp8E4M3;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_new.scalar_type(), "kv_cache_append_quantize", [&] {
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / H, h = bh % H;
          for (int kv = 0; kv < 2; ++kv) {
            const at::Tensor& cache = kv == 0 ? k_cache : v_cache;
            const at::Tensor& fresh = kv == 0 ? k_new : v_new;
            const at::Tensor& scale = kv == 0 ? scales.k : scales.v;
            const auto* src = fresh.data_ptr<scalar_t>() + b * fresh.stride(0) + h * fresh.stride(1);
            auto* dst = static_cast<uint8_t*>(cache.data_ptr()) + h * cache.stride(1);
            float* sc = scale.data_ptr<float>() + h * scale.stride(1);
            for (int64_t t = t_begin; t < L_new; ++t) {
              const auto [entry, slot] = slot_of(b, t);
              quantize_row(src + t * fresh.stride(2), cache.size(3),
                           dst + entry * cache.stride(0) + slot * cache.stride(2),
                           sc + entry * scale.stride(0) + slot * scale.stride(2), kind);
            }
          }
        }
      });
    });
    return;
  }

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (const auto& pair : {std::make_pair(&k_cache, &k_new), std::make_pair(&v_cache, &v_new)}) {
        const at::Tensor& cache = *pair.first;
        const at::Tensor& fresh = *pair.second;
        const int64_t bytes = cache.size(3) * elem;
        auto* base = static_cast<char*>(cache.data_ptr()) + h * cache.stride(1) * elem;
        const auto* src =
            static_cast<const char*>(fresh.data_ptr()) + (b * fresh.stride(0) + h * fresh.stride(1)) * elem;
        for (int64_t t = t_begin; t < L_new; ++t) {
          const auto [entry, slot] = slot_of(b, t);
          std::memcpy(base + (entry * cache.stride(0) + slot * cache.stride(2)) * elem,
                      src + t * fresh.stride(2) * elem, bytes);
        }
      }
    }
  });
}

// CPU calls check every value on the host and raise at once: nothing is ever pending.
void raise_kvcache_device_errors_cpu(const at::Tensor&) {}

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("kv_cache_append", &kv_cache_append_op<&append_validated>);
  m.impl("_raise_kvcache_device_errors", &raise_kvcache_device_errors_cpu);
}

}  // namespace flash_attn_ext::cpu
