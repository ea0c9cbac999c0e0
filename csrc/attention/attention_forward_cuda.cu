// CUDA kernels of flash_attn_ext::attention_forward. Calls that the tensor-core kernel serves
// (attention_forward_mma.h: float16/bfloat16, common head dims, no mask or dropout) go there;
// everything else to the safety net here.
//
// The safety net serves every case the
// CPU kernel serves (float32/float64/float16/bfloat16, head dims up to 256, both causal
// alignments, windows, GQA/MQA, attn_mask, dropout, lse). One warp per query row runs the
// row program of attention_rows.h (checked on the host by tests/native/cpp/test_attention_rows.cpp):
// an online softmax over the row's visible keys only, nothing of size L x S in memory.
//
// Dropout draws its seed and offset from PyTorch's CUDA generator (philox_cuda_state), so
// torch.cuda.manual_seed reproduces it; a one-thread kernel unpacks them into rng_state on
// the device, which keeps the op capturable in CUDA graphs, and the attention kernels read
// them from there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "../cuda/cuda_rows.cuh"
#include "attention_forward_cuda.h"
#include "attention_forward_mma.h"
#include "attention_host.h"

namespace flash_attn_ext::cuda {
namespace {

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_rows_kernel(AttentionParams p, MaskView mask, rows::Strided<const T> q, rows::Strided<const T> k,
                        rows::Strided<const T> v, rows::Strided<T> out, Acc* lse, const int64_t* rng_state) {
  load_rng_state(p, rng_state);
  const int64_t n_rows = p.batch * p.heads_q * p.len_q;
  for (int64_t r = global_warp(); r < n_rows; r += warp_count()) {  // warp-uniform loop
    const int64_t i = r % p.len_q, h = r / p.len_q % p.heads_q, b = r / p.len_q / p.heads_q;
    rows::forward_row<T, Acc, kWarp, kPerLane, WarpSum>(p, mask, q, k, v, out, lse, b, h, i, lane_id());
  }
}

__global__ void unpack_rng_state_kernel(at::PhiloxCudaState philox, int64_t* rng_state) {
  const auto seeds = at::cuda::philox::unpack(philox);
  rng_state[0] = static_cast<int64_t>(std::get<0>(seeds));
  rng_state[1] = static_cast<int64_t>(std::get<1>(seeds));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    double dropout_p, double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& relative_bias) {
  const ForwardCall call =
      prepare_attention_forward(q, k, v, attn_mask, dropout_p, scale, window_left, window_right, bottom_right, softcap,
                                alibi_slopes, sinks, cuda_limits(), relative_bias);
  TORCH_CHECK_NOT_IMPLEMENTED(call.params.relative_bias == nullptr,
                              "flash_attn_ext.attention_forward: relative_bias is served by the CPU kernels only; "
                              "on CUDA add it to attn_mask instead");
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionParams& p = call.params;
  at::Tensor rng_state = draw_rng_state_cuda(dropout_p, q);
  if (!try_attention_forward_mma(p, call.mask.kind != MaskKind::kNone, q, k, v, call.out, call.lse))
    run_attention_forward_cuda(p, call.mask, q, k, v, call.out, call.lse,
                               dropout_p > 0.0 ? rng_state.data_ptr<int64_t>() : nullptr);
  return {call.out, call.lse, rng_state};
}

}  // namespace

// int64 [seed, offset] on the device; zeros without dropout.
at::Tensor draw_rng_state_cuda(double dropout_p, const at::Tensor& q) {
  // Without dropout: an empty state, so a forward does no generator draw and no device work
  // for it (no allocation, no fill).
  if (dropout_p <= 0.0) return at::empty({0}, q.options().dtype(at::kLong));
  at::Tensor state = at::empty({2}, q.options().dtype(at::kLong));
  auto* gen =
      at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // The mask is keyed by (bh, i, j / 4) under one offset, so each call needs one fresh
    // offset; the generator rounds the increment up to a multiple of 4.
    philox = gen->philox_cuda_state(4);
  }
  unpack_rng_state_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(philox, state.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return state;
}

DeviceLimits cuda_limits() { return DeviceLimits{"CUDA", kMaxHeadDim}; }

void run_attention_forward_cuda(const AttentionParams& p, const MaskView& mask, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                const int64_t* rng_state) {
  const int64_t n_rows = p.batch * p.heads_q * p.len_q;
  if (n_rows == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows_kernel<scalar_t, acc_t><<<warp_grid(n_rows), kThreadsPerBlock, 0, stream>>>(
        p, mask, rows::q_view(strided<const scalar_t>(q), p), rows::kv_view(strided<const scalar_t>(k), p),
        rows::kv_view(strided<const scalar_t>(v), p), rows::q_view(strided<scalar_t>(out), p), lse.data_ptr<acc_t>(),
        rng_state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) { m.impl("attention_forward", &attention_forward_cuda); }

}  // namespace flash_attn_ext::cuda
