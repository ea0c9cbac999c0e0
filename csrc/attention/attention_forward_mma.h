// The tensor-core forward (FlashAttention-2 on mma.sync m16n8k16) for float16/bfloat16 and
// the head dims of mma_head_dims.h: declarations shared by the dispatcher
// (attention_forward_mma.cu) and the per-head-dim instantiation units
// (attention_forward_mma_hdim*.cu), so each head dim compiles in its own translation unit.
#pragma once

#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>

#include <type_traits>

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

// A float16 / bfloat16 tensor's (batch, head, position) view as the kernels take it.
template <typename Rows>
Rows rows_of(const at::Tensor& t) {
  using Word = std::remove_pointer_t<decltype(Rows::data)>;
  return {static_cast<Word*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// The common part of every tensor-core / decode kernel's arguments.
inline void set_common(MmaCommonParams& kp, const AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v) {
  kp.q = rows_of<InRows>(q), kp.k = rows_of<InRows>(k), kp.v = rows_of<InRows>(v);
  kp.p = p;
  kp.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
}

}  // namespace flash_attn_ext::cuda
