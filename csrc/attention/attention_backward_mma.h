// The tensor-core backward (attention_backward_mma_kernel.cuh) for float16/bfloat16 and the
// head dims of FAE_MMA_BACKWARD_HEAD_DIMS (mma_head_dims.h): declarations shared by the dispatcher
// (attention_backward_mma.cu) and the per-head-dim instantiation units (attention_backward_mma_hdim*.cu).
#pragma once

#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>

#include "attention_forward_mma_params.h"

namespace flash_attn_ext::cuda {

// Launches both kernels on `stream` and returns true, or returns false having done nothing
// when they need more shared memory per block than smem_limit.
template <typename T, int kHeadDim>
bool launch_attention_backward_mma(const MmaBackwardParams& bp, int64_t smem_limit, cudaStream_t stream);

// Runs the tensor-core backward (dQ, dK, dV; delta must already hold rowsum(dO * O)) and
// returns true when it serves the call, under the same conditions as the tensor-core forward
// (attention_forward_mma.h) with the backward's head dims and grad_out rows 16-byte aligned too;
// returns false, having done nothing, otherwise. p.config.cuda_fast off / require as
// for the forward.
bool try_attention_backward_mma(const AttentionParams& p, bool has_mask, const at::Tensor& grad_out,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                                const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
                                const at::Tensor& dv);

}  // namespace flash_attn_ext::cuda
