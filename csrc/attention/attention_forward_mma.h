// The tensor-core forward (FlashAttention-2 on mma.sync m16n8k16) for float16/bfloat16 and
// the head dims of mma_head_dims.h: declarations shared by the dispatcher
// (attention_forward_mma.cu) and the per-head-dim instantiation units
// (attention_forward_mma_hdim*.cu), so each head dim compiles in its own translation unit.
#pragma once

#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>

#include "attention_forward_mma_params.h"

namespace flash_attn_ext::cuda {

// Launches on `stream` and returns true, or returns false having done nothing when the kernel
// needs more shared memory per block than smem_limit (the device's opt-in maximum).
template <typename T, int kHeadDim>
bool launch_attention_forward_mma(const MmaParams& mp, int64_t smem_limit, cudaStream_t stream);

// Runs the tensor-core forward and returns true when it serves the call (float16/bfloat16,
// equal head dims of FAE_MMA_FORWARD_HEAD_DIMS, no attn_mask, no dropout, no per-sequence lengths,
// 16-byte aligned rows, an sm_80+ GPU, p.config.cuda_fast not off); returns false,
// having done nothing, otherwise, and the safety-net kernel serves the call.
bool try_attention_forward_mma(const AttentionParams& p, bool has_mask, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse);

// Why the tensor-core kernels cannot serve a call on these tensors (`out`: the output, or
// grad_out for the backward), or nullptr when they can.
const char* mma_ineligible(const AttentionParams& p, bool has_mask, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out);

// cp.async moves 16 bytes: every row of t starts on a 16-byte boundary.
bool mma_rows_aligned(const at::Tensor& t);

// The data pointers and (batch, head, position) element strides of q, k, v and out in a
// kernel argument struct with the q/k/v/out, *_sb/_sh/_sl fields (MmaParams, DecodeParams).
template <typename Params>
void set_qkvo(Params& kp, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out) {
  kp.q = q.data_ptr(), kp.k = k.data_ptr(), kp.v = v.data_ptr(), kp.out = out.data_ptr();
  kp.q_sb = q.stride(0), kp.q_sh = q.stride(1), kp.q_sl = q.stride(2);
  kp.k_sb = k.stride(0), kp.k_sh = k.stride(1), kp.k_sl = k.stride(2);
  kp.v_sb = v.stride(0), kp.v_sh = v.stride(1), kp.v_sl = v.stride(2);
  kp.o_sb = out.stride(0), kp.o_sh = out.stride(1), kp.o_sl = out.stride(2);
}

}  // namespace flash_attn_ext::cuda
