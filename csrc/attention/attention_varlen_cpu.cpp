// CPU implementations of attention_varlen_forward/backward: the dense CPU kernels
// (attention_forward_cpu.cpp, attention_backward_cpu.cpp) run with a varlen AttentionParams,
// which gives every packed sequence its own row offsets, lengths and alignment. No copy, no
// padding, no loop over sequences outside the kernels' own task loop. The ops' prologue is
// shared with CUDA (attention_varlen_host.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention_forward_cpu.h"
#include "attention_host.h"
#include "attention_varlen_host.h"

namespace flash_attn_ext::cpu {
namespace {

at::Tensor run_varlen_forward_cpu(AttentionParams& p, double dropout_p, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  at::Tensor rng_state = draw_rng_state(dropout_p, q.options());
  set_dropout_seed(p, rng_state);
  run_attention_forward_cpu(p, MaskView{}, q, k, v, out, lse);
  return rng_state;
}

void run_varlen_backward_cpu(AttentionParams& p, const at::Tensor& rng_state, const at::Tensor& grad_out,
                             const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& dq,
                             const at::Tensor& dk, const at::Tensor& dv) {
  set_dropout_seed(p, rng_state);
  run_attention_backward_cpu(p, MaskView{}, grad_out, q, k, v, out, lse, grad_lse, dq, dk, dv);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("attention_varlen_forward", &attention_varlen_forward_op<&cpu_limits, &run_varlen_forward_cpu>);
  m.impl("attention_varlen_backward", &attention_varlen_backward_op<&cpu_limits, &run_varlen_backward_cpu>);
}

}  // namespace flash_attn_ext::cpu
