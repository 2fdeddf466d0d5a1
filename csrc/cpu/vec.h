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

#include <algorithm>
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
// The lane masks of the `len` tokens from flat index `base` of a [B, T] mask given as bytes (bool) or,
// where f32 != nullptr, as the caller's float32 mask (Backend::float_mask; nonzero = in, NaN too, as
// to(bool)). Two loops, the choice made outside them.
template <typename K>
__attribute__((always_inline)) inline void mask_lanes(const bool* mask, const float* f32, int64_t base, int len, K* mk) {
  if (f32 != nullptr) {
    const float* m = f32 + base;
#pragma omp simd
    for (int t = 0; t < len; ++t) mk[t] = lane_mask<K>(m[t] != 0.0f);
  } else {
    const uint8_t* m = mask_bytes(mask) + base;
#pragma omp simd
    for (int t = 0; t < len; ++t) mk[t] = lane_mask<K>(m[t] != 0);
  }
}
// 0 where a value is finite or masked out, NaN where a masked-in value is NaN or Inf (v - v is 0
// exactly for finite v): a sum of these is nonzero (NaN) iff some masked-in value is not finite.
template <typename K, typename acc>
inline acc bad_lane(K keep, acc v) {
  return keep_lanes(keep, v - v);
}

// Asks for the cache lines of the `len` elements from x (the next tile of a stream) without waiting
// for them. A chunk function reads n + 3 streams a tile (1 KB) at a time, too many short runs for
// the hardware prefetcher: the loads of the advantages were a third of the indicator pass at n = 8.
// A prefetch never faults, but callers stay inside their rows anyway. Only from kPrefetchObjectives
// objectives on (prefetch_len): measured on the 2-core EPYC, 2^20 tokens, the prefetches made the n = 4
// and n = 8 statistics and policy loss 5-15 % faster and the n = 1 plain-PPO options (four streams,
// which the hardware follows) 5-18 % slower.
constexpr int kPrefetchObjectives = 4;
inline int64_t prefetch_len(int64_t n, int64_t T, int64_t tt, int64_t tile) {
  return n >= kPrefetchObjectives ? std::min<int64_t>(tile, T - (tt + tile)) : 0;  // the row's next tile
}
template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_tile(const scalar_t* x, int64_t len) {
  const char* c = reinterpret_cast<const char*>(x);
  const int64_t bytes = len * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// The sum of L partial sums (L a power of two) by halving: s[l] += s[l + L/2], ... (vector adds
// first, a short chain at the end; a loop adding them in lane order is a chain of L - 1 adds).
template <int L, typename acc>
__attribute__((always_inline)) inline acc lane_tree(acc* s) {
  static_assert(L > 0 && (L & (L - 1)) == 0, "L is a power of two");
  for (int w = L / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

// Σ f(t) for t in [0, len), in kSumLanes partial sums (lane l takes the t ≡ l mod kSumLanes) added
// by halving at the end (lane_tree): several independent vector accumulators, where an `omp simd
// reduction` keeps one and waits on the add latency at every vector. A fixed order: the sum does not
// depend on the thread count. Always inlined, so that it runs in the ISA clone of its caller.
constexpr int kSumLanes = 32;
template <typename acc, typename F>
__attribute__((always_inline)) inline acc lane_sum(int len, F&& f) {
  acc s[kSumLanes] = {};
  int t = 0;
  for (; t + kSumLanes <= len; t += kSumLanes) {
#pragma omp simd
    for (int l = 0; l < kSumLanes; ++l) s[l] += f(t + l);
  }
  for (int l = 0; t + l < len; ++l) s[l] += f(t + l);
  return lane_tree<kSumLanes>(s);
}

// The Gram of a tile of n rows, each `padded` elements long (a multiple of kLanes, zeros after the
// data): every upper-triangle product <x_i, x_j> (i <= j) is accumulated into kLanes partial sums,
// lanes[q] for pair q in the order (0,0), (0,1), ..., (0,n-1), (1,1), ... (gram_pairs(n) pairs; zeroed
// by the caller before the first tile), and added up once after the last tile (lane_total), not per
// tile. Blocks of four pairs (i, j..j+3) share the loads of row i and give 4 * kLanes / (vector width)
// independent accumulator chains (eight AVX2 registers), held in registers over the tile.
constexpr int kLanes = 16;
template <int J, typename acc>
__attribute__((always_inline)) inline void tile_dots(const acc* x, const acc* const* y, int padded,
                                                     acc (*lanes)[kLanes]) {
  acc r[J][kLanes];
  for (int jj = 0; jj < J; ++jj)
    for (int l = 0; l < kLanes; ++l) r[jj][l] = lanes[jj][l];
  for (int e = 0; e < padded; e += kLanes)
    for (int jj = 0; jj < J; ++jj) {
      const acc* yj = y[jj] + e;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) r[jj][l] += x[e + l] * yj[l];
    }
  for (int jj = 0; jj < J; ++jj)
    for (int l = 0; l < kLanes; ++l) lanes[jj][l] = r[jj][l];
}
template <typename acc>
__attribute__((always_inline)) inline void tile_gram(const acc* const* rows, int n, int padded, acc (*lanes)[kLanes]) {
  int q = 0;
  for (int i = 0; i < n; ++i) {
    int j = i;
    for (; j + 4 <= n; j += 4, q += 4) tile_dots<4>(rows[i], rows + j, padded, lanes + q);
    const int rest = n - j;  // 0-3 pairs left in this row of the triangle: one call for them all
    if (rest == 3) tile_dots<3>(rows[i], rows + j, padded, lanes + q);
    if (rest == 2) tile_dots<2>(rows[i], rows + j, padded, lanes + q);
    if (rest == 1) tile_dots<1>(rows[i], rows + j, padded, lanes + q);
    q += rest;
  }
}
template <typename acc>
inline acc lane_total(const acc* lanes) {
  acc s[kLanes];
  for (int l = 0; l < kLanes; ++l) s[l] = lanes[l];
  return lane_tree<kLanes>(s);
}

// The per-token range [mn, mx] over the objectives, grown by one objective's tile x (i: its index; the
// first one starts the range). With nmin != nullptr also how many objectives so far sit at each end
// (nmin, nmax: a new minimum restarts the count at 1, an equal value adds one): the tie counts of
// Theorem 1's token weights (thm1_weight_sums), the same counts as comparing every objective with the
// final range afterwards, without those n more passes over the tile. Always inlined, like
// thm1_weight_sums below, so that it runs in the ISA clone of its caller.
template <typename acc>
__attribute__((always_inline)) inline void range_update(int i, const acc* x, int len, acc* mn, acc* mx,
                                                        acc* nmin = nullptr, acc* nmax = nullptr) {
  if (i == 0) {
#pragma omp simd
    for (int t = 0; t < len; ++t) mn[t] = mx[t] = x[t];
    if (nmin != nullptr) {
#pragma omp simd
      for (int t = 0; t < len; ++t) nmin[t] = nmax[t] = acc(1);
    }
  } else if (nmin == nullptr) {
#pragma omp simd
    for (int t = 0; t < len; ++t) {
      mn[t] = minv(mn[t], x[t]);
      mx[t] = maxv(mx[t], x[t]);
    }
  } else {
#pragma omp simd
    for (int t = 0; t < len; ++t) {
      const acc v = x[t], lo = mn[t], hi = mx[t];
      nmin[t] = v < lo ? acc(1) : (v == lo ? nmin[t] + acc(1) : nmin[t]);
      nmax[t] = v > hi ? acc(1) : (v == hi ? nmax[t] + acc(1) : nmax[t]);
      mn[t] = minv(lo, v);
      mx[t] = maxv(hi, v);
    }
  }
}

// The per-objective sums of the Theorem-1 token weights over a tile (pama_math.h's thm1: the weight
// of each end of the range [mn, mx] shared by the nmin, nmax objectives that tie there, counted by
// range_update): N holds n rows of kVecTile values, out[i] += Σ_t weight of objective i at t.
// Masked-out tokens (mk = 0; NaN padding) add nothing. wmin, wmax: scratch tiles. Always inlined: an
// out-of-line copy is compiled for the baseline ISA only (the target clones are of the chunk functions
// that call it), which made the n = 4 pama/token forward 4x slower when GCC chose not to inline it.
template <typename acc, typename K>
__attribute__((always_inline)) inline void thm1_weight_sums(const acc* N, int n, int len, const acc* mn, const acc* mx,
                                                            const acc* nmin, const acc* nmax, const K* mk,
                                                            acc* wmin, acc* wmax, acc* out) {
#pragma omp simd
  for (int t = 0; t < len; ++t) {
    acc w_lo, w_hi;
    thm1_tie_weights(mn[t], mx[t], nmin[t], nmax[t], w_lo, w_hi);
    wmin[t] = keep_lanes(mk[t], w_lo);  // masked-out tokens (NaN padding) add nothing
    wmax[t] = keep_lanes(mk[t], w_hi);
  }
  // the weights are loaded unconditionally and then selected (`c ? wmin[t] : 0` became a masked load,
  // vmaskmovps, and kept the sum on the stack: a quarter of the n = 4 loss pass); four objectives per
  // loop, as in indicator_sums
  auto weight = [&](const acc* Ni, int t) {
    const acc x = Ni[t];
    return (x == mn[t] ? wmin[t] : acc(0)) + (x == mx[t] ? wmax[t] : acc(0));
  };
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const acc *N0 = N + i * kVecTile, *N1 = N0 + kVecTile, *N2 = N1 + kVecTile, *N3 = N2 + kVecTile;
    acc c0 = 0, c1 = 0, c2 = 0, c3 = 0;
#pragma omp simd reduction(+ : c0, c1, c2, c3)
    for (int t = 0; t < len; ++t) {
      c0 += weight(N0, t);
      c1 += weight(N1, t);
      c2 += weight(N2, t);
      c3 += weight(N3, t);
    }
    out[i] += c0, out[i + 1] += c1, out[i + 2] += c2, out[i + 3] += c3;
  }
  for (; i < n; ++i) {
    const acc* Ni = N + i * kVecTile;
    acc c0 = 0;
#pragma omp simd reduction(+ : c0)
    for (int t = 0; t < len; ++t) c0 += weight(Ni, t);
    out[i] += c0;
  }
}

// The two sums per objective of a tile that the statistics need besides the token weights
// (algorithms §3): Σ I_i (N_i where `ind` is set) into s_i[i] and the count of masked-in (mk) N_i > 0
// into s_pos[i], for the n rows of N (kVecTile apart). Four objectives per loop: eight independent
// sums, where one objective per loop waits on the add latency of its two sums at every vector. One
// definition for the indicators pass and the single-pass loss.
template <typename K, typename acc>
__attribute__((always_inline)) inline void indicator_sums(const acc* N, int n, const K* ind, const K* mk, int len,
                                                          acc* s_i, acc* s_pos) {
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const acc *N0 = N + i * kVecTile, *N1 = N0 + kVecTile, *N2 = N1 + kVecTile, *N3 = N2 + kVecTile;
    acc a0 = 0, a1 = 0, a2 = 0, a3 = 0, p0 = 0, p1 = 0, p2 = 0, p3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, p0, p1, p2, p3)
    for (int t = 0; t < len; ++t) {
      const K in = ind[t], k = mk[t];
      a0 += keep_lanes(in, N0[t]);
      a1 += keep_lanes(in, N1[t]);
      a2 += keep_lanes(in, N2[t]);
      a3 += keep_lanes(in, N3[t]);
      p0 += keep_lanes(k, N0[t] > acc(0) ? acc(1) : acc(0));
      p1 += keep_lanes(k, N1[t] > acc(0) ? acc(1) : acc(0));
      p2 += keep_lanes(k, N2[t] > acc(0) ? acc(1) : acc(0));
      p3 += keep_lanes(k, N3[t] > acc(0) ? acc(1) : acc(0));
    }
    s_i[i] += a0, s_i[i + 1] += a1, s_i[i + 2] += a2, s_i[i + 3] += a3;
    s_pos[i] += p0, s_pos[i + 1] += p1, s_pos[i + 2] += p2, s_pos[i + 3] += p3;
  }
  for (; i < n; ++i) {
    const acc* Ni = N + i * kVecTile;
    acc a0 = 0, p0 = 0;
#pragma omp simd reduction(+ : a0, p0)
    for (int t = 0; t < len; ++t) {
      a0 += keep_lanes(ind[t], Ni[t]);
      p0 += keep_lanes(mk[t], Ni[t] > acc(0) ? acc(1) : acc(0));
    }
    s_i[i] += a0;
    s_pos[i] += p0;
  }
}

