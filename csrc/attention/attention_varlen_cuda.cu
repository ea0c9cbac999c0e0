// CUDA implementations of attention_varlen_forward/backward: the row-program kernels of
// attention_forward_cuda.cu / attention_backward_cuda.cu with a varlen AttentionParams (each
// packed sequence's row offsets and lengths, read from cu_seqlens on the device). The
// tensor-core kernels decline varlen calls (mma_ineligible) for now.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_forward_cuda.h"
#include "attention_forward_mma.h"
#include "attention_host.h"
#include "attention_varlen_host.h"

namespace flash_attn_ext::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* kOp = "flash_attn_ext.attention_varlen_forward";
  const VarlenCall call =
      make_varlen_call(kOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                       window_left, window_right, bottom_right, softcap, alibi_slopes);
  check_head_dims(kOp, q.size(2), v.size(2), cuda_limits());
  const c10::cuda::CUDAGuard guard(q.device());
  auto [out, lse] = empty_varlen_outputs(q, v);
  at::Tensor rng_state = draw_rng_state_cuda(dropout_p, q);
  const at::Tensor q4 = as_heads_view(q), k4 = as_heads_view(k), v4 = as_heads_view(v), out4 = as_heads_view(out);
  // Asked first so that cuda_fast='require' names why it declines (varlen).
  if (try_attention_forward_mma(call.params, false, q4, k4, v4, out4, lse)) return {out, lse, rng_state};
  run_attention_forward_cuda(call.params, MaskView{}, q4, k4, v4, out4, lse,
                             dropout_p > 0.0 ? rng_state.data_ptr<int64_t>() : nullptr);
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* kOp = "flash_attn_ext.attention_varlen_backward";
  const VarlenCall call =
      make_varlen_call(kOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                       window_left, window_right, bottom_right, softcap, alibi_slopes);
  check_varlen_backward_inputs(grad_out, q, v, out, lse, rng_state);
  check_head_dims(kOp, q.size(2), v.size(2), cuda_limits());
  const c10::cuda::CUDAGuard guard(q.device());
  bool nothing_to_run = false;
  auto [dq, dk, dv] = varlen_gradients(call, q, k, v, &nothing_to_run);
  if (nothing_to_run) return {dq, dk, dv};
  const at::Tensor rng = rng_state.to(q.device(), at::kLong).contiguous();
  // Keys no sequence covers do not exist (cu_seqlens_k ends at total_k), so every dK/dV row
  // has exactly one writer, as in the dense backward.
  run_attention_backward_cuda(call.params, MaskView{}, as_heads_view(grad_out), as_heads_view(q), as_heads_view(k),
                              as_heads_view(v), as_heads_view(out), lse,
                              dropout_p > 0.0 ? rng.data_ptr<int64_t>() : nullptr, as_heads_view(dq), as_heads_view(dk),
                              as_heads_view(dv));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) {
  m.impl("attention_varlen_forward", &attention_varlen_forward_cuda);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cuda);
}

}  // namespace flash_attn_ext::cuda
