// cpu/gae.cpp — §1 token rewards and §2 multi-objective GAE (forward and the adjoint scan).
// The CPU twin of cuda/gae.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed work items (results do not depend on the thread count).
//
// GAE is a scan along T, one per (objective, row) sequence; one scalar scan is bound by the
// latency of its loop-carried dependency (~5 cycles a token), not by memory. So the scans run W
// sequences side by side (W = 8 float or 4 double lanes of a 32-byte vector): a group's rows are
// staged a tile of timesteps at a time (contiguous runs, converted to acc), W timesteps of the W
// rows are transposed in registers so that vector j holds timestep j of every sequence, stepped
// with pama::gae_step on whole vectors (one step advances W independent scans, each in its own
// order t = T-1 … 0: the recurrence is not reassociated), and transposed back. A group is W
// consecutive sequences s = i·B + b (the last group may have fewer: its missing lanes repeat its
// first sequence and are not stored), so a sequence's result does not depend on its lane, its
// group or the thread count.
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

// W consecutive acc of a tile row as a vector, and back.
template <typename acc>
__attribute__((always_inline)) inline typename Lanes<acc>::V load_vec(const acc* p) {
  typename Lanes<acc>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename acc>
__attribute__((always_inline)) inline void store_vec(acc* p, const typename Lanes<acc>::V& v) {
  std::memcpy(p, &v, sizeof v);
}
// W mask bytes (0 or 1) of a tile row as lane masks (all ones where masked in): each lane shifts its
// byte down from a broadcast word (no byte-to-lane conversion instruction needed).
template <typename acc>
__attribute__((always_inline)) inline typename Lanes<acc>::M load_mask_vec(const uint8_t* p) {
  using M = typename Lanes<acc>::M;
  constexpr int W = Lanes<acc>::W;
  uint8_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(b, p, W);
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

// A group's rows are staged kScanTile timesteps at a time: each row's part of the tile is read
// (and written back) as one contiguous run, converted to acc, and the scan works on the tile in L1.
// (Stepping the W rows a vector at a time straight from memory, 32 bytes per row and array at a
// time, all rows in one L1 set when T·elt is a multiple of 4 KiB, ran no faster than one scalar scan
// per sequence.)
constexpr int kScanTile = 256;

template <typename acc>
struct ScanTile {
  static constexpr int W = Lanes<acc>::W;
  alignas(64) acc x[W][kScanTile];  // rewards -> advantages (forward); dL/dA -> dL/dr (adjoint)
  alignas(64) acc y[W][kScanTile];  // values -> returns; dL/dreturns -> dL/dV
  alignas(64) uint8_t m[W][kScanTile];
};

// Rows [t0, t0 + len) of the group's sequences of a and b, and their mask rows, into the tile; the
// rest of a partial tile zero (masked out).
template <typename scalar_t, typename acc>
__attribute__((always_inline)) inline void stage_in(ScanTile<acc>& S, const scalar_t* a, const scalar_t* b,
                                                    const bool* mask, const Group<Lanes<acc>::W>& G, int64_t t0, int len) {
  for (int l = 0; l < ScanTile<acc>::W; ++l) {
    const scalar_t* pa = a + G.off[l] + t0;
    const scalar_t* pb = b + G.off[l] + t0;
    for (int t = 0; t < len; ++t) S.x[l][t] = static_cast<acc>(pa[t]);
    for (int t = 0; t < len; ++t) S.y[l][t] = static_cast<acc>(pb[t]);
    std::memcpy(S.m[l], mask_bytes(mask) + G.moff[l] + t0, len);
    for (int t = len; t < kScanTile; ++t) {
      S.x[l][t] = S.y[l][t] = acc(0);
      S.m[l][t] = 0;
    }
  }
}
template <typename scalar_t, typename acc>
__attribute__((always_inline)) inline void stage_out(const ScanTile<acc>& S, scalar_t* a, scalar_t* b,
                                                     const Group<Lanes<acc>::W>& G, int64_t t0, int len) {
  for (int l = 0; l < G.lanes; ++l) {
    scalar_t* pa = a + G.off[l] + t0;
    scalar_t* pb = b + G.off[l] + t0;
    for (int t = 0; t < len; ++t) pa[t] = static_cast<scalar_t>(S.x[l][t]);
    for (int t = 0; t < len; ++t) pb[t] = static_cast<scalar_t>(S.y[l][t]);
  }
}

// Timesteps [j0, j0 + W) of the tile as W step vectors (vector j: timestep j0 + j of every lane).
template <typename acc>
__attribute__((always_inline)) inline void tile_load(const ScanTile<acc>& S, int j0, typename Lanes<acc>::V (&X)[Lanes<acc>::W],
                                                     typename Lanes<acc>::V (&Y)[Lanes<acc>::W],
                                                     typename Lanes<acc>::M (&Mk)[Lanes<acc>::W]) {
  for (int l = 0; l < Lanes<acc>::W; ++l) {
    X[l] = load_vec(S.x[l] + j0);
    Y[l] = load_vec(S.y[l] + j0);
    Mk[l] = load_mask_vec<acc>(S.m[l] + j0);
  }
  transpose(X);
  transpose(Y);
  transpose(Mk);
}
template <typename acc>
__attribute__((always_inline)) inline void tile_store(ScanTile<acc>& S, int j0, typename Lanes<acc>::V (&X)[Lanes<acc>::W],
                                                      typename Lanes<acc>::V (&Y)[Lanes<acc>::W]) {
  transpose(X);
  transpose(Y);
  for (int l = 0; l < Lanes<acc>::W; ++l) {
    store_vec(S.x[l] + j0, X[l]);
    store_vec(S.y[l] + j0, Y[l]);
  }
}

// The forward scans of groups [g0, g1), tiles from the end of T (a partial one first); in a
// partial tile the padded steps come first and are masked out: the carry stays (0, 0).
template <typename scalar_t, typename acc = acc_of<scalar_t>>
PAMA_CPU_CLONES void gae_groups(const GaeParams& p, int64_t g0, int64_t g1) {
  using L = Lanes<acc>;
  constexpr int W = L::W;
  const typename L::V gamma = typename L::V() + static_cast<acc>(p.gamma);
  const typename L::V gl = typename L::V() + static_cast<acc>(p.gamma * p.lam);  // product in double
  auto* r = static_cast<const scalar_t*>(p.rewards);
  auto* v = static_cast<const scalar_t*>(p.values);
  auto* adv = static_cast<scalar_t*>(p.advantages);
  auto* ret = static_cast<scalar_t*>(p.returns);
  ScanTile<acc> S;
  for (int64_t g = g0; g < g1; ++g) {
    const Group<W> G(g, p.n * p.B, p.B, p.T);
    typename L::V next_v = typename L::V(), last_a = typename L::V();
    for (int64_t t0 = (p.T - 1) / kScanTile * kScanTile; t0 >= 0; t0 -= kScanTile) {
      const int len = static_cast<int>(std::min<int64_t>(kScanTile, p.T - t0));
      stage_in(S, r, v, p.mask, G, t0, len);
      for (int j0 = (len - 1) / W * W; j0 >= 0; j0 -= W) {
        typename L::V X[W], Y[W];
        typename L::M Mk[W];
        tile_load(S, j0, X, Y, Mk);
        for (int j = W - 1; j >= 0; --j) {
          X[j] = gae_step(X[j], Y[j], Mk[j], gamma, gl, next_v, last_a);  // X now holds A
          Y[j] = X[j] + Y[j];                                             // Y the returns
        }
        tile_store(S, j0, X, Y);
      }
      stage_out(S, adv, ret, G, t0, len);
    }
  }
}

// The adjoint scans of groups [g0, g1), walked forward in time (padded steps last, not stored).
template <typename scalar_t, typename acc = acc_of<scalar_t>>
PAMA_CPU_CLONES void gae_adjoint_groups(const GaeBackwardParams& p, int64_t g0, int64_t g1) {
  using L = Lanes<acc>;
  constexpr int W = L::W;
  const typename L::V gamma = typename L::V() + static_cast<acc>(p.gamma);
  const typename L::V gl = typename L::V() + static_cast<acc>(p.gamma * p.lam);
  auto* ga = static_cast<const scalar_t*>(p.grad_advantages);
  auto* gret = static_cast<const scalar_t*>(p.grad_returns);
  auto* gr = static_cast<scalar_t*>(p.grad_rewards);
  auto* gv = static_cast<scalar_t*>(p.grad_values);
  ScanTile<acc> S;
  for (int64_t g = g0; g < g1; ++g) {
    const Group<W> G(g, p.n * p.B, p.B, p.T);
    typename L::V c_la = typename L::V(), c_nv = typename L::V();
    for (int64_t t0 = 0; t0 < p.T; t0 += kScanTile) {
      const int len = static_cast<int>(std::min<int64_t>(kScanTile, p.T - t0));
      stage_in(S, ga, gret, p.mask, G, t0, len);
      for (int j0 = 0; j0 < len; j0 += W) {
        typename L::V X[W], Y[W];
        typename L::M Mk[W];
        tile_load(S, j0, X, Y, Mk);
        for (int j = 0; j < W; ++j) {
          typename L::V g_r, g_v;
          gae_adjoint_step(X[j] + Y[j], Mk[j], gamma, gl, c_la, c_nv, g_r, g_v);
          X[j] = g_r;        // X now holds dL/dr
          Y[j] = g_v + Y[j]; // Y dL/dV
        }
        tile_store(S, j0, X, Y);
      }
      stage_out(S, gr, gv, G, t0, len);
    }
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
