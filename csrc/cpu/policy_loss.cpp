// cpu/policy_loss.cpp — §4 fused policy loss, forward and backward.
// The CPU twin of cuda/policy_loss.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed chunks (results do not depend on the thread count). Each chunk is walked in tiles of
// kVecTile tokens by loops with selects only (masked-out tokens are selected away, never
// multiplied: their padding may be NaN), which the compiler vectorises (cpu/vec.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../pama_math.h"
#include "kernels.h"
#include "vec.h"

namespace pama {
namespace cpu {
namespace {

// The per-chunk constants of the forward pass.
template <typename acc>
struct LossConsts {
  acc mean[kMaxObjectives], istd[kMaxObjectives];
  acc eps_lo, eps_hi, dual;
  acc pref[kMaxObjectives];  // §4b pref_factor per objective (when steer)
  bool steer = false;        // the Theorem-1 combine runs on N_i / ρ_i
};

// §4b steered Theorem 1 of one tile: Ã = s*(N_i / ρ_i) (C.steer). A pass of its own over the
// advantages, out of line, so that the unsteered loop of tile_a_tilde keeps its registers and vector
// width (scaling inside it halved the n = 4 loss's speed); the [mn, mx] that tile_a_tilde keeps stay
// the unweighted range (the single pass's reported weights).
template <typename scalar_t, typename acc = acc_of<scalar_t>>
PAMA_CPU_CLONES __attribute__((noinline)) void steered_thm1_tile(const PolicyLossParams& p, const LossConsts<acc>& C,
                                                                 int64_t base, int len, acc* A) {
  const int n = static_cast<int>(p.n);
  const int64_t BT = p.B * p.T;
  auto* adv = static_cast<const scalar_t*>(p.advantages) + base;
  acc N[kVecTile], mx[kVecTile];
  for (int i = 0; i < n; ++i) {
    whiten_noon_tile(adv + i * BT, len, C.mean[i], C.istd[i], p.whiten, p.noon, N);
    const acc f = C.pref[i];
#pragma omp simd
    for (int t = 0; t < len; ++t) N[t] = pref_scaled(N[t], f);
    range_update(i, N, len, A, mx);  // A holds the running minimum
  }
#pragma omp simd
  for (int t = 0; t < len; ++t) A[t] = thm1_value(A[t], mx[t]);
}

// Ã of one tile (len tokens from flat index `base`): Theorem 1 per token (the range [mn, mx] of the
// N_i kept in mn, mx; with prefs, C.steer, Ã is Theorem 1 of the N_i / ρ_i, §4b), or Σ_i w_i N_i.
// With Nst != nullptr the tiles N_i are kept there (n rows of kVecTile), and with bad != nullptr
// *bad counts the masked-in (mk) non-finite raw advantages. With nmin != nullptr (Theorem 1 only) the tie
// counts of the range go there and to nmax (range_update). `next`: the tokens of the row's next tile,
// whose advantages are prefetched. Always inlined: an out-of-line copy is compiled for the baseline ISA
// only (the target clones are of loss_chunk), and GCC stopped inlining it as it grew.
template <typename scalar_t, typename acc = acc_of<scalar_t>>
__attribute__((always_inline)) inline void tile_a_tilde(const PolicyLossParams& p, const LossConsts<acc>& C,
                                                        const acc* w, int64_t base, int len, int64_t next,
                                                        const lane_mask_t<acc>* mk, acc* A, acc* mn, acc* mx,
                                                        acc* nmin, acc* nmax, acc* Nst, acc* bad) {
  const int n = static_cast<int>(p.n);
  const int64_t BT = p.B * p.T;
  auto* adv = static_cast<const scalar_t*>(p.advantages) + base;
  const bool whiten = p.whiten, noon = p.noon;
  acc Nloc[kVecTile];
  const bool thm = p.combine == kCombineTokenThm1;
  if (!thm) {
#pragma omp simd
    for (int t = 0; t < len; ++t) A[t] = acc(0);
  }
  for (int i = 0; i < n; ++i) {
    const scalar_t* a = adv + i * BT;
    acc* N = Nst != nullptr ? Nst + i * kVecTile : Nloc;
    prefetch_tile(a + kVecTile, next);
    whiten_noon_tile(a, len, C.mean[i], C.istd[i], whiten, noon, N, mk, bad);
    if (!thm) {
      const acc wi = w[i];
#pragma omp simd
      for (int t = 0; t < len; ++t) A[t] += wi * N[t];
    } else {
      range_update(i, N, len, mn, mx, nmin, nmax);
    }
  }
  if (thm && C.steer) {
    steered_thm1_tile<scalar_t>(p, C, base, len, A);
  } else if (thm) {
#pragma omp simd
    for (int t = 0; t < len; ++t) A[t] = thm1_value(mn[t], mx[t]);
  }
}

// One chunk of the forward pass: writes Ã of each token (into p.a_tilde unless nullptr, 0 on masked-out
// tokens: the backward op recomputes dl/dlogp from it, as the fused output layer does per chunk), the gradient
// coefficient dl/dlogp + beta_loss · dk3/dlogp (into p.dlogp, 0 on masked-out tokens: the op's own
// autograd backward multiplies it by the row scale) and the chunk's kLossPartialSize partial sums; with
// kSingle (PolicyLossParams::single_pass) also the chunk's SinglePassPartial into `extra` (its token
// count, non-finite counts and the indicator sums of the statistics). N: scratch of n * kVecTile acc.
template <typename scalar_t, bool kSingle>
PAMA_CPU_CLONES void loss_chunk(const PolicyLossParams& p, const LossConsts<acc_of<scalar_t>>& C,
                                const acc_of<scalar_t>* w, int64_t b, int64_t t0, int64_t t1,
                                acc_of<scalar_t>* out, acc_of<scalar_t>* extra, acc_of<scalar_t>* N) {
  using acc = acc_of<scalar_t>;
  using K = lane_mask_t<acc>;
  const int n = static_cast<int>(p.n);
  auto* lp = static_cast<const scalar_t*>(p.logp);
  auto* old = static_cast<const scalar_t*>(p.old_logp);
  auto* ref = static_cast<const scalar_t*>(p.ref_logp);
  auto* chk_ref = static_cast<const scalar_t*>(p.check_ref);
  auto* a_out = static_cast<acc*>(p.a_tilde);
  auto* d_out = static_cast<acc*>(p.dlogp);
  const acc eps_lo = C.eps_lo, eps_hi = C.eps_hi, dual = C.dual, beta = static_cast<acc>(p.beta_loss);
  const acc hi = acc(1) + eps_hi;
  const bool with_ctok = kSingle && p.combine == kCombineTokenThm1;
  const SinglePassPartial X(n);
  acc s_l = 0, s_kl = 0, s_clip = 0, s_akl = 0, s_active = 0;
  acc cnt = 0, bad_l = 0, bad_o = 0, bad_a = 0, bad_r = 0;
  K mk[kVecTile], ind[kVecTile];
  acc A[kVecTile], U[kVecTile], D[kVecTile], mn[kVecTile], mx[kVecTile];  // U: ratios, D: dl/dlogp
  acc nmin[kSingle ? kVecTile : 1], nmax[kSingle ? kVecTile : 1], wmin[kSingle ? kVecTile : 1],
      wmax[kSingle ? kVecTile : 1];  // scratch of the Theorem-1 token weights
  if (kSingle)
    for (int e = 0; e < X.size(); ++e) extra[e] = acc(0);
  for (int64_t tt = t0; tt < t1; tt += kVecTile) {
    const int len = static_cast<int>(std::min<int64_t>(kVecTile, t1 - tt));
    const int64_t base = b * p.T + tt;
    const scalar_t* l_b = lp + base;
    const scalar_t* o_b = old + base;
    const int64_t next = prefetch_len(p.n, p.T, tt, kVecTile);  // tokens of the next tile to prefetch
    prefetch_tile(l_b + kVecTile, next);
    prefetch_tile(o_b + kVecTile, next);
    if (ref != nullptr) prefetch_tile(ref + base + kVecTile, next);
    mask_lanes(p.mask, p.mask_f32, base, len, mk);
    tile_a_tilde<scalar_t>(p, C, w, base, len, next, mk, A, mn, mx, with_ctok ? nmin : nullptr, with_ctok ? nmax : nullptr,
                           kSingle ? N : nullptr, kSingle ? &bad_a : nullptr);
    acc* d_b = d_out + base;
    // two loops over the tile (the ratio, then the loss on it), each with few enough live values to
    // stay in registers: one loop spilled its sums and the exponential's constants to the stack
#pragma omp simd reduction(+ : s_akl, cnt, bad_l, bad_o)
    for (int t = 0; t < len; ++t) {
      const K k = mk[t];
      const acc l_p = static_cast<acc>(l_b[t]), o_p = static_cast<acc>(o_b[t]);
      U[t] = vexp_bounded(ppo_log_ratio(l_p, o_p));
      s_akl += keep_lanes(k, o_p - l_p);
      if (kSingle) {
        cnt += keep_lanes(k, acc(1));
        bad_l += bad_lane(k, l_p);
        bad_o += bad_lane(k, o_p);
      }
    }
#pragma omp simd reduction(+ : s_l, s_clip, s_active)
    for (int t = 0; t < len; ++t) {
      const K k = mk[t];
      const acc a_t = A[t], u = U[t];
      const TokenLoss<acc> r = ppo_token_from_exp(a_t, static_cast<acc>(l_b[t]), static_cast<acc>(o_b[t]), u,
                                                  eps_lo, eps_hi, dual);
      D[t] = r.dlogp;
      s_l += keep_lanes(k, r.loss);
      s_clip += keep_lanes(k, r.clipped);
      s_active += keep_lanes(k, a_t > acc(0) ? acc(1) : acc(0));
      if (kSingle) ind[t] = k & lane_mask<K>(u <= hi);  // I_i = ind ? N_i : 0
    }
    if (a_out != nullptr) {  // Ã for the callers that read it (return_a_tilde), from the tile in L1
      acc* a_b = a_out + base;
#pragma omp simd
      for (int t = 0; t < len; ++t) a_b[t] = keep_lanes(mk[t], A[t]);
    }
    if (ref != nullptr) {
      const scalar_t* r_b = ref + base;
#pragma omp simd reduction(+ : s_kl)
      for (int t = 0; t < len; ++t) {
        const acc l_p = static_cast<acc>(l_b[t]), r_p = static_cast<acc>(r_b[t]);
        const TokenLoss<acc> k3 = k3_token(l_p, r_p);
        s_kl += keep_lanes(mk[t], k3.loss);
        d_b[t] = keep_lanes(mk[t], D[t] + beta * k3.dlogp);  // the backward's coefficient (dlogp)
      }
    } else {
#pragma omp simd
      for (int t = 0; t < len; ++t) d_b[t] = keep_lanes(mk[t], D[t] + beta * acc(0));
    }
    if (!kSingle) continue;
    if (chk_ref != nullptr) {
      const scalar_t* r_b = chk_ref + base;
      acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int t = 0; t < len; ++t) s += bad_lane(mk[t], static_cast<acc>(r_b[t]));
      bad_r += s;
    }
    indicator_sums(N, n, ind, mk, len, extra + X.sum_i(), extra + X.pos());
    if (with_ctok) thm1_weight_sums(N, n, len, mn, mx, nmin, nmax, mk, wmin, wmax, extra + X.ctok());
  }
  out[0] = s_l;
  out[1] = s_kl;
  out[2] = s_clip;
  out[3] = s_akl;
  out[4] = s_active;
  if (kSingle) {
    extra[X.cnt()] = cnt;
    extra[X.bad() + 0] = bad_l;
    extra[X.bad() + 1] = bad_o;
    extra[X.bad() + 2] = bad_a;
    extra[X.bad() + 3] = bad_r;
  }
}

// The weights of a single-pass forward (finalize_weights): the prefs of method linear, which the loss
// pass combines with (so before it), or pama/token's ctok, reported only (so after it).
template <typename acc>
void single_pass_weights(const PolicyLossParams& p) {
  gram::Scratch scratch;
  finalize_weights(static_cast<const acc*>(p.stats), static_cast<int>(p.n), p.method, p.granularity,
                   static_cast<const acc*>(p.prefs), static_cast<acc>(p.cagrad_c), static_cast<acc*>(p.weights),
                   scratch);
}

// The statistics of a single-pass forward from its chunks' SinglePassPartial, summed over chunks
// in a fixed order: row_count, stats[count, num_seqs, abar, pos, ctok], finite_flags, weights.
template <typename acc>
void finalize_single_pass(const PolicyLossParams& p) {
  const int n = static_cast<int>(p.n);
  const SinglePassPartial X(n);
  const StatsLayout L(n);
  const int64_t nk = p.B * p.chunks_per_row;
  auto* ex = static_cast<const acc*>(p.extra_partials);
  auto* stats = static_cast<acc*>(p.stats);
  auto* rc = static_cast<acc*>(p.row_count);
  acc count = 0, nseq = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    acc c = 0;
    for (int64_t k = 0; k < p.chunks_per_row; ++k) c += ex[(b * p.chunks_per_row + k) * X.size() + X.cnt()];
    rc[b] = c;
    count += c;
    nseq += c > acc(0) ? acc(1) : acc(0);
  }
  stats[L.count()] = count;
  stats[L.num_seqs()] = nseq;
  const acc inv = acc(1) / maxv(count, acc(1));
  for (int e = 0; e < 3 * n; ++e) {  // sumI | pos | ctok -> abar | pos | ctok (adjacent in both layouts)
    acc s = 0;
    for (int64_t k = 0; k < nk; ++k) s += ex[k * X.size() + X.sum_i() + e];
    stats[L.abar() + e] = s * inv;
  }
  auto* flags = static_cast<acc*>(p.finite_flags);
  for (int j = 0; j < 4; ++j) {
    acc s = 0;
    for (int64_t k = 0; k < nk; ++k) s += ex[k * X.size() + X.bad() + j];
    if (flags != nullptr) flags[j] = s;
  }
  if (p.combine == kCombineTokenThm1) single_pass_weights<acc>(p);  // pama/token: ctok (reported only)
}

// One chunk of the backward pass: grad_logp = scale * mask * (dl/dlogp + beta * dk3/dlogp).
template <typename scalar_t, bool kRef>
PAMA_CPU_CLONES void loss_backward_chunk(const PolicyLossBackwardParams& p, acc_of<scalar_t> scale, int64_t t0,
                                         int64_t t1) {
  using acc = acc_of<scalar_t>;
  auto* lp = static_cast<const scalar_t*>(p.logp) + t0;
  auto* old = static_cast<const scalar_t*>(p.old_logp) + t0;
  auto* ref = static_cast<const scalar_t*>(p.ref_logp) + t0;
  auto* a_tilde = static_cast<const acc*>(p.a_tilde) + t0;
  auto* out = static_cast<scalar_t*>(p.grad_logp) + t0;
  const uint8_t* m = mask_bytes(p.mask) + t0;
  const acc eps_lo = static_cast<acc>(p.eps_lo), eps_hi = static_cast<acc>(p.eps_hi);
  const acc dual = static_cast<acc>(p.dual_clip), beta = static_cast<acc>(p.beta_loss);
  acc G[kVecTile];
  for (int64_t tt = 0; tt < t1 - t0; tt += kVecTile) {
    const int len = static_cast<int>(std::min<int64_t>(kVecTile, t1 - t0 - tt));
    // float32 writes the gradient in place; other dtypes convert from a tile of acc
    acc* g = std::is_same<scalar_t, acc>::value ? reinterpret_cast<acc*>(out + tt) : G;
    if (kRef) {
#pragma omp simd
      for (int t = 0; t < len; ++t) {
        const acc l_p = static_cast<acc>(lp[tt + t]), o_p = static_cast<acc>(old[tt + t]);
        const acc dl = ppo_token_from_exp(a_tilde[tt + t], l_p, o_p, vexp(ppo_log_ratio(l_p, o_p)), eps_lo, eps_hi,
                                           dual).dlogp;
        const acc dk = k3_token(l_p, static_cast<acc>(ref[tt + t])).dlogp;
        g[t] = keep_or_zero(m[tt + t], scale * (dl + beta * dk));
      }
    } else {
#pragma omp simd
      for (int t = 0; t < len; ++t) {
        const acc l_p = static_cast<acc>(lp[tt + t]), o_p = static_cast<acc>(old[tt + t]);
        const acc dl = ppo_token_from_exp(a_tilde[tt + t], l_p, o_p, vexp(ppo_log_ratio(l_p, o_p)), eps_lo, eps_hi,
                                           dual).dlogp;
        g[t] = keep_or_zero(m[tt + t], scale * (dl + beta * acc(0)));
      }
    }
    if (!std::is_same<scalar_t, acc>::value)
      for (int t = 0; t < len; ++t) out[tt + t] = static_cast<scalar_t>(G[t]);
  }
}

}  // namespace

