// ops.cpp — the RL ops' argument checks and device-independent op bodies: each validates, allocates
// and runs the stages of the launcher table of the inputs' device (cpu/tables.cpp, or
// cuda/ops_cuda.cpp). Schemas: registration.cpp; CPU kernels: cpu/<stage>.cpp.
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
#include <atomic>
#include <initializer_list>
#include <stdexcept>
#include <tuple>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
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


Launch backend_for_device(const at::Device& d, const char* op) {
  if (d.is_cpu()) return {cpu::table(), nullptr};
  TORCH_CHECK(d.is_cuda(), op, ": tensors on device ", d, " are not supported (cpu or cuda)");
  TORCH_CHECK(g_cuda_table != nullptr, op,
              ": pama_ext was built without CUDA kernels; rebuild with a CUDA-enabled torch "
              "(PAMA_EXT_CUDA=1) or move the inputs to the CPU");
  return {*g_cuda_table, g_cuda_stream()};
}

at::Tensor solver_scratch(const Launch& L, const at::Device& d) {
  if (L.be.solver_scratch_bytes == 0) return at::Tensor();
  return at::empty({L.be.solver_scratch_bytes}, at::TensorOptions().dtype(at::kByte).device(d));
}

namespace {

Launch backend_for(const at::Tensor& t, const char* op) { return backend_for_device(t.device(), op); }

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

// mask: [B, T], any real dtype (nonzero = in), on the device of `like`.
void check_mask(const at::Tensor& mask, int64_t B, int64_t T, const at::Tensor& like, const char* like_name,
                const char* op) {
  check_defined(mask, op, "mask");
  check_shape(mask, {B, T}, op, "mask", "[B, T]");
  TORCH_CHECK(mask.device() == like.device(), op, ": mask is on ", mask.device(), " but ", like_name, " is on ",
              like.device());
  TORCH_CHECK(!mask.is_complex(), op, ": mask must be bool or real, got ", mask.scalar_type());
}

// A checked mask as a contiguous bool copy or view.
at::Tensor as_bool_mask(const at::Tensor& mask) {
  // to(kBool) is nonzero -> true, as ne(0), and ~10x faster on a float mask (a plain conversion kernel)
  return (mask.scalar_type() == at::kBool ? mask : mask.to(at::kBool)).contiguous();
}

// The mask (check_mask) as a contiguous bool copy or view.
at::Tensor bool_mask(const at::Tensor& mask, int64_t B, int64_t T, const at::Tensor& like, const char* like_name,
                     const char* op) {
  check_mask(mask, B, T, like, like_name, op);
  return as_bool_mask(mask);
}

// Non-finite values on masked-in positions are an error naming the argument (algorithms §9). `checks`
// lists (name, tensor, kind) entries (undefined tensors are skipped):
//   kFinite    [..., B, T] tensors are checked where `mask_b` is set, 1-d ones everywhere;
//   kPrefs     a 1-d prefs vector: finite, and then >= 0 and not all 0 (algorithms §4 linear weights,
//              used as given: no normalisation, so the loss scales with them);
//   kPrefsPositive  prefs of method 'pama' (algorithms §4b, divided by): finite and every entry > 0;
//   kVariance  the per-objective variances of the statistics: +inf means the float32 (acc)
//              variance of the advantages overflowed, and whitening would divide them to 0.
// On CPU this is a fused loop per tensor that stops at the first hit. On a device every flag is
// computed there and the stacked flags come back in one host read, the only host read of these
// ops, which is why check_finite=False exists (CUDA graphs, sync-free training).
enum class CheckKind { kFinite, kPrefs, kVariance, kPrefsPositive };
struct FiniteCheck {
  const char* name;
  at::Tensor x;
  CheckKind kind = CheckKind::kFinite;
};

// NaN/Inf on a masked-in position, in branch-free chunks the compiler vectorises ((v - v) == 0 holds
// exactly for finite v), spread over torch's threads; the answer does not depend on the split.
template <typename scalar_t>
bool any_nonfinite_range(const scalar_t* p, const bool* m, int64_t lo, int64_t hi) {
  using acc_t = at::opmath_type<scalar_t>;
  int bad = 0;
  if (m == nullptr) {
#pragma omp simd reduction(| : bad)
    for (int64_t k = lo; k < hi; ++k) {
      const acc_t v = static_cast<acc_t>(p[k]);
      bad |= static_cast<int>(!((v - v) == acc_t(0)));
    }
  } else {
#pragma omp simd reduction(| : bad)
    for (int64_t k = lo; k < hi; ++k) {
      const acc_t v = static_cast<acc_t>(p[k]);
      bad |= static_cast<int>(m[k]) & static_cast<int>(!((v - v) == acc_t(0)));
    }
  }
  return bad != 0;
}

bool any_nonfinite_cpu(const at::Tensor& x, const at::Tensor& mask_b) {
  const int64_t BT = x.dim() == 1 ? x.numel() : mask_b.numel();
  if (BT == 0) return false;
  const int64_t reps = x.numel() / BT;
  const bool* m = x.dim() == 1 ? nullptr : mask_b.data_ptr<bool>();
  std::atomic<bool> found{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "check_finite", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t r = 0; r < reps && !found.load(std::memory_order_relaxed); ++r) {
      at::parallel_for(0, BT, 1 << 15, [&](int64_t lo, int64_t hi) {
        if (!found.load(std::memory_order_relaxed) && any_nonfinite_range(p + r * BT, m, lo, hi))
          found.store(true, std::memory_order_relaxed);
      });
    }
  });
  return found.load();
}

