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
  bool steer = false;
};

// Ã of one tile (len tokens from flat index `base`): Theorem 1 per token, or Σ_i w_i N_i.
template <typename scalar_t, typename acc = acc_of<scalar_t>>
inline void tile_a_tilde(const PolicyLossParams& p, const LossConsts<acc>& C, const acc* w, int64_t base, int len,
                         acc* A, acc* mx) {
  const int n = static_cast<int>(p.n);
  const int64_t BT = p.B * p.T;
  auto* adv = static_cast<const scalar_t*>(p.advantages) + base;
  const bool whiten = p.whiten, noon = p.noon;
  acc N[kVecTile];
  if (p.combine == kCombineTokenThm1) {  // A holds the running minimum, mx the maximum
    for (int i = 0; i < n; ++i) {
      whiten_noon_tile(adv + i * BT, len, C.mean[i], C.istd[i], whiten, noon, i == 0 ? A : N);
      if (C.steer) {  // §4b: Theorem 1 on N_i / ρ_i
        acc* x = i == 0 ? A : N;
        const acc f = C.pref[i];
#pragma omp simd
        for (int t = 0; t < len; ++t) x[t] = pref_scaled(x[t], f);
      }
      if (i == 0) {
#pragma omp simd
        for (int t = 0; t < len; ++t) mx[t] = A[t];
      } else {
#pragma omp simd
        for (int t = 0; t < len; ++t) {
          A[t] = minv(A[t], N[t]);
          mx[t] = maxv(mx[t], N[t]);
        }
      }
    }
#pragma omp simd
    for (int t = 0; t < len; ++t) A[t] = thm1_value(A[t], mx[t]);
  } else {
#pragma omp simd
    for (int t = 0; t < len; ++t) A[t] = acc(0);
    for (int i = 0; i < n; ++i) {
      whiten_noon_tile(adv + i * BT, len, C.mean[i], C.istd[i], whiten, noon, N);
      const acc wi = w[i];
#pragma omp simd
      for (int t = 0; t < len; ++t) A[t] += wi * N[t];
    }
  }
}

// One chunk of the forward pass: writes a_tilde and the chunk's kLossPartialSize partial sums.
template <typename scalar_t>
PAMA_CPU_CLONES void loss_chunk(const PolicyLossParams& p, const LossConsts<acc_of<scalar_t>>& C,
                                const acc_of<scalar_t>* w, int64_t b, int64_t t0, int64_t t1,
                                acc_of<scalar_t>* out) {
  using acc = acc_of<scalar_t>;
  auto* lp = static_cast<const scalar_t*>(p.logp);
  auto* old = static_cast<const scalar_t*>(p.old_logp);
  auto* ref = static_cast<const scalar_t*>(p.ref_logp);
  auto* at_out = static_cast<acc*>(p.a_tilde);
  const acc eps_lo = C.eps_lo, eps_hi = C.eps_hi, dual = C.dual;
  acc s_l = 0, s_kl = 0, s_clip = 0, s_akl = 0, s_active = 0;
  acc A[kVecTile], mx[kVecTile];
  for (int64_t tt = t0; tt < t1; tt += kVecTile) {
    const int len = static_cast<int>(std::min<int64_t>(kVecTile, t1 - tt));
    const int64_t base = b * p.T + tt;
    tile_a_tilde<scalar_t>(p, C, w, base, len, A, mx);
    const uint8_t* m = mask_bytes(p.mask) + base;
    const scalar_t* l_b = lp + base;
    const scalar_t* o_b = old + base;
    acc* at_b = at_out + base;
#pragma omp simd reduction(+ : s_l, s_clip, s_akl, s_active)
    for (int t = 0; t < len; ++t) {
      const uint8_t mt = m[t];
      const acc l_p = static_cast<acc>(l_b[t]), o_p = static_cast<acc>(o_b[t]), a_t = A[t];
      const TokenLoss<acc> r = ppo_token(a_t, l_p, o_p, eps_lo, eps_hi, dual);
      at_b[t] = keep_or_zero(mt, a_t);
      s_l += keep_or_zero(mt, r.loss);
      s_clip += keep_or_zero(mt, r.clipped);
      s_akl += keep_or_zero(mt, o_p - l_p);
      s_active += keep_or_zero(mt, a_t > acc(0) ? acc(1) : acc(0));
    }
    if (ref != nullptr) {
      const scalar_t* r_b = ref + base;
#pragma omp simd reduction(+ : s_kl)
      for (int t = 0; t < len; ++t) {
        const acc l_p = static_cast<acc>(l_b[t]), r_p = static_cast<acc>(r_b[t]);
        s_kl += keep_or_zero(m[t], k3_token(l_p, r_p).loss);
      }
    }
  }
  out[0] = s_l;
  out[1] = s_kl;
  out[2] = s_clip;
  out[3] = s_akl;
  out[4] = s_active;
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
        const acc dl = ppo_token(a_tilde[tt + t], l_p, o_p, eps_lo, eps_hi, dual).dlogp;
        const acc dk = k3_token(l_p, static_cast<acc>(ref[tt + t])).dlogp;
        g[t] = keep_or_zero(m[tt + t], scale * (dl + beta * dk));
      }
    } else {
#pragma omp simd
      for (int t = 0; t < len; ++t) {
        const acc l_p = static_cast<acc>(lp[tt + t]), o_p = static_cast<acc>(old[tt + t]);
        const acc dl = ppo_token(a_tilde[tt + t], l_p, o_p, eps_lo, eps_hi, dual).dlogp;
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
    auto* stats = static_cast<const acc*>(p.stats);
    auto* w_global = static_cast<const acc*>(p.weights);
    auto* w_rows = static_cast<const acc*>(p.seq_weights);
    LossConsts<acc> C;
    whitening_params(stats, n, C.mean, C.istd);
    C.eps_lo = static_cast<acc>(p.eps_lo);
    C.eps_hi = static_cast<acc>(p.eps_hi);
    C.dual = static_cast<acc>(p.dual_clip);
    C.steer = p.prefs != nullptr;
    for (int i = 0; C.steer && i < n; ++i) C.pref[i] = pref_factor(static_cast<const acc*>(p.prefs), n, i);
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      const acc* w = p.weights_per_row ? w_rows + b * n : w_global;
      loss_chunk<scalar_t>(p, C, w, b, t0, t1, part + k * kLossPartialSize);
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
