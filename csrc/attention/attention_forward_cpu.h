// The CPU attention kernels, for the ops that reuse them (attention_forward/backward, their
// varlen forms, attention_kvcache).
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/attention_semantics.h"

namespace flash_attn_ext::cpu {

// out (B, Hq, L, Dv) and lse (B, Hq, L) preallocated; p and mask describe the call
// (p.seqlens_k: per-sequence key lengths, or nullptr).
void run_attention_forward_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse);

// The gradients of the additive biases a backward call asks for (attention_backward's
// grad_attn_mask / grad_alibi_slopes / grad_relative_bias): in, the float mask, the slopes and
// the relative bias they are taken of (or undefined); out, grad_mask in the mask's shape and
// dtype, its size-1 dims summed over, grad_slopes in the slopes' shape (float32) and
// grad_relative in the relative bias's shape and dtype.
struct BiasGradients {
  at::Tensor mask, slopes, relative;
  at::Tensor grad_mask, grad_slopes, grad_relative;
};

// dq, dk, dv (preallocated like q, k, v) of the call p describes (attention_backward_cpu.cpp).
// grad_lse: the gradient flowing into lse (checked), or an undefined tensor. bias: the bias
// gradients asked for, or nullptr.
void run_attention_backward_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& grad_out,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& dq,
                                const at::Tensor& dk, const at::Tensor& dv, BiasGradients* bias = nullptr);

// Draws the dropout seed from PyTorch's default CPU generator and returns the op's rng_state
// (int64 [seed, offset]) for the backward; without dropout an empty tensor (nothing drawn).
at::Tensor draw_rng_state(double dropout_p, const at::TensorOptions& options);

// p's dropout seed and offset from an rng_state (read only when p has dropout).
void set_dropout_seed(AttentionParams& p, const at::Tensor& rng_state);

// The decode path (attention_decode_cpu.cpp): serves calls with few query rows per KV head,
// no mask and no dropout, and returns true; returns false (nothing done) otherwise.
// p.config.cpu_decode off turns it off (tests compare both paths), require raises where it
// cannot serve the call.
// k_scale / v_scale (float32, k's (B, Hkv, S) view without head_dim): k and v are an int8 or
// float8_e4m3fn cache read as stored, each key's scores times its K scale and each
// probability times its V scale (no dequantized copy); undefined for a float cache. A
// quantized cache with a float64 query is declined.
bool run_attention_decode_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& k_scale = {}, const at::Tensor& v_scale = {});

}  // namespace flash_attn_ext::cpu
