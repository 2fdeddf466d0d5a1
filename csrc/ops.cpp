// ops.cpp — schemas of torch.ops.pama_ext.*, argument checks, the device-independent op bodies
// (stages run on a launcher table) and the CPU launchers (at::parallel_for over chunks).
//
// Data flow of one PPO step, as ops:
//   token_rewards -> multi_gae -> objective_stats -> pareto_weights -> pama_policy_loss (+ backward)
//                                                                  -> multi_value_loss (+ backward)
// pama_policy_loss runs the statistics and weight stages internally, on device, with no host sync.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "checks.h"
#include "pama_math.h"

namespace pama {

// =================================================================================================
// Backend selection
// =================================================================================================
namespace {
const Backend* g_cuda_table = nullptr;
StreamGetter g_cuda_stream = nullptr;
}  // namespace

void set_cuda_backend(const Backend* table, StreamGetter stream) {
  g_cuda_table = table;
  g_cuda_stream = stream;
}
bool has_cuda_backend() { return g_cuda_table != nullptr; }

namespace cpu {
const Backend& table();
}

namespace {

struct Launch {
  const Backend& be;
  void* stream;
};

Launch backend_for(const at::Tensor& t, const char* op) {
  if (t.is_cpu()) return {cpu::table(), nullptr};
  TORCH_CHECK(t.is_cuda(), op, ": tensors on device ", t.device(), " are not supported (cpu or cuda)");
  TORCH_CHECK(g_cuda_table != nullptr, op,
              ": pama_ext was built without CUDA kernels; rebuild with a CUDA-enabled torch "
              "(PAMA_EXT_CUDA=1) or move the inputs to the CPU");
  return {*g_cuda_table, g_cuda_stream()};
}

// =================================================================================================
// Argument checks (shared by every device; the generic ones are in checks.h). Messages name the op
// and the argument.
// =================================================================================================
void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                const char* like_name) {
  check_float(t, op, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name,
              " (", like.scalar_type(), "), got ", t.scalar_type(),
              "; all floating inputs of one call share a dtype");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device());
}

// mask: [B, T], any dtype (nonzero = in), same device. Returns a contiguous bool copy or view.
at::Tensor bool_mask(const at::Tensor& mask, int64_t B, int64_t T, const at::Tensor& like, const char* like_name,
                     const char* op) {
  check_defined(mask, op, "mask");
  check_shape(mask, {B, T}, op, "mask", "[B, T]");
  TORCH_CHECK(mask.device() == like.device(), op, ": mask is on ", mask.device(), " but ", like_name, " is on ",
              like.device());
  TORCH_CHECK(!mask.is_complex(), op, ": mask must be bool or real, got ", mask.scalar_type());
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

// Non-finite values on masked-in positions are an error naming the argument (SPEC §9). `checks`
// lists (name, tensor, kind) entries (undefined tensors are skipped):
//   kFinite    [..., B, T] tensors are checked where `mask_b` is set, 1-d ones everywhere;
//   kPrefs     a 1-d prefs vector: finite, and then >= 0 and not all 0 (SPEC §4 linear weights,
//              used as given: no normalisation, so the loss scales with them);
//   kVariance  the per-objective variances of the statistics: +inf means the float32 (acc)
//              variance of the advantages overflowed, and whitening would divide them to 0.
// On CPU this is a fused loop per tensor that stops at the first hit. On a device every flag is
// computed there and the stacked flags come back in one host read, the only host read of these
// ops, which is why check_finite=False exists (CUDA graphs, sync-free training).
enum class CheckKind { kFinite, kPrefs, kVariance };
struct FiniteCheck {
  const char* name;
  at::Tensor x;
  CheckKind kind = CheckKind::kFinite;
};

bool any_nonfinite_cpu(const at::Tensor& x, const at::Tensor& mask_b) {
  const int64_t BT = x.dim() == 1 ? x.numel() : mask_b.numel();
  if (BT == 0) return false;
  const int64_t reps = x.numel() / BT;
  const bool* m = x.dim() == 1 ? nullptr : mask_b.data_ptr<bool>();
  bool found = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "check_finite", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t r = 0; r < reps && !found; ++r)
      for (int64_t k = 0; k < BT; ++k)
        if ((m == nullptr || m[k]) && !std::isfinite(static_cast<double>(p[r * BT + k]))) {
          found = true;
          break;
        }
  });
  return found;
}

// A (finite) prefs vector that is negative somewhere or sums to <= 0, on the CPU.
bool prefs_invalid_cpu(const at::Tensor& x) {
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "check_prefs", [&] {
    const at::Tensor c = x.contiguous();
    const scalar_t* p = c.data_ptr<scalar_t>();
    double sum = 0;
    for (int64_t k = 0; k < c.numel(); ++k) {
      const double v = static_cast<double>(p[k]);
      bad = bad || v < 0;
      sum += v;
    }
    bad = bad || !(sum > 0);
  });
  return bad;
}

void check_finite_all(std::initializer_list<FiniteCheck> checks, const at::Tensor& mask_b, const char* op) {
  // failure f of a check: 0 = non-finite, 1 = prefs negative or all zero
  auto fail = [op](const FiniteCheck& c, int f) {
    if (c.kind == CheckKind::kVariance)
      TORCH_CHECK_VALUE(false, op, ": ", c.name, " has a variance that overflows ", c.x.scalar_type(),
                        " (|advantages| around 1e19 or more), so whitening would divide every advantage to 0; "
                        "rescale the advantages or pass float64 inputs (check_finite=False skips this check)");
    if (f == 1)
      TORCH_CHECK_VALUE(false, op, ": ", c.name, " must be >= 0 and not all 0 (the weights of method 'linear', used "
                        "as given), got a negative entry or all zeros (pass check_finite=False to skip this check)");
    TORCH_CHECK_VALUE(false, op, ": ", c.name,
                      " has NaN or Inf on a masked-in position (pass check_finite=False to skip this check)");
  };
  if (mask_b.is_cpu()) {
    for (const auto& c : checks) {
      if (!c.x.defined()) continue;
      if (any_nonfinite_cpu(c.x, mask_b)) fail(c, 0);
      if (c.kind == CheckKind::kPrefs && prefs_invalid_cpu(c.x)) fail(c, 1);
    }
    return;
  }
  std::vector<at::Tensor> flags;
  std::vector<std::pair<const FiniteCheck*, int>> what;
  for (const auto& c : checks) {
    if (!c.x.defined()) continue;
    at::Tensor bad = at::isfinite(c.x).logical_not_();
    if (c.x.dim() > 1) bad.logical_and_(mask_b);
    flags.push_back(bad.any());
    what.emplace_back(&c, 0);
    if (c.kind == CheckKind::kPrefs) {
      flags.push_back(c.x.lt(0).any().logical_or_(c.x.sum().le(0)));
      what.emplace_back(&c, 1);
    }
  }
  if (flags.empty()) return;
  const at::Tensor host = at::stack(flags).to(at::kCPU);  // the one host read
  const bool* h = host.data_ptr<bool>();
  for (size_t i = 0; i < what.size(); ++i)
    if (h[i]) fail(*what[i].first, what[i].second);
}

