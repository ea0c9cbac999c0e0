// CUDA kernels of flash_attn_ext::attention_backward. After the delta kernel below, calls the
// tensor-core backward serves (attention_backward_mma.h) go there; the rest to the safety net
// here, for every case the forward serves. Three launches on the current stream, one warp per
// row or column program of attention_rows.h:
//   1. delta_i = <dO_i, O_i> per query row (float32, or float64 for float64 inputs);
//   2. dQ per query row, recomputing P_ij = exp(s_ij - lse_i) over the row's visible keys;
//   3. dK, dV per key column, over the visible rows of every query head of its GQA group.
// Each output element has exactly one writer: no atomics, and the result is bitwise repeatable
// (so is the tensor-core backward's).
// Dropout regenerates the forward's mask from rng_state ([seed, offset] on the device).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/cuda_rows.cuh"
#include "attention_backward_mma.h"
#include "attention_forward_cuda.h"
#include "attention_host.h"

namespace flash_attn_ext::cuda {
namespace {

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreadsPerBlock)
    delta_rows_kernel(AttentionParams p, rows::Strided<const T> grad_out, rows::Strided<const T> out, Acc* delta) {
  const int64_t n_rows = p.batch * p.heads_q * p.len_q;
  for (int64_t r = global_warp(); r < n_rows; r += warp_count()) {
    const int64_t i = r % p.len_q, h = r / p.len_q % p.heads_q, b = r / p.len_q / p.heads_q;
    rows::delta_row<T, Acc, kWarp, kPerLane, WarpSum>(p, grad_out, out, delta, b, h, i, lane_id());
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreadsPerBlock)
    grad_query_rows_kernel(AttentionParams p, MaskView mask, rows::Strided<const T> grad_out, rows::Strided<const T> q,
                           rows::Strided<const T> k, rows::Strided<const T> v, const Acc* lse, const Acc* delta,
                           rows::Strided<T> grad_q, const int64_t* rng_state) {
  load_rng_state(p, rng_state);
  const int64_t n_rows = p.batch * p.heads_q * p.len_q;
  for (int64_t r = global_warp(); r < n_rows; r += warp_count()) {
    const int64_t i = r % p.len_q, h = r / p.len_q % p.heads_q, b = r / p.len_q / p.heads_q;
    rows::grad_query_row<T, Acc, kWarp, kPerLane, WarpSum>(p, mask, grad_out, q, k, v, lse, delta, grad_q, b, h, i,
                                                           lane_id());
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreadsPerBlock)
    grad_key_value_columns_kernel(AttentionParams p, MaskView mask, rows::Strided<const T> grad_out,
                                  rows::Strided<const T> q, rows::Strided<const T> k, rows::Strided<const T> v,
                                  const Acc* lse, const Acc* delta, rows::Strided<T> grad_k, rows::Strided<T> grad_v,
                                  const int64_t* rng_state) {
  load_rng_state(p, rng_state);
  const int64_t n_cols = p.batch * p.heads_kv * p.len_k;
  for (int64_t c = global_warp(); c < n_cols; c += warp_count()) {
    const int64_t j = c % p.len_k, hk = c / p.len_k % p.heads_kv, b = c / p.len_k / p.heads_kv;
    rows::grad_key_value_column<T, Acc, kWarp, kPerLane, WarpSum>(p, mask, grad_out, q, k, v, lse, delta, grad_k,
                                                                  grad_v, b, hk, j, lane_id());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& grad_lse, bool grad_attn_mask,
    bool grad_alibi_slopes, const std::optional<at::Tensor>& relative_bias, bool grad_relative_bias) {
  const BackwardCall call =
      prepare_attention_backward(grad_out, q, k, v, out, lse, rng_state, attn_mask, dropout_p, scale, window_left,
                                 window_right, bottom_right, softcap, alibi_slopes, grad_lse, cuda_limits(),
                                 grad_attn_mask, grad_alibi_slopes, relative_bias, grad_relative_bias);
  // The bias gradients and the relative bias are CPU-only so far: refused before anything runs
  // (the CUDA forward refuses the relative bias, and the Python layer a mask or slopes that
  // require grad on CUDA, already).
  TORCH_CHECK_NOT_IMPLEMENTED(!grad_attn_mask && !grad_alibi_slopes && call.params.relative_bias == nullptr,
                              "flash_attn_ext.attention_backward: grad_attn_mask / grad_alibi_slopes are served by the "
                              "CPU kernels only; the CUDA kernels do not compute bias gradients yet");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor none = no_bias_gradient(q);
  if (call.nothing_to_run) return {call.dq, call.dk, call.dv, none, none, none};
  const at::Tensor rng = rng_state.to(q.device(), at::kLong).contiguous();
  run_attention_backward_cuda(call.params, call.mask, grad_out, q, k, v, out, lse, call.grad_lse,
                              dropout_p > 0.0 ? rng.data_ptr<int64_t>() : nullptr, call.dq, call.dk, call.dv);
  return {call.dq, call.dk, call.dv, none, none, none};
}

}  // namespace

void run_attention_backward_cuda(const AttentionParams& p, const MaskView& mask, const at::Tensor& grad_out,
                                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& grad_lse, const int64_t* rng_ptr,
                                 const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  at::Tensor delta = at::empty_like(lse);  // indexed as the lse (AttentionParams::row_index)
  const int64_t n_rows = p.batch * p.heads_q * p.len_q, n_cols = p.batch * p.heads_kv * p.len_k;
  if (n_rows == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto go = rows::q_view(strided<const scalar_t>(grad_out), p);
    const auto qs = rows::q_view(strided<const scalar_t>(q), p);
    const auto ks = rows::kv_view(strided<const scalar_t>(k), p), vs = rows::kv_view(strided<const scalar_t>(v), p);
    delta_rows_kernel<scalar_t, acc_t><<<warp_grid(n_rows), kThreadsPerBlock, 0, stream>>>(
        p, go, rows::q_view(strided<const scalar_t>(out), p), delta.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // d lse_i / d s_ij = P_ij: a gradient g into lse adds P * g to dS = P * (dP - delta).
    if (grad_lse.defined()) delta.sub_(grad_lse);
    if (try_attention_backward_mma(p, mask.kind != MaskKind::kNone, grad_out, q, k, v, lse, delta, dq, dk, dv)) return;
    grad_query_rows_kernel<scalar_t, acc_t><<<warp_grid(n_rows), kThreadsPerBlock, 0, stream>>>(
        p, mask, go, qs, ks, vs, lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), rows::q_view(strided<scalar_t>(dq), p),
        rng_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (n_cols > 0) {
      grad_key_value_columns_kernel<scalar_t, acc_t><<<warp_grid(n_cols), kThreadsPerBlock, 0, stream>>>(
          p, mask, go, qs, ks, vs, lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
          rows::kv_view(strided<scalar_t>(dk), p), rows::kv_view(strided<scalar_t>(dv), p), rng_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) { m.impl("attention_backward", &attention_backward_cuda); }

}  // namespace flash_attn_ext::cuda
