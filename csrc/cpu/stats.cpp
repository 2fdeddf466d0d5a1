// cpu/stats.cpp — §3 statistics (moments, then indicators) and §4 / §6 weights.
// The CPU twin of cuda/stats.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed chunks (results do not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../pama_math.h"
#include "kernels.h"
#include "vec.h"

namespace pama {
namespace cpu {

namespace {

// One chunk of the moments pass: [cnt, mean(n), msd(n)] (MomentsPartial). The mask becomes lane masks
// of the accumulation type's width once (so that the loops have one element width and run at full
// vector width; the byte mask among float lanes gave 128-bit vectors), then per objective two sums over
// the chunk (the mean, then the squared deviations from it, the chunk re-read from L1), each in
// kSumLanes partial sums (lane_sum).
template <typename scalar_t>
PAMA_CPU_CLONES void moments_chunk(const StatsParams& p, int64_t b, int64_t t0, int64_t t1, acc_of<scalar_t>* out) {
  using acc = acc_of<scalar_t>;
  using K = lane_mask_t<acc>;
  const int n = static_cast<int>(p.n);
  MomentsPartial P(n);
  const int64_t BT = p.B * p.T;
  const int len = static_cast<int>(t1 - t0);
  TORCH_INTERNAL_ASSERT(len <= kChunkLen, "moments_chunk: a chunk is at most the CPU table's kChunkLen tokens");
  K mk[kChunkLen];
  mask_lanes(p.mask, p.mask_f32, b * p.T + t0, len, mk);
  const acc cnt = lane_sum<acc>(len, [&](int t) { return keep_lanes(mk[t], acc(1)); });
  out[P.cnt()] = cnt;
  acc inv, rs;
  moments_chunk_scales(cnt, inv, rs);
  for (int i = 0; i < n; ++i) {
    const scalar_t* a = static_cast<const scalar_t*>(p.advantages) + i * BT + b * p.T + t0;
    const acc mean = lane_sum<acc>(len, [&](int t) { return keep_lanes(mk[t], static_cast<acc>(a[t]) * inv); });
    const acc msd = lane_sum<acc>(len, [&](int t) {
      const acc d = (static_cast<acc>(a[t]) - mean) * rs;
      return keep_lanes(mk[t], d * d);
    });
    out[P.mean() + i] = mean;
    out[P.msd() + i] = msd;
  }
}

// One chunk of the indicators pass (IndicatorPartial): per tile of tokens, the whitened and
// Noon-clipped advantages N[i][t] of every objective, then per objective the sums of I_i, of
// [N_i > 0] and of the Theorem-1 token weights (their ties shared as in pama_math.h's thm1), and
// the Gram of I when asked (tile_gram: lane sums over the chunk, added up at its end). The mask and
// the indicator are lane masks of the accumulation type's width (full-width loops, cpu/vec.h).
// scratch: n * kVecTile acc (the tiles N_i), then with_gram gram_pairs(n) * kLanes acc.
template <typename scalar_t>
PAMA_CPU_CLONES void indicators_chunk(const StatsParams& p, const acc_of<scalar_t>* mean, const acc_of<scalar_t>* istd,
                                      int64_t b, int64_t t0, int64_t t1, acc_of<scalar_t>* scratch,
                                      acc_of<scalar_t>* out) {
  using acc = acc_of<scalar_t>;
  using K = lane_mask_t<acc>;
  static_assert(kVecTile % kLanes == 0, "a tile is whole lane blocks");
  const int n = static_cast<int>(p.n);
  IndicatorPartial P(n);
  const int64_t BT = p.B * p.T;
  const bool whiten = p.whiten, noon = p.noon;
  const acc hi = acc(1) + static_cast<acc>(p.eps_hi);
  auto* lp = static_cast<const scalar_t*>(p.logp);
  auto* old = static_cast<const scalar_t*>(p.old_logp);
  acc* N = scratch;
  auto* lanes = reinterpret_cast<acc(*)[kLanes]>(scratch + static_cast<size_t>(n) * kVecTile);
  const acc* rows[kMaxObjectives];
  for (int i = 0; i < n; ++i) rows[i] = N + i * kVecTile;
  if (p.with_gram) std::fill(lanes[0], lanes[0] + static_cast<size_t>(gram_pairs(n)) * kLanes, acc(0));
  K mk[kVecTile], ind[kVecTile];
  acc mn[kVecTile], mx[kVecTile], nmin[kVecTile], nmax[kVecTile], wmin[kVecTile], wmax[kVecTile];
  for (int64_t tt = t0; tt < t1; tt += kVecTile) {
    const int len = static_cast<int>(std::min<int64_t>(kVecTile, t1 - tt));
    const int64_t base = b * p.T + tt;
    const scalar_t* l_b = lp + base;
    const scalar_t* o_b = old + base;
    const int64_t next = prefetch_len(p.n, p.T, tt, kVecTile);  // tokens of the next tile to prefetch
    prefetch_tile(l_b + kVecTile, next);
    prefetch_tile(o_b + kVecTile, next);
    mask_lanes(p.mask, p.mask_f32, base, len, mk);
    // ind: masked in and ratio <= 1 + eps_hi (I_i = ind ? N_i : 0)
#pragma omp simd
    for (int t = 0; t < len; ++t) {
      const acc u = vexp(ppo_log_ratio(static_cast<acc>(l_b[t]), static_cast<acc>(o_b[t])));
      ind[t] = mk[t] & lane_mask<K>(u <= hi);
    }
    for (int i = 0; i < n; ++i) {
      const scalar_t* a = static_cast<const scalar_t*>(p.advantages) + i * BT + base;
      acc* Ni = N + i * kVecTile;
      prefetch_tile(a + kVecTile, next);
      whiten_noon_tile(a, len, mean[i], istd[i], whiten, noon, Ni);
      range_update(i, Ni, len, mn, mx, nmin, nmax);  // the range of N over the objectives and its ties
    }
    indicator_sums(N, n, ind, mk, len, out + P.sum_i(), out + P.pos());
    // Theorem-1 token weights: the weight of each end of the range, shared by the objectives tied there
    thm1_weight_sums(N, n, len, mn, mx, nmin, nmax, mk, wmin, wmax, out + P.ctok());
    if (p.with_gram) {
      const int padded = (len + kLanes - 1) / kLanes * kLanes;
      for (int i = 0; i < n; ++i) {  // N becomes I, zeros after the tile's tokens
        acc* Ni = N + i * kVecTile;
#pragma omp simd
        for (int t = 0; t < len; ++t) Ni[t] = keep_lanes(ind[t], Ni[t]);
        for (int t = len; t < padded; ++t) Ni[t] = acc(0);
      }
      tile_gram(rows, n, padded, lanes);
    }
  }
  if (p.with_gram) {
    acc* G = out + P.gram();
    for (int i = 0, q = 0; i < n; ++i)
      for (int j = i; j < n; ++j, ++q) G[i * n + j] = G[j * n + i] = lane_total(lanes[q]);
  }
}

}  // namespace

void stats_moments(const StatsParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    MomentsPartial P(n);
    auto* part = static_cast<acc*>(p.partials);
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      moments_chunk<scalar_t>(p, b, t0, t1, part + k * P.size());
    });
    auto* stats = static_cast<acc*>(p.stats);
    auto* rc = static_cast<acc*>(p.row_count);
    row_counts(part, P.size(), p.B, p.chunks_per_row, rc, 0, 1);
    finalize_moments_stats(part, n, p.B, p.chunks_per_row, rc, stats);
  });
}