int parse_granularity(const std::string& s, const char* op) {
  if (s == "token") return kGranToken;
  if (s == "sequence") return kGranSequence;
  if (s == "batch") return kGranBatch;
  TORCH_CHECK_VALUE(false, op, ": granularity must be one of 'token', 'sequence', 'batch', got '", s, "'");
  return -1;  // unreachable
}
int parse_agg(const std::string& s, const char* op) {
  if (s == "token-mean") return kAggTokenMean;
  if (s == "seq-mean-token-mean") return kAggSeqMeanTokenMean;
  if (s == "seq-mean-token-sum") return kAggSeqMeanTokenSum;
  TORCH_CHECK_VALUE(false, op, ": agg must be one of 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum', got '",
                    s, "'");
  return -1;  // unreachable
}

// prefs: [n] finite floats -> contiguous acc-typed copy on `like`'s device (or undefined).
at::Tensor prefs_acc(const c10::optional<at::Tensor>& prefs, int64_t n, at::ScalarType acc, const at::Tensor& like,
                     const char* like_name, const char* op) {
  if (!prefs.has_value() || !prefs->defined()) return at::Tensor();
  const at::Tensor& p = *prefs;
  check_float(p, op, "prefs");
  check_shape(p, {n}, op, "prefs", "[n]");
  TORCH_CHECK(p.device() == like.device(), op, ": prefs is on ", p.device(), " but ", like_name, " is on ",
              like.device());
  return p.to(acc).contiguous();
}

int64_t chunks_per_row(const Backend& be, int64_t T, int64_t& chunk_len) {
  chunk_len = std::max<int64_t>(1, std::min<int64_t>(be.chunk_len, T));
  return T == 0 ? 1 : (T + chunk_len - 1) / chunk_len;
}

// =================================================================================================
// Op bodies
// =================================================================================================
constexpr const char* kTR = "token_rewards";
constexpr const char* kGAE = "multi_gae";
constexpr const char* kST = "objective_stats";
constexpr const char* kPW = "pareto_weights";
constexpr const char* kPL = "pama_policy_loss";
constexpr const char* kVL = "multi_value_loss";

