// cpu/gae.cpp — §1 token rewards and §2 multi-objective GAE (forward and the adjoint scan).
// The CPU twin of cuda/gae.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed work items (results do not depend on the thread count).
//
// GAE is a scan along T, one per (objective, row) sequence; one scalar scan is bound by the
// latency of its loop-carried dependency (~2 ns a token here), not by memory. So the scans run W
// sequences side by side (W = 8 float or 4 double lanes of a 32-byte vector): a block of W
// consecutive timesteps of W sequences is loaded as W row vectors, transposed in registers so that
// vector j holds timestep j of every sequence, stepped with pama::gae_step on whole vectors (one
// step advances W independent scans, each in its own order t = T-1 … 0: the recurrence is not
// reassociated), and transposed back. A group is W consecutive sequences s = i·B + b (the last
// group may have fewer: its missing lanes repeat its first sequence and are not stored), so a
// sequence's result does not depend on its lane, its group or the thread count.
// 32-byte vector arguments of always-inlined helpers (and of pama_math.h's gae_step with vector
// lanes): in the baseline clone GCC splits them into 16-byte halves; nothing crosses the library.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "../checks.h"
#include "../pama_math.h"
#include "kernels.h"
#include "vec.h"

namespace pama {
namespace cpu {
namespace {

// The lanes of a scan group: W sequences of acc in one 32-byte vector V, the lane masks (all ones
// where masked in) in M, an integer vector of the same lane width (also the shuffle index type).
template <typename acc>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int W = 8;
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t M __attribute__((vector_size(32)));
};
template <>
struct Lanes<double> {
  static constexpr int W = 4;
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t M __attribute__((vector_size(32)));
};

#if defined(__clang__)
#define PAMA_SHUFFLE(I, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PAMA_SHUFFLE(I, a, b, ...) __builtin_shuffle(a, b, I{__VA_ARGS__})
#endif

// In-register transpose of W vectors of W lanes: afterwards x[j][l] is the former x[l][j].
// 8 lanes: unpack pairs, then pairs of pairs, then 128-bit halves (24 two-input shuffles).
template <typename Vec>
__attribute__((always_inline)) inline void transpose(Vec (&x)[8]) {
  typedef int32_t I __attribute__((vector_size(32)));
  Vec t[8], s[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = PAMA_SHUFFLE(I, x[k], x[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[k + 1] = PAMA_SHUFFLE(I, x[k], x[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int k = 0; k < 8; k += 4) {
    s[k] = PAMA_SHUFFLE(I, t[k], t[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    s[k + 1] = PAMA_SHUFFLE(I, t[k], t[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    s[k + 2] = PAMA_SHUFFLE(I, t[k + 1], t[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    s[k + 3] = PAMA_SHUFFLE(I, t[k + 1], t[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int k = 0; k < 4; ++k) {
    x[k] = PAMA_SHUFFLE(I, s[k], s[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    x[k + 4] = PAMA_SHUFFLE(I, s[k], s[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
// 4 lanes (double): unpack pairs, then 128-bit halves.
template <typename Vec>
__attribute__((always_inline)) inline void transpose(Vec (&x)[4]) {
  typedef int64_t I __attribute__((vector_size(32)));
  const Vec t0 = PAMA_SHUFFLE(I, x[0], x[1], 0, 4, 2, 6), t1 = PAMA_SHUFFLE(I, x[0], x[1], 1, 5, 3, 7);
  const Vec t2 = PAMA_SHUFFLE(I, x[2], x[3], 0, 4, 2, 6), t3 = PAMA_SHUFFLE(I, x[2], x[3], 1, 5, 3, 7);
  x[0] = PAMA_SHUFFLE(I, t0, t2, 0, 1, 4, 5);
  x[1] = PAMA_SHUFFLE(I, t1, t3, 0, 1, 4, 5);
  x[2] = PAMA_SHUFFLE(I, t0, t2, 2, 3, 6, 7);
  x[3] = PAMA_SHUFFLE(I, t1, t3, 2, 3, 6, 7);
}

// W consecutive elements of one sequence as a vector of acc; kFull = false: the first len only, the
// rest 0 (the end of T).
template <bool kFull, typename acc, typename scalar_t>
__attribute__((always_inline)) inline typename Lanes<acc>::V load_row(const scalar_t* p, int len) {
  constexpr int W = Lanes<acc>::W;
  acc tmp[W];
  for (int j = 0; j < W; ++j) tmp[j] = (kFull || j < len) ? static_cast<acc>(p[j]) : acc(0);
  typename Lanes<acc>::V v;
  std::memcpy(&v, tmp, sizeof v);
  return v;
}
template <bool kFull, typename acc, typename scalar_t>
__attribute__((always_inline)) inline void store_row(scalar_t* p, const typename Lanes<acc>::V& v, int len) {
  constexpr int W = Lanes<acc>::W;
  acc tmp[W];
  std::memcpy(tmp, &v, sizeof v);
  for (int j = 0; j < (kFull ? W : len); ++j) p[j] = static_cast<scalar_t>(tmp[j]);
}
// W mask bytes (0 or 1) of one row as lane masks: each lane shifts its byte down from a broadcast
// word (no byte-to-lane conversion instruction needed); beyond len (kFull = false) masked out.
template <bool kFull, typename acc>
__attribute__((always_inline)) inline typename Lanes<acc>::M load_mask_row(const uint8_t* p, int len) {
  using M = typename Lanes<acc>::M;
  constexpr int W = Lanes<acc>::W;
  uint8_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(b, p, kFull ? W : len);
  uint32_t lo, hi;
  std::memcpy(&lo, b, 4);
  std::memcpy(&hi, b + 4, 4);
  M x, sh;
  for (int l = 0; l < W; ++l) {
    x[l] = l < 4 ? lo : hi;
    sh[l] = 8 * (l % 4);
  }
  return -((x >> sh) & 1);
}

// The W rows of a group are W separate streams through memory that the hardware prefetchers do
// not follow (one load instruction walks all of them, a block at a time): each block asks for the
// lines kPrefetchSteps timesteps ahead in the direction of the scan (d = ±kPrefetchSteps), of the
// inputs, the mask and the outputs (for writing: a store to a line not in cache stalls as well).
// The callers only ask for timesteps inside the row.
template <typename scalar_t>
constexpr int64_t kPrefetchSteps = 1024 / sizeof(scalar_t);
template <typename In, typename Out, int W>
__attribute__((always_inline)) inline void prefetch_rows(const In* a, const In* b, const uint8_t* m, Out* x, Out* y,
                                                         const int64_t (&off)[W], const int64_t (&moff)[W], int64_t d) {
  for (int l = 0; l < W; ++l) {
    __builtin_prefetch(a + off[l] + d, 0);
    __builtin_prefetch(b + off[l] + d, 0);
    __builtin_prefetch(m + moff[l] + d, 0);
    __builtin_prefetch(x + off[l] + d, 1);
    __builtin_prefetch(y + off[l] + d, 1);
  }
}

// The lanes of group g: element offsets of its sequences and of their mask rows.
template <int W>
struct Group {
  int64_t off[W], moff[W];
  int lanes;
  Group(int64_t g, int64_t S, int64_t B, int64_t T) {
    const int64_t s0 = g * W;
    lanes = static_cast<int>(std::min<int64_t>(W, S - s0));
    for (int l = 0; l < W; ++l) {
      const int64_t s = s0 + (l < lanes ? l : 0);
      off[l] = s * T;
      moff[l] = (s % B) * T;
    }
  }
};

// One block [t0, t0 + W) (or [t0, T) when !kFull) of the forward scan of a group.
template <bool kFull, typename scalar_t, typename acc>
__attribute__((always_inline)) inline void gae_block(const GaeParams& p, const Group<Lanes<acc>::W>& G, int64_t t0,
                                                     const typename Lanes<acc>::V& gamma, const typename Lanes<acc>::V& gl,
                                                     typename Lanes<acc>::V& next_v, typename Lanes<acc>::V& last_a) {
  using L = Lanes<acc>;
  constexpr int W = L::W;
  const int len = kFull ? W : static_cast<int>(p.T - t0);
  auto* r = static_cast<const scalar_t*>(p.rewards) + t0;
  auto* v = static_cast<const scalar_t*>(p.values) + t0;
  const uint8_t* m = mask_bytes(p.mask) + t0;
  auto* adv = static_cast<scalar_t*>(p.advantages) + t0;
  auto* ret = static_cast<scalar_t*>(p.returns) + t0;
  if (kFull && t0 >= kPrefetchSteps<scalar_t>)
    prefetch_rows<scalar_t, scalar_t, W>(r, v, m, adv, ret, G.off, G.moff, -kPrefetchSteps<scalar_t>);
  typename L::V R[W], Vl[W];
  typename L::M Mk[W];
  for (int l = 0; l < W; ++l) {
    R[l] = load_row<kFull, acc>(r + G.off[l], len);
    Vl[l] = load_row<kFull, acc>(v + G.off[l], len);
    Mk[l] = load_mask_row<kFull, acc>(m + G.moff[l], len);
  }
  transpose(R);
  transpose(Vl);
  transpose(Mk);
  // padded steps (!kFull, j >= len) are masked out: they leave the carry at its start (0, 0)
  for (int j = W - 1; j >= 0; --j) {
    R[j] = gae_step(R[j], Vl[j], Mk[j], gamma, gl, next_v, last_a);  // R now holds A
    Vl[j] = R[j] + Vl[j];                                           // Vl now holds the returns
  }
  transpose(R);
  transpose(Vl);
  for (int l = 0; l < G.lanes; ++l) {
    store_row<kFull, acc>(adv + G.off[l], R[l], len);
    store_row<kFull, acc>(ret + G.off[l], Vl[l], len);
  }
}

template <typename scalar_t, typename acc = acc_of<scalar_t>>
PAMA_CPU_CLONES void gae_groups(const GaeParams& p, int64_t g0, int64_t g1) {
  using L = Lanes<acc>;
  constexpr int W = L::W;
  const typename L::V gamma = typename L::V() + static_cast<acc>(p.gamma);
  const typename L::V gl = typename L::V() + static_cast<acc>(p.gamma * p.lam);  // product in double
  const int64_t full = p.T / W * W;
  for (int64_t g = g0; g < g1; ++g) {
    const Group<W> G(g, p.n * p.B, p.B, p.T);
    typename L::V next_v = typename L::V(), last_a = typename L::V();
    if (full < p.T) gae_block<false, scalar_t, acc>(p, G, full, gamma, gl, next_v, last_a);
    for (int64_t t0 = full - W; t0 >= 0; t0 -= W) gae_block<true, scalar_t, acc>(p, G, t0, gamma, gl, next_v, last_a);
  }
}

// One block of the adjoint scan of a group (walked forward in time).
template <bool kFull, typename scalar_t, typename acc>
__attribute__((always_inline)) inline void gae_adjoint_block(const GaeBackwardParams& p, const Group<Lanes<acc>::W>& G,
                                                             int64_t t0, const typename Lanes<acc>::V& gamma,
                                                             const typename Lanes<acc>::V& gl, typename Lanes<acc>::V& c_la,
                                                             typename Lanes<acc>::V& c_nv) {
  using L = Lanes<acc>;
  constexpr int W = L::W;
  const int len = kFull ? W : static_cast<int>(p.T - t0);
  auto* ga = static_cast<const scalar_t*>(p.grad_advantages) + t0;
  auto* gret = static_cast<const scalar_t*>(p.grad_returns) + t0;
  const uint8_t* m = mask_bytes(p.mask) + t0;
  auto* gr = static_cast<scalar_t*>(p.grad_rewards) + t0;
  auto* gv = static_cast<scalar_t*>(p.grad_values) + t0;
  if (kFull && t0 + kPrefetchSteps<scalar_t> < p.T)
    prefetch_rows<scalar_t, scalar_t, W>(ga, gret, m, gr, gv, G.off, G.moff, kPrefetchSteps<scalar_t>);
  typename L::V GA[W], GRET[W];
  typename L::M Mk[W];
  for (int l = 0; l < W; ++l) {
    GA[l] = load_row<kFull, acc>(ga + G.off[l], len);
    GRET[l] = load_row<kFull, acc>(gret + G.off[l], len);
    Mk[l] = load_mask_row<kFull, acc>(m + G.moff[l], len);
  }
  transpose(GA);
  transpose(GRET);
  transpose(Mk);
  for (int j = 0; j < W; ++j) {
    typename L::V g_r, g_v;
    gae_adjoint_step(GA[j] + GRET[j], Mk[j], gamma, gl, c_la, c_nv, g_r, g_v);
    GA[j] = g_r;                // GA now holds dL/dr
    GRET[j] = g_v + GRET[j];    // GRET now holds dL/dV
  }
  transpose(GA);
  transpose(GRET);
  for (int l = 0; l < G.lanes; ++l) {
    store_row<kFull, acc>(gr + G.off[l], GA[l], len);
    store_row<kFull, acc>(gv + G.off[l], GRET[l], len);
  }
}

template <typename scalar_t, typename acc = acc_of<scalar_t>>
PAMA_CPU_CLONES void gae_adjoint_groups(const GaeBackwardParams& p, int64_t g0, int64_t g1) {
  using L = Lanes<acc>;
  constexpr int W = L::W;
  const typename L::V gamma = typename L::V() + static_cast<acc>(p.gamma);
  const typename L::V gl = typename L::V() + static_cast<acc>(p.gamma * p.lam);
  const int64_t full = p.T / W * W;
  for (int64_t g = g0; g < g1; ++g) {
    const Group<W> G(g, p.n * p.B, p.B, p.T);
    typename L::V c_la = typename L::V(), c_nv = typename L::V();
    for (int64_t t0 = 0; t0 < full; t0 += W) gae_adjoint_block<true, scalar_t, acc>(p, G, t0, gamma, gl, c_la, c_nv);
    if (full < p.T) gae_adjoint_block<false, scalar_t, acc>(p, G, full, gamma, gl, c_la, c_nv);
  }
}

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
    constexpr int W = Lanes<acc_of<scalar_t>>::W;
    at::parallel_for(0, (p.n * p.B + W - 1) / W, 1, [&](int64_t g0, int64_t g1) { gae_groups<scalar_t>(p, g0, g1); });
  });
}

void multi_gae_backward(const GaeBackwardParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int W = Lanes<acc_of<scalar_t>>::W;
    at::parallel_for(0, (p.n * p.B + W - 1) / W, 1,
                     [&](int64_t g0, int64_t g1) { gae_adjoint_groups<scalar_t>(p, g0, g1); });
  });
}

}  // namespace cpu
}  // namespace pama
