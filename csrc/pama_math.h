// pama_math.h — the scalar math of docs/algorithms.md, shared by the CPU kernels (ops.cpp) and the CUDA
// kernels (cuda/*.cu). One source of truth per formula: every kernel calls these functions and
// none re-derives them. Plain C++ with no torch headers; `acc` is the accumulation type
// (float for fp32/fp16/bf16 inputs, double for float64 inputs).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PAMA_HD __host__ __device__ __forceinline__
#else
#define PAMA_HD inline
#endif

#include "gram_solvers.h"  // pama::mgda_weights, pama::cagrad_weights (exact, float64)

namespace pama {

constexpr int kMaxObjectives = 64;
static_assert(gram::kMaxN == kMaxObjectives, "gram_solvers.h sizes its scratch for kMaxObjectives");
constexpr double kWhitenEps = 1e-8;       // algorithms §3: sqrt(var + 1e-8)
constexpr double kLogRatioClamp = 20.0;   // algorithms §4: exp(clamp(logp - old_logp, -20, 20))

// Combination modes of the policy loss (resolved from method x granularity on the host).
enum Combine : int {
  kCombineTokenThm1 = 0,  // pama/token: Ã = projection of 0 onto [min_i N_i, max_i N_i]
  kCombineWeighted = 1,   // Ã = Σ_i w_i N_i, w global (stride 0) or per row (stride n)
};
enum Agg : int { kAggTokenMean = 0, kAggSeqMeanTokenMean = 1, kAggSeqMeanTokenSum = 2 };
// The one vocabulary of weighting methods (docs/algorithms.md §4, §6), for the statistics ops
// (pareto_weights, pama_policy_loss: every method; the Gram-based ones use the statistics Gram) and
// the Gram op (gram_weights: every method but pama, which needs the per-token indicators). Python
// mirrors it once (pama_ext.vocab.METHODS, tested against the weighting_methods op).
enum Method : int {
  kMethodPama = 0,    // Theorem 1 (closed form), at token / sequence / batch granularity
  kMethodLinear = 1,  // the user weights (prefs), MORLHF
  kMethodMgda = 2,    // the min-norm point of the Gram
  kMethodCagrad = 3,  // CAGrad's coefficients (prefs as w, cagrad_c as c)
  kMethodRaco = 4,    // CAGrad with RACO's clip p~ = min(p*, w)
  kMethodPcgrad = 5,  // PCGrad in Gram form
  kNumMethods = 6,
};
constexpr const char* kMethodNames[kNumMethods] = {"pama", "linear", "mgda", "cagrad", "raco", "pcgrad"};
PAMA_HD bool method_uses_gram(int m) { return m >= kMethodMgda; }
enum Granularity : int { kGranToken = 0, kGranSequence = 1, kGranBatch = 2 };

// Layout of the flat statistics vector (algorithms §3), (n+3)^2 - 7 entries:
// [count, num_seqs, mean(n), var(n), abar(n), pos(n), ctok(n), cseq(n), gram(n*n)]
struct StatsLayout {
  int n;
  PAMA_HD explicit StatsLayout(int n_) : n(n_) {}
  PAMA_HD int count() const { return 0; }
  PAMA_HD int num_seqs() const { return 1; }
  PAMA_HD int mean() const { return 2; }
  PAMA_HD int var() const { return 2 + n; }
  PAMA_HD int abar() const { return 2 + 2 * n; }
  PAMA_HD int pos() const { return 2 + 3 * n; }
  PAMA_HD int ctok() const { return 2 + 4 * n; }
  PAMA_HD int cseq() const { return 2 + 5 * n; }
  PAMA_HD int gram() const { return 2 + 6 * n; }
  PAMA_HD int size() const { return 2 + 6 * n + n * n; }
};
// The n whose statistics vector has `len` entries, or 0 when no n in [1, kMaxObjectives] fits.
inline int stats_num_objectives(int64_t len) {
  for (int n = 1; n <= 64; ++n)
    if (StatsLayout(n).size() == len) return n;
  return 0;
}

// Per-chunk partial sums. A chunk is a contiguous token range of one row; the CPU uses one chunk
// per row, the CUDA kernels several. Totals are sums over chunks in a fixed order (deterministic).
// stage 1: [cnt, mean(n), msd(n)]: the chunk's token count, mean and mean squared deviation from
// that mean (M2 / cnt, not M2: see moments_merge). 0, 0 for an empty chunk.
struct MomentsPartial {
  int n;
  PAMA_HD explicit MomentsPartial(int n_) : n(n_) {}
  PAMA_HD int cnt() const { return 0; }
  PAMA_HD int mean() const { return 1; }
  PAMA_HD int msd() const { return 1 + n; }
  PAMA_HD int size() const { return 1 + 2 * n; }
};
struct IndicatorPartial {  // stage 2: [sumI(n), pos(n), ctok(n), gram(n*n)]
  int n;
  PAMA_HD explicit IndicatorPartial(int n_) : n(n_) {}
  PAMA_HD int sum_i() const { return 0; }
  PAMA_HD int pos() const { return n; }
  PAMA_HD int ctok() const { return 2 * n; }
  PAMA_HD int gram() const { return 3 * n; }
  PAMA_HD int size(bool with_gram) const { return 3 * n + (with_gram ? n * n : 0); }
};
// stage 3 (policy loss): [Σ m·l, Σ m·k3, Σ clipped, Σ (old - logp), Σ active]
constexpr int kLossPartialSize = 5;
// policy-loss metrics vector: [pg_loss, kl_loss, clipfrac, approx_kl, active, abar(n), pos(n), weights(n)]
constexpr int kLossMetricScalars = 5;
PAMA_HD int loss_metrics_size(int n) { return kLossMetricScalars + 3 * n; }
// value loss partial: [count, Σ clipped (over heads), Σ_t m·l_i (n)]
PAMA_HD int value_partial_size(int n) { return 2 + n; }
// value-loss metrics vector: [clipfrac, head_loss(n)]
PAMA_HD int value_metrics_size(int n) { return 1 + n; }

// x clamped to [lo, hi] (lo <= hi); NaN stays NaN. Two selects of the form `a < b ? b : a`, which
// the compilers turn into one max / min instruction each (a nested select became two compares and
// two blends per value in the vectorised CPU loops).
template <typename T>
PAMA_HD T clampv(T x, T lo, T hi) {
  const T y = x < lo ? lo : x;
  return y > hi ? hi : y;
}
template <typename T>
PAMA_HD T maxv(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
PAMA_HD T minv(T a, T b) {
  return a < b ? a : b;
}

// Chunk `chunk` of the [B, T] token grid (the convention of launch.h): row b, tokens
// [t_begin, t_end). Used by the CPU and the CUDA chunk passes alike.
struct ChunkBounds {
  int64_t b, t_begin, t_end;
};
PAMA_HD ChunkBounds chunk_bounds(int64_t chunk, int64_t chunks_per_row, int64_t chunk_len, int64_t T) {
  const int64_t t_begin = (chunk % chunks_per_row) * chunk_len;
  return {chunk / chunks_per_row, t_begin, minv(T, t_begin + chunk_len)};
}

// ---- §2 GAE --------------------------------------------------------------------------------
// One backward-in-time step; carry (next_v, last_a) starts at (0, 0) at t = T-1.
// Returns A[t] (= last_a after the step).
template <typename T>
PAMA_HD T gae_step(T r, T v, bool m, T gamma, T gamma_lam, T& next_v, T& last_a) {
  T delta = r + gamma * next_v - v;
  T a = delta + gamma_lam * last_a;
  if (m) {
    next_v = v;
    last_a = a;
  }
  return last_a;
}

// Adjoint of gae_step, walked forward in time (t = 0 … T-1) with carry (c_la, c_nv) = (0, 0).
// g_adv is dL/dA[t] + dL/dreturns[t]; adds dL/dr[t] and dL/dV[t] (excluding the returns term).
template <typename T>
PAMA_HD void gae_adjoint_step(T g_adv, bool m, T gamma, T gamma_lam, T& c_la, T& c_nv, T& g_r, T& g_v) {
  T g_la = g_adv + c_la;
  T g_a = m ? g_la : T(0);  // a[t] is stored only on masked-in steps
  g_r = g_a;                // dδ/dr = 1, dA/dδ = 1
  g_v = (m ? c_nv : T(0)) - g_a;
  c_la = (m ? T(0) : g_la) + gamma_lam * g_a;
  c_nv = (m ? T(0) : c_nv) + gamma * g_a;
}

// ---- §3 whitening and Noon ------------------------------------------------------------------
template <typename T>
PAMA_HD T inv_std(T var) {
  return T(1) / std::sqrt(var + T(kWhitenEps));
}
template <typename T>
PAMA_HD T whiten_value(T a, T mean, T istd) {
  return (a - mean) * istd;
}
template <typename T>
PAMA_HD T noon_value(T x) {
  return maxv(x, T(0));
}
template <typename T>
PAMA_HD T whiten_noon(T a, T mean, T istd, bool whiten, bool noon) {
  T x = whiten ? whiten_value(a, mean, istd) : a;
  return noon ? noon_value(x) : x;
}
// Moments are accumulated in a scaled form so that no intermediate exceeds the result: a chunk
// keeps its mean Σ a·(1/cnt) and its mean squared deviation Σ (d·(1/sqrt(cnt)))² (d = a − mean)
// rather than Σ a and Σ d², and chunks merge through those. Σ d² overflows float32 once
// |d| ~ 1e19 (d² ~ 1e38) although the variance itself fits (up to FLT_MAX ~ 3.4e38); in this form
// the variance is right whenever it is representable, and +inf (an honest overflow) otherwise.
// The per-chunk factors: inv = 1/cnt, rs = 1/sqrt(cnt) (both 0 for an empty chunk).
template <typename T>
PAMA_HD void moments_chunk_scales(T cnt, T& inv, T& rs) {
  inv = cnt > T(0) ? T(1) / cnt : T(0);
  rs = cnt > T(0) ? T(1) / std::sqrt(cnt) : T(0);
}
// Merges a chunk's (c_cnt, c_mean, c_msd) into a running (count, mean, msd) (Chan's parallel
// update divided through by the new count): with fa = count/total, fb = c_cnt/total and
// δ = c_mean − mean, mean += δ·fb and msd = fa·msd + fb·c_msd + (δ·fa)·(δ·fb).
template <typename T>
PAMA_HD void moments_merge(T& count, T& mean, T& msd, T c_cnt, T c_mean, T c_msd) {
  if (c_cnt <= T(0)) return;
  const T total = count + c_cnt;
  const T fa = count / total, fb = c_cnt / total;
  const T delta = c_mean - mean;
  mean += delta * fb;
  msd = fa * msd + fb * c_msd + (delta * fa) * (delta * fb);
  count = total;
}
// Unbiased variance msd·count/(count − 1), 0 when count <= 1 (algorithms §3).
template <typename T>
PAMA_HD T unbiased_var(T msd, T count) {
  return count > T(1) ? msd * (count / (count - T(1))) : T(0);
}

// ---- §4 ratio, PPO token loss, KL ------------------------------------------------------------
// The per-token formulas come in two forms: the usual one, and a `_from_exp` one that takes the
// exponential from the caller (the vectorised CPU loops compute it lane-wise). Both are this one
// formula; the usual form is the `_from_exp` form with std::exp. Written with selects only (no
// data-dependent branch, no short-circuit &&), so a loop over tokens vectorises.

// The clamped log-ratio x = clamp(logp - old_logp, -20, 20): the ratio is exp(x).
template <typename T>
PAMA_HD T ppo_log_ratio(T logp, T old_logp) {
  return clampv(logp - old_logp, T(-kLogRatioClamp), T(kLogRatioClamp));
}
template <typename T>
PAMA_HD T ppo_ratio(T logp, T old_logp) {
  return std::exp(ppo_log_ratio(logp, old_logp));
}

// Clipped surrogate with dual clip for one token: loss, d loss / d logp, and whether the
// clipped branch was taken (clipfrac). verl's compute_policy_loss, written per token.
// u = exp(ppo_log_ratio(logp, old_logp)).
template <typename T>
PAMA_HD T ppo_token_loss_from_exp(T adv, T logp, T old_logp, T u, T eps_lo, T eps_hi, T dual_clip, T& dlogp,
                                  bool& clipped) {
  const T x = logp - old_logp;
  const bool in_range = (x >= T(-kLogRatioClamp)) & (x <= T(kLogRatioClamp));
  const T lo = T(1) - eps_lo, hi = T(1) + eps_hi;
  const T l1 = -adv * u;
  const T l2 = -adv * clampv(u, lo, hi);
  clipped = l2 > l1;
  const T l12 = clipped ? l2 : l1;
  const T dl12 = clipped ? (((u >= lo) & (u <= hi)) ? -adv : T(0)) : -adv;
  const T l3 = -adv * dual_clip;
  const bool dual = (adv < T(0)) & (l3 < l12);  // the dual clip binds
  dlogp = (in_range & !dual) ? dl12 * u : T(0);
  return dual ? l3 : l12;
}
template <typename T>
PAMA_HD T ppo_token_loss(T adv, T logp, T old_logp, T eps_lo, T eps_hi, T dual_clip, T& dlogp,
                         bool& clipped) {
  return ppo_token_loss_from_exp(adv, logp, old_logp, ppo_ratio(logp, old_logp), eps_lo, eps_hi, dual_clip,
                                 dlogp, clipped);
}

// k3 estimator of KL(π_θ || π_ref) per token and its derivative w.r.t. logp.
// e = exp(k3_log_arg(logp, ref_logp)).
template <typename T>
PAMA_HD T k3_log_arg(T logp, T ref_logp) {
  return ref_logp - logp;
}
template <typename T>
PAMA_HD T k3_kl_from_exp(T logp, T ref_logp, T e, T& dlogp) {
  const T d = k3_log_arg(logp, ref_logp);
  dlogp = T(1) - e;
  return e - d - T(1);
}
template <typename T>
PAMA_HD T k3_kl(T logp, T ref_logp, T& dlogp) {
  return k3_kl_from_exp(logp, ref_logp, std::exp(k3_log_arg(logp, ref_logp)), dlogp);
}

// ---- §4 Theorem 1 (closed-form min-norm weights over a scalar per objective) -----------------
// s* from the range of the values: the projection of 0 onto [mn, mx]. Callers that need only s*
// (no weights) keep a running min / max and call this, so no array of the n values is needed.
template <typename T>
PAMA_HD T thm1_value(T mn, T mx) {
  return mn > T(0) ? mn : (mx < T(0) ? mx : T(0));
}

// The Theorem-1 weight of each value equal to the minimum (w_min) and to the maximum (w_max), given
// the range [mn, mx] and how many values equal each end (nmin, nmax >= 1): the weight c_min of the
// minimum end (1 when mn > 0, 0 when mx < 0, else mx / (mx - mn)) is shared uniformly by its ties,
// 1 - c_min likewise; a value that is both (mn == mx) gets both.
template <typename T>
PAMA_HD void thm1_tie_weights(T mn, T mx, T nmin, T nmax, T& w_min, T& w_max) {
  const T width = mx - mn;
  const T c_min = mn > T(0) ? T(1) : (mx < T(0) ? T(0) : mx / (width > T(0) ? width : T(1)));
  w_min = c_min / nmin;
  w_max = (T(1) - c_min) / nmax;
}

// v[i * stride], i < n. Returns s* (thm1_value of min v, max v); when c != nullptr, adds
// scale * c_i to c[i] (ties share uniformly), so callers can accumulate means directly.
template <typename T>
PAMA_HD T thm1(const T* v, int64_t stride, int n, T* c, T scale) {
  T mn = v[0], mx = v[0];
  for (int i = 1; i < n; ++i) {
    T x = v[i * stride];
    mn = minv(mn, x);
    mx = maxv(mx, x);
  }
  if (c != nullptr) {
    int nmin = 0, nmax = 0;
    for (int i = 0; i < n; ++i) {
      nmin += v[i * stride] == mn;
      nmax += v[i * stride] == mx;
    }
    T w_min, w_max;
    thm1_tie_weights(mn, mx, T(nmin), T(nmax), w_min, w_max);
    for (int i = 0; i < n; ++i) {
      T x = v[i * stride];
      c[i] += scale * ((x == mn ? w_min : T(0)) + (x == mx ? w_max : T(0)));
    }
  }
  return thm1_value(mn, mx);
}

// ---- §4b preference-steered Theorem 1 (weighted Tchebycheff, docs/algorithms.md §4b) -------------
// With preferences w > 0, Theorem 1 is applied to the rescaled values v_i / ρ_i, ρ_i = n·w_i / Σ_j w_j
// (w relative to uniform). pref_factor is 1/ρ_i, written as (1/n)·Σ_j w_j / w_i so that every uniform
// w (any constant vector) gives exactly 1 and today's PAMA bit for bit. O(n) per objective, computed
// once per call (CPU) or per block (CUDA), never per token.
template <typename T>
PAMA_HD T pref_factor(const T* w, int n, int i) {
  T s = T(0);
  for (int j = 0; j < n; ++j) s += w[j] / w[i];
  return s / T(n);
}
// The value objective i contributes to the weighted Theorem 1: v_i / ρ_i.
template <typename T>
PAMA_HD T pref_scaled(T v, T factor) {
  return v * factor;
}

// §4/§6 MGDA and CAGrad on a Gram matrix: mgda_weights, cagrad_weights in gram_solvers.h

template <typename T>
PAMA_HD void gram_weights(const T* G, const T* w, int n, int method, T c, T* out, gram::Scratch& scratch);

// Combination weights used by the loss for a batch-level method: pama/batch (Theorem 1 on abar),
// or gram_weights of every other method on the statistics Gram. prefs may be null (uniform; for pama:
// plain Theorem 1, otherwise the weighted one of §4b). scratch: the exact solvers' working arrays.
template <typename T>
PAMA_HD void batch_weights(const T* stats, int n, int method, const T* prefs, T cagrad_c, T* w,
                           gram::Scratch& scratch) {
  StatsLayout L(n);
  if (method == kMethodPama && prefs != nullptr) {  // §4b: Theorem 1 on abar_i / ρ_i, weights c_i / ρ_i
    T v[kMaxObjectives];
    for (int i = 0; i < n; ++i) {
      v[i] = pref_scaled(stats[L.abar() + i], pref_factor(prefs, n, i));
      w[i] = T(0);
    }
    thm1(v, 1, n, w, T(1));
    for (int i = 0; i < n; ++i) w[i] = pref_scaled(w[i], pref_factor(prefs, n, i));
  } else if (method == kMethodPama) {
    for (int i = 0; i < n; ++i) w[i] = T(0);
    thm1(stats + L.abar(), 1, n, w, T(1));
  } else {
    gram_weights(stats + L.gram(), prefs, n, method, cagrad_c, w, scratch);
  }
}

// ---- §4 aggregation ---------------------------------------------------------------------------
// Weight of row b's token sum in the aggregated loss (verl agg_loss; empty rows excluded).
template <typename T>
PAMA_HD T agg_row_scale(int agg, T row_count, T total_count, T num_seqs) {
  if (agg == kAggTokenMean) return T(1) / maxv(total_count, T(1));
  if (row_count <= T(0)) return T(0);
  T nseq = maxv(num_seqs, T(1));
  return agg == kAggSeqMeanTokenMean ? T(1) / (row_count * nseq) : T(1) / nseq;
}

// ---- §5 clipped value loss for one token ------------------------------------------------------
template <typename T>
PAMA_HD T value_token_loss(T v, T old_v, T ret, T clip, T& dv, bool& clipped) {
  T diff = v - old_v;
  const bool in_range = diff >= -clip && diff <= clip;
  // Inside the clip range Vc = V exactly (old + (V - old) would differ from V by rounding and
  // count spurious clips, e.g. with clip = inf).
  T vc = in_range ? v : old_v + clampv(diff, -clip, clip);
  T e1 = v - ret, e2 = vc - ret;
  T l1 = e1 * e1, l2 = e2 * e2;
  clipped = l2 > l1;
  dv = clipped ? (in_range ? T(2) * e2 : T(0)) : T(2) * e1;
  return clipped ? l2 : l1;
}

// ================================================================================================
// Finalisation: chunk partials -> totals. Shared by the CPU path (called with tid = 0, nth = 1, or
// through the serial drivers of the finalize tree below) and the CUDA finalize kernels (tid =
// threadIdx.x, nth = blockDim.x, __syncthreads() between phases; one thread per tree lane). Every
// total is summed over chunks in a fixed order, so results are deterministic.
// Chunk c of row b is partial index b * chunks_per_row + c.
// ================================================================================================

// Phase 1 of the moments and of the value loss (per row): row_count[b] = Σ_c cnt over the row's chunk
// partials of `psize` entries, whose entry 0 is the token count (MomentsPartial::cnt(), the value
// partial's count).
template <typename T>
PAMA_HD void row_counts(const T* part, int psize, int64_t B, int64_t cpr, T* row_count, int64_t tid, int64_t nth) {
  for (int64_t b = tid; b < B; b += nth) {
    T c = 0;
    for (int64_t k = 0; k < cpr; ++k) c += part[(b * cpr + k) * psize];
    row_count[b] = c;
  }
}
// ---- the finalize reductions' fixed tree ---------------------------------------------------------
// A total over many partials is taken in kMergeLanes lanes: lane l combines the items l,
// l + kMergeLanes, ... in order; then, for s = 1, 2, ..., kMergeLanes / 2, every lane l that is a
// multiple of 2s combines lane l + s into itself (`step(l, s)`), and lane 0 ends with the total. The
// order depends on the item count only: the CPU runs the lanes and levels one after another
// (serial_tree), the CUDA finalize kernels one lane per thread with a barrier per level
// (cuda/common.cuh block_tree), so both combine in the same order, whatever the thread count. One
// thread combining every partial in turn was a chain of B·cpr dependent steps on the GPU.
constexpr int kMergeLanes = 256;
template <typename Step>
inline void serial_tree(Step step) {
  for (int s = 1; s < kMergeLanes; s *= 2)
    for (int l = 0; l < kMergeLanes; l += 2 * s) step(l, s);
}
// The tree step of K sums per lane kept as acc[q * kMergeLanes + lane].
template <typename T>
PAMA_HD void lanes_add(T* acc, int K, int lane, int s) {
  for (int q = 0; q < K; ++q) acc[q * kMergeLanes + lane] += acc[q * kMergeLanes + lane + s];
}

// Moments phase 2 (per objective): mean_i, var_i merged from the B·cpr chunk partials by the tree,
// the items of lane l being partials (moments_lane), the step moments_merge (moments_tree_step);
// store_moments writes lane 0's result.
template <typename T>
PAMA_HD void moments_lane(const T* part, int n, int i, int64_t nparts, int lane, T& count, T& mean, T& msd) {
  const MomentsPartial P(n);
  count = mean = msd = T(0);
  for (int64_t k = lane; k < nparts; k += kMergeLanes) {
    const T* p = part + k * P.size();
    moments_merge(count, mean, msd, p[P.cnt()], p[P.mean() + i], p[P.msd() + i]);
  }
}
template <typename T>
PAMA_HD void moments_tree_step(T* count, T* mean, T* msd, int lane, int s) {
  moments_merge(count[lane], mean[lane], msd[lane], count[lane + s], mean[lane + s], msd[lane + s]);
}
template <typename T>
PAMA_HD void store_moments(T* stats, int n, int i, T count, T mean, T msd) {
  const StatsLayout L(n);
  stats[L.mean() + i] = mean;
  stats[L.var() + i] = unbiased_var(msd, count);
}
// Moments phase 3 (one thread, after phase 1): count and num_seqs from row_count.
template <typename T>
PAMA_HD void finalize_moments_counts(const T* row_count, int n, int64_t B, T* stats) {
  const StatsLayout L(n);
  T count = 0, nseq = 0;
  for (int64_t b = 0; b < B; ++b) {
    count += row_count[b];
    nseq += row_count[b] > T(0) ? T(1) : T(0);
  }
  stats[L.count()] = count;
  stats[L.num_seqs()] = nseq;
}
// Phases 2 and 3 on one thread (the CPU): the merge tree's lanes one after another.
template <typename T>
void finalize_moments_stats(const T* part, int n, int64_t B, int64_t cpr, const T* row_count, T* stats) {
  T count[kMergeLanes], mean[kMergeLanes], msd[kMergeLanes];
  for (int i = 0; i < n; ++i) {
    for (int l = 0; l < kMergeLanes; ++l) moments_lane(part, n, i, B * cpr, l, count[l], mean[l], msd[l]);
    serial_tree([&](int l, int s) { moments_tree_step(count, mean, msd, l, s); });
    store_moments(stats, n, i, count[0], mean[0], msd[0]);
  }
  finalize_moments_counts(row_count, n, B, stats);
}

// Indicators phase 1 (per entry of abar/pos/ctok/gram, and per row): batch means, and the
// per-sequence Theorem-1 weights seq_weights[b, :] from the per-sequence means of I_i.
template <typename T>
PAMA_HD void finalize_indicator_totals(const T* part, int n, int64_t B, int64_t cpr, bool with_gram,
                                       T* stats, int64_t tid, int64_t nth) {
  IndicatorPartial P(n);
  StatsLayout L(n);
  const int psize = P.size(with_gram);
  const T inv = T(1) / maxv(stats[L.count()], T(1));
  const int entries = psize;  // sum_i | pos | ctok | gram
  for (int64_t e = tid; e < entries; e += nth) {
    T s = 0;
    for (int64_t k = 0; k < B * cpr; ++k) s += part[k * psize + e];
    int dst = e < n ? L.abar() + e : (e < 2 * n ? L.pos() + (e - n) : (e < 3 * n ? L.ctok() + (e - 2 * n) : L.gram() + (e - 3 * n)));
    stats[dst] = s * inv;
  }
  if (!with_gram)
    for (int64_t e = tid; e < n * n; e += nth) stats[L.gram() + e] = T(0);
}
template <typename T>
PAMA_HD void finalize_indicator_rows(const T* part, int n, int64_t B, int64_t cpr, bool with_gram,
                                     const T* row_count, T* seq_weights, int64_t tid, int64_t nth) {
  IndicatorPartial P(n);
  const int psize = P.size(with_gram);
  for (int64_t b = tid; b < B; b += nth) {
    T* c = seq_weights + b * n;
    T v[kMaxObjectives];
    T inv = T(1) / maxv(row_count[b], T(1));
    for (int i = 0; i < n; ++i) {
      T s = 0;
      for (int64_t k = 0; k < cpr; ++k) s += part[(b * cpr + k) * psize + P.sum_i() + i];
      v[i] = s * inv;
      c[i] = T(0);
    }
    thm1(v, 1, n, c, T(1));
  }
}
// Indicators phase 2 (per objective, after phase 1): cseq_i = mean over non-empty rows of c[b, i].
template <typename T>
PAMA_HD void finalize_indicator_cseq(int n, int64_t B, const T* row_count, const T* seq_weights, T* stats,
                                     int64_t tid, int64_t nth) {
  StatsLayout L(n);
  T inv = T(1) / maxv(stats[L.num_seqs()], T(1));
  for (int64_t i = tid; i < n; i += nth) {
    T s = 0;
    for (int64_t b = 0; b < B; ++b)
      if (row_count[b] > T(0)) s += seq_weights[b * n + i];
    stats[L.cseq() + i] = s * inv;
  }
}

// Reported/combination weights of pareto_weights: pama/token -> ctok, pama/sequence -> cseq,
// otherwise batch_weights. Single thread.
template <typename T>
PAMA_HD void finalize_weights(const T* stats, int n, int method, int granularity, const T* prefs, T cagrad_c,
                              T* weights, gram::Scratch& scratch) {
  StatsLayout L(n);
  if (method == kMethodPama && granularity == kGranToken) {
    for (int i = 0; i < n; ++i) weights[i] = stats[L.ctok() + i];
  } else if (method == kMethodPama && granularity == kGranSequence) {
    for (int i = 0; i < n; ++i) weights[i] = stats[L.cseq() + i];
  } else {
    batch_weights(stats, n, method, prefs, cagrad_c, weights, scratch);
  }
}

// Policy loss phase 1 (per row): row_scale[b].
template <typename T>
PAMA_HD void finalize_row_scale(const T* row_count, int64_t B, int agg, T total, T nseq, T* row_scale,
                                int64_t tid, int64_t nth) {
  for (int64_t b = tid; b < B; b += nth) row_scale[b] = agg_row_scale(agg, row_count[b], total, nseq);
}
// Policy loss phase 2, lane `lane` of the finalize tree (its items are rows): the rows lane,
// lane + kMergeLanes, ... (each row's chunks in order) into acc[q * kMergeLanes + lane] for the
// kLossPartialSize totals [Σ row_scale·Σ m·l, Σ row_scale·Σ m·k3, Σ clipped, Σ (old - logp), Σ active].
template <typename T>
PAMA_HD void policy_loss_lane(const T* part, int64_t B, int64_t cpr, const T* row_scale, int lane, T* acc) {
  T pg = 0, kl = 0, clip = 0, akl = 0, active = 0;
  for (int64_t b = lane; b < B; b += kMergeLanes) {
    T rpg = 0, rkl = 0;
    for (int64_t k = 0; k < cpr; ++k) {
      const T* p = part + (b * cpr + k) * kLossPartialSize;
      rpg += p[0];
      rkl += p[1];
      clip += p[2];
      akl += p[3];
      active += p[4];
    }
    pg += row_scale[b] * rpg;
    kl += row_scale[b] * rkl;
  }
  acc[0 * kMergeLanes + lane] = pg;
  acc[1 * kMergeLanes + lane] = kl;
  acc[2 * kMergeLanes + lane] = clip;
  acc[3 * kMergeLanes + lane] = akl;
  acc[4 * kMergeLanes + lane] = active;
}
// Policy loss phase 3 (single thread): loss and metrics
// [pg_loss, kl_loss, clipfrac, approx_kl, active, abar(n), pos(n), weights(n)] from the tree's totals
// (lane 0 of acc, after lanes_add over kLossPartialSize sums).
template <typename T>
PAMA_HD void store_policy_loss(const T* acc, int n, const T* stats, const T* weights, T beta_loss, T* loss,
                               T* metrics) {
  StatsLayout L(n);
  const T pg = acc[0], kl = acc[kMergeLanes], clip = acc[2 * kMergeLanes], akl = acc[3 * kMergeLanes],
          active = acc[4 * kMergeLanes];
  T inv = T(1) / maxv(stats[L.count()], T(1));
  loss[0] = pg + beta_loss * kl;
  metrics[0] = pg;
  metrics[1] = kl;
  metrics[2] = clip * inv;
  metrics[3] = akl * inv;
  metrics[4] = active * inv;
  for (int i = 0; i < n; ++i) {
    metrics[kLossMetricScalars + i] = stats[L.abar() + i];
    metrics[kLossMetricScalars + n + i] = stats[L.pos() + i];
    metrics[kLossMetricScalars + 2 * n + i] = weights[i];
  }
}
// Policy loss phases 2 and 3 on one thread (the CPU): the tree's lanes one after another.
template <typename T>
void finalize_policy_loss(const T* part, int n, int64_t B, int64_t cpr, const T* row_scale, const T* stats,
                          const T* weights, T beta_loss, T* loss, T* metrics) {
  T acc[kLossPartialSize * kMergeLanes];
  for (int l = 0; l < kMergeLanes; ++l) policy_loss_lane(part, B, cpr, row_scale, l, acc);
  serial_tree([&](int l, int s) { lanes_add(acc, kLossPartialSize, l, s); });
  store_policy_loss(acc, n, stats, weights, beta_loss, loss, metrics);
}

// Value loss finalize: row_scale, loss = ½ Σ_i Σ_b scale_b Σ_t m·l_i, metrics [clipfrac, head_loss(n)].
// `denominators` (nullptr: this batch's own) are the global [token count, sequence count] (algorithms §8).
// The totals over rows use the finalize tree (items: rows):
//   phase 1 (per row, row_counts): row_scale[b] = the row's token count;
//   phase 2 (tree, value_counts_lane): [Σ count, Σ (count > 0), Σ clipped] in acc (3 sums);
//   phase 3 (per row, value_scale_rows): row_scale[b] = agg_row_scale(count_b, total, nseq), the
//     denominators (value_denominators) being the caller's or the tree's;
//   phase 4 (tree per head, value_head_lane): head_i = Σ_b row_scale[b] Σ_c Σ m·l_i; metrics[1 + i] = ½ head_i;
//   phase 5 (one thread, store_value_loss): loss = Σ_i metrics[1 + i] in head order, clipfrac.
template <typename T>
PAMA_HD void value_counts_lane(const T* part, int n, int64_t B, int64_t cpr, const T* row_count, int lane, T* acc) {
  const int ps = value_partial_size(n);
  T total = 0, nseq = 0, clip = 0;
  for (int64_t b = lane; b < B; b += kMergeLanes) {
    const T c = row_count[b];
    total += c;
    nseq += c > T(0) ? T(1) : T(0);
    for (int64_t k = 0; k < cpr; ++k) clip += part[(b * cpr + k) * ps + 1];
  }
  acc[lane] = total;
  acc[kMergeLanes + lane] = nseq;
  acc[2 * kMergeLanes + lane] = clip;
}
// (total, nseq) of phase 3: the caller's denominators, or the tree's totals (lane 0 of acc)
template <typename T>
PAMA_HD void value_denominators(const T* acc, const T* denominators, T& total, T& nseq) {
  total = denominators != nullptr ? denominators[0] : acc[0];
  nseq = denominators != nullptr ? denominators[1] : acc[kMergeLanes];
}
template <typename T>
PAMA_HD void value_scale_rows(int agg, T total, T nseq, int64_t B, T* row_scale, int64_t tid, int64_t nth) {
  for (int64_t b = tid; b < B; b += nth) row_scale[b] = agg_row_scale(agg, row_scale[b], total, nseq);
}
template <typename T>
PAMA_HD void value_head_lane(const T* part, int n, int i, int64_t B, int64_t cpr, const T* row_scale, int lane,
                             T* acc) {
  const int ps = value_partial_size(n);
  T head = 0;
  for (int64_t b = lane; b < B; b += kMergeLanes) {
    T r = 0;
    for (int64_t k = 0; k < cpr; ++k) r += part[(b * cpr + k) * ps + 2 + i];
    head += row_scale[b] * r;
  }
  acc[lane] = head;
}
// clip_total: the tree's Σ clipped (phase 2); total: phase 3's token count
template <typename T>
PAMA_HD void store_value_loss(int n, T total, T clip_total, T* loss, T* metrics) {
  T sum = 0;
  for (int i = 0; i < n; ++i) sum += metrics[1 + i];
  metrics[0] = clip_total / maxv(total * T(n), T(1));
  loss[0] = sum;
}
// All phases on one thread (the CPU): the tree's lanes one after another.
template <typename T>
void finalize_value_loss(const T* part, int n, int64_t B, int64_t cpr, int agg, const T* denominators,
                         T* row_scale, T* loss, T* metrics) {
  T acc[3 * kMergeLanes], head[kMergeLanes];
  row_counts(part, value_partial_size(n), B, cpr, row_scale, 0, 1);
  for (int l = 0; l < kMergeLanes; ++l) value_counts_lane(part, n, B, cpr, row_scale, l, acc);
  serial_tree([&](int l, int s) { lanes_add(acc, 3, l, s); });
  T total, nseq;
  value_denominators(acc, denominators, total, nseq);
  value_scale_rows(agg, total, nseq, B, row_scale, 0, 1);
  for (int i = 0; i < n; ++i) {
    for (int l = 0; l < kMergeLanes; ++l) value_head_lane(part, n, i, B, cpr, row_scale, l, head);
    serial_tree([&](int l, int s) { lanes_add(head, 1, l, s); });
    metrics[1 + i] = T(0.5) * head[0];
  }
  store_value_loss(n, total, acc[2 * kMergeLanes], loss, metrics);
}

// ================================================================================================
// §6-§7 preference data: per-objective DPO losses, Gram of parameter gradients, Gram solvers.
// ================================================================================================

// ---- §7 per-objective DPO -------------------------------------------------------------------
// Objective sign of a preference label: +1 chosen wins, -1 rejected wins, 0 tie (NaN is a tie).
template <typename T>
PAMA_HD T label_sign(T label) {
  return label > T(0) ? T(1) : (label < T(0) ? T(-1) : T(0));
}
// Length used by the length normalisation (1 when absent; clamped to >= 1).
template <typename T>
PAMA_HD T dpo_length(const T* lengths, int64_t b) {
  return lengths != nullptr ? maxv(lengths[b], T(1)) : T(1);
}
// h = (pc - rc)/Lc - (pr - rr)/Lr
template <typename T>
PAMA_HD T dpo_margin(T pc, T pr, T rc, T rr, T len_c, T len_r) {
  return (pc - rc) / len_c - (pr - rr) / len_r;
}
// The logit of one (objective, pair) term, z = beta*s*h, and the argument -|z| of its exponential.
template <typename T>
PAMA_HD T dpo_logit(T beta, T s, T h) {
  return beta * s * h;
}
template <typename T>
PAMA_HD T dpo_exp_arg(T z) {
  return -(z < T(0) ? -z : z);
}
// One (objective, pair) term from z, e = exp(-|z|) in [0, 1] and l1p = log1p(e), computed by the
// caller (the CPU passes cpu::vexp / cpu::vlog1p, which vectorise): returns -log sigmoid(z) (stable
// form) and writes coef = dL_i/dh_b = -(beta/B) * s * sigmoid(-z) (inv_b = 1/max(B, 1)); sigmoid(-z)
// is e/(1+e) for z >= 0, 1/(1+e) otherwise, one division either way.
template <typename T>
PAMA_HD T dpo_pair_loss_from_exp(T beta, T s, T z, T e, T l1p, T inv_b, T& coef) {
  const T sig_neg = (z >= T(0) ? e : T(1)) / (T(1) + e);
  coef = -(beta * inv_b) * s * sig_neg;
  return maxv(-z, T(0)) + l1p;
}
template <typename T>
PAMA_HD T dpo_pair_loss(T beta, T s, T h, T inv_b, T& coef) {
  const T z = dpo_logit(beta, s, h);
  const T e = std::exp(dpo_exp_arg(z));
  return dpo_pair_loss_from_exp(beta, s, z, e, std::log1p(e), inv_b, coef);
}

// ---- §6 Gram of per-objective gradients --------------------------------------------------------
// Partials hold the upper triangle (i <= j) row by row: n(n+1)/2 entries.
PAMA_HD constexpr int gram_pairs(int n) { return n * (n + 1) / 2; }
PAMA_HD void gram_pair(int q, int n, int& i, int& j) {
  i = 0;
  while (q >= n - i) {
    q -= n - i;
    ++i;
  }
  j = i + q;
}
// G[i, j] = G[j, i] = Σ_parts part[k][pair(i, j)], summed over k in order (deterministic).
template <typename T>
PAMA_HD void finalize_gram(const T* part, int64_t nparts, int n, T* G, int64_t tid, int64_t nth) {
  const int P = gram_pairs(n);
  for (int64_t q = tid; q < P; q += nth) {
    T s = 0;
    for (int64_t k = 0; k < nparts; ++k) s += part[k * P + q];
    int i, j;
    gram_pair(static_cast<int>(q), n, i, j);
    G[i * n + j] = s;
    G[j * n + i] = s;
  }
}

// ---- §6 solvers on a Gram matrix ---------------------------------------------------------------
// PCGrad in Gram form (algorithms §6): v_i = e_i; for j != i in order, if (G v_i)_j < 0 (and G_jj > 0),
// v_i[j] -= (G v_i)_j / G_jj; out = Σ_i v_i.
template <typename T>
PAMA_HD void pcgrad_weights(const T* G, int n, T* out) {
  T v[kMaxObjectives];
  for (int i = 0; i < n; ++i) out[i] = T(0);
  for (int i = 0; i < n; ++i) {
    for (int r = 0; r < n; ++r) v[r] = r == i ? T(1) : T(0);
    for (int j = 0; j < n; ++j) {
      if (j == i) continue;
      T gv = 0;
      for (int r = 0; r < n; ++r) gv += G[j * n + r] * v[r];
      const T gjj = G[j * n + j];
      if (gv < T(0) && gjj > T(0)) v[j] -= gv / gjj;
    }
    for (int r = 0; r < n; ++r) out[r] += v[r];
  }
}

// Weights of `method` (a Method other than pama) from G [n, n]; w (prefs) may be null (uniform);
// c is CAGrad's / RACO's c; scratch: the exact solvers' working arrays (MGDA, CAGrad, RACO). Single
// thread.
template <typename T>
PAMA_HD void gram_weights(const T* G, const T* w, int n, int method, T c, T* out, gram::Scratch& scratch) {
  if (method == kMethodMgda) {
    mgda_weights(G, n, out, scratch);
  } else if (method == kMethodCagrad || method == kMethodRaco) {
    cagrad_weights(G, w, n, c, method == kMethodRaco, out, scratch);
  } else if (method == kMethodPcgrad) {
    pcgrad_weights(G, n, out);
  } else {
    for (int i = 0; i < n; ++i) out[i] = w != nullptr ? w[i] : T(1) / T(n);
  }
}

}  // namespace pama
