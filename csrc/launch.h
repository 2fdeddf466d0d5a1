// launch.h — the contract between the device-independent op code (ops.cpp) and the kernels.
//
// Plain parameter structs and launcher declarations, no torch headers, so the .cu files compile
// with bare nvcc on a machine without a GPU. The same launchers exist twice: pama::cpu
// (cpu/<stage>.cpp, tables in cpu/tables.cpp) and pama::cuda (cuda/<stage>.cu, tables in
// cuda/ops_cuda.cpp); the op bodies (ops.cpp, preference_ops.cpp) pick one table per device and
// run the same stages on it.
//
// Conventions
// - Tensors are contiguous. [n, B, T] is objective-first; [B, T] per token; mask is bool [B, T].
// - `dtype` (DType) is the dtype of every floating input/output marked "dtype"; buffers marked
//   "acc" are float for fp32/fp16/bf16 inputs and double for float64 inputs.
// - Work is split into chunks: chunk k of row b covers t in [k*chunk_len, min(T,(k+1)*chunk_len))
//   and owns partial index b*chunks_per_row + k of the `partials` workspace (acc).
// - A launcher writes every element of its outputs (and partial entries it owns), so buffers may
//   be allocated uninitialised. Launchers enqueue on `stream` (cudaStream_t as void*) and never
//   synchronise with the host.
#pragma once

#include <cstdint>