at::Tensor token_rewards(const at::Tensor& scores, const at::Tensor& old_logp, const at::Tensor& ref_logp,
                         const at::Tensor& mask, double beta_kl) {
  check_float(old_logp, kTR, "old_logp");
  check_rank(old_logp, 2, kTR, "old_logp", "[B, T]");
  const int64_t B = old_logp.size(0), T = old_logp.size(1);
  check_like(scores, old_logp, kTR, "scores", "old_logp");
  check_rank(scores, 2, kTR, "scores", "[n, B]");
  check_num_objectives(scores.size(0), kTR, "scores");
  const int64_t n = scores.size(0);
  check_shape(scores, {n, B}, kTR, "scores", "[n, B] (B from old_logp)");
  check_like(ref_logp, old_logp, kTR, "ref_logp", "old_logp");
  check_shape(ref_logp, {B, T}, kTR, "ref_logp", "[B, T] (the shape of old_logp)");
  c10::OptionalDeviceGuard guard(old_logp.device());
  at::Tensor m = bool_mask(mask, B, T, old_logp, "old_logp", kTR);
  auto s = scores.contiguous(), o = old_logp.contiguous(), r = ref_logp.contiguous();
  at::Tensor out = at::empty({n, B, T}, old_logp.options());
  if (out.numel() == 0) return out;
  Launch L = backend_for(old_logp, kTR);
  TokenRewardsParams p{s.data_ptr(), o.data_ptr(), r.data_ptr(), m.data_ptr<bool>(), out.data_ptr(),
                       n, B, T, beta_kl, dtype_code(old_logp.scalar_type())};
  L.be.token_rewards(p, L.stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor> multi_gae(const at::Tensor& rewards, const at::Tensor& values,
                                             const at::Tensor& mask, double gamma, double lam) {
  check_float(values, kGAE, "values");
  check_rank(values, 3, kGAE, "values", "[n, B, T]");
  check_num_objectives(values.size(0), kGAE, "values");
  const int64_t n = values.size(0), B = values.size(1), T = values.size(2);
  check_like(rewards, values, kGAE, "rewards", "values");
  check_shape(rewards, {n, B, T}, kGAE, "rewards", "[n, B, T] (the shape of values)");
  check_unit_interval(gamma, kGAE, "gamma");
  check_unit_interval(lam, kGAE, "lam");
  c10::OptionalDeviceGuard guard(values.device());
  at::Tensor m = bool_mask(mask, B, T, values, "values", kGAE);
  auto r = rewards.contiguous(), v = values.contiguous();
  at::Tensor adv = at::empty_like(v), ret = at::empty_like(v);
  if (v.numel() == 0) return {adv, ret};
  Launch L = backend_for(values, kGAE);
  GaeParams p{r.data_ptr(), v.data_ptr(), m.data_ptr<bool>(), adv.data_ptr(), ret.data_ptr(),
              n, B, T, gamma, lam, dtype_code(values.scalar_type())};
  L.be.multi_gae(p, L.stream);
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> multi_gae_backward(const at::Tensor& grad_adv, const at::Tensor& grad_ret,
                                                      const at::Tensor& mask, double gamma, double lam) {
  const char* op = "multi_gae_backward";
  check_float(grad_adv, op, "grad_advantages");
  check_rank(grad_adv, 3, op, "grad_advantages", "[n, B, T]");
  const int64_t n = grad_adv.size(0), B = grad_adv.size(1), T = grad_adv.size(2);
  check_like(grad_ret, grad_adv, op, "grad_returns", "grad_advantages");
  check_shape(grad_ret, {n, B, T}, op, "grad_returns", "[n, B, T]");
  c10::OptionalDeviceGuard guard(grad_adv.device());
  at::Tensor m = bool_mask(mask, B, T, grad_adv, "grad_advantages", op);
  auto ga = grad_adv.contiguous(), gr = grad_ret.contiguous();
  at::Tensor g_r = at::empty_like(ga), g_v = at::empty_like(ga);
  if (ga.numel() == 0) return {g_r, g_v};
  Launch L = backend_for(grad_adv, op);
  GaeBackwardParams p{ga.data_ptr(), gr.data_ptr(), m.data_ptr<bool>(), g_r.data_ptr(), g_v.data_ptr(),
                      n, B, T, gamma, lam, dtype_code(grad_adv.scalar_type())};
  L.be.multi_gae_backward(p, L.stream);
  return {g_r, g_v};
}

// Checked, contiguous inputs of the statistics / policy-loss ops.
struct PolicyInputs {
  at::Tensor logp, old_logp, advantages, mask, ref_logp;
  int64_t n, B, T;
};

PolicyInputs policy_inputs(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                           const at::Tensor& mask, const c10::optional<at::Tensor>& ref_logp, const char* op) {
  check_float(logp, op, "logp");
  check_rank(logp, 2, op, "logp", "[B, T]");
  const int64_t B = logp.size(0), T = logp.size(1);
  check_like(old_logp, logp, op, "old_logp", "logp");
  check_shape(old_logp, {B, T}, op, "old_logp", "[B, T] (the shape of logp)");
  check_like(advantages, logp, op, "advantages", "logp");
  check_rank(advantages, 3, op, "advantages", "[n, B, T]");
  check_num_objectives(advantages.size(0), op, "advantages");
  const int64_t n = advantages.size(0);
  check_shape(advantages, {n, B, T}, op, "advantages", "[n, B, T]");
  PolicyInputs in;
  in.n = n;
  in.B = B;
  in.T = T;
  in.mask = bool_mask(mask, B, T, logp, "logp", op);
  in.logp = logp.contiguous();
  in.old_logp = old_logp.contiguous();
  in.advantages = advantages.contiguous();
  if (ref_logp.has_value() && ref_logp->defined()) {
    check_like(*ref_logp, logp, op, "ref_logp", "logp");
    check_shape(*ref_logp, {B, T}, op, "ref_logp", "[B, T] (the shape of logp)");
    in.ref_logp = ref_logp->contiguous();
  }
  return in;
}

// Runs the two statistics stages; returns (stats, row_count, seq_weights). With `moments` (the global
// [count, num_seqs, mean(n), var(n)] of a data-parallel group, SPEC §8) the moments stage is not
// run: its first 2+2n entries are the supplied ones and the per-row token counts (its other
// output, exact integers) come from one sum over the mask. Whitening then uses the global moments
// and every indicator entry (abar, pos, ctok, cseq, gram) is this shard's contribution to the
// global mean: the sum of the shards' vectors is the global statistic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_stats(const Launch& L, const PolicyInputs& in, double eps_hi,
                                                         bool whiten, bool noon, bool with_gram,
                                                         const at::Tensor& moments = at::Tensor()) {
  const auto acc = acc_type(in.logp.scalar_type());
  auto opts = in.logp.options().dtype(acc);
  int64_t chunk_len = 0;
  const int64_t cpr = chunks_per_row(L.be, in.T, chunk_len);
  const int64_t psize = std::max<int64_t>(MomentsPartial(in.n).size(), IndicatorPartial(in.n).size(with_gram));
  at::Tensor stats = at::empty({StatsLayout(in.n).size()}, opts);
  at::Tensor row_count = at::empty({in.B}, opts);
  at::Tensor seq_weights = at::empty({in.B, in.n}, opts);
  at::Tensor partials = at::empty({std::max<int64_t>(1, in.B * cpr * psize)}, opts);
  StatsParams p{in.advantages.data_ptr(), in.logp.data_ptr(), in.old_logp.data_ptr(), in.mask.data_ptr<bool>(),
                in.n, in.B, in.T, chunk_len, cpr, eps_hi, whiten, noon, with_gram,
                stats.data_ptr(), row_count.data_ptr(), seq_weights.data_ptr(), partials.data_ptr(),
                dtype_code(in.logp.scalar_type())};
  if (moments.defined()) {
    stats.narrow(0, 0, moments.size(0)).copy_(moments);
    at::sum_out(row_count, in.mask, {1}, /*keepdim=*/false, acc);
  } else {
    L.be.stats_moments(p, L.stream);
  }
  L.be.stats_indicators(p, L.stream);
  return {stats, row_count, seq_weights};
}

at::Tensor run_weights(const Launch& L, const at::Tensor& stats, const at::Tensor& prefs, int64_t n, int method,
                       int granularity, double cagrad_c) {
  at::Tensor weights = at::empty({n}, stats.options());
  WeightsParams p{stats.data_ptr(), prefs.defined() ? prefs.data_ptr() : nullptr, static_cast<int>(n), method,
                  granularity, cagrad_c, weights.data_ptr(), stats.scalar_type() == at::kDouble};
  L.be.pareto_weights(p, L.stream);
  return weights;
}

// A statistics vector (or its moments prefix) supplied by the caller (data parallelism, SPEC §8):
// `len` entries of the accumulation dtype of `like`, on its device. Returns a contiguous view.
at::Tensor supplied_stats(const c10::optional<at::Tensor>& t, int64_t len, const at::Tensor& like, const char* op,
                          const char* name, const char* meaning) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const auto acc = acc_type(like.scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == len, op, ": ", name, " must be ", meaning, " of ", len,
                    " entries, got shape ", shape_str(*t));
  TORCH_CHECK_TYPE(t->scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulation dtype of ",
                   like.scalar_type(), " inputs), got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
                    t->device());
  return t->contiguous();
}

at::Tensor objective_moments(const at::Tensor& advantages, const at::Tensor& mask) {
  const char* op = "objective_moments";
  check_float(advantages, op, "advantages");
  check_rank(advantages, 3, op, "advantages", "[n, B, T]");
  check_num_objectives(advantages.size(0), op, "advantages");
  c10::OptionalDeviceGuard guard(advantages.device());
  PolicyInputs in;
  in.n = advantages.size(0);
  in.B = advantages.size(1);
  in.T = advantages.size(2);
  in.mask = bool_mask(mask, in.B, in.T, advantages, "advantages", op);
  in.advantages = advantages.contiguous();
  Launch L = backend_for(advantages, op);
  const auto acc = acc_type(in.advantages.scalar_type());
  auto opts = in.advantages.options().dtype(acc);
  int64_t chunk_len = 0;
  const int64_t cpr = chunks_per_row(L.be, in.T, chunk_len);
  at::Tensor stats = at::empty({StatsLayout(in.n).size()}, opts);
  at::Tensor row_count = at::empty({in.B}, opts);
  at::Tensor partials = at::empty({std::max<int64_t>(1, in.B * cpr * MomentsPartial(in.n).size())}, opts);
  StatsParams p{in.advantages.data_ptr(), nullptr, nullptr, in.mask.data_ptr<bool>(), in.n, in.B, in.T,
                chunk_len, cpr, 0.0, true, true, false, stats.data_ptr(), row_count.data_ptr(), nullptr,
                partials.data_ptr(), dtype_code(in.advantages.scalar_type())};
  L.be.stats_moments(p, L.stream);
  return stats.narrow(0, 0, StatsLayout(in.n).abar()).clone();
}

at::Tensor objective_stats(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& old_logp,
                           const at::Tensor& mask, double eps_hi, bool whiten, bool noon,
                           const c10::optional<at::Tensor>& moments, bool with_gram) {
  c10::OptionalDeviceGuard guard(logp.defined() ? logp.device() : at::Device(at::kCPU));
  PolicyInputs in = policy_inputs(logp, old_logp, advantages, mask, c10::nullopt, kST);
  check_nonneg_finite(eps_hi, kST, "eps_hi");
  at::Tensor mom = supplied_stats(moments, StatsLayout(in.n).abar(), in.logp, kST, "moments",
                                  "the [count, num_seqs, mean(n), var(n)] moments vector");
  Launch L = backend_for(logp, kST);
  return std::get<0>(run_stats(L, in, eps_hi, whiten, noon, with_gram, mom));
}

at::Tensor pareto_weights(const at::Tensor& stats, const c10::optional<at::Tensor>& prefs,
                          const std::string& method, const std::string& granularity, double cagrad_c) {
  check_float(stats, kPW, "stats");
  check_rank(stats, 1, kPW, "stats", "[(n+3)^2 - 7] statistics vector");
  const int64_t len = stats.size(0);
  const int64_t n = stats_num_objectives(len);
  TORCH_CHECK(n > 0, kPW, ": stats must have (n+3)^2 - 7 entries for n objectives in [1, ", kMaxObjectives,
              "], got ", len);
  const int m = parse_method(method, kPW, /*from_gram=*/false);
  check_nonneg_finite(cagrad_c, kPW, "cagrad_c");
  const int g = parse_granularity(granularity, kPW);
  c10::OptionalDeviceGuard guard(stats.device());
  const auto acc = acc_type(stats.scalar_type());
  at::Tensor s = stats.to(acc).contiguous();
  at::Tensor pr = prefs_acc(prefs, n, acc, s, "stats", kPW);
  return run_weights(backend_for(stats, kPW), s, pr, n, m, g, cagrad_c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pama_policy_loss(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& prefs, double eps_lo,
    double eps_hi, double dual_clip, bool noon, bool whiten, const std::string& method,
    const std::string& granularity, const std::string& agg, double beta_loss, bool check_finite,
    const c10::optional<at::Tensor>& global_stats, double cagrad_c) {
  c10::OptionalDeviceGuard guard(logp.defined() ? logp.device() : at::Device(at::kCPU));
  PolicyInputs in = policy_inputs(logp, old_logp, advantages, mask, ref_logp, kPL);
  at::Tensor gstats = supplied_stats(global_stats, StatsLayout(in.n).size(), in.logp, kPL, "global_stats",
                                     "a statistics vector (objective_stats)");
  const int m = parse_method(method, kPL, /*from_gram=*/false);
  const int g = parse_granularity(granularity, kPL);
  const int a = parse_agg(agg, kPL);
  check_nonneg_finite(cagrad_c, kPL, "cagrad_c");
  TORCH_CHECK_VALUE(eps_lo >= 0 && eps_lo < 1, kPL, ": eps_lo must be in [0, 1), got ", eps_lo);
  check_nonneg_finite(eps_hi, kPL, "eps_hi");
  TORCH_CHECK_VALUE(dual_clip > 1, kPL, ": dual_clip must be > 1 (inf disables it), got ", dual_clip);
  check_nonneg_finite(beta_loss, kPL, "beta_loss");
  TORCH_CHECK_VALUE(beta_loss == 0 || in.ref_logp.defined(), kPL, ": beta_loss = ", beta_loss,
                    " > 0 needs ref_logp (the reference log-probs of the KL loss), got None");
  const auto acc = acc_type(in.logp.scalar_type());
  at::Tensor pr = prefs_acc(prefs, in.n, acc, in.logp, "logp", kPL);
  Launch L = backend_for(logp, kPL);
  auto opts = in.logp.options().dtype(acc);
  // Without `stats` every statistic is this call's own. With the global statistics of a
  // data-parallel group, the local stages still give the per-row counts and per-sequence weights
  // (rows never straddle ranks, whitened with the global moments); weights, denominators and the
  // reported statistics come from the global vector, so the loss and the per-token metric sums
  // are this shard's contributions to the global ones.
  auto [stats, row_count, seq_weights] =
      gstats.defined() ? run_stats(L, in, eps_hi, whiten, noon, /*with_gram=*/false, gstats)
                       : run_stats(L, in, eps_hi, whiten, noon, /*with_gram=*/method_uses_gram(m));
  if (gstats.defined()) stats = gstats;
  if (check_finite) {  // after the statistics, so that the variance check shares the one host read
    const StatsLayout SL(static_cast<int>(in.n));
    check_finite_all({{"logp", in.logp},
                      {"old_logp", in.old_logp},
                      {"advantages", in.advantages},
                      {"ref_logp", in.ref_logp},
                      {"prefs", pr, CheckKind::kPrefs},
                      {"advantages", whiten ? stats.narrow(0, SL.var(), in.n) : at::Tensor(), CheckKind::kVariance}},
                     in.mask, kPL);
  }
  at::Tensor weights = run_weights(L, stats, pr, in.n, m, g, cagrad_c);
  int64_t chunk_len = 0;
  const int64_t cpr = chunks_per_row(L.be, in.T, chunk_len);
  at::Tensor a_tilde = at::empty({in.B, in.T}, opts);
  at::Tensor row_scale = at::empty({in.B}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor metrics = at::empty({loss_metrics_size(static_cast<int>(in.n))}, opts);
  at::Tensor partials = at::empty({std::max<int64_t>(1, in.B * cpr * kLossPartialSize)}, opts);
  const bool token = m == kMethodPama && g == kGranToken;
  const bool per_row = m == kMethodPama && g == kGranSequence;
  PolicyLossParams p{in.logp.data_ptr(), in.old_logp.data_ptr(),
                     (in.ref_logp.defined() && beta_loss != 0.0) ? in.ref_logp.data_ptr() : nullptr,
                     in.advantages.data_ptr(), in.mask.data_ptr<bool>(), stats.data_ptr(), row_count.data_ptr(),
                     weights.data_ptr(), seq_weights.data_ptr(), in.n, in.B, in.T, chunk_len, cpr,
                     eps_lo, eps_hi, dual_clip, beta_loss, whiten, noon, per_row,
                     token ? kCombineTokenThm1 : kCombineWeighted, a,
                     a_tilde.data_ptr(), row_scale.data_ptr(), loss.data_ptr(), metrics.data_ptr(),
                     partials.data_ptr(), dtype_code(in.logp.scalar_type())};
  L.be.policy_loss_forward(p, L.stream);
  return {loss, metrics, a_tilde, row_scale};
}

at::Tensor pama_policy_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                     const c10::optional<at::Tensor>& ref_logp, const at::Tensor& mask,
                                     const at::Tensor& a_tilde, const at::Tensor& row_scale, double eps_lo,
                                     double eps_hi, double dual_clip, double beta_loss) {
  const char* op = "pama_policy_loss_backward";
  check_float(logp, op, "logp");
  check_rank(logp, 2, op, "logp", "[B, T]");
  const int64_t B = logp.size(0), T = logp.size(1);
  check_like(old_logp, logp, op, "old_logp", "logp");
  check_shape(old_logp, {B, T}, op, "old_logp", "[B, T]");
  const auto acc = acc_type(logp.scalar_type());
  check_defined(a_tilde, op, "a_tilde");
  TORCH_CHECK(a_tilde.scalar_type() == acc && a_tilde.sizes() == logp.sizes(), op, ": a_tilde must be ", acc,
              " [B, T]");
  TORCH_CHECK(row_scale.defined() && row_scale.scalar_type() == acc && row_scale.sizes() == at::IntArrayRef{B}, op,
              ": row_scale must be ", acc, " [B]");
  TORCH_CHECK(grad_loss.defined() && grad_loss.numel() == 1, op, ": grad_loss must be a scalar tensor");
  c10::OptionalDeviceGuard guard(logp.device());
  at::Tensor m = bool_mask(mask, B, T, logp, "logp", op);
  auto lp = logp.contiguous(), ol = old_logp.contiguous();
  at::Tensor rl;
  if (ref_logp.has_value() && ref_logp->defined() && beta_loss != 0.0) {
    check_like(*ref_logp, logp, op, "ref_logp", "logp");
    check_shape(*ref_logp, {B, T}, op, "ref_logp", "[B, T]");
    rl = ref_logp->contiguous();
  }
  at::Tensor g = grad_loss.to(logp.device(), acc).reshape({1}).contiguous();
  at::Tensor at_ = a_tilde.contiguous(), rs = row_scale.contiguous();
  at::Tensor grad = at::empty_like(lp);
  if (grad.numel() == 0) return grad;
  Launch L = backend_for(logp, op);
  PolicyLossBackwardParams p{g.data_ptr(), lp.data_ptr(), ol.data_ptr(), rl.defined() ? rl.data_ptr() : nullptr,
                             m.data_ptr<bool>(), at_.data_ptr(), rs.data_ptr(), B, T, eps_lo, eps_hi, dual_clip,
                             beta_loss, grad.data_ptr(), dtype_code(logp.scalar_type())};
  L.be.policy_loss_backward(p, L.stream);
  return grad;
}

struct ValueInputs {
  at::Tensor values, old_values, returns, mask;
  int64_t n, B, T;
};

ValueInputs value_inputs(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                         const at::Tensor& mask, const char* op) {
  check_float(values, op, "values");
  check_rank(values, 3, op, "values", "[n, B, T]");
  check_num_objectives(values.size(0), op, "values");
  ValueInputs in;
  in.n = values.size(0);
  in.B = values.size(1);
  in.T = values.size(2);
  check_like(old_values, values, op, "old_values", "values");
  check_shape(old_values, values.sizes(), op, "old_values", "[n, B, T] (the shape of values)");
  check_like(returns, values, op, "returns", "values");
  check_shape(returns, values.sizes(), op, "returns", "[n, B, T] (the shape of values)");
  in.mask = bool_mask(mask, in.B, in.T, values, "values", op);
  in.values = values.contiguous();
  in.old_values = old_values.contiguous();
  in.returns = returns.contiguous();
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_value_loss(const at::Tensor& values,
                                                                const at::Tensor& old_values,
                                                                const at::Tensor& returns, const at::Tensor& mask,
                                                                double clip, const std::string& agg,
                                                                bool check_finite,
                                                                const c10::optional<at::Tensor>& denominators) {
  c10::OptionalDeviceGuard guard(values.defined() ? values.device() : at::Device(at::kCPU));
  ValueInputs in = value_inputs(values, old_values, returns, mask, kVL);
  at::Tensor denoms = supplied_stats(denominators, 2, in.values, kVL, "denominators",
                                     "the global [token count, sequence count]");
  const int a = parse_agg(agg, kVL);
  TORCH_CHECK_VALUE(clip >= 0, kVL, ": clip must be >= 0 (inf disables it), got ", clip);
  if (check_finite) {
    check_finite_all({{"values", in.values}, {"old_values", in.old_values}, {"returns", in.returns}}, in.mask, kVL);
  }
  Launch L = backend_for(values, kVL);
  auto opts = in.values.options().dtype(acc_type(in.values.scalar_type()));
  int64_t chunk_len = 0;
  const int64_t cpr = chunks_per_row(L.be, in.T, chunk_len);
  at::Tensor row_scale = at::empty({in.B}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor metrics = at::empty({value_metrics_size(static_cast<int>(in.n))}, opts);
  at::Tensor partials =
      at::empty({std::max<int64_t>(1, in.B * cpr * value_partial_size(static_cast<int>(in.n)))}, opts);
  ValueLossParams p{in.values.data_ptr(), in.old_values.data_ptr(), in.returns.data_ptr(), in.mask.data_ptr<bool>(),
                    denoms.defined() ? denoms.data_ptr() : nullptr,
                    in.n, in.B, in.T, chunk_len, cpr, clip, a, row_scale.data_ptr(), loss.data_ptr(),
                    metrics.data_ptr(), partials.data_ptr(), dtype_code(in.values.scalar_type())};
  L.be.value_loss_forward(p, L.stream);
  return {loss, metrics, row_scale};
}

at::Tensor multi_value_loss_backward(const at::Tensor& grad_loss, const at::Tensor& values,
                                     const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
                                     const at::Tensor& row_scale, double clip) {
  const char* op = "multi_value_loss_backward";
  c10::OptionalDeviceGuard guard(values.defined() ? values.device() : at::Device(at::kCPU));
  ValueInputs in = value_inputs(values, old_values, returns, mask, op);
  const auto acc = acc_type(in.values.scalar_type());
  TORCH_CHECK(row_scale.defined() && row_scale.scalar_type() == acc && row_scale.sizes() == at::IntArrayRef{in.B},
              op, ": row_scale must be ", acc, " [B]");
  TORCH_CHECK(grad_loss.defined() && grad_loss.numel() == 1, op, ": grad_loss must be a scalar tensor");
  at::Tensor g = grad_loss.to(values.device(), acc).reshape({1}).contiguous();
  at::Tensor rs = row_scale.contiguous();
  at::Tensor grad = at::empty_like(in.values);
  if (grad.numel() == 0) return grad;
  Launch L = backend_for(values, op);
  ValueLossBackwardParams p{g.data_ptr(), in.values.data_ptr(), in.old_values.data_ptr(), in.returns.data_ptr(),
                            in.mask.data_ptr<bool>(), rs.data_ptr(), in.n, in.B, in.T, clip, grad.data_ptr(),
                            dtype_code(in.values.scalar_type())};
  L.be.value_loss_backward(p, L.stream);
  return grad;
}

}  // namespace

void register_impls(torch::Library& m) {
  m.impl("token_rewards", &token_rewards);
  m.impl("multi_gae", &multi_gae);
  m.impl("multi_gae_backward", &multi_gae_backward);
  m.impl("objective_moments", &objective_moments);
  m.impl("objective_stats", &objective_stats);
  m.impl("pareto_weights", &pareto_weights);
  m.impl("pama_policy_loss", &pama_policy_loss);
  m.impl("pama_policy_loss_backward", &pama_policy_loss_backward);
  m.impl("multi_value_loss", &multi_value_loss);
  m.impl("multi_value_loss_backward", &multi_value_loss_backward);
}

// =================================================================================================
// CPU launchers: one task per chunk (fixed chunking, so results do not depend on the thread
// count), each chunk's partial written by exactly one task, then the shared finalize routines.
// =================================================================================================
namespace cpu {
namespace {

constexpr int64_t kChunkLen = 2048;

template <typename F>
void for_chunks(int64_t B, int64_t T, int64_t chunk_len, int64_t cpr, F&& f) {
  at::parallel_for(0, B * cpr, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const ChunkBounds cb = chunk_bounds(k, cpr, chunk_len, T);
      f(k, cb.b, cb.t_begin, cb.t_end);
    }
  });
}

void token_rewards(const TokenRewardsParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    auto* sc = static_cast<const scalar_t*>(p.scores);
    auto* old = static_cast<const scalar_t*>(p.old_logp);
    auto* ref = static_cast<const scalar_t*>(p.ref_logp);
    auto* out = static_cast<scalar_t*>(p.rewards);
    const acc beta = static_cast<acc>(p.beta_kl);
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const bool* m = p.mask + b * p.T;
        int64_t last = -1;
        for (int64_t t = 0; t < p.T; ++t)
          if (m[t]) last = t;
        for (int64_t i = 0; i < p.n; ++i) {
          scalar_t* o = out + (i * p.B + b) * p.T;
          const acc score = static_cast<acc>(sc[i * p.B + b]);
          for (int64_t t = 0; t < p.T; ++t) {
            acc kl = m[t] ? static_cast<acc>(old[b * p.T + t]) - static_cast<acc>(ref[b * p.T + t]) : acc(0);
            o[t] = static_cast<scalar_t>(-beta * kl + (t == last ? score : acc(0)));
          }
        }
      }
    });
  });
}

