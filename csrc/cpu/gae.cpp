// cpu/gae.cpp — §1 token rewards and §2 multi-objective GAE (forward and the adjoint scan).
// The CPU twin of cuda/gae.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed chunks (results do not depend on the thread count).
//
// multi_gae and its adjoint scan one (objective, row) sequence per task: each is bound by the
// latency of its loop-carried dependency (~5 cycles a token). Scanning 8 sequences as the lanes of
// a vector (in-register transposes of tiles staged in L1) was 1.8-2.5x faster in cache but no
// faster from memory at 2^20 tokens (docs/kernels.md, "The CPU kernels"), so it was not kept.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../checks.h"
#include "../pama_math.h"
#include "kernels.h"
#include "vec.h"

namespace pama {
namespace cpu {
namespace {

// Token rewards of rows [b0, b1): the KL term of a tile is computed once per row and copied to
// every objective; the score goes onto the row's last masked-in token afterwards (found once, from
// the end of the row).
template <typename scalar_t, typename acc = acc_of<scalar_t>>
PAMA_CPU_CLONES void token_reward_rows(const TokenRewardsParams& p, int64_t b0, int64_t b1) {
  auto* sc = static_cast<const scalar_t*>(p.scores);
  auto* out = static_cast<scalar_t*>(p.rewards);
  const acc beta = static_cast<acc>(p.beta_kl);
  const int64_t T = p.T, BT = p.B * p.T;
  scalar_t K[kVecTile];
  for (int64_t b = b0; b < b1; ++b) {
    auto* old = static_cast<const scalar_t*>(p.old_logp) + b * T;
    auto* ref = static_cast<const scalar_t*>(p.ref_logp) + b * T;
    const uint8_t* m = mask_bytes(p.mask) + b * T;
    for (int64_t t0 = 0; t0 < T; t0 += kVecTile) {
      const int len = static_cast<int>(std::min<int64_t>(kVecTile, T - t0));
#pragma omp simd
      for (int t = 0; t < len; ++t) {
        const acc kl = keep_or_zero(m[t0 + t], static_cast<acc>(old[t0 + t]) - static_cast<acc>(ref[t0 + t]));
        K[t] = static_cast<scalar_t>(-beta * kl + acc(0));  // + 0: a masked-out token is +0, not -0
      }
      for (int64_t i = 0; i < p.n; ++i) std::memcpy(out + i * BT + b * T + t0, K, len * sizeof(scalar_t));
    }
    int64_t last = T - 1;
    while (last >= 0 && !m[last]) --last;
    if (last < 0) continue;
    const acc kl = static_cast<acc>(old[last]) - static_cast<acc>(ref[last]);
    for (int64_t i = 0; i < p.n; ++i)
      out[i * BT + b * T + last] = static_cast<scalar_t>(-beta * kl + static_cast<acc>(sc[i * p.B + b]));
  }
}

}  // namespace

void token_rewards(const TokenRewardsParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) { token_reward_rows<scalar_t>(p, b0, b1); });
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
