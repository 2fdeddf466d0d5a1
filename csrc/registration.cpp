// registration.cpp — the one registration file: every schema of torch.ops.pama_ext (the RL ops of
// ops.cpp and the preference ops of preference_ops.cpp), their CPU implementations (the op bodies
// run the CPU launcher tables of cpu/tables.cpp; cuda/ops_cuda.cpp registers the same bodies for
// CUDA), the vocabulary ops that pama_ext.vocab is tested against, and the Python module init.
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"
#include "pama_math.h"
#include "preference_ops.h"

TORCH_LIBRARY(pama_ext, m) {
  m.def("token_rewards(Tensor scores, Tensor old_logp, Tensor ref_logp, Tensor mask, float beta_kl) -> Tensor");
  m.def("multi_gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def(
      "multi_gae_backward(Tensor grad_advantages, Tensor grad_returns, Tensor mask, float gamma, float lam) "
      "-> (Tensor, Tensor)");
  m.def(
      "objective_stats(Tensor advantages, Tensor logp, Tensor old_logp, Tensor mask, float eps_hi, bool whiten, "
      "bool noon, Tensor? moments=None, bool with_gram=True) -> Tensor");
  m.def("objective_moments(Tensor advantages, Tensor mask) -> Tensor");
  m.def("pareto_weights(Tensor stats, Tensor? prefs, str method, str granularity, float cagrad_c=0.4) -> Tensor");
  m.def(
      "pama_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, "
      "Tensor? prefs, float eps_lo, float eps_hi, float dual_clip, bool noon, bool whiten, str method, "
      "str granularity, str agg, float beta_loss, bool check_finite, Tensor? global_stats=None, "
      "float cagrad_c=0.4) "
      "-> (Tensor loss, Tensor metrics, Tensor a_tilde, Tensor row_scale)");
  m.def(
      "pama_policy_loss_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor? ref_logp, Tensor mask, "
      "Tensor a_tilde, Tensor row_scale, float eps_lo, float eps_hi, float dual_clip, float beta_loss) -> Tensor");
  m.def(
      "multi_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip, str agg, "
      "bool check_finite, Tensor? denominators=None) -> (Tensor loss, Tensor metrics, Tensor row_scale)");
  m.def(
      "multi_value_loss_backward(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
      "Tensor row_scale, float clip) -> Tensor");
}


// Which device kernels are compiled in (for `pama-ext info`).
namespace {
bool has_cuda_kernels() { return pama::has_cuda_backend(); }
// The vocabularies and layouts defined in pama_math.h, for pama_ext.vocab to be tested against.
std::vector<std::string> weighting_methods() {
  return std::vector<std::string>(pama::kMethodNames, pama::kMethodNames + pama::kNumMethods);
}
std::vector<int64_t> stats_layout(int64_t n) {
  TORCH_CHECK_VALUE(n >= 1 && n <= pama::kMaxObjectives, "stats_layout: n must be in [1, ", pama::kMaxObjectives,
                    "], got ", n);
  const pama::StatsLayout L(static_cast<int>(n));
  return {L.count(), L.num_seqs(), L.mean(), L.var(), L.abar(), L.pos(), L.ctok(), L.cseq(), L.gram(), L.size()};
}
}  // namespace
TORCH_LIBRARY_FRAGMENT(pama_ext, m) {
  m.def("has_cuda_kernels() -> bool", [] { return has_cuda_kernels(); });
  m.def("weighting_methods() -> str[]", &weighting_methods);
  m.def("stats_layout(int n) -> int[]", &stats_layout);
}

TORCH_LIBRARY_FRAGMENT(pama_ext, m) {
  m.def(
      "multi_dpo_loss(Tensor policy_chosen_logps, Tensor policy_rejected_logps, Tensor ref_chosen_logps, "
      "Tensor ref_rejected_logps, Tensor labels, float beta, Tensor? chosen_lengths, Tensor? rejected_lengths) "
      "-> (Tensor losses, Tensor coef)");
  m.def(
      "multi_dpo_loss_backward(Tensor grad_losses, Tensor coef, Tensor policy_chosen_logps, "
      "Tensor? chosen_lengths, Tensor? rejected_lengths) -> (Tensor grad_chosen, Tensor grad_rejected)");
  m.def("gradient_gram(Tensor?[] grads, int num_objectives) -> Tensor");
  m.def(
      "combine_gradients(Tensor?[] grads, int num_objectives, Tensor coeffs, Tensor(a!)[] out, bool accumulate) "
      "-> ()");
  m.def("gram_weights(Tensor G, Tensor? w, str method, float c) -> Tensor");
}

TORCH_LIBRARY_IMPL(pama_ext, CPU, m) {
  pama::register_impls(m);
  pama::register_preference_impls(m);
}

// The extension is imported as the Python module pama_ext._C; loading it runs the registrations
// above. It defines no Python functions of its own: everything is reached through torch.ops.
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pama_ext compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
