// Autograd for attention_forward and attention_varlen_forward, registered in C++ so that loss.backward() works from
// Python and from LibTorch programs alike; torch.compile traces through it with the fake
// kernels. The backward recomputes probabilities from (out, lse, rng_state): nothing of size
// L x S is saved. out and lse are differentiable (a gradient into lse adds P * grad_lse to dS),
// so partial attentions merged by their lse (ring attention, split KV) compose under autograd.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace flash_attn_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
using T = const at::Tensor&;

// The ops' C++ signatures (their schemas are in csrc/ops.cpp), written once here for the
// dispatcher calls and the autograd kernels below.
using ForwardSig = Tensors3(T q, T k, T v, const OptTensor& attn_mask, double dropout_p, double scale,
                            int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                            const OptTensor& alibi_slopes, const OptTensor& sinks, const OptTensor& relative_bias);
using BackwardSig = Tensors6(T grad_out, T q, T k, T v, T out, T lse, T rng_state, const OptTensor& attn_mask,
                             double dropout_p, double scale, int64_t window_left, int64_t window_right,
                             bool bottom_right, double softcap, const OptTensor& alibi_slopes,
                             const OptTensor& grad_lse, bool grad_attn_mask, bool grad_alibi_slopes,
                             const OptTensor& relative_bias, bool grad_relative_bias);
using VarlenForwardSig = Tensors3(T q, T k, T v, T cu_q, T cu_k, int64_t max_q, int64_t max_k, double dropout_p,
                                  double scale, int64_t window_left, int64_t window_right, bool bottom_right,
                                  double softcap, const OptTensor& alibi_slopes, const OptTensor& sinks);
using VarlenBackwardSig = Tensors3(T grad_out, T q, T k, T v, T out, T lse, T rng_state, T cu_q, T cu_k, int64_t max_q,
                                   int64_t max_k, double dropout_p, double scale, int64_t window_left,
                                   int64_t window_right, bool bottom_right, double softcap,
                                   const OptTensor& alibi_slopes, const OptTensor& grad_lse);

constexpr char kForwardOp[] = "flash_attn_ext::attention_forward";
constexpr char kBackwardOp[] = "flash_attn_ext::attention_backward";
constexpr char kVarlenForwardOp[] = "flash_attn_ext::attention_varlen_forward";
constexpr char kVarlenBackwardOp[] = "flash_attn_ext::attention_varlen_backward";

// Calls the op Op of signature Sig below autograd (its CPU / CUDA kernels); looked up once.
template <typename Sig, const char* Op, typename... Args>
auto call_op(Args&&... args) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Op, "").template typed<Sig>();
  return op.call(std::forward<Args>(args)...);
}

// The gradient as the backward kernels read it: a last dim of stride 1 (e.g. the expanded
// gradient of out.sum() is not).
at::Tensor contiguous_last_dim(const at::Tensor& g) {
  return g.defined() && g.size(-1) > 1 && g.stride(-1) != 1 ? g.contiguous() : g;
}

// The non-tensor options of a forward call, kept in the autograd context for its backward.
struct Options {
  double dropout_p, scale;
  int64_t window_left, window_right;
  bool bottom_right;
  double softcap;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["softcap"] = softcap;
  }
  static Options load(AutogradContext* ctx) {
    return {ctx->saved_data["dropout_p"].toDouble(),  ctx->saved_data["scale"].toDouble(),
            ctx->saved_data["window_left"].toInt(),   ctx->saved_data["window_right"].toInt(),
            ctx->saved_data["bottom_right"].toBool(), ctx->saved_data["softcap"].toDouble()};
  }
};

// An optional tensor saved for backward as an undefined tensor when absent.
std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The end of both forwards: the options saved for backward, rng_state returned as a
// non-differentiable output.
variable_list outputs_of_forward(AutogradContext* ctx, const Options& options, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& rng_state) {
  options.save(ctx);
  ctx->mark_non_differentiable({rng_state});
  return {out, lse, rng_state};
}

// The incoming gradients of (out, lse) as the backward ops take them; false when neither is
// defined (nothing to compute). A gradient into lse alone backpropagates with grad_out = 0.
bool incoming_gradients(const variable_list& grads, const at::Tensor& out, at::Tensor* grad_out, OptTensor* grad_lse) {
  if (!grads[0].defined() && !grads[1].defined()) return false;
  *grad_out = grads[0].defined() ? contiguous_last_dim(grads[0]) : at::zeros_like(out);
  *grad_lse = grads[1].defined() ? OptTensor(grads[1].contiguous()) : std::nullopt;
  return true;
}

