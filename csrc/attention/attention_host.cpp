#include "attention_host.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace flash_attn_ext {
namespace {

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", st);
}

void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must have a contiguous last dimension (stride 1), got stride ", t.stride(-1),
                    "; call .contiguous() first");
}

}  // namespace

void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
                            int64_t window_left, int64_t window_right, bool paged_kv, bool quantized_kv) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": query must be 4-D (batch, heads, len_q, head_dim), got ", q.dim(),
                    "-D with shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": key must be 4-D (batch, kv_heads, len_k, head_dim), got ", k.dim(),
                    "-D with shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, op, ": value must be 4-D (batch, kv_heads, len_k, head_dim_v), got ", v.dim(),
                    "-D with shape ", v.sizes());
  check_floating(op, "query", q);
  // quantized_kv: int8 / fp8 KV-cache storage, its dtype checked with its scales (kv_cache_host.h)
  TORCH_CHECK_TYPE(quantized_kv || (k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type()), op,
                   ": query, key and value must have the same dtype, got query ", q.scalar_type(), ", key ",
                   k.scalar_type(), ", value ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": query, key and value must be on the same device, got query ", q.device(), ", key ", k.device(),
                    ", value ", v.device());
  TORCH_CHECK_VALUE(v.size(0) == k.size(0) && (paged_kv || k.size(0) == q.size(0)), op, ": batch sizes differ: query ",
                    q.size(0), ", key ", k.size(0), ", value ", v.size(0));
  TORCH_CHECK_VALUE(k.size(1) == v.size(1), op, ": key and value must have the same number of heads, got key ",
                    k.size(1), ", value ", v.size(1));
  TORCH_CHECK_VALUE(k.size(2) == v.size(2), op, ": key and value must have the same length, got key ", k.size(2),
                    ", value ", v.size(2));
  TORCH_CHECK_VALUE(q.size(3) == k.size(3), op, ": query and key head dims differ: query ", q.size(3), ", key ",
                    k.size(3));
  TORCH_CHECK_VALUE((k.size(1) >= 1 && q.size(1) % k.size(1) == 0) || (q.size(1) == 0 && k.size(1) == 0), op,
                    ": number of query heads (", q.size(1), ") must be a multiple of the number of key/value heads (",
                    k.size(1), ")");
  check_last_dim_contiguous(op, "query", q);
  check_last_dim_contiguous(op, "key", k);
  check_last_dim_contiguous(op, "value", v);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(window_left >= -1, op, ": window_left must be >= -1 (-1 = unbounded), got ", window_left);
  TORCH_CHECK_VALUE(window_right >= -1, op, ": window_right must be >= -1 (-1 = unbounded), got ", window_right);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                     ": attn_mask must be bool or floating point, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == q.device(), op, ": attn_mask must be on ", q.device(), ", got ", m.device());
    TORCH_CHECK_VALUE(m.dim() == 4, op, ": attn_mask must be 4-D, broadcastable to (batch, heads, len_q, len_k), got ",
                      m.dim(), "-D with shape ", m.sizes());
    const int64_t want[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK_VALUE(m.size(d) == want[d] || m.size(d) == 1, op, ": attn_mask of shape ", m.sizes(),
                        " is not broadcastable to (", want[0], ", ", want[1], ", ", want[2], ", ", want[3], ")");
    }
  }
}