void stats_indicators(const StatsParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    IndicatorPartial P(n);
    const int psize = P.size(p.with_gram);
    auto* part = static_cast<acc*>(p.partials);
    auto* stats = static_cast<acc*>(p.stats);
    acc mean[kMaxObjectives], istd[kMaxObjectives];
    whitening_params(stats, n, mean, istd);
    at::parallel_for(0, p.B * p.chunks_per_row, 1, [&](int64_t begin, int64_t end) {
      // per task: the tiles N_i and the Gram's lane sums (indicators_chunk)
      std::vector<acc> scratch(static_cast<size_t>(n) * kVecTile +
                               (p.with_gram ? static_cast<size_t>(gram_pairs(n)) * kLanes : 0));
      for (int64_t k = begin; k < end; ++k) {
        const ChunkBounds cb = chunk_bounds(k, p.chunks_per_row, p.chunk_len, p.T);
        acc* out = part + k * psize;
        std::fill(out, out + psize, acc(0));
        indicators_chunk<scalar_t>(p, mean, istd, cb.b, cb.t_begin, cb.t_end, scratch.data(), out);
      }
    });
    auto* rc = static_cast<const acc*>(p.row_count);
    auto* sw = static_cast<acc*>(p.seq_weights);
    finalize_indicator_totals(part, n, p.B, p.chunks_per_row, p.with_gram, stats, 0, 1);
    finalize_indicator_rows(part, n, p.B, p.chunks_per_row, p.with_gram, rc, sw, 0, 1);
    finalize_indicator_cseq(n, p.B, rc, sw, stats, 0, 1);
  });
}

void pareto_weights(const WeightsParams& p, void*) {
  dispatch_acc(p.acc_is_double, [&](auto tag) {
    using acc = decltype(tag);
    gram::Scratch scratch;  // on this thread's stack (the CUDA kernel gets WeightsParams::scratch)
    finalize_weights(static_cast<const acc*>(p.stats), p.n, p.method, p.granularity,
                     static_cast<const acc*>(p.prefs), static_cast<acc>(p.cagrad_c), static_cast<acc*>(p.weights),
                     scratch);
  });
}

}  // namespace cpu
}  // namespace pama
