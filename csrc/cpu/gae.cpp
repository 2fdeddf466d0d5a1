// cpu/gae.cpp — §1 token rewards and §2 multi-objective GAE (forward and the adjoint scan).
// The CPU twin of cuda/gae.cu: the same stages, the same pama_math.h formulas, at::parallel_for
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

}  // namespace cpu
}  // namespace pama