// The gradient of the sink logits (sinks: (Hq,)): the sink is one more softmax entry with
// probability exp(sink - lse_i) and no value, so d sink_h = -sum over head h's rows of
// exp(sink_h - lse_i) * (delta_i - grad_lse_i), delta_i = <dO_i, O_i> (the backward kernels'
// row term, formed here again in lse's precision: O(L * D), nothing of size L x S).
// head_dim: lse's head dim (1 for (B, Hq, L), 0 for varlen's (Hq, total_q)).
at::Tensor sink_gradient(const at::Tensor& sinks, const at::Tensor& lse, const at::Tensor& out,
                         const at::Tensor& grad_out, const OptTensor& grad_lse, int64_t head_dim) {
  const auto acc = lse.scalar_type();
  at::Tensor delta = (grad_out.to(acc) * out.to(acc)).sum(-1);  // (B, Hq, L), or (total_q, Hq) packed
  if (head_dim == 0) delta = delta.transpose(0, 1);
  if (grad_lse.has_value()) delta = delta - *grad_lse;
  std::vector<int64_t> shape(lse.dim(), 1);
  shape[head_dim] = sinks.size(0);
  const at::Tensor p_sink = at::exp(sinks.to(acc).view(shape) - lse);
  // exp(-inf - -inf) is NaN: a -inf sink on a row with no visible key has probability 0.
  const at::Tensor weight = at::where(lse == -std::numeric_limits<double>::infinity(), at::zeros_like(p_sink), p_sink);
  std::vector<int64_t> rows;
  for (int64_t d = 0; d < lse.dim(); ++d)
    if (d != head_dim) rows.push_back(d);
  return (weight * delta).sum(rows).neg().to(sinks.scalar_type());
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
                               int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                               const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                               const std::optional<at::Tensor>& relative_bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, rng_state] =
        call_op<ForwardSig, kForwardOp>(q, k, v, attn_mask, dropout_p, scale, window_left, window_right, bottom_right,
                                        softcap, alibi_slopes, sinks, relative_bias);
    ctx->save_for_backward({q, k, v, out, lse, rng_state, attn_mask.value_or(at::Tensor()),
                            alibi_slopes.value_or(at::Tensor()), sinks.value_or(at::Tensor()),
                            relative_bias.value_or(at::Tensor())});
    return outputs_of_forward(ctx, {dropout_p, scale, window_left, window_right, bottom_right, softcap}, out, lse,
                              rng_state);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_out;
    OptTensor grad_lse;
    if (!incoming_gradients(grads, saved[3], &grad_out, &grad_lse)) return variable_list(13);
    const Options o = Options::load(ctx);
    // needs_input_grad counts the defined tensor arguments only: q, k, v, then the mask, the
    // slopes, the sinks and the relative bias, each when given.
    const size_t slopes_edge = 3 + saved[6].defined(), sinks_edge = slopes_edge + saved[7].defined();
    const size_t relative_edge = sinks_edge + saved[8].defined();
    const bool grad_mask = saved[6].defined() && ctx->needs_input_grad(3);
    const bool grad_slopes = saved[7].defined() && ctx->needs_input_grad(slopes_edge);
    const bool grad_relative = saved[9].defined() && ctx->needs_input_grad(relative_edge);
    auto [dq, dk, dv, dmask, dslopes, drelative] = call_op<BackwardSig, kBackwardOp>(
        grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], optional_of(saved[6]), o.dropout_p,
        o.scale, o.window_left, o.window_right, o.bottom_right, o.softcap, optional_of(saved[7]), grad_lse, grad_mask,
        grad_slopes, optional_of(saved[9]), grad_relative);
    variable_list result(13);  // nothing for the non-tensor arguments
    result[0] = dq, result[1] = dk, result[2] = dv;
    if (grad_mask) result[3] = dmask;
    if (grad_slopes) result[10] = dslopes;
    if (grad_relative) result[12] = drelative;
    if (saved[8].defined() && ctx->needs_input_grad(sinks_edge))
      result[11] = sink_gradient(saved[8], saved[4], saved[3], grad_out, grad_lse, 1);
    return result;
  }
};

// Autograd of attention_varlen_forward: the same recomputation from (out, lse, rng_state).
class VarlenAttentionFunction : public torch::autograd::Function<VarlenAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                               double dropout_p, double scale, int64_t window_left, int64_t window_right,
                               bool bottom_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                               const std::optional<at::Tensor>& sinks) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, rng_state] =
        call_op<VarlenForwardSig, kVarlenForwardOp>(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, window_left,
                                                    window_right, bottom_right, softcap, alibi_slopes, sinks);
    ctx->save_for_backward(
        {q, k, v, out, lse, rng_state, cu_q, cu_k, alibi_slopes.value_or(at::Tensor()), sinks.value_or(at::Tensor())});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    return outputs_of_forward(ctx, {dropout_p, scale, window_left, window_right, bottom_right, softcap}, out, lse,
                              rng_state);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    variable_list result(15);
    at::Tensor grad_out;
    OptTensor grad_lse;
    if (!incoming_gradients(grads, s[3], &grad_out, &grad_lse)) return result;
    const Options o = Options::load(ctx);
    auto [dq, dk, dv] = call_op<VarlenBackwardSig, kVarlenBackwardOp>(
        grad_out, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], ctx->saved_data["max_q"].toInt(),
        ctx->saved_data["max_k"].toInt(), o.dropout_p, o.scale, o.window_left, o.window_right, o.bottom_right,
        o.softcap, optional_of(s[8]), grad_lse);
    result[0] = dq, result[1] = dk, result[2] = dv;
    const size_t sinks_edge = 5 + s[8].defined();  // q, k, v, cu_seqlens_q/k, the slopes when given
    if (s[9].defined() && ctx->needs_input_grad(sinks_edge))
      result[14] = sink_gradient(s[9], s[4], s[3], grad_out, grad_lse, 0);
    return result;
  }
};

