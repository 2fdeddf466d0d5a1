// cpu/policy_loss.cpp — §4 fused policy loss, forward and backward.
// The CPU twin of cuda/policy_loss.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed chunks (results do not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../checks.h"
#include "../pama_math.h"
#include "kernels.h"

namespace pama {
namespace cpu {

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

}  // namespace cpu
}  // namespace pama