// A (finite) prefs vector that is negative somewhere or sums to <= 0 (positive: that has an entry <= 0),
// on the CPU.
bool prefs_invalid_cpu(const at::Tensor& x, bool positive = false) {
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "check_prefs", [&] {
    const at::Tensor c = x.contiguous();
    const scalar_t* p = c.data_ptr<scalar_t>();
    double sum = 0;
    for (int64_t k = 0; k < c.numel(); ++k) {
      const double v = static_cast<double>(p[k]);
      bad = bad || v < 0 || (positive && !(v > 0));
      sum += v;
    }
    bad = bad || !(sum > 0);
  });
  return bad;
}

// Raises the error of failure f of a check: 0 = non-finite, 1 = prefs negative or all zero (kPrefs) or
// not all > 0 (kPrefsPositive).
[[noreturn]] void fail_check(const FiniteCheck& c, int f, const char* op) {
  if (c.kind == CheckKind::kVariance)
    TORCH_CHECK_VALUE(false, op, ": ", c.name, " has a variance that overflows ", c.x.scalar_type(),
                      " (|advantages| around 1e19 or more), so whitening would divide every advantage to 0; "
                      "rescale the advantages or pass float64 inputs (check_finite=False skips this check)");
  if (f == 1 && c.kind == CheckKind::kPrefsPositive)
    TORCH_CHECK_VALUE(false, op, ": ", c.name, " must be > 0 for method 'pama' (the preference weights of the "
                      "weighted Theorem 1 divide by them), got a zero or negative entry (pass check_finite=False "
                      "to skip this check)");
  if (f == 1)
    TORCH_CHECK_VALUE(false, op, ": ", c.name, " must be >= 0 and not all 0 (the weights of method 'linear', used "
                      "as given), got a negative entry or all zeros (pass check_finite=False to skip this check)");
  TORCH_CHECK_VALUE(false, op, ": ", c.name,
                    " has NaN or Inf on a masked-in position (pass check_finite=False to skip this check)");
  throw std::logic_error("unreachable");
}