// The backward ops are themselves differentiable only to first order.
template <typename Sig, const char* Op>
class BackwardFunction : public torch::autograd::Function<BackwardFunction<Sig, Op>> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext*, Args&&... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::apply([](auto&&... t) { return variable_list{t...}; }, call_op<Sig, Op>(std::forward<Args>(args)...));
  }

  static variable_list backward(AutogradContext*, variable_list) {
    constexpr size_t kNamespace = sizeof("flash_attn_ext::") - 1;  // named as Python spells it
    TORCH_CHECK(false, "flash_attn_ext.", Op + kNamespace,
                ": double backward (gradients of gradients) is not supported");
    return {};
  }
};

// A Function's apply as the autograd kernel of an op of signature Sig (its three or six outputs).
template <typename Function, typename Sig>
struct AutogradKernel;
template <typename Function, typename... Args>
struct AutogradKernel<Function, Tensors3(Args...)> {
  static Tensors3 call(Args... args) {
    auto r = Function::apply(args...);
    return {r[0], r[1], r[2]};
  }
};
template <typename Function, typename... Args>
struct AutogradKernel<Function, Tensors6(Args...)> {
  static Tensors6 call(Args... args) {
    auto r = Function::apply(args...);
    return {r[0], r[1], r[2], r[3], r[4], r[5]};
  }
};

// Bias gradients (attn_mask, alibi_slopes) are computed by the CPU kernels only: elsewhere a
// bias that requires grad is refused at the forward, before anything runs, rather than left
// without its gradient. Checked in the autograd kernels, not in forward(), where grad mode is
// already off; under no_grad a bias that requires grad is just data. cpu_gradients: whether
// op's CPU kernels compute them (attention_forward: yes; the varlen op: no).
void check_bias_gradients(const char* op, bool cpu_gradients, const at::Tensor& q, const OptTensor& attn_mask,
                          const OptTensor& alibi_slopes) {
  if (!at::GradMode::is_enabled() || (cpu_gradients && q.device().is_cpu())) return;
  const char* why =
      cpu_gradients ? "only the CPU kernels compute its gradient" : "this op does not compute its gradient";
  const auto refuse_if_wanted = [&](const OptTensor& t, const char* name, const char* alternative) {
    TORCH_CHECK_NOT_IMPLEMENTED(!(t.has_value() && t->defined() && t->requires_grad()), "flash_attn_ext.",
                                op + sizeof("flash_attn_ext::") - 1, ": ", name, " requires grad, and ", why, "; pass ",
                                name, ".detach() or run under torch.no_grad()", alternative);
  };
  refuse_if_wanted(attn_mask, "attn_mask",
                   ", or use flash_attn_ext.scaled_dot_product_attention, which falls back to PyTorch");
  refuse_if_wanted(alibi_slopes, "alibi_slopes", "");
}

Tensors3 attention_forward_autograd(T q, T k, T v, const OptTensor& attn_mask, double dropout_p, double scale,
                                    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                                    const OptTensor& alibi_slopes, const OptTensor& sinks,
                                    const OptTensor& relative_bias) {
  check_bias_gradients(kForwardOp, /*cpu_gradients=*/true, q, attn_mask, alibi_slopes);
  auto r = AttentionFunction::apply(q, k, v, attn_mask, dropout_p, scale, window_left, window_right, bottom_right,
                                    softcap, alibi_slopes, sinks, relative_bias);
  return {r[0], r[1], r[2]};
}

Tensors3 attention_varlen_forward_autograd(T q, T k, T v, T cu_q, T cu_k, int64_t max_q, int64_t max_k,
                                           double dropout_p, double scale, int64_t window_left, int64_t window_right,
                                           bool bottom_right, double softcap, const OptTensor& alibi_slopes,
                                           const OptTensor& sinks) {
  check_bias_gradients(kVarlenForwardOp, /*cpu_gradients=*/false, q, std::nullopt, alibi_slopes);
  auto r = VarlenAttentionFunction::apply(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, window_left,
                                          window_right, bottom_right, softcap, alibi_slopes, sinks);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, Autograd, m) {
  m.impl("attention_forward", &attention_forward_autograd);
  m.impl("attention_backward", &AutogradKernel<BackwardFunction<BackwardSig, kBackwardOp>, BackwardSig>::call);
  m.impl("attention_varlen_forward", &attention_varlen_forward_autograd);
  m.impl("attention_varlen_backward",
         &AutogradKernel<BackwardFunction<VarlenBackwardSig, kVarlenBackwardOp>, VarlenBackwardSig>::call);
}

}  // namespace flash_attn_ext