void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& rng_state, double dropout_p) {
  const char* op = "flash_attn_ext.attention_backward";
  const std::vector<int64_t> out_shape = {q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK_VALUE(out.sizes() == out_shape, op, ": out must have shape ", out_shape, ", got ", out.sizes());
  TORCH_CHECK_VALUE(grad_out.sizes() == out_shape, op, ": grad_out must have shape ", out_shape, ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                   ": grad_out and out must have the query's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(),
                   " and ", out.scalar_type());
  check_last_dim_contiguous(op, "grad_out", grad_out);
  check_last_dim_contiguous(op, "out", out);
  const std::vector<int64_t> lse_shape = {q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape && lse.is_contiguous(), op, ": lse must be a contiguous tensor of shape ",
                    lse_shape, ", got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": lse must be ", lse_dtype(q.scalar_type()),
                   ", got ", lse.scalar_type());
  check_rng_state(op, rng_state, dropout_p);
}

at::Tensor checked_grad_lse(const char* op, const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse) {
  if (!grad_lse.has_value() || !grad_lse->defined()) return at::Tensor();
  const at::Tensor& g = *grad_lse;
  TORCH_CHECK_VALUE(g.sizes() == lse.sizes(), op, ": grad_lse must have lse's shape ", lse.sizes(), ", got ",
                    g.sizes());
  TORCH_CHECK_TYPE(g.scalar_type() == lse.scalar_type(), op, ": grad_lse must have lse's dtype ", lse.scalar_type(),
                   ", got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == lse.device(), op, ": grad_lse must be on ", lse.device(), ", got ", g.device());
  return g;
}

void check_rng_state(const char* op, const at::Tensor& rng_state, double dropout_p) {
  const bool ok = dropout_p > 0.0 ? rng_state.numel() == 2 : rng_state.numel() == 0 || rng_state.numel() == 2;
  TORCH_CHECK_VALUE(ok && rng_state.scalar_type() == at::kLong, op,
                    ": rng_state must be the int64 tensor returned by the forward ([seed, offset] with dropout_p > 0), "
                    "got ",
                    rng_state.numel(), " elements of ", rng_state.scalar_type(), " with dropout_p ", dropout_p);
}

void check_softcap(const char* op, double softcap) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op,
                    ": softcap must be a finite number >= 0 (0 = no soft-capping), got ", softcap);
}

void set_alibi_slopes(const char* op, AttentionParams& p, const std::optional<at::Tensor>& alibi_slopes,
                      const at::Device& device) {
  if (!alibi_slopes.has_value() || !alibi_slopes->defined()) return;
  const at::Tensor& a = *alibi_slopes;
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.device() == device, op, ": alibi_slopes must be on ", device, ", got ", a.device());
  const bool per_head = a.dim() == 1 && a.size(0) == p.heads_q;
  const bool per_batch = a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.heads_q;
  TORCH_CHECK_VALUE(per_head || per_batch, op, ": alibi_slopes must have shape (", p.heads_q, ",) or (", p.batch, ", ",
                    p.heads_q, "), got ", a.sizes());
  TORCH_CHECK_VALUE(a.size(-1) <= 1 || a.stride(-1) == 1, op,
                    ": alibi_slopes must have a contiguous last dimension, got stride ", a.stride(-1));
  p.alibi_slopes = a.data_ptr<float>();
  p.alibi_batch_stride = per_batch && a.size(0) > 1 ? a.stride(0) : 0;
}

void set_relative_bias(const char* op, AttentionParams& p, const std::optional<at::Tensor>& relative_bias,
                       const at::Device& device) {
  if (!relative_bias.has_value() || !relative_bias->defined()) return;
  const at::Tensor& t = *relative_bias;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                   ": relative_bias must be float32 (or float64), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, op, ": relative_bias must be on ", device, ", got ", t.device());
  const int64_t distances = p.len_q + p.len_k - 1;
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == p.heads_q && t.size(1) == std::max<int64_t>(distances, 0), op,
                    ": relative_bias must have shape (", p.heads_q, ", ", std::max<int64_t>(distances, 0),
                    ") (query heads, len_q + len_k - 1 distances j - i), got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op,
                    ": relative_bias must have a contiguous last dimension, got stride ", t.stride(1));
  p.relative_bias = t.data_ptr();
  p.relative_bias_f64 = t.scalar_type() == at::kDouble;
  p.relative_bias_stride = t.stride(0);
}

void set_sinks(const char* op, AttentionParams& p, const std::optional<at::Tensor>& sinks, const at::Device& device) {
  if (!sinks.has_value() || !sinks->defined()) return;
  const at::Tensor& s = *sinks;
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op,
                   ": sinks must be float32 (or float64), got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == device, op, ": sinks must be on ", device, ", got ", s.device());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == p.heads_q, op, ": sinks must have shape (", p.heads_q,
                    ",) (one logit per query head), got ", s.sizes());
  TORCH_CHECK_VALUE(s.size(0) <= 1 || s.stride(0) == 1, op, ": sinks must be contiguous, got stride ", s.stride(0));
  p.sinks = s.data_ptr();
  p.sinks_f64 = s.scalar_type() == at::kDouble;
}

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p,
                                      double scale, int64_t window_left, int64_t window_right, bool bottom_right,
                                      double softcap) {
  AttentionParams p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.len_q = q.size(2);
  p.len_k = k.size(2);
  p.dim_qk = q.size(3);
  p.dim_v = v.size(3);
  p.window_left = window_left;
  p.window_right = window_right;
  p.align_offset = alignment_offset(p.len_q, p.len_k, bottom_right);
  p.bottom_right = bottom_right;
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.softcap = softcap;
  p.config = current_kernel_config();
  return p;
}