void check_finite_all(std::initializer_list<FiniteCheck> checks, const at::Tensor& mask_b, const char* op) {
  auto fail = [op](const FiniteCheck& c, int f) { fail_check(c, f, op); };
  if (mask_b.is_cpu()) {
    for (const auto& c : checks) {
      if (!c.x.defined()) continue;
      if (any_nonfinite_cpu(c.x, mask_b)) fail(c, 0);
      if (c.kind == CheckKind::kPrefs && prefs_invalid_cpu(c.x)) fail(c, 1);
      if (c.kind == CheckKind::kPrefsPositive && prefs_invalid_cpu(c.x, true)) fail(c, 1);
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
    if (c.kind == CheckKind::kPrefsPositive) {
      flags.push_back(c.x.le(0).any());
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

// The checked mask of an op's inputs, as given until for_backend; then bool, or (float_mask) the
// caller's float32 mask, which a backend with Backend::float_mask reads as it is instead of a bool
// copy made per call (a pass over the mask and a fresh [B, T] buffer).
struct MaskedInputs {
  at::Tensor mask;
  bool float_mask = false;
  void for_backend(const Backend& be) {
    float_mask = be.float_mask && mask.scalar_type() == at::kFloat;
    mask = float_mask ? mask.contiguous() : as_bool_mask(mask);
  }
  at::Tensor mask_as_bool() const { return float_mask ? as_bool_mask(mask) : mask; }
  const bool* mask_bool() const { return float_mask ? nullptr : mask.data_ptr<bool>(); }
  const float* mask_f32() const { return float_mask ? mask.data_ptr<float>() : nullptr; }
};

// Checked, contiguous inputs of the statistics / policy-loss ops (the mask: MaskedInputs).
struct PolicyInputs : MaskedInputs {
  at::Tensor logp, old_logp, advantages, ref_logp;
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
  check_mask(mask, B, T, logp, "logp", op);
  in.mask = mask;  // as given until for_backend
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
// [count, num_seqs, mean(n), var(n)] of a data-parallel group, algorithms §8) the moments stage is not
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
  StatsParams p{in.advantages.data_ptr(), in.logp.data_ptr(), in.old_logp.data_ptr(), in.mask_bool(),
                in.n, in.B, in.T, chunk_len, cpr, eps_hi, whiten, noon, with_gram,
                stats.data_ptr(), row_count.data_ptr(), seq_weights.data_ptr(), partials.data_ptr(),
                dtype_code(in.logp.scalar_type())};
  p.mask_f32 = in.mask_f32();
  if (moments.defined()) {
    stats.narrow(0, 0, moments.size(0)).copy_(moments);
    at::sum_out(row_count, in.mask_as_bool(), {1}, /*keepdim=*/false, acc);
  } else {
    L.be.stats_moments(p, L.stream);
  }
  L.be.stats_indicators(p, L.stream);
  return {stats, row_count, seq_weights};
}

// The moments stage alone, into `stats` (its [count, num_seqs, mean(n), var(n)] entries) and row_count.
void run_moments(const Launch& L, const PolicyInputs& in, const at::Tensor& stats, const at::Tensor& row_count) {
  int64_t chunk_len = 0;
  const int64_t cpr = chunks_per_row(L.be, in.T, chunk_len);
  at::Tensor partials = at::empty({std::max<int64_t>(1, in.B * cpr * MomentsPartial(in.n).size())}, stats.options());
  StatsParams p{in.advantages.data_ptr(), nullptr, nullptr, in.mask_bool(), in.n, in.B, in.T,
                chunk_len, cpr, 0.0, true, true, false, stats.data_ptr(), row_count.data_ptr(), nullptr,
                partials.data_ptr(), dtype_code(in.advantages.scalar_type())};
  p.mask_f32 = in.mask_f32();
  L.be.stats_moments(p, L.stream);
}

at::Tensor run_weights(const Launch& L, const at::Tensor& stats, const at::Tensor& prefs, int64_t n, int method,
                       int granularity, double cagrad_c) {
  at::Tensor weights = at::empty({n}, stats.options());
  const at::Tensor scratch = solver_scratch(L, stats.device());
  WeightsParams p{stats.data_ptr(), prefs.defined() ? prefs.data_ptr() : nullptr, static_cast<int>(n), method,
                  granularity, cagrad_c, weights.data_ptr(), stats.scalar_type() == at::kDouble,
                  scratch_ptr(scratch)};
  L.be.pareto_weights(p, L.stream);
  return weights;
}

// A statistics vector (or its moments prefix) supplied by the caller (data parallelism, algorithms §8):
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
  check_mask(mask, in.B, in.T, advantages, "advantages", op);
  in.mask = mask;
  in.advantages = advantages.contiguous();
  Launch L = backend_for(advantages, op);
  in.for_backend(L.be);
  const auto acc = acc_type(in.advantages.scalar_type());
  auto opts = in.advantages.options().dtype(acc);
  at::Tensor stats = at::empty({StatsLayout(in.n).size()}, opts);
  at::Tensor row_count = at::empty({in.B}, opts);
  run_moments(L, in, stats, row_count);
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
  in.for_backend(L.be);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pama_policy_loss(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& prefs, double eps_lo,
    double eps_hi, double dual_clip, bool noon, bool whiten, const std::string& method,
    const std::string& granularity, const std::string& agg, double beta_loss, bool check_finite,
    const c10::optional<at::Tensor>& global_stats, double cagrad_c, bool return_a_tilde) {
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
  TORCH_CHECK_VALUE(!(m == kMethodPama && g == kGranSequence && prefs.has_value() && prefs->defined()), kPL,
                    ": prefs with method 'pama' needs granularity 'token' or 'batch' (the weighted Theorem 1, "
                    "algorithms §4b), got granularity 'sequence'");
  TORCH_CHECK_VALUE(beta_loss == 0 || in.ref_logp.defined(), kPL, ": beta_loss = ", beta_loss,
                    " > 0 needs ref_logp (the reference log-probs of the KL loss), got None");
  const auto acc = acc_type(in.logp.scalar_type());
  at::Tensor pr = prefs_acc(prefs, in.n, acc, in.logp, "logp", kPL);
  Launch L = backend_for(logp, kPL);
  in.for_backend(L.be);
  auto opts = in.logp.options().dtype(acc);
  // Without `stats` every statistic is this call's own. With the global statistics of a
  // data-parallel group, the local stages still give the per-row counts and per-sequence weights
  // (rows never straddle ranks, whitened with the global moments); weights, denominators and the
  // reported statistics come from the global vector, so the loss and the per-token metric sums
  // are this shard's contributions to the global ones.
  // Single pass (a backend that has it, this call's own statistics, method linear or pama/token):
  // nothing but the whitening moments is needed before the loss, so the loss pass itself computes
  // the counts, the indicator statistics (reported metrics) and the finite checks of the inputs.
  const bool single = L.be.single_pass_loss && !gstats.defined() &&
                      (m == kMethodLinear || (m == kMethodPama && g == kGranToken));
  const CheckKind prefs_kind = m == kMethodPama ? CheckKind::kPrefsPositive : CheckKind::kPrefs;
  const StatsLayout SL(static_cast<int>(in.n));
  at::Tensor stats, row_count, seq_weights, weights, finite_flags, extra;
  int64_t chunk_len = 0;
  const int64_t cpr = chunks_per_row(L.be, in.T, chunk_len);
  if (single) {
    stats = at::zeros({SL.size()}, opts);  // mean 0, var 0 unless whitened: unused then
    row_count = at::empty({in.B}, opts);
    seq_weights = at::empty({in.B, in.n}, opts);  // unused (no per-sequence weights)
    if (whiten) run_moments(L, in, stats, row_count);
    weights = at::empty({in.n}, opts);
    if (check_finite) finite_flags = at::empty({4}, opts);
    extra = at::empty({std::max<int64_t>(1, in.B * cpr * SinglePassPartial(static_cast<int>(in.n)).size())}, opts);
  } else {
    std::tie(stats, row_count, seq_weights) =
        gstats.defined() ? run_stats(L, in, eps_hi, whiten, noon, /*with_gram=*/false, gstats)
                         : run_stats(L, in, eps_hi, whiten, noon, /*with_gram=*/method_uses_gram(m));
    if (gstats.defined()) stats = gstats;
    if (check_finite) {  // after the statistics, so that the variance check shares the one host read
      check_finite_all({{"logp", in.logp},
                        {"old_logp", in.old_logp},
                        {"advantages", in.advantages},
                        {"ref_logp", in.ref_logp},
                        {"prefs", pr, prefs_kind},
                        {"advantages", whiten ? stats.narrow(0, SL.var(), in.n) : at::Tensor(), CheckKind::kVariance}},
                       in.mask_as_bool(), kPL);
    }
    weights = run_weights(L, stats, pr, in.n, m, g, cagrad_c);
  }
  // Ã is written only for callers that read it (pama_policy_loss_backward's callers: the fused output
  // layer); the entry point and the op's own autograd do not, and get an empty [0] tensor.
  at::Tensor a_tilde = return_a_tilde ? at::empty({in.B, in.T}, opts) : at::empty({0}, opts);
  at::Tensor dlogp = at::empty({in.B, in.T}, opts);
  at::Tensor row_scale = at::empty({in.B}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor metrics = at::empty({loss_metrics_size(static_cast<int>(in.n))}, opts);
  at::Tensor partials = at::empty({std::max<int64_t>(1, in.B * cpr * kLossPartialSize)}, opts);
  const bool token = m == kMethodPama && g == kGranToken;
  const bool per_row = m == kMethodPama && g == kGranSequence;
  PolicyLossParams p{in.logp.data_ptr(), in.old_logp.data_ptr(),
                     (in.ref_logp.defined() && beta_loss != 0.0) ? in.ref_logp.data_ptr() : nullptr,
                     in.advantages.data_ptr(), in.mask_bool(), stats.data_ptr(), row_count.data_ptr(),
                     weights.data_ptr(), seq_weights.data_ptr(), in.n, in.B, in.T, chunk_len, cpr,
                     eps_lo, eps_hi, dual_clip, beta_loss, whiten, noon, per_row,
                     token ? kCombineTokenThm1 : kCombineWeighted, a,
                     return_a_tilde ? a_tilde.data_ptr() : nullptr, row_scale.data_ptr(), dlogp.data_ptr(), loss.data_ptr(), metrics.data_ptr(),
                     partials.data_ptr(), dtype_code(in.logp.scalar_type())};
  p.mask_f32 = in.mask_f32();
  // prefs: method linear's weights on the single pass; pama/token's §4b weighted Theorem 1
  if (pr.defined() && (single || token)) p.prefs = pr.data_ptr();
  if (single) {
    p.single_pass = true;
    p.method = m;
    p.granularity = g;
    p.cagrad_c = cagrad_c;
    p.check_ref = (check_finite && in.ref_logp.defined()) ? in.ref_logp.data_ptr() : nullptr;
    p.extra_partials = extra.data_ptr();
    p.finite_flags = check_finite ? finite_flags.data_ptr() : nullptr;
  }
  L.be.policy_loss_forward(p, L.stream);
  if (single && check_finite) {  // the checks of the loss pass, in the order of the other path
    const at::Tensor bad = finite_flags.to(at::kDouble);  // a CPU tensor (single pass is CPU only)
    const double* f = bad.data_ptr<double>();
    const char* names[4] = {"logp", "old_logp", "advantages", "ref_logp"};
    for (int j = 0; j < 4; ++j)
      if (f[j] != 0) fail_check({names[j], at::Tensor()}, 0, kPL);
    check_finite_all({{"prefs", pr, prefs_kind},
                      {"advantages", whiten ? stats.narrow(0, SL.var(), in.n) : at::Tensor(), CheckKind::kVariance}},
                     in.mask, kPL);  // 1-d checks only: the mask (bool or float) is not read
  }
  return {loss, metrics, a_tilde, row_scale, dlogp};
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

struct ValueInputs : MaskedInputs {  // the mask: MaskedInputs
  at::Tensor values, old_values, returns;
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
  check_mask(mask, in.B, in.T, values, "values", op);
  in.mask = mask;
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
  auto check_inputs = [&] {
    check_finite_all({{"values", in.values}, {"old_values", in.old_values}, {"returns", in.returns}},
                     in.mask_as_bool(), kVL);
  };
  Launch L = backend_for(values, kVL);
  in.for_backend(L.be);
  // A backend with value_loss_checks tests the inputs in the loss pass; only when that finds a
  // non-finite value does the separate check run, to name the argument.
  const bool check_in_pass = check_finite && L.be.value_loss_checks;
  if (check_finite && !check_in_pass) check_inputs();
  auto opts = in.values.options().dtype(acc_type(in.values.scalar_type()));
  int64_t chunk_len = 0;
  const int64_t cpr = chunks_per_row(L.be, in.T, chunk_len);
  at::Tensor row_scale = at::empty({in.B}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor metrics = at::empty({value_metrics_size(static_cast<int>(in.n))}, opts);
  at::Tensor partials =
      at::empty({std::max<int64_t>(1, in.B * cpr * value_partial_size(static_cast<int>(in.n)))}, opts);
  ValueLossParams p{in.values.data_ptr(), in.old_values.data_ptr(), in.returns.data_ptr(), in.mask_bool(),
                    denoms.defined() ? denoms.data_ptr() : nullptr,
                    in.n, in.B, in.T, chunk_len, cpr, clip, a, row_scale.data_ptr(), loss.data_ptr(),
                    metrics.data_ptr(), partials.data_ptr(), dtype_code(in.values.scalar_type())};
  p.mask_f32 = in.mask_f32();
  bool nonfinite = false;
  if (check_in_pass) p.nonfinite = &nonfinite;
  L.be.value_loss_forward(p, L.stream);
  if (nonfinite) {
    check_inputs();
    TORCH_CHECK_VALUE(false, kVL, ": values, old_values or returns is NaN or Inf on a masked-in position");
  }
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
  in.for_backend(L.be);
  ValueLossBackwardParams p{g.data_ptr(), in.values.data_ptr(), in.old_values.data_ptr(), in.returns.data_ptr(),
                            in.mask_bool(), rs.data_ptr(), in.n, in.B, in.T, clip, grad.data_ptr(),
                            dtype_code(in.values.scalar_type())};
  p.mask_f32 = in.mask_f32();
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

}  // namespace pama