namespace pama {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// §1: rewards[i,b,t] = -beta_kl * mask * (old_logp - ref_logp) + [t == last valid t of row b] * scores[i,b]
struct TokenRewardsParams {
  const void* scores;    // dtype [n, B]
  const void* old_logp;  // dtype [B, T]
  const void* ref_logp;  // dtype [B, T]
  const bool* mask;      // [B, T]
  void* rewards;         // dtype [n, B, T] out
  int64_t n, B, T;
  double beta_kl;
  int dtype;
};

// §2: per-objective GAE (pama::gae_step), one scan per (objective, row).
struct GaeParams {
  const void* rewards;  // dtype [n, B, T]
  const void* values;   // dtype [n, B, T]
  const bool* mask;     // [B, T]
  void* advantages;     // dtype [n, B, T] out
  void* returns;        // dtype [n, B, T] out  (advantages + values)
  int64_t n, B, T;
  double gamma, lam;
  int dtype;
};
// Adjoint of §2 (pama::gae_adjoint_step), walked forward in time.
struct GaeBackwardParams {
  const void* grad_advantages;  // dtype [n, B, T]
  const void* grad_returns;     // dtype [n, B, T]
  const bool* mask;             // [B, T]
  void* grad_rewards;           // dtype [n, B, T] out
  void* grad_values;            // dtype [n, B, T] out (includes grad_returns)
  int64_t n, B, T;
  double gamma, lam;
  int dtype;
};

// §3 statistics, two passes over the data.
// launch_stats_moments: partials = MomentsPartial per chunk; then writes stats[count, num_seqs,
//   mean, var] and row_count (row_counts, then the finalize tree of pama_math.h:
//   moments_lane / moments_tree_step / store_moments, finalize_moments_counts).
// launch_stats_indicators (after moments): per token N_i = whiten_noon(A_i), I_i = N_i * [u <= 1+eps_hi];
//   partials = IndicatorPartial per chunk (sumI, pos = [N_i > 0], ctok = thm1 weights of N,
//   gram = I_i I_j when with_gram); then writes stats[abar, pos, ctok, cseq, gram] and
//   seq_weights (finalize_indicator_totals / _rows / _cseq). Masked-out tokens contribute nothing.
struct StatsParams {
  const void* advantages;  // dtype [n, B, T]
  const void* logp;        // dtype [B, T]
  const void* old_logp;    // dtype [B, T]
  const bool* mask;        // [B, T]
  int64_t n, B, T;
  int64_t chunk_len, chunks_per_row;
  double eps_hi;
  bool whiten, noon, with_gram;
  void* stats;        // acc [StatsLayout(n).size()]
  void* row_count;    // acc [B]
  void* seq_weights;  // acc [B, n]
  void* partials;     // acc [B * chunks_per_row * max(MomentsPartial.size, IndicatorPartial.size)]
  int dtype;
  const float* mask_f32 = nullptr;  // as ValueLossParams::mask_f32 (Backend::float_mask)
};

// §4 weights from statistics (finalize_weights), one tiny launch.
struct WeightsParams {
  const void* stats;  // acc [StatsLayout(n).size()]
  const void* prefs;  // acc [n] or nullptr (uniform)
  int n;
  int method, granularity;  // pama::Method, pama::Granularity
  double cagrad_c;          // c of the cagrad / raco methods
  void* weights;            // acc [n] out
  int acc_is_double;
  void* scratch;  // Backend::solver_scratch_bytes of device memory (gram::Scratch), or nullptr where that is 0
};

// §4 fused policy loss forward. Per token: N_i = whiten_noon(A_i) with stats' mean/var; Ã from
// `combine` (kCombineTokenThm1: thm1 s*; kCombineWeighted: Σ w_i N_i with w = weights (global) or
// seq_weights[b] when weights_per_row); l = ppo_token_loss(Ã, …); k3 when ref_logp != nullptr.
// Writes a_tilde (0 on masked tokens), partials (kLossPartialSize per chunk), then row_scale,
// loss and metrics (finalize_row_scale / finalize_policy_loss). Also writes dlogp, the gradient
// coefficient dl/dlogp + beta_loss · dk3/dlogp of each token at these log-probs (0 on masked
// tokens; not yet scaled by row_scale), from which the op's autograd backward is one multiply.
// a_tilde stays Ã: the backward op recomputes dl/dlogp from (Ã, logp), and the fused output layer
// calls it per chunk at log-probs the forward never saw (fused_linear.py). a_tilde == nullptr
// (return_a_tilde=False: the entry point, which reads only the loss and the metrics): the CPU skips
// that write; the CUDA kernel stores Ã into the token's dlogp slot, which its next store overwrites.
// single_pass (a backend with Backend::single_pass_loss; method linear, or pama/token): the
// indicator statistics are not needed before the loss, so this pass also computes what the
// indicator pass would: per chunk [cnt, bad(4), sumI(n), pos(n), ctok(n)] (SinglePassPartial, in
// `extra_partials`), from which the launcher writes row_count, stats[count, num_seqs, abar, pos,
// ctok] and weights (finalize_weights) before the loss. `stats` holds the moments on entry (when
// whiten; mean 0 / var 0 otherwise). bad: masked-in non-finite logp, old_logp, advantages,
// check_ref (finite_flags [4]: nonzero (NaN) where some masked-in value is not finite; check_ref =
// ref_logp to check, or nullptr).
struct PolicyLossParams {
  const void* logp;        // dtype [B, T]
  const void* old_logp;    // dtype [B, T]
  const void* ref_logp;    // dtype [B, T] or nullptr
  const void* advantages;  // dtype [n, B, T]
  const bool* mask;        // [B, T]
  void* stats;             // acc, from the stats launchers (single_pass: completed here)
  void* row_count;         // acc [B] (single_pass: written here)
  void* weights;           // acc [n] (single_pass: written here)
  const void* seq_weights; // acc [B, n]
  int64_t n, B, T;
  int64_t chunk_len, chunks_per_row;
  double eps_lo, eps_hi, dual_clip, beta_loss;
  bool whiten, noon, weights_per_row;
  int combine, agg;
  void* a_tilde;    // acc [B, T] out, or nullptr (not written: return_a_tilde=False)
  void* row_scale;  // acc [B] out
  void* dlogp;      // acc [B, T] out
  void* loss;       // acc [1] out
  void* metrics;    // acc [loss_metrics_size(n)] out
  void* partials;   // acc [B * chunks_per_row * kLossPartialSize]
  int dtype;
  // prefs: acc [n] or nullptr (uniform). With combine kCombineTokenThm1 (pama/token) the combine is
  // Theorem 1 on N_i / ρ_i (§4b, prefs > 0); on the single pass of method
  // linear, the weights finalize_weights turns into `weights`.
  const void* prefs = nullptr;
  // single_pass only (see above)
  bool single_pass = false;
  int method = 0, granularity = 0;  // for finalize_weights
  double cagrad_c = 0.0;
  const void* check_ref = nullptr;  // dtype [B, T] or nullptr
  void* extra_partials = nullptr;   // acc [B * chunks_per_row * SinglePassPartial(n).size()]
  void* finite_flags = nullptr;     // acc [4] out: bad logp, old_logp, advantages, ref_logp
  const float* mask_f32 = nullptr;  // as ValueLossParams::mask_f32 (Backend::float_mask)
};
// The extra per-chunk sums of a single-pass policy-loss forward.
struct SinglePassPartial {
  int n;
  explicit SinglePassPartial(int n_) : n(n_) {}
  int cnt() const { return 0; }
  int bad() const { return 1; }  // 4 entries: logp, old_logp, advantages, ref_logp
  int sum_i() const { return 5; }
  int pos() const { return 5 + n; }
  int ctok() const { return 5 + 2 * n; }
  int size() const { return 5 + 3 * n; }
};
// grad_logp[b,t] = grad_loss * mask * row_scale[b] * (dl/dlogp + beta_loss * dk3/dlogp)
struct PolicyLossBackwardParams {
  const void* grad_loss;  // acc [1] (device scalar: no host read)
  const void* logp;       // dtype [B, T]
  const void* old_logp;   // dtype [B, T]
  const void* ref_logp;   // dtype [B, T] or nullptr
  const bool* mask;       // [B, T]
  const void* a_tilde;    // acc [B, T]
  const void* row_scale;  // acc [B]
  int64_t B, T;
  double eps_lo, eps_hi, dual_clip, beta_loss;
  void* grad_logp;  // dtype [B, T] out
  int dtype;
};

// §5 multi-head clipped value loss. partials = value_partial_size(n) per chunk; then
// finalize_value_loss writes row_scale, loss and metrics [clipfrac, head_loss(n)]. With
// `denominators` (global token and sequence counts of a data-parallel group, algorithms §8) the
// aggregation and clipfrac use them, so loss and metrics are this shard's contributions.
struct ValueLossParams {
  const void* values;        // dtype [n, B, T]
  const void* old_values;    // dtype [n, B, T]
  const void* returns;       // dtype [n, B, T]
  const bool* mask;          // [B, T]
  const void* denominators;  // acc [2] (token count, sequence count) or nullptr (this batch's own)
  int64_t n, B, T;
  int64_t chunk_len, chunks_per_row;
  double clip;
  int agg;
  void* row_scale;  // acc [B] out
  void* loss;       // acc [1] out
  void* metrics;    // acc [value_metrics_size(n)] out
  void* partials;   // acc [B * chunks_per_row * value_partial_size(n)]
  int dtype;
  // With Backend::value_loss_checks: nullptr, or (check_finite) set to whether some masked-in value,
  // old value or return is NaN/Inf, computed in the loss pass (a host bool: CPU backends only)
  bool* nonfinite = nullptr;
  // With Backend::float_mask: nullptr, or the caller's float32 mask [B, T] (nonzero = in, NaN too, as
  // to(bool)), read in place of `mask` (which is then nullptr)
  const float* mask_f32 = nullptr;
};
// grad_values[i,b,t] = grad_loss * 0.5 * mask * row_scale[b] * dl_i/dV
struct ValueLossBackwardParams {
  const void* grad_loss;   // acc [1]
  const void* values;      // dtype [n, B, T]
  const void* old_values;  // dtype [n, B, T]
  const void* returns;     // dtype [n, B, T]
  const bool* mask;        // [B, T]
  const void* row_scale;   // acc [B]
  int64_t n, B, T;
  double clip;
  void* grad_values;  // dtype [n, B, T] out
  int dtype;
  const float* mask_f32 = nullptr;  // as ValueLossParams::mask_f32
};

// One table of launchers per device.

namespace cuda {
constexpr int64_t kChunkLen = 1024;
void launch_token_rewards(const TokenRewardsParams& p, void* stream);
void launch_multi_gae(const GaeParams& p, void* stream);
void launch_multi_gae_backward(const GaeBackwardParams& p, void* stream);
void launch_stats_moments(const StatsParams& p, void* stream);
void launch_stats_indicators(const StatsParams& p, void* stream);
void launch_pareto_weights(const WeightsParams& p, void* stream);
void launch_policy_loss_forward(const PolicyLossParams& p, void* stream);
void launch_policy_loss_backward(const PolicyLossBackwardParams& p, void* stream);
void launch_value_loss_forward(const ValueLossParams& p, void* stream);
void launch_value_loss_backward(const ValueLossBackwardParams& p, void* stream);
}  // namespace cuda

}  // namespace pama

