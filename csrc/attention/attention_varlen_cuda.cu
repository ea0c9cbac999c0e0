// CUDA implementations of attention_varlen_forward/backward: the row-program kernels of
// attention_forward_cuda.cu / attention_backward_cuda.cu with a varlen AttentionParams (each
// packed sequence's row offsets and lengths, read from cu_seqlens on the device). The
// tensor-core kernels decline varlen calls (mma_ineligible) for now. The ops' prologue is
// shared with the CPU (attention_varlen_host.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_forward_cuda.h"
#include "attention_forward_mma.h"
#include "attention_host.h"
#include "attention_varlen_host.h"

namespace flash_attn_ext::cuda {
namespace {

at::Tensor run_varlen_forward_cuda(AttentionParams& p, double dropout_p, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor rng_state = draw_rng_state_cuda(dropout_p, q);
  // Asked first so that cuda_fast='require' names why it declines (varlen).
  if (try_attention_forward_mma(p, false, q, k, v, out, lse)) return rng_state;
  run_attention_forward_cuda(p, MaskView{}, q, k, v, out, lse,
                             dropout_p > 0.0 ? rng_state.data_ptr<int64_t>() : nullptr);
  return rng_state;
}

void run_varlen_backward_cuda(AttentionParams& p, const at::Tensor& rng_state, const at::Tensor& grad_out,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                              const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& dq,
                              const at::Tensor& dk, const at::Tensor& dv) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor rng = rng_state.to(q.device(), at::kLong).contiguous();
  // Keys no sequence covers do not exist (cu_seqlens_k ends at total_k), so every dK/dV row
  // has exactly one writer, as in the dense backward.
  run_attention_backward_cuda(p, MaskView{}, grad_out, q, k, v, out, lse, grad_lse,
                              p.dropout_p > 0.0 ? rng.data_ptr<int64_t>() : nullptr, dq, dk, dv);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) {
  m.impl("attention_varlen_forward", &attention_varlen_forward_op<&cuda_limits, &run_varlen_forward_cuda>);
  m.impl("attention_varlen_backward", &attention_varlen_backward_op<&cuda_limits, &run_varlen_backward_cuda>);
}

}  // namespace flash_attn_ext::cuda
