// cpu/kernels.h — the CPU launchers (one file per stage, mirroring cuda/<stage>.cu) and what they
// share: the fixed chunking and the whitening of one token. The launcher table is in cpu/tables.cpp.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "../launch.h"
#include "../pama_math.h"

namespace pama {
namespace cpu {

constexpr int64_t kChunkLen = 2048;

constexpr int64_t kGramBlockCpu = 32768;  // elements per Gram partial / combine task
constexpr int kTile = 256;                // elements converted to acc at a time (L1-resident)

template <typename F>
inline void for_chunks(int64_t B, int64_t T, int64_t chunk_len, int64_t cpr, F&& f) {
  at::parallel_for(0, B * cpr, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const ChunkBounds cb = chunk_bounds(k, cpr, chunk_len, T);
      f(k, cb.b, cb.t_begin, cb.t_end);
    }
  });
}

// N_i for one token of row b at position t (algorithms §3): whitened (optionally) and Noon-clipped.
template <typename scalar_t, typename acc>
inline void token_noon(const scalar_t* adv, int n, int64_t BT, int64_t idx, const acc* mean, const acc* istd,
                       bool whiten, bool noon, acc* N) {
  for (int i = 0; i < n; ++i) N[i] = whiten_noon(static_cast<acc>(adv[i * BT + idx]), mean[i], istd[i], whiten, noon);
}

template <typename acc>
inline void whitening_params(const acc* stats, int n, acc* mean, acc* istd) {
  StatsLayout L(n);
  for (int i = 0; i < n; ++i) {
    mean[i] = stats[L.mean() + i];
    istd[i] = inv_std(stats[L.var() + i]);
  }
}

// gae.cpp
void token_rewards(const TokenRewardsParams& p, void*);
void multi_gae(const GaeParams& p, void*);
void multi_gae_backward(const GaeBackwardParams& p, void*);
// stats.cpp
void stats_moments(const StatsParams& p, void*);
void stats_indicators(const StatsParams& p, void*);
void pareto_weights(const WeightsParams& p, void*);
// policy_loss.cpp
void policy_loss_forward(const PolicyLossParams& p, void*);
void policy_loss_backward(const PolicyLossBackwardParams& p, void*);
// value_loss.cpp
void value_loss_forward(const ValueLossParams& p, void*);
void value_loss_backward(const ValueLossBackwardParams& p, void*);
// preference.cpp
void dpo_loss_forward(const DpoLossParams& p, void*);
void dpo_loss_backward(const DpoLossBackwardParams& p, void*);
void gradient_gram(const GradGramParams& p, void*);
void combine_gradients(const CombineGradsParams& p, void*);
void gram_weights(const GramWeightsParams& p, void*);

// tables.cpp: the CPU launcher table (both op families)
const Backend& table();

}  // namespace cpu
}  // namespace pama
