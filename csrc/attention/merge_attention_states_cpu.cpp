// CPU kernel of flash_attn_ext::merge_attention_states, and its autograd.
//
// Two partial results over disjoint key sets combine exactly through their log-sum-exps:
//   lse = log(exp(lse_a) + exp(lse_b)),  out = w_a out_a + w_b out_b,  w_x = exp(lse_x - lse).
// A side that saw no key (lse = -inf) gets weight 0; both empty gives zeros and lse = -inf,
// matching the attention kernels' convention for rows with no visible key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "attention_rows.h"
#include "merge_attention_states.h"

namespace flash_attn_ext {

constexpr const char* kOp = "flash_attn_ext.merge_attention_states";

void check_merge_inputs(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                        const at::Tensor& lse_b) {
  TORCH_CHECK_VALUE(out_a.dim() >= 1 && out_a.sizes() == out_b.sizes(), kOp,
                    ": out_a and out_b must have the same shape (..., head_dim), got ", out_a.sizes(), " and ",
                    out_b.sizes());
  TORCH_CHECK_VALUE(lse_a.sizes() == out_a.sizes().slice(0, out_a.dim() - 1) && lse_b.sizes() == lse_a.sizes(), kOp,
                    ": lse_a and lse_b must have out_a's shape without its last dim ",
                    out_a.sizes().slice(0, out_a.dim() - 1), ", got ", lse_a.sizes(), " and ", lse_b.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(out_a.scalar_type()) && out_b.scalar_type() == out_a.scalar_type(), kOp,
                   ": out_a and out_b must share a floating dtype, got ", out_a.scalar_type(), " and ",
                   out_b.scalar_type());
  TORCH_CHECK_TYPE((lse_a.scalar_type() == at::kFloat || lse_a.scalar_type() == at::kDouble) &&
                       lse_b.scalar_type() == lse_a.scalar_type(),
                   kOp, ": lse_a and lse_b must both be float32 or float64, got ", lse_a.scalar_type(), " and ",
                   lse_b.scalar_type());
  for (const auto* t : {&lse_a, &out_b, &lse_b}) {
    TORCH_CHECK_VALUE(t->device() == out_a.device(), kOp, ": all inputs must be on ", out_a.device());
  }
}

namespace {

template <typename scalar_t, typename lse_t>
void merge_kernel(const at::Tensor& oa, const at::Tensor& la, const at::Tensor& ob, const at::Tensor& lb,
                  const at::Tensor& out, const at::Tensor& lse) {
  const int64_t n_rows = la.numel(), D = oa.size(-1);
  const scalar_t* pa = oa.data_ptr<scalar_t>();
  const scalar_t* pb = ob.data_ptr<scalar_t>();
  const lse_t* qa = la.data_ptr<lse_t>();
  const lse_t* qb = lb.data_ptr<lse_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
  lse_t* ql = lse.data_ptr<lse_t>();
  at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const rows::MergeWeights<lse_t> w = rows::merge_weights(qa[r], qb[r]);
      const lse_t wa = w.a, wb = w.b, l = w.lse;
      ql[r] = l;
      for (int64_t d = 0; d < D; ++d) {
        po[r * D + d] =
            static_cast<scalar_t>(wa * static_cast<lse_t>(pa[r * D + d]) + wb * static_cast<lse_t>(pb[r * D + d]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                              const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge_inputs(out_a, lse_a, out_b, lse_b);
  const at::Tensor oa = out_a.contiguous(), ob = out_b.contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty(oa.sizes(), oa.options());
  at::Tensor lse = at::empty(la.sizes(), la.options());
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, oa.scalar_type(), "merge_attention_states_cpu", [&] {
    if (la.scalar_type() == at::kDouble) {
      merge_kernel<scalar_t, double>(oa, la, ob, lb, out, lse);
    } else {
      merge_kernel<scalar_t, float>(oa, la, ob, lb, out, lse);
    }
  });
  return {out, lse};
}

// Autograd with out = w_a o_a + w_b o_b, w_a = exp(lse_a - lse), w_a + w_b = 1:
//   d o_a = w_a dout,  d lse_a = w_a (rowsum(dout * (o_a - out)) + dlse)   (same for b).
class MergeFunction : public torch::autograd::Function<MergeFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& out_a,
                                                const at::Tensor& lse_a, const at::Tensor& out_b,
                                                const at::Tensor& lse_b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flash_attn_ext::merge_attention_states", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&)>();
    auto [out, lse] = op.call(out_a, lse_a, out_b, lse_b);
    ctx->save_for_backward({out_a, lse_a, out_b, lse_b, out, lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &oa = s[0], &la = s[1], &ob = s[2], &lb = s[3], &out = s[4], &lse = s[5];
    // Weights in the lse dtype; 0 where the merged row saw nothing (lse = -inf).
    const at::Tensor empty_row = at::isinf(lse).logical_and(lse < 0);
    const at::Tensor safe_lse = at::where(empty_row, at::zeros_like(lse), lse);
    const at::Tensor wa = at::where(empty_row, at::zeros_like(lse), at::exp(la - safe_lse));
    const at::Tensor wb = at::where(empty_row, at::zeros_like(lse), at::exp(lb - safe_lse));
    const at::Tensor dout = grads[0].defined() ? grads[0].to(lse.scalar_type()) : at::zeros_like(out, lse.options());
    const at::Tensor dlse = grads[1].defined() ? grads[1] : at::zeros_like(lse);
    const at::Tensor outf = out.to(lse.scalar_type());
    const at::Tensor d_oa = (wa.unsqueeze(-1) * dout).to(oa.scalar_type());
    const at::Tensor d_ob = (wb.unsqueeze(-1) * dout).to(ob.scalar_type());
    const at::Tensor d_la = wa * ((dout * (oa.to(lse.scalar_type()) - outf)).sum(-1) + dlse);
    const at::Tensor d_lb = wb * ((dout * (ob.to(lse.scalar_type()) - outf)).sum(-1) + dlse);
    return {d_oa, d_la, d_ob, d_lb};
  }
};

std::tuple<at::Tensor, at::Tensor> merge_attention_states_autograd(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                                   const at::Tensor& out_b, const at::Tensor& lse_b) {
  auto r = MergeFunction::apply(out_a, lse_a, out_b, lse_b);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) { m.impl("merge_attention_states", &merge_attention_states_cpu); }

TORCH_LIBRARY_IMPL(flash_attn_ext, Autograd, m) { m.impl("merge_attention_states", &merge_attention_states_autograd); }

}  // namespace flash_attn_ext
