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

namespace {

// GAE is a scan per (objective, row) sequence: each step waits for the previous one (a multiply-add
// and a select), so one sequence at a time runs at the latency of that chain. The scans below walk
// kGaeGroup sequences in lock step, whose chains are independent, so the core overlaps them; each
// sequence's arithmetic is that of a lone scan (same bits, any grouping, any thread count).
constexpr int kGaeGroup = 8;

// Sequences s0 .. s0+G-1 of the forward scan (t = T-1 … 0).
template <int G, typename scalar_t, typename acc>
inline void gae_forward_group(const GaeParams& p, int64_t s0, acc gamma, acc gl) {
  const int64_t T = p.T;
  auto* r = static_cast<const scalar_t*>(p.rewards) + s0 * T;
  auto* v = static_cast<const scalar_t*>(p.values) + s0 * T;
  auto* adv = static_cast<scalar_t*>(p.advantages) + s0 * T;
  auto* ret = static_cast<scalar_t*>(p.returns) + s0 * T;
  const bool* m[G];
  acc next_v[G], last_a[G];
  for (int g = 0; g < G; ++g) {
    m[g] = p.mask + ((s0 + g) % p.B) * T;
    next_v[g] = last_a[g] = acc(0);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const int64_t k = g * T + t;
      const acc vt = static_cast<acc>(v[k]);
      const acc a = gae_step(static_cast<acc>(r[k]), vt, m[g][t], gamma, gl, next_v[g], last_a[g]);
      adv[k] = static_cast<scalar_t>(a);
      ret[k] = static_cast<scalar_t>(a + vt);
    }
  }
}

// Sequences s0 .. s0+G-1 of the adjoint scan (t = 0 … T-1).
template <int G, typename scalar_t, typename acc>
inline void gae_backward_group(const GaeBackwardParams& p, int64_t s0, acc gamma, acc gl) {
  const int64_t T = p.T;
  auto* ga = static_cast<const scalar_t*>(p.grad_advantages) + s0 * T;
  auto* gret = static_cast<const scalar_t*>(p.grad_returns) + s0 * T;
  auto* gr = static_cast<scalar_t*>(p.grad_rewards) + s0 * T;
  auto* gv = static_cast<scalar_t*>(p.grad_values) + s0 * T;
  const bool* m[G];
  acc c_la[G], c_nv[G];
  for (int g = 0; g < G; ++g) {
    m[g] = p.mask + ((s0 + g) % p.B) * T;
    c_la[g] = c_nv[g] = acc(0);
  }
  for (int64_t t = 0; t < T; ++t) {
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const int64_t k = g * T + t;
      const acc g_ret = static_cast<acc>(gret[k]);
      acc g_r, g_v;
      gae_adjoint_step(static_cast<acc>(ga[k]) + g_ret, m[g][t], gamma, gl, c_la[g], c_nv[g], g_r, g_v);
      gr[k] = static_cast<scalar_t>(g_r);
      gv[k] = static_cast<scalar_t>(g_v + g_ret);
    }
  }
}

// The sequences [s0, s1) in groups of kGaeGroup, the rest one by one.
template <typename F1, typename FG>
inline void for_sequence_groups(int64_t s0, int64_t s1, F1&& one, FG&& group) {
  int64_t s = s0;
  for (; s + kGaeGroup <= s1; s += kGaeGroup) group(s);
  for (; s < s1; ++s) one(s);
}

}  // namespace

void multi_gae(const GaeParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const acc gamma = static_cast<acc>(p.gamma), gl = static_cast<acc>(p.gamma * p.lam);
    // grain: a task holds whole groups (the grouping, like every step's arithmetic, changes no bit)
    at::parallel_for(0, p.n * p.B, kGaeGroup, [&](int64_t s0, int64_t s1) {
      for_sequence_groups(
          s0, s1, [&](int64_t s) { gae_forward_group<1, scalar_t>(p, s, gamma, gl); },
          [&](int64_t s) { gae_forward_group<kGaeGroup, scalar_t>(p, s, gamma, gl); });
    });
  });
}

void multi_gae_backward(const GaeBackwardParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const acc gamma = static_cast<acc>(p.gamma), gl = static_cast<acc>(p.gamma * p.lam);
    at::parallel_for(0, p.n * p.B, kGaeGroup, [&](int64_t s0, int64_t s1) {
      for_sequence_groups(
          s0, s1, [&](int64_t s) { gae_backward_group<1, scalar_t>(p, s, gamma, gl); },
          [&](int64_t s) { gae_backward_group<kGaeGroup, scalar_t>(p, s, gamma, gl); });
    });
  });
}

}  // namespace cpu
}  // namespace pama
