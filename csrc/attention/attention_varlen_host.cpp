#include "attention_varlen_host.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "attention_host.h"

namespace flash_attn_ext {
namespace {

// The sequence lengths of a cu_seqlens tensor, checked against its packed tensor's length.
std::vector<int64_t> read_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                                     const char* tensor_name, const at::Device& device) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32 (as flash-attn's), got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": ", name, " must be 1-D of shape (batch + 1,), got shape ",
                    cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == device, op, ": ", name, " is on ", cu.device(), ", expected ", device);
  const at::Tensor host = cu.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = host.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
  std::vector<int64_t> lens(cu.size(0) - 1);
  for (size_t b = 0; b < lens.size(); ++b) {
    lens[b] = c[b + 1] - c[b];
    TORCH_CHECK_VALUE(lens[b] >= 0, op, ": ", name, " must be non-decreasing, got ", name, "[", b, "] = ", c[b], " > ",
                      name, "[", b + 1, "] = ", c[b + 1]);
  }
  TORCH_CHECK_VALUE(c[cu.size(0) - 1] == total, op, ": ", name, "[-1] must equal ", tensor_name, ".size(0) = ", total,
                    ", got ", c[cu.size(0) - 1]);
  return lens;
}

void check_packed(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must be 3-D ", layout, " (packed sequences), got ", t.dim(),
                    "-D with shape ", t.sizes());
}

}  // namespace

VarlenCall make_varlen_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
                            int64_t window_right, bool bottom_right, double softcap,
                            const std::optional<at::Tensor>& alibi_slopes) {
  check_packed(op, "query", q, "(total_q, heads, head_dim)");
  check_packed(op, "key", k, "(total_k, kv_heads, head_dim)");
  check_packed(op, "value", v, "(total_k, kv_heads, head_dim_v)");
  TORCH_CHECK_VALUE(k.size(0) == v.size(0), op, ": key and value must have the same number of rows, got key ",
                    k.size(0), ", value ", v.size(0));
  // dtype, device, heads, head dims, strides, dropout, scale and windows, as the dense op checks them.
  check_attention_inputs(op, as_heads_view(q), as_heads_view(k), as_heads_view(v), std::nullopt, dropout_p, scale,
                         window_left, window_right);
  check_softcap(op, softcap);
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_k.dim() == 1 && cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
                    op, ": cu_seqlens_q and cu_seqlens_k must be 1-D of the same length (batch + 1), got ",
                    cu_seqlens_q.sizes(), " and ", cu_seqlens_k.sizes());
  const std::vector<int64_t> lens_q = read_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.size(0), "query", q.device());
  const std::vector<int64_t> lens_k = read_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.size(0), "key", q.device());
  const int64_t longest_q = lens_q.empty() ? 0 : *std::max_element(lens_q.begin(), lens_q.end());
  const int64_t longest_k = lens_k.empty() ? 0 : *std::max_element(lens_k.begin(), lens_k.end());
  TORCH_CHECK_VALUE(max_seqlen_q >= longest_q, op, ": max_seqlen_q = ", max_seqlen_q,
                    " is shorter than the longest query sequence in cu_seqlens_q (", longest_q, ")");
  TORCH_CHECK_VALUE(max_seqlen_k >= longest_k, op, ": max_seqlen_k = ", max_seqlen_k,
                    " is shorter than the longest key sequence in cu_seqlens_k (", longest_k, ")");

  VarlenCall call;
  call.cu_seqlens_q = cu_seqlens_q.contiguous();
  call.cu_seqlens_k = cu_seqlens_k.contiguous();
  AttentionParams& p = call.params;
  p = make_attention_params(as_heads_view(q), as_heads_view(k), as_heads_view(v), dropout_p, scale, window_left,
                            window_right, bottom_right, softcap);
  p.batch = static_cast<int64_t>(lens_q.size());
  // The loops run over the longest sequence (measured, not max_seqlen_*: a generous bound costs nothing).
  p.len_q = longest_q;
  p.len_k = longest_k;
  p.total_q = q.size(0);
  p.cu_seqlens_q = call.cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = call.cu_seqlens_k.data_ptr<int32_t>();
  set_alibi_slopes(op, p, alibi_slopes, q.device());
  return call;
}

std::tuple<at::Tensor, at::Tensor> empty_varlen_outputs(const at::Tensor& q, const at::Tensor& v) {
  return {at::empty({q.size(0), q.size(1), v.size(2)}, q.options()),
          at::empty({q.size(1), q.size(0)}, q.options().dtype(lse_dtype(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_gradients(const VarlenCall& call, const at::Tensor& q,
                                                                const at::Tensor& k, const at::Tensor& v,
                                                                bool* nothing_to_run) {
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  *nothing_to_run = call.params.batch * call.params.heads_q == 0 || q.size(0) == 0;
  if (*nothing_to_run) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  return {dq, dk, dv};
}

void check_varlen_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state,
                                  double dropout_p) {
  const char* op = "flash_attn_ext.attention_varlen_backward";
  const std::vector<int64_t> out_shape = {q.size(0), q.size(1), v.size(2)};
  TORCH_CHECK_VALUE(out.sizes() == out_shape, op, ": out must have shape ", out_shape, ", got ", out.sizes());
  TORCH_CHECK_VALUE(grad_out.sizes() == out_shape, op, ": grad_out must have shape ", out_shape, ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                   ": grad_out and out must have the query's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(),
                   " and ", out.scalar_type());
  for (const auto* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": grad_out, out and lse must be on ", q.device());
  }
  TORCH_CHECK_VALUE(grad_out.numel() == 0 || grad_out.size(-1) <= 1 || grad_out.stride(-1) == 1, op,
                    ": grad_out must have a contiguous last dimension");
  TORCH_CHECK_VALUE(out.numel() == 0 || out.size(-1) <= 1 || out.stride(-1) == 1, op,
                    ": out must have a contiguous last dimension");
  const std::vector<int64_t> lse_shape = {q.size(1), q.size(0)};
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape && lse.is_contiguous(), op, ": lse must be a contiguous tensor of shape ",
                    lse_shape, ", got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": lse must be ", lse_dtype(q.scalar_type()),
                   ", got ", lse.scalar_type());
  check_rng_state(op, rng_state, dropout_p);
}

}  // namespace flash_attn_ext