// =================================================================================================
// §6-§7 preference-data ops (csrc/preference_ops.cpp, cuda/preference.cu). Their own launcher
// table, so the PPO table above stays as it is.
// =================================================================================================
namespace pama {

// §7 per-objective DPO losses. h_b = dpo_margin(...) with lengths (acc, clamped >= 1) or 1;
// losses[i] = Σ_b dpo_pair_loss / max(B, 1) (fixed order), coef[i, b] from dpo_pair_loss.
struct DpoLossParams {
  const void* policy_chosen;    // dtype [B]
  const void* policy_rejected;  // dtype [B]
  const void* ref_chosen;       // dtype [B]
  const void* ref_rejected;     // dtype [B]
  const void* labels;           // acc [n, B] (any real values; read through their sign)
  const void* chosen_lengths;   // acc [B] or nullptr
  const void* rejected_lengths; // acc [B] or nullptr
  int64_t n, B;
  double beta;
  void* losses;  // acc [n] out
  void* coef;    // acc [n, B] out
  int dtype;
};
// grad_h[b] = Σ_i grad_losses[i] * coef[i, b];  grad_chosen = grad_h / Lc, grad_rejected = grad_h / Lr
// (d/d policy_chosen; the other three log-probs get ±these).
struct DpoLossBackwardParams {
  const void* grad_losses;       // acc [n]
  const void* coef;              // acc [n, B]
  const void* chosen_lengths;    // acc [B] or nullptr
  const void* rejected_lengths;  // acc [B] or nullptr
  int64_t n, B;
  void* grad_chosen;    // dtype [B] out
  void* grad_rejected;  // dtype [B] out
  int dtype;
};

// §6 Gram of per-objective gradients over a table of K parameters: ptrs[i * K + k] is objective
// i's gradient of parameter k (numel[k] elements, contiguous, `dtype`; nullptr = zero). Host
// arrays; the launcher copies what each launch needs into its kernel arguments. Parameter k is
// split into ceil(numel[k] / block) blocks of `block` elements (Backend gram_block); block c of
// parameter k owns partial index part_offset[k] + c (gram_pairs(n) acc entries, upper triangle),
// and G = finalize_gram over all partials in index order (deterministic).
struct GradGramParams {
  const void* const* ptrs;    // host [n * K]
  const int64_t* numel;       // host [K]
  const int64_t* part_offset; // host [K + 1] (part_offset[K] = number of partials)
  int64_t n, K, block;
  void* partials;  // acc [part_offset[K] * gram_pairs(n)]
  void* gram;      // acc [n, n] out
  int dtype;
};
// §6 combination: out_k = (accumulate ? out_k : 0) + Σ_i coeffs[i] * ptrs[i * K + k] (i in order,
// in acc = double if either dtype is float64, else float; nullptr gradients are skipped).
struct CombineGradsParams {
  const void* const* ptrs;  // host [n * K], `dtype`
  void* const* outs;        // host [K], `out_dtype`, contiguous
  const int64_t* numel;     // host [K]
  const void* coeffs;       // acc [n] (device)
  int64_t n, K;
  bool accumulate;
  int dtype, out_dtype;
};
// §6 weights on a Gram matrix (pama::gram_weights), one thread.
struct GramWeightsParams {
  const void* gram;   // acc [n, n]
  const void* prefs;  // acc [n] or nullptr
  int n, method;      // pama::Method (not pama)
  double c;           // c of the cagrad / raco methods
  void* weights;      // acc [n] out
  int acc_is_double;
  void* scratch;      // as WeightsParams::scratch
};

// The one launcher table: every stage of both op families, for one device. pama::cpu (cpu/tables.cpp)
// and pama::cuda (cuda/ops_cuda.cpp) each fill one; the op bodies pick the table of the inputs' device.
struct Backend {
  const char* name;
  int64_t chunk_len;   // tokens per chunk for the chunked passes
  int64_t gram_block;  // elements per Gram partial / combine task
  bool single_pass_loss;  // policy_loss_forward supports PolicyLossParams::single_pass
  bool value_loss_checks;  // value_loss_forward fills ValueLossParams::nonfinite
  // the launchers of the value loss, the statistics and the policy-loss forward read a float32 mask as it
  // is (their Params::mask_f32) instead of a bool copy made per call
  bool float_mask;
  // bytes of device memory the weights launchers (pareto_weights, gram_weights) need for the exact
  // solvers' working arrays (gram::Scratch), passed as their Params::scratch; 0: they use the stack
  int64_t solver_scratch_bytes;
  // RL ops (ops.cpp)
  void (*token_rewards)(const TokenRewardsParams&, void* stream);
  void (*multi_gae)(const GaeParams&, void* stream);
  void (*multi_gae_backward)(const GaeBackwardParams&, void* stream);
  void (*stats_moments)(const StatsParams&, void* stream);
  void (*stats_indicators)(const StatsParams&, void* stream);
  void (*pareto_weights)(const WeightsParams&, void* stream);
  void (*policy_loss_forward)(const PolicyLossParams&, void* stream);
  void (*policy_loss_backward)(const PolicyLossBackwardParams&, void* stream);
  void (*value_loss_forward)(const ValueLossParams&, void* stream);
  void (*value_loss_backward)(const ValueLossBackwardParams&, void* stream);
  // preference ops (preference_ops.cpp)
  void (*dpo_loss_forward)(const DpoLossParams&, void* stream);
  void (*dpo_loss_backward)(const DpoLossBackwardParams&, void* stream);
  void (*gradient_gram)(const GradGramParams&, void* stream);
  void (*combine_gradients)(const CombineGradsParams&, void* stream);
  void (*gram_weights)(const GramWeightsParams&, void* stream);
};

namespace cuda {
constexpr int64_t kGramBlock = 65536;
void launch_dpo_loss_forward(const DpoLossParams& p, void* stream);
void launch_dpo_loss_backward(const DpoLossBackwardParams& p, void* stream);
void launch_gradient_gram(const GradGramParams& p, void* stream);
void launch_combine_gradients(const CombineGradsParams& p, void* stream);
void launch_gram_weights(const GramWeightsParams& p, void* stream);
}  // namespace cuda

}  // namespace pama
