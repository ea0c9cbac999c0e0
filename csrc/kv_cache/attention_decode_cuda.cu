// Chooses and launches the split-KV decode kernels; see attention_decode_cuda.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../attention/attention_forward_mma.h"
#include "attention_decode_cuda.h"
#include "attention_decode_cuda_kernel.cuh"

namespace flash_attn_ext::cuda {
namespace {

// Resident blocks per SM of the split kernel for (T, kDim) on the current device, as the
// occupancy calculator gives it for the kernel's registers and shared memory. Asked once per
// device, together with the opt-in to more than 48 KB of dynamic shared memory (a per-device
// function attribute), so a decode step's launch makes no extra driver calls.
template <typename T, int kDim>
int blocks_per_sm() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device < kMaxDevices, "flash_attn_ext.attention_kvcache: device index ", device, " >= ", kMaxDevices);
  int n = cached[device].load(std::memory_order_acquire);
  if (n == 0) {  // a race here only repeats the same two idempotent calls
    const auto kernel = decode_detail::attention_decode_split_kernel<T, kDim>;
    const int smem = static_cast<int>(decode_detail::smem_bytes<kDim>());
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, decode_detail::kThreads, smem));
    n = std::max(n, 1);
    cached[device].store(n, std::memory_order_release);
  }
  return n;
}

// Splits per (sequence, KV head): enough blocks to fill every SM to its occupancy (a memory-
// bound kernel needs all the loads in flight it can get), but at least two chunks per split of
// the longest band so the merge stays a small cost. `band` bounds the keys one (sequence, KV
// head) visits: the cache length, or less under a two-sided window.
int64_t choose_splits(int64_t blocks, int64_t band, int per_sm) {
  const int64_t target = per_sm * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  if (blocks >= target) return 1;
  const int64_t by_sms = (target + blocks - 1) / blocks;
  const int64_t by_len = std::max<int64_t>(1, band / (2 * decode_detail::kChunk));
  return std::min<int64_t>({by_sms, by_len, 256});
}

// The decode kernels' head dim as a compile-time constant: f(std::integral_constant<int, D>{})
// for D = dim (64, 128 or 256; decode_ineligible has checked it). The one switch over it.
template <typename F>
decltype(auto) with_head_dim(int64_t dim, F&& f) {
  switch (dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

// The split kernel, then (with several splits) the combine kernel, on `stream`. The shared-
// memory opt-in was made by blocks_per_sm<T, kDim>, which try_attention_decode_cuda asks first.
template <typename T, int kDim>
void launch(DecodeParams dp, int64_t blocks, int64_t rows_all, cudaStream_t stream) {
  const auto kernel = decode_detail::attention_decode_split_kernel<T, kDim>;
  const int smem = static_cast<int>(decode_detail::smem_bytes<kDim>());
  kernel<<<static_cast<unsigned>(blocks * dp.n_splits), decode_detail::kThreads, smem, stream>>>(dp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (dp.n_splits > 1) {
    decode_detail::decode_combine_kernel<T, kDim>
        <<<static_cast<unsigned>(rows_all), decode_detail::kThreads, 0, stream>>>(dp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

const char* decode_ineligible(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return "dtype is not float16/bfloat16";
  const int64_t dim = p.dim_qk;
  if (p.dim_v != dim || (dim != 64 && dim != 128 && dim != 256))
    return "head dim not in {64, 128, 256} or differs between key and value";
  if (p.group_size() * p.len_q > decode_detail::kMaxRows) return "more than 16 query rows per key/value head";
  if (p.dropout_p > 0.0) return "dropout";
  if (p.softcap > 0.0) return "softcap";
  if (p.alibi_slopes != nullptr) return "alibi_slopes";
  if (p.has_sinks()) return "sinks";  // (the split-KV combine has no sink term yet)
  if (p.len_q == 0 || p.batch * p.heads_kv == 0) return "empty";
  if (p.len_k > (int64_t{1} << 31) - 2 * decode_detail::kChunk) return "cache of 2^31 positions or more";
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return "GPU older than sm_80 (cp.async)";
  const size_t smem = with_head_dim(dim, [](auto d) { return decode_detail::smem_bytes<decltype(d)::value>(); });
  if (at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin < smem)
    return "not enough shared memory per block on this GPU";
  if (!mma_rows_aligned(q) || !mma_rows_aligned(k) || !mma_rows_aligned(v) || !mma_rows_aligned(out))
    return "rows not 16-byte aligned";
  return nullptr;
}

bool try_attention_decode_cuda(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, int64_t max_len_k) {
  if (p.config.cuda_fast == PathMode::kOff) return false;
  const char* why = decode_ineligible(p, q, k, v, out);
  TORCH_CHECK(why == nullptr || p.config.cuda_fast != PathMode::kRequire,
              "flash_attn_ext.attention_kvcache: kernel_config(cuda_fast='require') but the decode kernel cannot "
              "serve this call: ",
              why);
  if (why != nullptr) return false;

  const int64_t blocks = p.batch * p.heads_kv, rows_all = p.batch * p.heads_q * p.len_q;
  const bool half = q.scalar_type() == at::kHalf;
  const int per_sm = with_head_dim(p.dim_qk, [half](auto d) {
    constexpr int kDim = decltype(d)::value;
    return half ? blocks_per_sm<__half, kDim>() : blocks_per_sm<__nv_bfloat16, kDim>();
  });
  // The keys the G * L rows of one (sequence, KV head) can see: with both window sides bounded,
  // at most left + right + L (sliding-window decode), else up to the cache length.
  const int64_t band = p.window_left >= 0 && p.window_right >= 0
                           ? std::min(max_len_k, p.window_left + p.window_right + p.len_q + decode_detail::kChunk)
                           : max_len_k;
  const int64_t n_splits = std::min<int64_t>(p.config.splits(choose_splits(blocks, band, per_sm)), 1024);
  TORCH_CHECK(blocks * n_splits <= 0x7fffffff && rows_all <= 0x7fffffff,
              "flash_attn_ext.attention_kvcache: decode grid too large");
  DecodeParams dp;
  set_common(dp, p, q, k, v);
  dp.out = rows_of<OutRows>(out);
  dp.lse = lse.data_ptr<float>();
  dp.n_splits = static_cast<int>(n_splits);
  at::Tensor part_acc, part_ml;
  if (n_splits > 1) {  // partial states, merged by the combine kernel (stream-ordered, then freed)
    part_acc = at::empty({n_splits, rows_all, p.dim_v}, q.options().dtype(at::kFloat));
    part_ml = at::empty({n_splits, rows_all, 2}, q.options().dtype(at::kFloat));
    dp.part_acc = part_acc.data_ptr<float>();
    dp.part_ml = part_ml.data_ptr<float>();
  } else {
    dp.part_acc = dp.part_ml = nullptr;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_head_dim(p.dim_qk, [&](auto d) {
    constexpr int kDim = decltype(d)::value;
    if (half)
      launch<__half, kDim>(dp, blocks, rows_all, stream);
    else
      launch<__nv_bfloat16, kDim>(dp, blocks, rows_all, stream);
  });
  return true;
}

}  // namespace flash_attn_ext::cuda
