// The CPU forward kernel, for the ops that reuse it (attention_forward, attention_kvcache).
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/attention_semantics.h"

namespace flash_attn_ext::cpu {

// out (B, Hq, L, Dv) and lse (B, Hq, L) preallocated; p and mask describe the call
// (p.seqlens_k: per-sequence key lengths, or nullptr).
void run_attention_forward_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse);

// The decode path (attention_decode_cpu.cpp): serves calls with few query rows per KV head,
// no mask and no dropout, and returns true; returns false (nothing done) otherwise.
// FLASH_ATTN_EXT_CPU_DECODE=0 turns it off (tests compare both paths).
bool run_attention_decode_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                              const at::Tensor& lse);

}  // namespace flash_attn_ext::cpu
