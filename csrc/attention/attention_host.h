// Host-side glue shared by the CPU and CUDA implementations of the attention ops:
// argument validation (before anything is allocated or written) and the translation of
// tensors into the torch-free AttentionParams / MaskView of attention_semantics.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "../common/attention_semantics.h"

namespace flash_attn_ext {

// Validates q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), the mask (4-D,
// broadcastable to (B, Hq, L, S), bool or floating), dropout_p in [0, 1), a finite scale
// and windows >= -1. `op` names the caller in messages.
// paged_kv: k/v are the blocks of a paged cache (their first dim counts blocks, not sequences).
void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
                            int64_t window_left, int64_t window_right, bool paged_kv = false,
                            bool quantized_kv = false);

// Backward also checks that grad_out, out and lse match the forward's shapes.
void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& rng_state, double dropout_p);

// The backward's optional grad_lse: lse's shape, dtype and device (ValueError / TypeError
// naming grad_lse otherwise). Returns it, or an undefined tensor when absent.
at::Tensor checked_grad_lse(const char* op, const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse);

// The forward's rng_state as the backward takes it: int64 [seed, offset] with dropout; without
// dropout the forward returns an empty one (no generator draw, no device work), and any int64
// state of 0 or 2 elements is accepted (it is not read).
void check_rng_state(const char* op, const at::Tensor& rng_state, double dropout_p);

// softcap must be finite and >= 0 (0 = off).
void check_softcap(const char* op, double softcap);

// alibi_slopes, when given: float32, (heads_q,) or (batch, heads_q), on `device`, last dim
// contiguous. Sets p.alibi_slopes / alibi_batch_stride (the tensor must outlive the call).
void set_alibi_slopes(const char* op, AttentionParams& p, const std::optional<at::Tensor>& alibi_slopes,
                      const at::Device& device);

// relative_bias, when given: (heads_q, len_q + len_k - 1) float32 or float64 on `device`, last
// dim contiguous (ValueError / TypeError naming relative_bias otherwise). Sets p.relative_bias.
void set_relative_bias(const char* op, AttentionParams& p, const std::optional<at::Tensor>& relative_bias,
                       const at::Device& device);

// sinks, when given: (heads_q,) float32 or float64 on `device`, contiguous (ValueError /
// TypeError naming sinks otherwise). Sets p.sinks (the tensor must outlive the call).
void set_sinks(const char* op, AttentionParams& p, const std::optional<at::Tensor>& sinks, const at::Device& device);

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p,
                                      double scale, int64_t window_left, int64_t window_right, bool bottom_right,
                                      double softcap);

MaskView make_mask_view(const std::optional<at::Tensor>& attn_mask);

// The output layout of the forward: (B, L, H, Dv) in memory, returned as a (B, H, L, Dv)
// view, as PyTorch's own flash kernels do; a flash-attn (B, L, H, D) caller gets a
// contiguous tensor back by transposing.
at::Tensor empty_attention_output(const at::Tensor& q, int64_t dim_v);

// Validates cache_seqlens' dtype (int32/int64), shape (batch,) and device.
void check_cache_seqlens(const char* op, const at::Tensor& cache_seqlens, int64_t batch, const at::Device& device);
// check_cache_seqlens, then its values on the host. KV-cache ops read it before writing anything.
std::vector<int64_t> read_cache_seqlens(const char* op, const at::Tensor& cache_seqlens, int64_t batch,
                                        const at::Device& device);

// log-sum-exp dtype: float32, or float64 for float64 inputs (so gradcheck sees full precision).
at::ScalarType lse_dtype(at::ScalarType input_dtype);

// What one device's kernels cannot serve, checked with the other arguments (before anything is
// allocated or written): the longest head dim (0: any). The CPU kernels have no limit.
struct DeviceLimits {
  const char* kernels = "CPU";
  int64_t max_head_dim = 0;
};
void check_head_dims(const char* op, int64_t dim_qk, int64_t dim_v, const DeviceLimits& limits);
inline DeviceLimits cpu_limits() { return DeviceLimits{}; }

// The prologue of attention_forward shared by its CPU and CUDA entries: every check, the params
// (the kernel configuration included), the mask view and the outputs, out (B, Hq, L, Dv) and lse
// (B, Hq, L), uninitialised. The entry draws the dropout state and runs its kernels.
struct ForwardCall {
  AttentionParams params;
  MaskView mask;
  at::Tensor out, lse;
};
ForwardCall prepare_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
                                      int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                                      const std::optional<at::Tensor>& alibi_slopes,
                                      const std::optional<at::Tensor>& sinks, const DeviceLimits& limits,
                                      const std::optional<at::Tensor>& relative_bias = std::nullopt);

// The same for attention_backward: the forward's checks and the backward's (grad_out, out, lse
// and rng_state shapes, dtypes and device), the params and the gradients dq, dk, dv,
// uninitialised, or zeroed with nothing_to_run set when no query reads any key (the kernels are
// then skipped); grad_lse checked (undefined when absent). grad_attn_mask / grad_alibi_slopes
// / grad_relative_bias (the bias gradients asked for) need a floating-point mask / the slopes /
// the relative bias (ValueError naming them otherwise); with nothing_to_run, grad_mask /
// grad_slopes / grad_relative_bias are their zero gradients.
struct BackwardCall {
  AttentionParams params;
  MaskView mask;
  at::Tensor dq, dk, dv, grad_lse;
  at::Tensor grad_mask, grad_slopes, grad_relative_bias;
  bool nothing_to_run = false;
};
BackwardCall prepare_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& grad_lse,
    const DeviceLimits& limits, bool grad_attn_mask = false, bool grad_alibi_slopes = false,
    const std::optional<at::Tensor>& relative_bias = std::nullopt, bool grad_relative_bias = false);

// What attention_backward returns for a bias gradient not asked for: an empty (0,) tensor.
at::Tensor no_bias_gradient(const at::Tensor& q);

}  // namespace flash_attn_ext
