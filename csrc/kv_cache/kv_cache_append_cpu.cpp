// CPU kernel of flash_attn_ext::kv_cache_append: copies each sequence's new K/V rows into
// its cache slots in place, K and V in one pass, no allocation. Every argument, including
// every value of cache_seqlens, is validated before the first write, so a bad call leaves
// the caches untouched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../attention/attention_host.h"

namespace flash_attn_ext::cpu {
namespace {

constexpr const char* kOp = "flash_attn_ext.kv_cache_append";

void check_cache_pair(const char* cache_name, const at::Tensor& cache, const char* new_name,
                      const at::Tensor& fresh) {
  TORCH_CHECK_VALUE(cache.dim() == 4, kOp, ": ", cache_name,
                    " must be 4-D (batch, kv_heads, max_len, head_dim), got shape ", cache.sizes());
  TORCH_CHECK_VALUE(fresh.dim() == 4, kOp, ": ", new_name,
                    " must be 4-D (batch, kv_heads, new_len, head_dim), got shape ", fresh.sizes());
  TORCH_CHECK_TYPE(fresh.scalar_type() == cache.scalar_type(), kOp, ": ", new_name, " dtype ",
                   fresh.scalar_type(), " differs from ", cache_name, " dtype ", cache.scalar_type());
  TORCH_CHECK_VALUE(fresh.device() == cache.device(), kOp, ": ", new_name, " is on ", fresh.device(),
                    ", ", cache_name, " on ", cache.device());
  TORCH_CHECK_VALUE(fresh.size(0) == cache.size(0) && fresh.size(1) == cache.size(1) &&
                        fresh.size(3) == cache.size(3),
                    kOp, ": ", new_name, " of shape ", fresh.sizes(), " does not match ", cache_name,
                    " of shape ", cache.sizes(), " in batch, kv_heads or head_dim");
  for (const auto* t : {&cache, &fresh}) {
    TORCH_CHECK_VALUE(t->numel() == 0 || t->size(3) <= 1 || t->stride(3) == 1, kOp, ": ",
                      t == &cache ? cache_name : new_name,
                      " must have a contiguous last dimension (stride 1)");
  }
}

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& k_new, const at::Tensor& v_new,
                         const at::Tensor& cache_seqlens, bool rolling) {
  check_cache_pair("k_cache", k_cache, "k_new", k_new);
  check_cache_pair("v_cache", v_cache, "v_new", v_new);
  TORCH_CHECK_VALUE(k_cache.sizes().slice(0, 3).equals(v_cache.sizes().slice(0, 3)), kOp,
                    ": k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
                    " differ in batch, kv_heads or max_len");
  TORCH_CHECK_VALUE(k_new.size(2) == v_new.size(2), kOp, ": k_new has ", k_new.size(2),
                    " new positions, v_new ", v_new.size(2));
  const int64_t B = k_cache.size(0), H = k_cache.size(1), S_max = k_cache.size(2);
  const int64_t L_new = k_new.size(2);
  const std::vector<int64_t> lens = read_cache_seqlens(kOp, cache_seqlens, B, k_cache.device());
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0, kOp, ": cache_seqlens[", b, "] = ", lens[b], " is negative");
    if (!rolling) {
      TORCH_CHECK_VALUE(lens[b] + L_new <= S_max, kOp, ": appending ", L_new,
                        " positions at cache_seqlens[", b, "] = ", lens[b],
                        " overflows the cache (max_len ", S_max,
                        "); nothing was written. Use a larger cache or rolling=True");
    }
  }
  TORCH_CHECK_VALUE(!rolling || S_max > 0 || L_new == 0, kOp, ": a rolling cache needs max_len > 0");
  if (B == 0 || H == 0 || L_new == 0) return;
  // In rolling mode only the last S_max new positions survive; writing only them keeps the
  // slots disjoint, so the (b, h) rows can be copied in any order.
  const int64_t t_begin = rolling && L_new > S_max ? L_new - S_max : 0;
  const int64_t elem = k_cache.element_size();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (const auto& pair : {std::make_pair(&k_cache, &k_new), std::make_pair(&v_cache, &v_new)}) {
        const at::Tensor& cache = *pair.first;
        const at::Tensor& fresh = *pair.second;
        const int64_t bytes = cache.size(3) * elem;
        auto* dst = static_cast<char*>(cache.data_ptr()) + (b * cache.stride(0) + h * cache.stride(1)) * elem;
        const auto* src = static_cast<const char*>(fresh.data_ptr()) + (b * fresh.stride(0) + h * fresh.stride(1)) * elem;
        for (int64_t t = t_begin; t < L_new; ++t) {
          const int64_t pos = lens[b] + t;
          const int64_t slot = rolling ? pos % S_max : pos;
          std::memcpy(dst + slot * cache.stride(2) * elem, src + t * fresh.stride(2) * elem, bytes);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("kv_cache_append", &kv_cache_append_cpu);
}

}  // namespace flash_attn_ext::cpu
