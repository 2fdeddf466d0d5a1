// cpu/vec.h — what the vectorised CPU loops share: the ISA clones of a chunk function, the tile
// of tokens a loop works on, and an exponential the compiler can vectorise.
//
// The chunk functions (one per stage, e.g. policy_loss.cpp's loss_chunk) are written as loops over
// a tile of tokens with selects only, and the compiler vectorises them. PAMA_CPU_CLONES builds each
// twice, for x86-64-v3 (AVX2 + FMA) and for the baseline ISA, and picks one when the library loads
// (GCC target_clones; setup.py adds -fno-trapping-math, without which GCC does not turn the selects
// of a loop into vector blends). The clone is fixed per machine and the chunking is fixed (cpu::kChunkLen),
// so results do not depend on the thread count; they may differ in the last bits between machines
// with and without AVX2 (lane count of the in-chunk partial sums, fused multiply-adds).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../pama_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PAMA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PAMA_CPU_CLONES
#endif

namespace pama {
namespace cpu {

constexpr int kVecTile = 256;  // tokens per tile: the tile buffers of a chunk function stay in L1

// exp(x) for float, branch-free so that a loop calling it vectorises (std::exp does not). Range
// reduction x = k·ln2 + r (ln2 in two parts), a degree-7 polynomial for e^r on |r| <= ln2/2
// (Cephes' expf coefficients), and 2^k from the exponent bits. Error about 1 ulp on [-86, 88.72]
// (at most 1.02 ulp on [-86, 0], test_vec_math.py); 0 below -86 (exp(-86) ~ 4e-38: no denormals),
// +inf above ln(FLT_MAX), NaN for NaN.
// vexp_bounded is the same for x in [-86, 88.72] or NaN only (NaN propagates through the
// polynomial), without the range selects: for arguments clamped before (the PPO log-ratio).
inline float vexp_bounded(float x) {
  // k = round(x / ln2) by the 1.5·2^23 shift (round to nearest; no SSE4.1 rounding instruction needed)
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  // 2^(k-1): k - 1 + 127 in [1, 254] (for NaN, any bits: e is NaN)
  const int32_t bits = (static_cast<int32_t>(k) + 126) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return (e * s) * 2.0f;
}
inline float vexp(float x) {
  const float xc = x < -86.0f ? -86.0f : (x > 88.72283f ? 88.72283f : x);
  float y = vexp_bounded(xc);
  y = x < -86.0f ? 0.0f : y;
  y = x > 88.72283f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
// float64 keeps the library exponential (its tests compare with the reference at ~1e-12).
inline double vexp(double x) { return std::exp(x); }
inline double vexp_bounded(double x) { return std::exp(x); }

// log1p(x) for float x in [0, 1] (DPO's log1p(exp(-|z|))), branch-free so that a loop calling it
// vectorises (std::log1p does not). x < 0.5: f = x; x >= 0.5: log1p(x) = ln2 + log1p(f) with
// f = (x - 1)/2, exact (Sterbenz). Then log1p(f) = f - f²/2 + f³·P(f) on f in [-0.25, 0.5): P of
// degree 7, a relative-error minimax fit made for this function (fit error < 1e-8), ln2 in two parts.
// Error <= 1 ulp on [0, 1] (python_tests/test_vec_math.py sweeps it); NaN propagates. Outside [0, 1]
// the result is not log1p.
inline float vlog1p(float x) {
  const float k = x >= 0.5f ? 1.0f : 0.0f;
  const float f = x >= 0.5f ? (x - 1.0f) * 0.5f : x;
  const float f2 = f * f;
  float p = -0.045071073f;
  p = p * f + 0.10461988f;
  p = p * f + -0.13160475f;
  p = p * f + 0.14478303f;
  p = p * f + -0.16647367f;
  p = p * f + 0.19990873f;
  p = p * f + -0.25000095f;
  p = p * f + 0.33333448f;
  float y = f2 * f * p + k * -2.12194440e-4f;  // ln2 - 0.693359375
  y = y - 0.5f * f2;
  return (f + y) + k * 0.693359375f;
}
// float64: the library log1p (as vexp)
inline double vlog1p(double x) { return std::log1p(x); }

// The mask as bytes (bool is one byte holding 0 or 1): a byte loads into a vector lane, a bool
// does not.
inline const uint8_t* mask_bytes(const bool* m) { return reinterpret_cast<const uint8_t*>(m); }

// v where keep != 0, else +0, by masking the bits: the loads and the arithmetic of a token stay
// unconditional, so the loop vectorises (a `keep ? v : 0` lets the compiler move them under the
// condition, which needs masked loads), and a NaN of a masked-out token never reaches a result.
inline float keep_or_zero(uint8_t keep, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= 0u - static_cast<uint32_t>(keep != 0);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline double keep_or_zero(uint8_t keep, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= uint64_t(0) - static_cast<uint64_t>(keep != 0);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The mask of a tile as lane masks of the accumulation type's width (all ones where masked in), so
// that a loop over the tile has one element width and vectorises at full width: a byte mask among
// float lanes made GCC pick 128-bit vectors and spill. keep_lanes(k, v) is v where k is set, else +0.
template <typename acc>
struct LaneMaskOf;
template <>
struct LaneMaskOf<float> {
  using type = uint32_t;
};
template <>
struct LaneMaskOf<double> {
  using type = uint64_t;
};
template <typename acc>
using lane_mask_t = typename LaneMaskOf<acc>::type;

template <typename K>
inline K lane_mask(bool keep) {
  return K(0) - static_cast<K>(keep);
}
template <typename K, typename V>
inline V keep_lanes(K k, V v) {
  static_assert(sizeof(K) == sizeof(V), "a lane mask has the width of the value");
  K bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= k;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
// 0 where a value is finite or masked out, NaN where a masked-in value is NaN or Inf (v - v is 0
// exactly for finite v): a sum of these is nonzero (NaN) iff some masked-in value is not finite.
template <typename K, typename acc>
inline acc bad_lane(K keep, acc v) {
  return keep_lanes(keep, v - v);
}

// The per-token range [mn, mx] over the objectives, grown by one objective's tile x (i: its index; the
// first one starts the range). Always inlined, like thm1_weight_sums below, so that it runs in the ISA
// clone of its caller.
template <typename acc>
__attribute__((always_inline)) inline void range_update(int i, const acc* x, int len, acc* mn, acc* mx) {
  if (i == 0) {
#pragma omp simd
    for (int t = 0; t < len; ++t) mn[t] = mx[t] = x[t];
  } else {
#pragma omp simd
    for (int t = 0; t < len; ++t) {
      mn[t] = minv(mn[t], x[t]);
      mx[t] = maxv(mx[t], x[t]);
    }
  }
}

// The per-objective sums of the Theorem-1 token weights over a tile (pama_math.h's thm1: the weight
// of each end of the range [mn, mx] shared by the objectives that tie there): N holds n rows of
// kVecTile values, out[i] += Σ_t weight of objective i at t. Masked-out tokens (m = 0; NaN padding)
// add nothing. nmin, nmax, wmin, wmax: scratch tiles. Always inlined: an out-of-line copy is compiled
// for the baseline ISA only (the target clones are of the chunk functions that call it), which made the
// n = 4 pama/token forward 4x slower when GCC chose not to inline it.
template <typename acc>
__attribute__((always_inline)) inline void thm1_weight_sums(const acc* N, int n, int len, const acc* mn, const acc* mx, const uint8_t* m, acc* nmin,
                             acc* nmax, acc* wmin, acc* wmax, acc* out) {
#pragma omp simd
  for (int t = 0; t < len; ++t) nmin[t] = nmax[t] = acc(0);
  for (int i = 0; i < n; ++i) {
    const acc* Ni = N + i * kVecTile;
#pragma omp simd
    for (int t = 0; t < len; ++t) {
      nmin[t] += Ni[t] == mn[t] ? acc(1) : acc(0);
      nmax[t] += Ni[t] == mx[t] ? acc(1) : acc(0);
    }
  }
#pragma omp simd
  for (int t = 0; t < len; ++t) {
    acc w_lo, w_hi;
    thm1_tie_weights(mn[t], mx[t], nmin[t], nmax[t], w_lo, w_hi);
    wmin[t] = keep_or_zero(m[t], w_lo);  // masked-out tokens (NaN padding, nmin = 0) add nothing
    wmax[t] = keep_or_zero(m[t], w_hi);
  }
  for (int i = 0; i < n; ++i) {
    const acc* Ni = N + i * kVecTile;
    acc s_c = 0;
    // the weights are loaded unconditionally and then selected: `c ? wmin[t] : 0` became a masked
    // load (vmaskmovps) and kept the sum on the stack, a quarter of the n = 4 loss pass
#pragma omp simd reduction(+ : s_c)
    for (int t = 0; t < len; ++t) {
      const acc x = Ni[t], lo = wmin[t], hi = wmax[t];
      s_c += (x == mn[t] ? lo : acc(0)) + (x == mx[t] ? hi : acc(0));
    }
    out[i] += s_c;
  }
}

// N[t] = whiten_noon(a[t]) over a tile, the options tested once outside the loops (a loop-invariant
// flag inside the loop keeps GCC from vectorising it).
template <typename scalar_t, typename acc>
inline void whiten_noon_tile(const scalar_t* a, int len, acc mean, acc istd, bool whiten, bool noon, acc* N) {
  if (whiten) {
#pragma omp simd
    for (int t = 0; t < len; ++t) N[t] = whiten_value(static_cast<acc>(a[t]), mean, istd);
  } else {
#pragma omp simd
    for (int t = 0; t < len; ++t) N[t] = static_cast<acc>(a[t]);
  }
  if (noon) {
#pragma omp simd
    for (int t = 0; t < len; ++t) N[t] = noon_value(N[t]);
  }
}

// The per-token formulas of pama_math.h that return through references, returning by value: a
// local whose address is taken inside an `omp simd` loop becomes a per-lane array in memory and
// the loop no longer vectorises. `clipped` is 1 or 0 in T (a bool member also stops GCC).
template <typename T>
struct TokenLoss {
  T loss, dlogp, clipped;
};
template <typename T>
inline TokenLoss<T> ppo_token_from_exp(T adv, T logp, T old_logp, T u, T eps_lo, T eps_hi, T dual_clip) {
  TokenLoss<T> r;
  bool clipped;
  r.loss = ppo_token_loss_from_exp(adv, logp, old_logp, u, eps_lo, eps_hi, dual_clip, r.dlogp, clipped);
  r.clipped = clipped ? T(1) : T(0);
  return r;
}
template <typename T>
inline TokenLoss<T> k3_token(T logp, T ref_logp) {
  TokenLoss<T> r;
  r.loss = k3_kl_from_exp(logp, ref_logp, vexp(k3_log_arg(logp, ref_logp)), r.dlogp);
  r.clipped = T(0);
  return r;
}
// One DPO (objective, pair) term (pama_math.h dpo_pair_loss) with the vectorisable exp and log1p:
// loss and coef = dL_i/dh_b (in dlogp).
template <typename T>
inline TokenLoss<T> dpo_term(T beta, T s, T h, T inv_b) {
  TokenLoss<T> r;
  const T z = dpo_logit(beta, s, h);
  const T e = vexp(dpo_exp_arg(z));
  r.loss = dpo_pair_loss_from_exp(beta, s, z, e, vlog1p(e), inv_b, r.dlogp);
  r.clipped = T(0);
  return r;
}
template <typename T>
inline TokenLoss<T> value_token(T v, T old_v, T ret, T clip) {
  TokenLoss<T> r;
  bool clipped;
  r.loss = value_token_loss(v, old_v, ret, clip, r.dlogp, clipped);
  r.clipped = clipped ? T(1) : T(0);
  return r;
}

}  // namespace cpu
}  // namespace pama
