// Host glue of the varlen ops (attention_varlen_forward/backward), shared by their CPU and
// CUDA implementations: validation of the packed tensors and cu_seqlens, and the translation
// into the (1, H, total, D) views and AttentionParams the attention kernels take. The kernels
// themselves are the ordinary forward/backward kernels: a varlen AttentionParams gives each
// sequence its row offsets and lengths (AttentionParams::for_batch, row_index).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../common/attention_semantics.h"
#include "attention_host.h"

namespace flash_attn_ext {

struct VarlenCall {
  AttentionParams params;                 // cu_seqlens_* point at the tensors below (device pointers on CUDA)
  at::Tensor cu_seqlens_q, cu_seqlens_k;  // int32, contiguous, on the inputs' device
};

// Validates query (total_q, Hq, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv),
// cu_seqlens_q/k (int32, (B + 1,), 0 first, non-decreasing, total last), max_seqlen_q/k (at
// least every sequence's length) and the attention options, reading cu_seqlens on the host,
// before anything is allocated. `op` names the caller in messages.
VarlenCall make_varlen_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
                            int64_t window_right, bool bottom_right, double softcap,
                            const std::optional<at::Tensor>& alibi_slopes);

// The backward's extra checks: grad_out and out (total_q, Hq, Dv) in the query's dtype, lse
// (Hq, total_q) contiguous, rng_state as check_rng_state says.
void check_varlen_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state,
                                  double dropout_p);

// The forward's outputs, uninitialised: out (total_q, Hq, Dv) and lse (Hq, total_q).
std::tuple<at::Tensor, at::Tensor> empty_varlen_outputs(const at::Tensor& q, const at::Tensor& v);

// The backward's gradients, shaped like q, k, v. When no query reads any key (no sequence,
// no head or no query row) they are zeroed and `nothing_to_run` is set: the kernels are skipped.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_gradients(const VarlenCall& call, const at::Tensor& q,
                                                                const at::Tensor& k, const at::Tensor& v,
                                                                bool* nothing_to_run);

// A packed (total, H, D) tensor as the (1, H, total, D) view the kernels address.
inline at::Tensor as_heads_view(const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }

// A device's kernels of the varlen forward on a prepared call, the packed tensors as
// (1, H, total, D) views: draws the op's rng_state from the device's generator, sets p's
// dropout seed from it, fills out and lse, and returns the rng_state.
using VarlenForwardRunFn = at::Tensor (*)(AttentionParams& p, double dropout_p, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                          const at::Tensor& lse);
// The same for the backward: fills dq, dk, dv (views too) from the forward's rng_state.
using VarlenBackwardRunFn = void (*)(AttentionParams& p, const at::Tensor& rng_state, const at::Tensor& grad_out,
                                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse,
                                     const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

// The ops attention_varlen_forward/backward on one device: the shared prologue (every check,
// the device's head-dim limits included, the params, the outputs) and Run, the device's
// kernels. Registered by attention_varlen_{cpu,cuda}.
template <DeviceLimits (*Limits)(), VarlenForwardRunFn Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_forward_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  constexpr const char* kOp = "flash_attn_ext.attention_varlen_forward";
  VarlenCall call = make_varlen_call(kOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                     scale, window_left, window_right, bottom_right, softcap, alibi_slopes);
  set_sinks(kOp, call.params, sinks, q.device());
  check_head_dims(kOp, q.size(2), v.size(2), Limits());
  auto [out, lse] = empty_varlen_outputs(q, v);
  at::Tensor rng_state =
      Run(call.params, dropout_p, as_heads_view(q), as_heads_view(k), as_heads_view(v), as_heads_view(out), lse);
  return {out, lse, rng_state};
}

template <DeviceLimits (*Limits)(), VarlenBackwardRunFn Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& grad_lse) {
  constexpr const char* kOp = "flash_attn_ext.attention_varlen_backward";
  VarlenCall call = make_varlen_call(kOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                     scale, window_left, window_right, bottom_right, softcap, alibi_slopes);
  check_varlen_backward_inputs(grad_out, q, v, out, lse, rng_state, dropout_p);
  check_head_dims(kOp, q.size(2), v.size(2), Limits());
  const at::Tensor checked_lse_grad = checked_grad_lse(kOp, grad_lse, lse);
  bool nothing_to_run = false;
  auto [dq, dk, dv] = varlen_gradients(call, q, k, v, &nothing_to_run);
  if (nothing_to_run) return {dq, dk, dv};
  Run(call.params, rng_state, as_heads_view(grad_out), as_heads_view(q), as_heads_view(k), as_heads_view(v),
      as_heads_view(out), lse, checked_lse_grad, as_heads_view(dq), as_heads_view(dk), as_heads_view(dv));
  return {dq, dk, dv};
}

}  // namespace flash_attn_ext