// N[t] = whiten_noon(a[t]) over a tile in one loop, the options as template constants (a
// loop-invariant flag inside the loop keeps GCC from vectorising it); with kCheck it returns the sum
// of bad_lane(mk[t], a[t]) (NaN iff a masked-in raw value is not finite), else 0.
template <bool kWhiten, bool kNoon, bool kCheck, typename scalar_t, typename acc, typename K>
__attribute__((always_inline)) inline acc whiten_noon_loop(const scalar_t* a, int len, acc mean, acc istd, acc* N,
                                                           const K* mk) {
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int t = 0; t < len; ++t) {
    const acc x = static_cast<acc>(a[t]);
    const acc y = kWhiten ? whiten_value(x, mean, istd) : x;
    N[t] = kNoon ? noon_value(y) : y;
    if (kCheck) s += bad_lane(mk[t], x);
  }
  return s;
}
// The options tested once, outside the loop. With bad != nullptr, *bad also counts the masked-in (mk)
// non-finite raw values (the policy loss's in-pass finite check of the advantages).
template <typename scalar_t, typename acc, typename K = lane_mask_t<acc>>
__attribute__((always_inline)) inline void whiten_noon_tile(const scalar_t* a, int len, acc mean, acc istd, bool whiten,
                                                            bool noon, acc* N, const K* mk = nullptr,
                                                            acc* bad = nullptr) {
  acc s = 0;
  switch ((whiten ? 4 : 0) + (noon ? 2 : 0) + (bad != nullptr ? 1 : 0)) {
    case 0: s = whiten_noon_loop<false, false, false>(a, len, mean, istd, N, mk); break;
    case 1: s = whiten_noon_loop<false, false, true>(a, len, mean, istd, N, mk); break;
    case 2: s = whiten_noon_loop<false, true, false>(a, len, mean, istd, N, mk); break;
    case 3: s = whiten_noon_loop<false, true, true>(a, len, mean, istd, N, mk); break;
    case 4: s = whiten_noon_loop<true, false, false>(a, len, mean, istd, N, mk); break;
    case 5: s = whiten_noon_loop<true, false, true>(a, len, mean, istd, N, mk); break;
    case 6: s = whiten_noon_loop<true, true, false>(a, len, mean, istd, N, mk); break;
    default: s = whiten_noon_loop<true, true, true>(a, len, mean, istd, N, mk); break;
  }
  if (bad != nullptr) *bad += s;
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