MaskView make_mask_view(const std::optional<at::Tensor>& attn_mask) {
  MaskView m;
  if (!attn_mask.has_value() || !attn_mask->defined()) return m;
  const at::Tensor& t = *attn_mask;
  switch (t.scalar_type()) {
    case at::kBool: m.kind = MaskKind::kBool; break;
    case at::kFloat: m.kind = MaskKind::kFloat32; break;
    case at::kDouble: m.kind = MaskKind::kFloat64; break;
    case at::kHalf: m.kind = MaskKind::kFloat16; break;
    case at::kBFloat16: m.kind = MaskKind::kBFloat16; break;
    default: TORCH_CHECK_TYPE(false, "attn_mask: unsupported dtype ", t.scalar_type());
  }
  m.data = t.data_ptr();
  // Broadcast dims read element 0 over and over.
  m.stride_b = t.size(0) == 1 ? 0 : t.stride(0);
  m.stride_h = t.size(1) == 1 ? 0 : t.stride(1);
  m.stride_i = t.size(2) == 1 ? 0 : t.stride(2);
  m.stride_j = t.size(3) == 1 ? 0 : t.stride(3);
  return m;
}

void check_cache_seqlens(const char* op, const at::Tensor& cache_seqlens, int64_t batch, const at::Device& device) {
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong, op,
                   ": cache_seqlens must be int32 or int64, got ", cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch, op, ": cache_seqlens must have shape (",
                    batch, "), got ", cache_seqlens.sizes());
  TORCH_CHECK_VALUE(cache_seqlens.device() == device, op, ": cache_seqlens is on ", cache_seqlens.device(),
                    ", expected ", device);
}

std::vector<int64_t> read_cache_seqlens(const char* op, const at::Tensor& cache_seqlens, int64_t batch,
                                        const at::Device& device) {
  check_cache_seqlens(op, cache_seqlens, batch, device);
  const at::Tensor s = cache_seqlens.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + batch);
}

at::Tensor empty_attention_output(const at::Tensor& q, int64_t dim_v) {
  return at::empty({q.size(0), q.size(2), q.size(1), dim_v}, q.options()).transpose(1, 2);
}

at::ScalarType lse_dtype(at::ScalarType input_dtype) { return input_dtype == at::kDouble ? at::kDouble : at::kFloat; }

void check_head_dims(const char* op, int64_t dim_qk, int64_t dim_v, const DeviceLimits& limits) {
  if (limits.max_head_dim <= 0) return;
  TORCH_CHECK_VALUE(dim_qk <= limits.max_head_dim && dim_v <= limits.max_head_dim, op, ": the ", limits.kernels,
                    " kernels support head dims up to ", limits.max_head_dim, ", got query/key ", dim_qk, " and value ",
                    dim_v);
}

ForwardCall prepare_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
                                      int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                                      const std::optional<at::Tensor>& alibi_slopes,
                                      const std::optional<at::Tensor>& sinks, const DeviceLimits& limits,
                                      const std::optional<at::Tensor>& relative_bias) {
  constexpr const char* kOp = "flash_attn_ext.attention_forward";
  check_attention_inputs(kOp, q, k, v, attn_mask, dropout_p, scale, window_left, window_right);
  check_softcap(kOp, softcap);
  check_head_dims(kOp, q.size(3), v.size(3), limits);
  ForwardCall call;
  call.params = make_attention_params(q, k, v, dropout_p, scale, window_left, window_right, bottom_right, softcap);
  set_alibi_slopes(kOp, call.params, alibi_slopes, q.device());
  set_sinks(kOp, call.params, sinks, q.device());
  set_relative_bias(kOp, call.params, relative_bias, q.device());
  call.mask = make_mask_view(attn_mask);
  const AttentionParams& p = call.params;
  call.out = empty_attention_output(q, p.dim_v);
  call.lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  return call;
}