void policy_loss_forward(const PolicyLossParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    auto* part = static_cast<acc*>(p.partials);
    auto* extra = static_cast<acc*>(p.extra_partials);
    auto* stats = static_cast<acc*>(p.stats);
    auto* w_global = static_cast<const acc*>(p.weights);
    auto* w_rows = static_cast<const acc*>(p.seq_weights);
    LossConsts<acc> C;
    whitening_params(stats, n, C.mean, C.istd);
    C.eps_lo = static_cast<acc>(p.eps_lo);
    C.eps_hi = static_cast<acc>(p.eps_hi);
    C.dual = static_cast<acc>(p.dual_clip);
    C.steer = p.prefs != nullptr && p.combine == kCombineTokenThm1;
    for (int i = 0; C.steer && i < n; ++i) C.pref[i] = pref_factor(static_cast<const acc*>(p.prefs), n, i);
    const SinglePassPartial X(n);
    if (p.single_pass && p.combine != kCombineTokenThm1) single_pass_weights<acc>(p);
    at::parallel_for(0, p.B * p.chunks_per_row, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> N(p.single_pass ? static_cast<size_t>(n) * kVecTile : 0);  // per task: the tiles N_i
      for (int64_t k = begin; k < end; ++k) {
        const ChunkBounds cb = chunk_bounds(k, p.chunks_per_row, p.chunk_len, p.T);
        const acc* w = p.weights_per_row ? w_rows + cb.b * n : w_global;
        if (p.single_pass)
          loss_chunk<scalar_t, true>(p, C, w, cb.b, cb.t_begin, cb.t_end, part + k * kLossPartialSize,
                                     extra + k * X.size(), N.data());
        else
          loss_chunk<scalar_t, false>(p, C, w, cb.b, cb.t_begin, cb.t_end, part + k * kLossPartialSize, nullptr,
                                      nullptr);
      }
    });
    if (p.single_pass) finalize_single_pass<acc>(p);
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
    auto* rs = static_cast<const acc*>(p.row_scale);
    const int64_t cpr = p.T == 0 ? 1 : (p.T + kChunkLen - 1) / kChunkLen;
    // elementwise: any split gives the same result; chunks of one row share its scale
    for_chunks(p.B, p.T, kChunkLen, cpr, [&](int64_t, int64_t b, int64_t t0, int64_t t1) {
      const acc scale = g * rs[b];
      if (p.ref_logp != nullptr)
        loss_backward_chunk<scalar_t, true>(p, scale, b * p.T + t0, b * p.T + t1);
      else
        loss_backward_chunk<scalar_t, false>(p, scale, b * p.T + t0, b * p.T + t1);
    });
  });
}

}  // namespace cpu
}  // namespace pama
