// preference_ops.cpp — §6-§7 preference-data ops: argument checks and the device-independent op
// bodies (run on the launcher table of the inputs' device, see ops.h). Schemas: registration.cpp;
// CPU kernels: cpu/preference.cpp.
//
//   multi_dpo_loss (+ backward)  per-objective DPO losses on shared pairs, and dL_i/dh (algorithms §7)
//   gradient_gram                G = [<g_i, g_j>] over lists of per-parameter gradients, one pass
//   combine_gradients            p.grad = Σ_i a_i g_i over the same lists, one pass, in place
//   gram_weights                 linear / MGDA / CAGrad / RACO / PCGrad weights from G (algorithms §6)
#include "preference_ops.h"

#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "pama_math.h"

namespace pama {


namespace {


// ---- argument checks (messages name the op and the argument) -----------------------------------
void need_real(const at::Tensor& t, const char* op, const std::string& name, const char* what) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.scalar_type() != at::kBool && !t.is_complex(), op, ": ", name, " must have an integer or floating ",
              "dtype (", what, "), got ", t.scalar_type());
}
void need_device(const at::Tensor& t, const at::Device& d, const char* op, const std::string& name,
                 const char* like) {
  TORCH_CHECK(t.device() == d, op, ": ", name, " is on ", t.device(), " but ", like, " is on ", d);
}
// optional [B] lengths -> contiguous acc copy (or undefined)
at::Tensor lengths_acc(const c10::optional<at::Tensor>& len, int64_t B, at::ScalarType acc, const at::Device& d,
                       const char* op, const char* name) {
  if (!len.has_value() || !len->defined()) return at::Tensor();
  need_real(*len, op, name, "response lengths");
  check_shape(*len, {B}, op, name, "[B]");
  need_device(*len, d, op, name, "policy_chosen_logps");
  return len->to(acc).contiguous();
}

constexpr const char* kDPO = "multi_dpo_loss";
constexpr const char* kDPOB = "multi_dpo_loss_backward";
constexpr const char* kGG = "gradient_gram";
constexpr const char* kCG = "combine_gradients";
constexpr const char* kGW = "gram_weights";

std::tuple<at::Tensor, at::Tensor> multi_dpo_loss(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc,
                                                  const at::Tensor& rr, const at::Tensor& labels, double beta,
                                                  const c10::optional<at::Tensor>& chosen_lengths,
                                                  const c10::optional<at::Tensor>& rejected_lengths) {
  check_float(pc, kDPO, "policy_chosen_logps");
  TORCH_CHECK(pc.dim() == 1, kDPO, ": policy_chosen_logps must be 1-D [B] (summed log-probs per pair), got shape ",
              shape_str(pc));
  const int64_t B = pc.size(0);
  const at::Device dev = pc.device();
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&pr, "policy_rejected_logps"}, {&rc, "ref_chosen_logps"}, {&rr, "ref_rejected_logps"}};
  for (const auto& [t, name] : others) {
    check_float(*t, kDPO, name);
    TORCH_CHECK(t->scalar_type() == pc.scalar_type(), kDPO, ": ", name, " must have the dtype of policy_chosen_logps (",
                pc.scalar_type(), "), got ", t->scalar_type());
    check_shape(*t, {B}, kDPO, name, "[B] (the shape of policy_chosen_logps)");
    need_device(*t, dev, kDPO, name, "policy_chosen_logps");
  }
  need_real(labels, kDPO, "labels", "+1 chosen wins, -1 rejected wins, 0 tie");
  TORCH_CHECK(labels.dim() == 2, kDPO, ": labels must be 2-D [n, B], got shape ", shape_str(labels));
  check_num_objectives(labels.size(0), kDPO, "labels");
  const int64_t n = labels.size(0);
  check_shape(labels, {n, B}, kDPO, "labels", "[n, B] (B from policy_chosen_logps)");
  need_device(labels, dev, kDPO, "labels", "policy_chosen_logps");
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, kDPO, ": beta must be finite and > 0, got ", beta);
  c10::OptionalDeviceGuard guard(dev);
  const auto acc = acc_type(pc.scalar_type());
  at::Tensor lc = lengths_acc(chosen_lengths, B, acc, dev, kDPO, "chosen_lengths");
  at::Tensor lr = lengths_acc(rejected_lengths, B, acc, dev, kDPO, "rejected_lengths");
  auto c_pc = pc.contiguous(), c_pr = pr.contiguous(), c_rc = rc.contiguous(), c_rr = rr.contiguous();
  at::Tensor lab = labels.to(acc).contiguous();
  auto opts = pc.options().dtype(acc);
  at::Tensor losses = at::empty({n}, opts), coef = at::empty({n, B}, opts);
  Launch L = backend_for_device(dev, kDPO);
  DpoLossParams p{c_pc.data_ptr(), c_pr.data_ptr(), c_rc.data_ptr(), c_rr.data_ptr(), lab.data_ptr(),
                  lc.defined() ? lc.data_ptr() : nullptr, lr.defined() ? lr.data_ptr() : nullptr,
                  n, B, beta, losses.data_ptr(), coef.data_ptr(), dtype_code(pc.scalar_type())};
  L.be.dpo_loss_forward(p, L.stream);
  return {losses, coef};
}

