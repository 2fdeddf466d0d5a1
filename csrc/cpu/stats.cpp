// cpu/stats.cpp — §3 statistics (moments, then indicators) and §4 / §6 weights.
// The CPU twin of cuda/stats.cu: the same stages, the same pama_math.h formulas, at::parallel_for
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

void stats_moments(const StatsParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    MomentsPartial P(n);
    auto* part = static_cast<acc*>(p.partials);
    auto* adv = static_cast<const scalar_t*>(p.advantages);
    const int64_t BT = p.B * p.T;
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      acc* out = part + k * P.size();
      const bool* m = p.mask + b * p.T;
      acc cnt = 0;
      for (int64_t t = t0; t < t1; ++t) cnt += m[t] ? acc(1) : acc(0);
      out[P.cnt()] = cnt;
      acc inv, rs;
      moments_chunk_scales(cnt, inv, rs);
      for (int i = 0; i < n; ++i) {
        const scalar_t* a = adv + i * BT + b * p.T;
        acc mean = 0;
        for (int64_t t = t0; t < t1; ++t)
          if (m[t]) mean += static_cast<acc>(a[t]) * inv;
        acc msd = 0;
        for (int64_t t = t0; t < t1; ++t)
          if (m[t]) {
            const acc d = (static_cast<acc>(a[t]) - mean) * rs;
            msd += d * d;
          }
        out[P.mean() + i] = mean;
        out[P.msd() + i] = msd;
      }
    });
    auto* stats = static_cast<acc*>(p.stats);
    auto* rc = static_cast<acc*>(p.row_count);
    finalize_moments_rows(part, n, p.B, p.chunks_per_row, rc, 0, 1);
    finalize_moments_stats(part, n, p.B, p.chunks_per_row, rc, stats, 0, 1);
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
    auto* adv = static_cast<const scalar_t*>(p.advantages);
    auto* lp = static_cast<const scalar_t*>(p.logp);
    auto* old = static_cast<const scalar_t*>(p.old_logp);
    const int64_t BT = p.B * p.T;
    acc mean[kMaxObjectives], istd[kMaxObjectives];
    whitening_params(stats, n, mean, istd);
    const acc hi = acc(1) + static_cast<acc>(p.eps_hi);
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      acc* out = part + k * psize;
      std::fill(out, out + psize, acc(0));
      acc N[kMaxObjectives], I[kMaxObjectives];
      const bool* m = p.mask + b * p.T;
      for (int64_t t = t0; t < t1; ++t) {
        if (!m[t]) continue;
        const int64_t idx = b * p.T + t;
        token_noon(adv, n, BT, idx, mean, istd, p.whiten, p.noon, N);
        const bool ind = ppo_ratio(static_cast<acc>(lp[idx]), static_cast<acc>(old[idx])) <= hi;
        for (int i = 0; i < n; ++i) {
          I[i] = ind ? N[i] : acc(0);
          out[P.sum_i() + i] += I[i];
          out[P.pos() + i] += N[i] > acc(0) ? acc(1) : acc(0);
        }
        thm1(N, 1, n, out + P.ctok(), acc(1));
        if (p.with_gram) {
          acc* G = out + P.gram();
          for (int i = 0; i < n; ++i)
            for (int j = i; j < n; ++j) G[i * n + j] += I[i] * I[j];
        }
      }
      if (p.with_gram) {
        acc* G = out + P.gram();
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < i; ++j) G[i * n + j] = G[j * n + i];
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
    finalize_weights(static_cast<const acc*>(p.stats), p.n, p.method, p.granularity,
                     static_cast<const acc*>(p.prefs), static_cast<acc>(p.cagrad_c), static_cast<acc*>(p.weights));
  });
}

}  // namespace cpu
}  // namespace pama
