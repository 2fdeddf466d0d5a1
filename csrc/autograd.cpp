// autograd.cpp — the Autograd kernels of pama_policy_loss and multi_value_loss, in C++.
//
// Every other op gets its autograd from Python (pama_ext/op_table.py: torch.library.register_autograd,
// derived from the op's schema and its <op>_backward op). That path costs about 150 µs of Python per
// forward + backward (torch's generated autograd.Function, its argument re-binding, the Python
// backward), which is as long as the whole kernel at 2^15 tokens. The policy loss is the op a trainer
// calls every micro-batch and its backward is one multiply, so its Autograd kernel is written here,
// and so is the value loss's (called as often; its backward is the multi_value_loss_backward op on the
// saved inputs, exactly what the schema-derived formula calls). op_table.register leaves alone every op
// that already has an Autograd kernel from this library.
//
// Forward: the op below autograd; outputs other than the loss take no gradient. Backward: the forward's
// `dlogp` output (dl/dlogp + beta_loss · dk3/dlogp at the forward's log-probs, 0 on masked-out
// tokens) times row_scale and the incoming gradient: g = dlogp · (grad_loss · row_scale)[:, None], cast
// to logp's dtype. pama_policy_loss_backward computes the same product (the same bits) from Ã for
// callers that need the gradient at other log-probs (pama_ext.fused_linear). A second derivative
// raises (the coefficient's own derivative is not computed), as for every op of the library.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace pama {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::string double_backward_message(const char* op) {
  return std::string("pama_ext.") + op +
         ": double backward is not supported (its backward is a fused kernel that is not itself "
         "differentiable); compute higher-order derivatives with the pama_ext.reference implementation instead";
}

// dlogp · scale[:, None] where the backward records a graph (create_graph=True): the first derivative
// as usual; a second one (the product depends on logp through dlogp, which is not differentiated)
// raises instead of silently leaving that term out.
struct FirstOrderOnly : public torch::autograd::Function<FirstOrderOnly> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& dlogp, const at::Tensor& scale, const at::Tensor&) {
    return dlogp * scale.unsqueeze(-1);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, double_backward_message("pama_policy_loss"));
  }
};

using PolicyLossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using PolicyLossSig = PolicyLossOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double,
                                    double, double, bool, bool, const std::string&, const std::string&,
                                    const std::string&, double, bool, const c10::optional<at::Tensor>&, double, bool);

struct PolicyLossFunction : public torch::autograd::Function<PolicyLossFunction> {
  // logp is the only differentiable input; the rest ride along as non-tensor state of the call.
  template <typename Call>
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logp, const Call& call) {
    PolicyLossOut out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = call(logp);
    }
    auto& [loss, metrics, a_tilde, row_scale, dlogp] = out;
    ctx->mark_non_differentiable({metrics, a_tilde, row_scale, dlogp});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({dlogp, row_scale, logp});
    return {loss, metrics, a_tilde, row_scale, dlogp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return {at::Tensor(), at::Tensor()};  // one per forward argument
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &dlogp = saved[0], &row_scale = saved[1], &logp = saved[2];
    const at::Tensor scale = grad_loss.to(dlogp.scalar_type()) * row_scale;
    const at::Tensor g = at::GradMode::is_enabled() ? FirstOrderOnly::apply(dlogp, scale, logp)
                                                    : dlogp * scale.unsqueeze(-1);
    return {g.to(logp.scalar_type()), at::Tensor()};
  }
};

PolicyLossOut policy_loss_autograd(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                                   const at::Tensor& mask, const c10::optional<at::Tensor>& ref_logp,
                                   const c10::optional<at::Tensor>& prefs, double eps_lo, double eps_hi,
                                   double dual_clip, bool noon, bool whiten, const std::string& method,
                                   const std::string& granularity, const std::string& agg, double beta_loss,
                                   bool check_finite, const c10::optional<at::Tensor>& global_stats,
                                   double cagrad_c, bool return_a_tilde) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pama_ext::pama_policy_loss", "")
                             .typed<PolicyLossSig>();
  auto call = [&](const at::Tensor& lp) {
    return op.call(lp, old_logp, advantages, mask, ref_logp, prefs, eps_lo, eps_hi, dual_clip, noon, whiten,
                   method, granularity, agg, beta_loss, check_finite, global_stats, cagrad_c, return_a_tilde);
  };
  // Only logp gets a gradient (the schema's contract): the other tensors are read under the guard of
  // the forward, so a gradient flowing to them is never recorded.
  const variable_list out = PolicyLossFunction::apply(logp, call);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---- multi_value_loss: backward = the multi_value_loss_backward op on the saved inputs ----------
using ValueLossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ValueLossSig = ValueLossOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  const std::string&, bool, const c10::optional<at::Tensor>&);
using ValueLossBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, double);

struct ValueLossFunction : public torch::autograd::Function<ValueLossFunction> {
  template <typename Call>
  static variable_list forward(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& old_values,
                               const at::Tensor& returns, const at::Tensor& mask, double clip, const Call& call) {
    ValueLossOut out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = call(values);
    }
    auto& [loss, metrics, row_scale] = out;
    ctx->mark_non_differentiable({metrics, row_scale});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({values, old_values, returns, mask, row_scale});
    ctx->saved_data["clip"] = clip;
    return {loss, metrics, row_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(6);  // one per forward argument after ctx
    if (!grads[0].defined()) return none;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pama_ext::multi_value_loss_backward", "")
                               .typed<ValueLossBackwardSig>();
    const auto s = ctx->get_saved_variables();
    const double clip = ctx->saved_data["clip"].toDouble();
    // With create_graph the backward op goes through its own autograd (a second derivative raises,
    // op_table.not_twice_differentiable); otherwise straight to the kernel.
    if (at::GradMode::is_enabled()) {
      none[0] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], clip);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      none[0] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], clip);
    }
    return none;
  }
};

ValueLossOut value_loss_autograd(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                                 const at::Tensor& mask, double clip, const std::string& agg, bool check_finite,
                                 const c10::optional<at::Tensor>& denominators) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pama_ext::multi_value_loss", "")
                             .typed<ValueLossSig>();
  auto call = [&](const at::Tensor& v) {
    return op.call(v, old_values, returns, mask, clip, agg, check_finite, denominators);
  };
  // values is the differentiable input; the other tensors are saved for the backward op only
  const variable_list out = ValueLossFunction::apply(values, old_values.detach(), returns.detach(), mask, clip, call);
  return {out[0], out[1], out[2]};
}

}  // namespace

void register_autograd_impls(torch::Library& m) {
  m.impl("pama_policy_loss", &policy_loss_autograd);
  m.impl("multi_value_loss", &value_loss_autograd);
}

}  // namespace pama