std::tuple<at::Tensor, at::Tensor> multi_dpo_loss_backward(const at::Tensor& grad_losses, const at::Tensor& coef,
                                                           const at::Tensor& pc,
                                                           const c10::optional<at::Tensor>& chosen_lengths,
                                                           const c10::optional<at::Tensor>& rejected_lengths) {
  check_float(pc, kDPOB, "policy_chosen_logps");
  TORCH_CHECK(pc.dim() == 1, kDPOB, ": policy_chosen_logps must be 1-D [B], got shape ", shape_str(pc));
  const int64_t B = pc.size(0);
  const at::Device dev = pc.device();
  const auto acc = acc_type(pc.scalar_type());
  TORCH_CHECK(coef.defined() && coef.dim() == 2 && coef.size(1) == B && coef.scalar_type() == acc, kDPOB,
              ": coef must be ", acc, " [n, B] (from multi_dpo_loss)");
  const int64_t n = coef.size(0);
  check_float(grad_losses, kDPOB, "grad_losses");
  check_shape(grad_losses, {n}, kDPOB, "grad_losses", "[n]");
  need_device(grad_losses, dev, kDPOB, "grad_losses", "policy_chosen_logps");
  need_device(coef, dev, kDPOB, "coef", "policy_chosen_logps");
  c10::OptionalDeviceGuard guard(dev);
  at::Tensor lc = lengths_acc(chosen_lengths, B, acc, dev, kDPOB, "chosen_lengths");
  at::Tensor lr = lengths_acc(rejected_lengths, B, acc, dev, kDPOB, "rejected_lengths");
  at::Tensor g = grad_losses.to(acc).contiguous(), cf = coef.contiguous();
  at::Tensor gc = at::empty({B}, pc.options()), gr = at::empty({B}, pc.options());
  if (B == 0) return {gc, gr};
  Launch L = backend_for_device(dev, kDPOB);
  DpoLossBackwardParams p{g.data_ptr(), cf.data_ptr(), lc.defined() ? lc.data_ptr() : nullptr,
                          lr.defined() ? lr.data_ptr() : nullptr, n, B, gc.data_ptr(), gr.data_ptr(),
                          dtype_code(pc.scalar_type())};
  L.be.dpo_loss_backward(p, L.stream);
  return {gc, gr};
}

// ---- gradient tables -----------------------------------------------------------------------
// A flat i-major list grads[i * K + k] of optional tensors, checked and made contiguous.
struct GradTable {
  int64_t n = 0, K = 0;
  std::vector<at::Tensor> held;  // contiguous tensors (undefined = zero)
  std::vector<const void*> ptrs;
  std::vector<int64_t> numel;  // [K]
  at::Tensor first;            // the first defined gradient (dtype/device), or undefined
};

std::string grad_name(int64_t idx, int64_t K) {
  return "grads[" + std::to_string(idx / K) + "][" + std::to_string(idx % K) + "]";
}