void multi_gae(const GaeParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const acc gamma = static_cast<acc>(p.gamma), gl = static_cast<acc>(p.gamma * p.lam);
    at::parallel_for(0, p.n * p.B, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s % p.B, off = s * p.T;
        auto* r = static_cast<const scalar_t*>(p.rewards) + off;
        auto* v = static_cast<const scalar_t*>(p.values) + off;
        auto* adv = static_cast<scalar_t*>(p.advantages) + off;
        auto* ret = static_cast<scalar_t*>(p.returns) + off;
        const bool* m = p.mask + b * p.T;
        acc next_v = 0, last_a = 0;
        for (int64_t t = p.T - 1; t >= 0; --t) {
          const acc vt = static_cast<acc>(v[t]);
          const acc a = gae_step(static_cast<acc>(r[t]), vt, m[t], gamma, gl, next_v, last_a);
          adv[t] = static_cast<scalar_t>(a);
          ret[t] = static_cast<scalar_t>(a + vt);
        }
      }
    });
  });
}

void multi_gae_backward(const GaeBackwardParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const acc gamma = static_cast<acc>(p.gamma), gl = static_cast<acc>(p.gamma * p.lam);
    at::parallel_for(0, p.n * p.B, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s % p.B, off = s * p.T;
        auto* ga = static_cast<const scalar_t*>(p.grad_advantages) + off;
        auto* gret = static_cast<const scalar_t*>(p.grad_returns) + off;
        auto* gr = static_cast<scalar_t*>(p.grad_rewards) + off;
        auto* gv = static_cast<scalar_t*>(p.grad_values) + off;
        const bool* m = p.mask + b * p.T;
        acc c_la = 0, c_nv = 0;
        for (int64_t t = 0; t < p.T; ++t) {
          const acc g_ret = static_cast<acc>(gret[t]);
          acc g_r, g_v;
          gae_adjoint_step(static_cast<acc>(ga[t]) + g_ret, m[t], gamma, gl, c_la, c_nv, g_r, g_v);
          gr[t] = static_cast<scalar_t>(g_r);
          gv[t] = static_cast<scalar_t>(g_v + g_ret);
        }
      }
    });
  });
}

