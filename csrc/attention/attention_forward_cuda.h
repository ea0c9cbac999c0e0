// CUDA entry points shared by attention_forward/backward, their varlen forms and attention_kvcache.
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/attention_semantics.h"
#include "attention_host.h"

namespace flash_attn_ext::cuda {

// out (B, Hq, L, Dv) and lse (B, Hq, L) for p on the current stream. p.seqlens_k, when set,
// and rng_state (int64 [seed, offset], or nullptr without dropout) are device pointers.
void run_attention_forward_cuda(const AttentionParams& p, const MaskView& mask, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                const int64_t* rng_state);

// dq, dk, dv for p on the current stream (the tensor-core backward where it serves the call,
// the row programs otherwise). rng_ptr: the device rng_state, or nullptr without dropout.
// grad_lse: the gradient flowing into lse (checked), or an undefined tensor.
void run_attention_backward_cuda(const AttentionParams& p, const MaskView& mask, const at::Tensor& grad_out,
                                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& grad_lse, const int64_t* rng_ptr,
                                 const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

// int64 [seed, offset] of the call's dropout mask on q's device, drawn from PyTorch's CUDA
// generator; zeros without dropout.
at::Tensor draw_rng_state_cuda(double dropout_p, const at::Tensor& q);

// What only the CUDA kernels limit (for check_head_dims and the prologues): head dims up to
// kMaxHeadDim.
DeviceLimits cuda_limits();

}  // namespace flash_attn_ext::cuda