GradTable grad_table(const c10::List<c10::optional<at::Tensor>>& grads, int64_t n, const char* op) {
  check_num_objectives(n, op, "grads");
  const int64_t len = static_cast<int64_t>(grads.size());
  TORCH_CHECK(len % n == 0, op, ": grads holds ", len, " entries, not a multiple of num_objectives = ", n,
              " (one gradient per objective and parameter)");
  GradTable t;
  t.n = n;
  t.K = len / n;
  t.held.resize(len);
  t.ptrs.assign(len, nullptr);
  t.numel.assign(t.K, 0);
  std::vector<at::Tensor> col_first(t.K);
  std::string first_name;
  for (int64_t idx = 0; idx < len; ++idx) {
    const c10::optional<at::Tensor> g = grads.get(idx);
    if (!g.has_value() || !g->defined()) continue;
    const std::string name = grad_name(idx, t.K);
    check_float(*g, op, name);
    if (!t.first.defined()) {
      t.first = *g;
      first_name = name;
    }
    TORCH_CHECK(g->scalar_type() == t.first.scalar_type(), op, ": ", name, " has dtype ", g->scalar_type(),
                " but the other gradients are ", t.first.scalar_type(), "; all gradients must share one dtype");
    need_device(*g, t.first.device(), op, name, first_name.c_str());
    at::Tensor& cf = col_first[idx % t.K];
    if (!cf.defined()) {
      cf = *g;
      t.numel[idx % t.K] = g->numel();
    } else {
      TORCH_CHECK(g->sizes() == cf.sizes(), op, ": ", name, " has shape ", shape_str(*g), " but another objective's ",
                  "gradient of parameter ", idx % t.K, " has shape ", shape_str(cf),
                  "; every objective's gradient of a parameter has the parameter's shape");
    }
    t.held[idx] = g->contiguous();
    t.ptrs[idx] = t.held[idx].data_ptr();
  }
  return t;
}

at::Tensor gradient_gram(const c10::List<c10::optional<at::Tensor>>& grads, int64_t num_objectives) {
  GradTable t = grad_table(grads, num_objectives, kGG);
  const int64_t n = t.n;
  if (!t.first.defined()) return at::zeros({n, n}, at::TensorOptions().dtype(at::kFloat));
  const at::Device dev = t.first.device();
  c10::OptionalDeviceGuard guard(dev);
  Launch L = backend_for_device(dev, kGG);
  const int64_t block = L.be.gram_block;
  std::vector<int64_t> offset(t.K + 1, 0);
  for (int64_t k = 0; k < t.K; ++k) offset[k + 1] = offset[k] + (t.numel[k] + block - 1) / block;
  auto opts = t.first.options().dtype(acc_type(t.first.scalar_type()));
  at::Tensor partials = at::empty({std::max<int64_t>(1, offset[t.K] * gram_pairs(static_cast<int>(n)))}, opts);
  at::Tensor G = at::empty({n, n}, opts);
  GradGramParams p{t.ptrs.data(), t.numel.data(), offset.data(), n, t.K, block, partials.data_ptr(), G.data_ptr(),
                   dtype_code(t.first.scalar_type())};
  L.be.gradient_gram(p, L.stream);
  return G;
}

