// CPU implementations of attention_varlen_forward/backward: the dense CPU kernels
// (attention_forward_cpu.cpp, attention_backward_cpu.cpp) run with a varlen AttentionParams,
// which gives every packed sequence its own row offsets, lengths and alignment. No copy, no
// padding, no loop over sequences outside the kernels' own task loop.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention_forward_cpu.h"
#include "attention_host.h"
#include "attention_varlen_host.h"

namespace flash_attn_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  VarlenCall call =
      make_varlen_call("flash_attn_ext.attention_varlen_forward", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, dropout_p, scale, window_left, window_right, bottom_right, softcap, alibi_slopes);
  AttentionParams& p = call.params;
  auto [out, lse] = empty_varlen_outputs(q, v);
  at::Tensor rng_state = draw_rng_state(dropout_p, q.options());
  p.dropout_seed = static_cast<uint64_t>(rng_state.data_ptr<int64_t>()[0]);
  p.dropout_offset = static_cast<uint64_t>(rng_state.data_ptr<int64_t>()[1]);
  run_attention_forward_cpu(p, MaskView{}, as_heads_view(q), as_heads_view(k), as_heads_view(v), as_heads_view(out),
                            lse);
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  VarlenCall call =
      make_varlen_call("flash_attn_ext.attention_varlen_backward", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, dropout_p, scale, window_left, window_right, bottom_right, softcap, alibi_slopes);
  check_varlen_backward_inputs(grad_out, q, v, out, lse, rng_state);
  AttentionParams& p = call.params;
  const at::Tensor rng = rng_state.cpu();
  p.dropout_seed = static_cast<uint64_t>(rng.data_ptr<int64_t>()[0]);
  p.dropout_offset = static_cast<uint64_t>(rng.data_ptr<int64_t>()[1]);
  bool nothing_to_run = false;
  auto [dq, dk, dv] = varlen_gradients(call, q, k, v, &nothing_to_run);
  if (nothing_to_run) return {dq, dk, dv};
  run_attention_backward_cpu(p, MaskView{}, as_heads_view(grad_out), as_heads_view(q), as_heads_view(k),
                             as_heads_view(v), as_heads_view(out), lse, as_heads_view(dq), as_heads_view(dk),
                             as_heads_view(dv));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("attention_varlen_forward", &attention_varlen_forward_cpu);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cpu);
}

}  // namespace flash_attn_ext::cpu
