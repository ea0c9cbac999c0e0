// Launch plumbing shared by the CUDA safety-net kernels: one warp per row program of
// csrc/attention/attention_rows.h, the 32 lanes splitting the head dim.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../attention/attention_rows.h"

namespace flash_attn_ext::cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarp * kWarpsPerBlock;
// Each lane holds features lane, lane + 32, ...: head dims up to 32 * 8 = 256.
constexpr int kPerLane = 8;
constexpr int64_t kMaxHeadDim = kWarp * kPerLane;

// Sum over the 32 lanes of a warp; every lane gets the total. (Host side: one lane.)
struct WarpSum {
  template <typename Acc>
  __host__ __device__ static Acc sum(Acc x) {
#ifdef __CUDA_ARCH__
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
#endif
    return x;
  }
};

template <typename T>
rows::Strided<T> strided(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// Blocks for `n` warp-sized work items; kernels loop grid-stride over the rest, so the grid
// stays within limits for any B * H * L.
inline unsigned int warp_grid(int64_t n) {
  const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

// The dropout seed and offset of the call, read on the device from rng_state ([seed, offset],
// written by the forward; nullptr without dropout), so the launch is graph-capturable.
__device__ __forceinline__ void load_rng_state(AttentionParams& p, const int64_t* rng_state) {
  if (rng_state != nullptr) {
    p.dropout_seed = static_cast<uint64_t>(rng_state[0]);
    p.dropout_offset = static_cast<uint64_t>(rng_state[1]);
  }
}

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarp; }
__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp; }

}  // namespace flash_attn_ext::cuda