void combine_gradients(const c10::List<c10::optional<at::Tensor>>& grads, int64_t num_objectives,
                       const at::Tensor& coeffs, at::TensorList out, bool accumulate) {
  GradTable t = grad_table(grads, num_objectives, kCG);
  const int64_t n = t.n, K = t.K;
  TORCH_CHECK(static_cast<int64_t>(out.size()) == K, kCG, ": out (the parameters' .grad) has ", out.size(),
              " tensors but grads has ", K, " per objective");
  if (K == 0) return;
  for (int64_t k = 0; k < K; ++k) {
    const std::string name = "out[" + std::to_string(k) + "]";
    check_float(out[k], kCG, name);
    TORCH_CHECK(out[k].scalar_type() == out[0].scalar_type(), kCG, ": ", name, " has dtype ", out[k].scalar_type(),
                " but out[0] has ", out[0].scalar_type());
    need_device(out[k], out[0].device(), kCG, name, "out[0]");
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& g = t.held[i * K + k];
      if (!g.defined()) continue;
      TORCH_CHECK(g.sizes() == out[k].sizes(), kCG, ": ", grad_name(i * K + k, K), " has shape ", shape_str(g),
                  " but params[", k, "] has shape ", shape_str(out[k]));
    }
  }
  const at::Device dev = out[0].device();
  if (t.first.defined()) need_device(t.first, dev, kCG, "grads", "params (out)");
  check_float(coeffs, kCG, "coeffs");
  check_shape(coeffs, {n}, kCG, "coeffs", "[n]");
  need_device(coeffs, dev, kCG, "coeffs", "params (out)");
  c10::OptionalDeviceGuard guard(dev);
  const at::ScalarType gdt = t.first.defined() ? t.first.scalar_type() : out[0].scalar_type();
  const at::ScalarType odt = out[0].scalar_type();
  const auto acc = (gdt == at::kDouble || odt == at::kDouble) ? at::kDouble : at::kFloat;
  at::Tensor c = coeffs.to(acc).contiguous();
  std::vector<at::Tensor> dst(K);  // contiguous targets (a copy for a non-contiguous .grad)
  std::vector<void*> outs(K);
  for (int64_t k = 0; k < K; ++k) {
    dst[k] = out[k].is_contiguous() ? out[k] : out[k].contiguous();
    outs[k] = dst[k].data_ptr();
    t.numel[k] = out[k].numel();
  }
  Launch L = backend_for_device(dev, kCG);
  CombineGradsParams p{t.ptrs.data(), outs.data(), t.numel.data(), c.data_ptr(), n, K, accumulate,
                       dtype_code(gdt), dtype_code(odt)};
  L.be.combine_gradients(p, L.stream);
  for (int64_t k = 0; k < K; ++k)
    if (!out[k].is_contiguous()) out[k].copy_(dst[k]);
}

at::Tensor gram_weights_op(const at::Tensor& gram, const c10::optional<at::Tensor>& prefs, const std::string& method,
                        double c) {
  check_float(gram, kGW, "G");
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == gram.size(1), kGW, ": G must be a square [n, n] Gram matrix, got ",
              "shape ", shape_str(gram));
  const int64_t n = gram.size(0);
  check_num_objectives(n, kGW, "G");
  const int m = parse_method(method, kGW, /*from_gram=*/true);
  TORCH_CHECK_VALUE(std::isfinite(c) && c >= 0, kGW, ": c must be finite and >= 0, got ", c);
  const at::Device dev = gram.device();
  c10::OptionalDeviceGuard guard(dev);
  const auto acc = acc_type(gram.scalar_type());
  // the solvers compute in float64 internally (gram_solvers.h) and return the accumulation dtype
  at::Tensor G = gram.to(acc).contiguous();
  at::Tensor w;
  if (prefs.has_value() && prefs->defined()) {
    check_float(*prefs, kGW, "w");
    check_shape(*prefs, {n}, kGW, "w", "[n]");
    need_device(*prefs, dev, kGW, "w", "G");
    w = prefs->to(acc).contiguous();
  }
  auto opts = gram.options().dtype(acc);
  at::Tensor out = at::empty({n}, opts);
  Launch L = backend_for_device(dev, kGW);
  const at::Tensor scratch = solver_scratch(L, dev);
  GramWeightsParams p{G.data_ptr(), w.defined() ? w.data_ptr() : nullptr, static_cast<int>(n), m, c,
                      out.data_ptr(), acc == at::kDouble, scratch_ptr(scratch)};
  L.be.gram_weights(p, L.stream);
  return out;
}

}  // namespace

void register_preference_impls(torch::Library& m) {
  m.impl("multi_dpo_loss", &multi_dpo_loss);
  m.impl("multi_dpo_loss_backward", &multi_dpo_loss_backward);
  m.impl("gradient_gram", &gradient_gram);
  m.impl("combine_gradients", &combine_gradients);
  m.impl("gram_weights", &gram_weights_op);
}

}  // namespace pama