void stats_moments(const StatsParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    MomentsPartial P(n);
    auto* part = static_cast<acc*>(p.partials);
    auto* adv = static_cast<const scalar_t*>(p.advantages);
    const int64_t BT = p.B * p.T;
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      acc* out = part + k * P.size();
      const bool* m = p.mask + b * p.T;
      acc cnt = 0;
      for (int64_t t = t0; t < t1; ++t) cnt += m[t] ? acc(1) : acc(0);
      out[P.cnt()] = cnt;
      acc inv, rs;
      moments_chunk_scales(cnt, inv, rs);
      for (int i = 0; i < n; ++i) {
        const scalar_t* a = adv + i * BT + b * p.T;
        acc mean = 0;
        for (int64_t t = t0; t < t1; ++t)
          if (m[t]) mean += static_cast<acc>(a[t]) * inv;
        acc msd = 0;
        for (int64_t t = t0; t < t1; ++t)
          if (m[t]) {
            const acc d = (static_cast<acc>(a[t]) - mean) * rs;
            msd += d * d;
          }
        out[P.mean() + i] = mean;
        out[P.msd() + i] = msd;
      }
    });
    auto* stats = static_cast<acc*>(p.stats);
    auto* rc = static_cast<acc*>(p.row_count);
    finalize_moments_rows(part, n, p.B, p.chunks_per_row, rc, 0, 1);
    finalize_moments_stats(part, n, p.B, p.chunks_per_row, rc, stats, 0, 1);
  });
}

