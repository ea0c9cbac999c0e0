// The CUDA split-KV decode path of attention_kvcache (attention_decode_cuda_kernel.cuh).
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/attention_semantics.h"

namespace flash_attn_ext::cuda {

// Why the decode kernels cannot serve the call, or nullptr: fp16/bf16, equal head dims of 64,
// 128 or 256, at most 16 query rows per KV head (G * L), no dropout, 16-byte aligned rows.
const char* decode_ineligible(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out);

// Runs them on the current stream and returns true, or returns false having done nothing
// (p.config.cuda_fast off, or ineligible; require raises instead). p.seqlens_k and the
// block table are device pointers; max_len_k (the longest sequence) sizes the split count,
// which p.config.num_splits forces.
bool try_attention_decode_cuda(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, int64_t max_len_k);

}  // namespace flash_attn_ext::cuda