BackwardCall prepare_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                        const at::Tensor& rng_state, const std::optional<at::Tensor>& attn_mask,
                                        double dropout_p, double scale, int64_t window_left, int64_t window_right,
                                        bool bottom_right, double softcap,
                                        const std::optional<at::Tensor>& alibi_slopes,
                                        const std::optional<at::Tensor>& grad_lse, const DeviceLimits& limits,
                                        bool grad_attn_mask, bool grad_alibi_slopes,
                                        const std::optional<at::Tensor>& relative_bias, bool grad_relative_bias) {
  constexpr const char* kOp = "flash_attn_ext.attention_backward";
  const bool has_mask = attn_mask.has_value() && attn_mask->defined();
  TORCH_CHECK_VALUE(!grad_attn_mask || (has_mask && attn_mask->is_floating_point()), kOp,
                    ": grad_attn_mask=True needs a floating-point attn_mask (a boolean mask has no gradient), got ",
                    has_mask ? c10::toString(attn_mask->scalar_type()) : "none");
  TORCH_CHECK_VALUE(!grad_alibi_slopes || (alibi_slopes.has_value() && alibi_slopes->defined()), kOp,
                    ": grad_alibi_slopes=True needs alibi_slopes");
  TORCH_CHECK_VALUE(!grad_relative_bias || (relative_bias.has_value() && relative_bias->defined()), kOp,
                    ": grad_relative_bias=True needs relative_bias");
  check_attention_inputs(kOp, q, k, v, attn_mask, dropout_p, scale, window_left, window_right);
  check_softcap(kOp, softcap);
  check_attention_backward_inputs(grad_out, q, k, v, out, lse, rng_state, dropout_p);
  check_head_dims(kOp, q.size(3), v.size(3), limits);
  for (const auto* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), kOp, ": grad_out, out and lse must be on ", q.device());
  }
  BackwardCall call;
  call.params = make_attention_params(q, k, v, dropout_p, scale, window_left, window_right, bottom_right, softcap);
  set_alibi_slopes(kOp, call.params, alibi_slopes, q.device());
  set_relative_bias(kOp, call.params, relative_bias, q.device());
  call.mask = make_mask_view(attn_mask);
  call.grad_lse = checked_grad_lse(kOp, grad_lse, lse);
  call.dq = at::empty_like(q);
  call.dk = at::empty_like(k);
  call.dv = at::empty_like(v);
  const AttentionParams& p = call.params;
  if (q.numel() == 0 && k.numel() == 0 && v.numel() == 0) {
    // Head dims of 0 (or nothing at all): dS = P * (dP - delta) is 0, but a gradient into the lse
    // adds P * grad_lse, which the bias gradients would then need from the kernels.
    TORCH_CHECK_NOT_IMPLEMENTED(!(call.grad_lse.defined() && p.len_q > 0 && p.len_k > 0 &&
                                  (grad_attn_mask || grad_alibi_slopes || grad_relative_bias)),
                                kOp,
                                ": bias gradients with head dims of 0 and a gradient into the lse are not supported");
    call.nothing_to_run = true;
  } else if (p.len_q == 0 || p.batch * p.heads_q == 0) {  // no query reads any key
    call.dq.zero_();
    call.dk.zero_();
    call.dv.zero_();
    call.nothing_to_run = true;
  }
  if (call.nothing_to_run && grad_attn_mask) call.grad_mask = at::zeros_like(*attn_mask, at::MemoryFormat::Contiguous);
  if (call.nothing_to_run && grad_alibi_slopes) call.grad_slopes = at::zeros_like(*alibi_slopes);
  if (call.nothing_to_run && grad_relative_bias)
    call.grad_relative_bias = at::zeros_like(*relative_bias, at::MemoryFormat::Contiguous);
  return call;
}

at::Tensor no_bias_gradient(const at::Tensor& q) { return at::empty({0}, q.options()); }

}  // namespace flash_attn_ext