// N_i for one token of row b at position t (SPEC §3): whitened (optionally) and Noon-clipped.
template <typename scalar_t, typename acc>
inline void token_noon(const scalar_t* adv, int n, int64_t BT, int64_t idx, const acc* mean, const acc* istd,
                       bool whiten, bool noon, acc* N) {
  for (int i = 0; i < n; ++i) N[i] = whiten_noon(static_cast<acc>(adv[i * BT + idx]), mean[i], istd[i], whiten, noon);
}

template <typename acc>
void whitening_params(const acc* stats, int n, acc* mean, acc* istd) {
  StatsLayout L(n);
  for (int i = 0; i < n; ++i) {
    mean[i] = stats[L.mean() + i];
    istd[i] = inv_std(stats[L.var() + i]);
  }
}

void stats_indicators(const StatsParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    IndicatorPartial P(n);
    const int psize = P.size(p.with_gram);
    auto* part = static_cast<acc*>(p.partials);
    auto* stats = static_cast<acc*>(p.stats);
    auto* adv = static_cast<const scalar_t*>(p.advantages);
    auto* lp = static_cast<const scalar_t*>(p.logp);
    auto* old = static_cast<const scalar_t*>(p.old_logp);
    const int64_t BT = p.B * p.T;
    acc mean[kMaxObjectives], istd[kMaxObjectives];
    whitening_params(stats, n, mean, istd);
    const acc hi = acc(1) + static_cast<acc>(p.eps_hi);
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      acc* out = part + k * psize;
      std::fill(out, out + psize, acc(0));
      acc N[kMaxObjectives], I[kMaxObjectives];
      const bool* m = p.mask + b * p.T;
      for (int64_t t = t0; t < t1; ++t) {
        if (!m[t]) continue;
        const int64_t idx = b * p.T + t;
        token_noon(adv, n, BT, idx, mean, istd, p.whiten, p.noon, N);
        const bool ind = ppo_ratio(static_cast<acc>(lp[idx]), static_cast<acc>(old[idx])) <= hi;
        for (int i = 0; i < n; ++i) {
          I[i] = ind ? N[i] : acc(0);
          out[P.sum_i() + i] += I[i];
          out[P.pos() + i] += N[i] > acc(0) ? acc(1) : acc(0);
        }
        thm1(N, 1, n, out + P.ctok(), acc(1));
        if (p.with_gram) {
          acc* G = out + P.gram();
          for (int i = 0; i < n; ++i)
            for (int j = i; j < n; ++j) G[i * n + j] += I[i] * I[j];
        }
      }
      if (p.with_gram) {
        acc* G = out + P.gram();
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < i; ++j) G[i * n + j] = G[j * n + i];
      }
    });
    auto* rc = static_cast<const acc*>(p.row_count);
    auto* sw = static_cast<acc*>(p.seq_weights);
    finalize_indicator_totals(part, n, p.B, p.chunks_per_row, p.with_gram, stats, 0, 1);
    finalize_indicator_rows(part, n, p.B, p.chunks_per_row, p.with_gram, rc, sw, 0, 1);
    finalize_indicator_cseq(n, p.B, rc, sw, stats, 0, 1);
  });
}

void pareto_weights(const WeightsParams& p, void*) {
  auto run = [&](auto tag) {
    using acc = decltype(tag);
    finalize_weights(static_cast<const acc*>(p.stats), p.n, p.method, p.granularity,
                     static_cast<const acc*>(p.prefs), static_cast<acc>(p.cagrad_c), static_cast<acc*>(p.weights));
  };
  if (p.acc_is_double)
    run(double{});
  else
    run(float{});
}

void policy_loss_forward(const PolicyLossParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    auto* part = static_cast<acc*>(p.partials);
    auto* stats = static_cast<const acc*>(p.stats);
    auto* adv = static_cast<const scalar_t*>(p.advantages);
    auto* lp = static_cast<const scalar_t*>(p.logp);
    auto* old = static_cast<const scalar_t*>(p.old_logp);
    auto* ref = static_cast<const scalar_t*>(p.ref_logp);
    auto* at_out = static_cast<acc*>(p.a_tilde);
    auto* w_global = static_cast<const acc*>(p.weights);
    auto* w_rows = static_cast<const acc*>(p.seq_weights);
    const int64_t BT = p.B * p.T;
    acc mean[kMaxObjectives], istd[kMaxObjectives];
    whitening_params(stats, n, mean, istd);
    const acc eps_lo = static_cast<acc>(p.eps_lo), eps_hi = static_cast<acc>(p.eps_hi);
    const acc dual = static_cast<acc>(p.dual_clip);
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      acc* out = part + k * kLossPartialSize;
      acc s_l = 0, s_kl = 0, s_clip = 0, s_akl = 0, s_active = 0;
      acc N[kMaxObjectives];
      const acc* w = p.weights_per_row ? w_rows + b * n : w_global;
      const bool* m = p.mask + b * p.T;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t idx = b * p.T + t;
        if (!m[t]) {
          at_out[idx] = acc(0);
          continue;
        }
        token_noon(adv, n, BT, idx, mean, istd, p.whiten, p.noon, N);
        acc a_t;
        if (p.combine == kCombineTokenThm1) {
          a_t = thm1(N, 1, n, static_cast<acc*>(nullptr), acc(0));
        } else {
          a_t = 0;
          for (int i = 0; i < n; ++i) a_t += w[i] * N[i];
        }
        at_out[idx] = a_t;
        const acc l_p = static_cast<acc>(lp[idx]), o_p = static_cast<acc>(old[idx]);
        acc dl;
        bool clipped;
        s_l += ppo_token_loss(a_t, l_p, o_p, eps_lo, eps_hi, dual, dl, clipped);
        s_clip += clipped ? acc(1) : acc(0);
        s_akl += o_p - l_p;
        s_active += a_t > acc(0) ? acc(1) : acc(0);
        if (ref != nullptr) {
          acc dk;
          s_kl += k3_kl(l_p, static_cast<acc>(ref[idx]), dk);
        }
      }
      out[0] = s_l;
      out[1] = s_kl;
      out[2] = s_clip;
      out[3] = s_akl;
      out[4] = s_active;
    });
    auto* rs = static_cast<acc*>(p.row_scale);
    finalize_row_scale(static_cast<const acc*>(p.row_count), p.B, p.agg, stats[StatsLayout(n).count()],
                       stats[StatsLayout(n).num_seqs()], rs, 0, 1);
    finalize_policy_loss(part, n, p.B, p.chunks_per_row, rs, stats, w_global, static_cast<acc>(p.beta_loss),
                         static_cast<acc*>(p.loss), static_cast<acc*>(p.metrics));
  });
}

void policy_loss_backward(const PolicyLossBackwardParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const acc g = static_cast<const acc*>(p.grad_loss)[0];
    auto* lp = static_cast<const scalar_t*>(p.logp);
    auto* old = static_cast<const scalar_t*>(p.old_logp);
    auto* ref = static_cast<const scalar_t*>(p.ref_logp);
    auto* a_tilde = static_cast<const acc*>(p.a_tilde);
    auto* rs = static_cast<const acc*>(p.row_scale);
    auto* out = static_cast<scalar_t*>(p.grad_logp);
    const acc eps_lo = static_cast<acc>(p.eps_lo), eps_hi = static_cast<acc>(p.eps_hi);
    const acc dual = static_cast<acc>(p.dual_clip), beta = static_cast<acc>(p.beta_loss);
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc scale = g * rs[b];
        for (int64_t t = 0; t < p.T; ++t) {
          const int64_t idx = b * p.T + t;
          if (!p.mask[idx]) {
            out[idx] = scalar_t(0);
            continue;
          }
          const acc l_p = static_cast<acc>(lp[idx]);
          acc dl, dk = 0;
          bool clipped;
          ppo_token_loss(a_tilde[idx], l_p, static_cast<acc>(old[idx]), eps_lo, eps_hi, dual, dl, clipped);
          if (ref != nullptr) k3_kl(l_p, static_cast<acc>(ref[idx]), dk);
          out[idx] = static_cast<scalar_t>(scale * (dl + beta * dk));
        }
      }
    });
  });
}

void value_loss_forward(const ValueLossParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    const int ps = value_partial_size(n);
    auto* part = static_cast<acc*>(p.partials);
    auto* v = static_cast<const scalar_t*>(p.values);
    auto* ov = static_cast<const scalar_t*>(p.old_values);
    auto* ret = static_cast<const scalar_t*>(p.returns);
    const acc clip = static_cast<acc>(p.clip);
    const int64_t BT = p.B * p.T;
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      acc* out = part + k * ps;
      std::fill(out, out + ps, acc(0));
      const bool* m = p.mask + b * p.T;
      for (int64_t t = t0; t < t1; ++t) out[0] += m[t] ? acc(1) : acc(0);
      for (int i = 0; i < n; ++i) {
        const int64_t off = i * BT + b * p.T;
        acc s = 0, c = 0;
        for (int64_t t = t0; t < t1; ++t) {
          if (!m[t]) continue;
          acc dv;
          bool clipped;
          s += value_token_loss(static_cast<acc>(v[off + t]), static_cast<acc>(ov[off + t]),
                                static_cast<acc>(ret[off + t]), clip, dv, clipped);
          c += clipped ? acc(1) : acc(0);
        }
        out[1] += c;
        out[2 + i] = s;
      }
    });
    finalize_value_loss(part, n, p.B, p.chunks_per_row, p.agg, static_cast<const acc*>(p.denominators),
                        static_cast<acc*>(p.row_scale),
                        static_cast<acc*>(p.loss), static_cast<acc*>(p.metrics));
  });
}

void value_loss_backward(const ValueLossBackwardParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const acc g = static_cast<const acc*>(p.grad_loss)[0];
    auto* v = static_cast<const scalar_t*>(p.values);
    auto* ov = static_cast<const scalar_t*>(p.old_values);
    auto* ret = static_cast<const scalar_t*>(p.returns);
    auto* rs = static_cast<const acc*>(p.row_scale);
    auto* out = static_cast<scalar_t*>(p.grad_values);
    const acc clip = static_cast<acc>(p.clip);
    at::parallel_for(0, p.n * p.B, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s % p.B, off = s * p.T;
        const acc scale = acc(0.5) * g * rs[b];
        const bool* m = p.mask + b * p.T;
        for (int64_t t = 0; t < p.T; ++t) {
          if (!m[t]) {
            out[off + t] = scalar_t(0);
            continue;
          }
          acc dv;
          bool clipped;
          value_token_loss(static_cast<acc>(v[off + t]), static_cast<acc>(ov[off + t]),
                           static_cast<acc>(ret[off + t]), clip, dv, clipped);
          out[off + t] = static_cast<scalar_t>(scale * dv);
        }
      }
    });
  });
}

}  // namespace

const Backend& table() {
  static const Backend t{"cpu",
                         kChunkLen,
                         &token_rewards,
                         &multi_gae,
                         &multi_gae_backward,
                         &stats_moments,
                         &stats_indicators,
                         &pareto_weights,
                         &policy_loss_forward,
                         &policy_loss_backward,
                         &value_loss_forward,
                         &value_loss_backward};
  return t;
}

}  // namespace cpu
}  // namespace pama

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

TORCH_LIBRARY_IMPL(pama_ext, CPU, m) { pama::register_impls(m); }

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

// The extension is imported as the Python module pama_ext._C; loading it runs the registrations
// above. It defines no Python functions of its own: everything is reached through torch.ops.
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pama_ext compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
