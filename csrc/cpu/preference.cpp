// cpu/preference.cpp — §7 preference ops: per-objective DPO losses (forward, backward), the Gram of
// per-objective gradients, their combination, and the Gram methods (pama::gram_weights).
// The CPU twin of cuda/preference.cu. The DPO loss runs one task per fixed block of kDpoChunk pairs,
// Gram and combine one per fixed block of elements (at::parallel_for), so partials and results do not
// depend on the thread count; the finalizes add the partials in task order. The DPO tasks are tile
// loops that the compiler vectorises (cpu/vec.h: vexp, vlog1p).
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

// Pairs per DPO task: fixed, so the per-task partial sums and their ordered finalize do not depend
// on the thread count (2^20 pairs: 128 tasks).
constexpr int64_t kDpoChunk = 8192;

inline int64_t dpo_tasks(int64_t B) { return (B + kDpoChunk - 1) / kDpoChunk; }

// The length-normalisation divisors of a tile (1 where a length tensor is absent). Always inlined,
// so that it runs in the ISA clone of its caller.
template <typename acc>
__attribute__((always_inline)) inline void length_tile(const acc* lengths, int64_t base, int len, acc* L) {
  if (lengths != nullptr) {
#pragma omp simd
    for (int t = 0; t < len; ++t) L[t] = dpo_length(lengths, base + t);
  } else {
#pragma omp simd
    for (int t = 0; t < len; ++t) L[t] = acc(1);
  }
}

// One task of the forward: pairs [b0, b1), walked in tiles of kVecTile. The margins h of a tile
// first (one read of the four log-prob vectors), then per objective the losses and coef (one read of
// its labels, one write of its coef); part[i] = Σ over the task's pairs of objective i's loss term.
// kLen: some length tensor is given (else the margins divide by nothing).
template <typename scalar_t, bool kLen>
PAMA_CPU_CLONES void dpo_forward_task(const DpoLossParams& p, int64_t b0, int64_t b1, acc_of<scalar_t>* part) {
  using acc = acc_of<scalar_t>;
  auto* pc = static_cast<const scalar_t*>(p.policy_chosen);
  auto* pr = static_cast<const scalar_t*>(p.policy_rejected);
  auto* rc = static_cast<const scalar_t*>(p.ref_chosen);
  auto* rr = static_cast<const scalar_t*>(p.ref_rejected);
  auto* lab = static_cast<const acc*>(p.labels);
  auto* coef = static_cast<acc*>(p.coef);
  const acc beta = static_cast<acc>(p.beta);
  const acc inv_b = acc(1) / static_cast<acc>(std::max<int64_t>(p.B, 1));
  const int n = static_cast<int>(p.n);
  acc H[kVecTile], Lc[kLen ? kVecTile : 1], Lr[kLen ? kVecTile : 1];
  for (int i = 0; i < n; ++i) part[i] = acc(0);
  for (int64_t base = b0; base < b1; base += kVecTile) {
    const int len = static_cast<int>(std::min<int64_t>(kVecTile, b1 - base));
    if (kLen) {
      length_tile(static_cast<const acc*>(p.chosen_lengths), base, len, Lc);
      length_tile(static_cast<const acc*>(p.rejected_lengths), base, len, Lr);
    }
#pragma omp simd
    for (int t = 0; t < len; ++t) {
      const int64_t b = base + t;
      H[t] = dpo_margin(static_cast<acc>(pc[b]), static_cast<acc>(pr[b]), static_cast<acc>(rc[b]),
                        static_cast<acc>(rr[b]), kLen ? Lc[t] : acc(1), kLen ? Lr[t] : acc(1));
    }
    for (int i = 0; i < n; ++i) {
      const acc* lab_i = lab + i * p.B + base;
      acc* coef_i = coef + i * p.B + base;
      acc s_l = 0;
#pragma omp simd reduction(+ : s_l)
      for (int t = 0; t < len; ++t) {
        const TokenLoss<acc> r = dpo_term(beta, label_sign(lab_i[t]), H[t], inv_b);
        coef_i[t] = r.dlogp;
        s_l += r.loss;
      }
      part[i] += s_l;
    }
  }
}

// One task of the backward: grad_h = Σ_i grad_losses[i] coef[i, b] (i in order) over pairs [b0, b1),
// divided by the lengths.
template <typename scalar_t, bool kLen>
PAMA_CPU_CLONES void dpo_backward_task(const DpoLossBackwardParams& p, int64_t b0, int64_t b1) {
  using acc = acc_of<scalar_t>;
  auto* g = static_cast<const acc*>(p.grad_losses);
  auto* coef = static_cast<const acc*>(p.coef);
  auto* gc = static_cast<scalar_t*>(p.grad_chosen);
  auto* gr = static_cast<scalar_t*>(p.grad_rejected);
  const int n = static_cast<int>(p.n);
  acc G[kVecTile], Lc[kLen ? kVecTile : 1], Lr[kLen ? kVecTile : 1];
  for (int64_t base = b0; base < b1; base += kVecTile) {
    const int len = static_cast<int>(std::min<int64_t>(kVecTile, b1 - base));
#pragma omp simd
    for (int t = 0; t < len; ++t) G[t] = acc(0);
    for (int i = 0; i < n; ++i) {
      const acc gi = g[i];
      const acc* c = coef + i * p.B + base;
#pragma omp simd
      for (int t = 0; t < len; ++t) G[t] += gi * c[t];
    }
    if (kLen) {
      length_tile(static_cast<const acc*>(p.chosen_lengths), base, len, Lc);
      length_tile(static_cast<const acc*>(p.rejected_lengths), base, len, Lr);
    }
#pragma omp simd
    for (int t = 0; t < len; ++t) {
      gc[base + t] = static_cast<scalar_t>(kLen ? G[t] / Lc[t] : G[t]);
      gr[base + t] = static_cast<scalar_t>(kLen ? G[t] / Lr[t] : G[t]);
    }
  }
}

template <typename F>
inline void for_dpo_tasks(int64_t B, F&& f) {
  at::parallel_for(0, dpo_tasks(B), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, c * kDpoChunk, std::min(B, (c + 1) * kDpoChunk));
  });
}

}  // namespace

void dpo_loss_forward(const DpoLossParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int64_t n = p.n, ntasks = dpo_tasks(p.B);
    const bool with_len = p.chosen_lengths != nullptr || p.rejected_lengths != nullptr;
    std::vector<acc> part(static_cast<size_t>(ntasks * n));
    for_dpo_tasks(p.B, [&](int64_t c, int64_t b0, int64_t b1) {
      if (with_len)
        dpo_forward_task<scalar_t, true>(p, b0, b1, part.data() + c * n);
      else
        dpo_forward_task<scalar_t, false>(p, b0, b1, part.data() + c * n);
    });
    // ordered finalize: the tasks' partials in task order
    const acc inv_b = acc(1) / static_cast<acc>(std::max<int64_t>(p.B, 1));
    auto* losses = static_cast<acc*>(p.losses);
    for (int64_t i = 0; i < n; ++i) {
      acc sum = 0;
      for (int64_t c = 0; c < ntasks; ++c) sum += part[c * n + i];
      losses[i] = sum * inv_b;
    }
  });
}

void dpo_loss_backward(const DpoLossBackwardParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const bool with_len = p.chosen_lengths != nullptr || p.rejected_lengths != nullptr;
    for_dpo_tasks(p.B, [&](int64_t, int64_t b0, int64_t b1) {
      if (with_len)
        dpo_backward_task<scalar_t, true>(p, b0, b1);
      else
        dpo_backward_task<scalar_t, false>(p, b0, b1);
    });
  });
}

// Parameter k and block c of task `task` (part_offset is non-decreasing, [K + 1]).
inline void task_block(const int64_t* part_offset, int64_t K, int64_t task, int64_t& k, int64_t& c) {
  k = std::upper_bound(part_offset, part_offset + K + 1, task) - part_offset - 1;
  c = task - part_offset[k];
}

namespace {

// One Gram task: elements [e0, e1) of parameter k, in tiles of kTile converted to acc (dead rows, a
// None gradient, are zeros and their products are dropped); sums[q] = the task's <g_i, g_j> of each
// upper-triangle pair q. buf: n * kTile + gram_pairs(n) * kLanes scratch (the tile, the lane sums).
template <typename scalar_t>
PAMA_CPU_CLONES void gram_task(const GradGramParams& p, int64_t k, int64_t e0, int64_t e1, acc_of<scalar_t>* sums,
                               acc_of<scalar_t>* buf) {
  using acc = acc_of<scalar_t>;
  const int n = static_cast<int>(p.n);
  bool live[kMaxObjectives];
  const acc* rows[kMaxObjectives];
  for (int i = 0; i < n; ++i) {
    live[i] = p.ptrs[i * p.K + k] != nullptr;
    rows[i] = buf + static_cast<size_t>(i) * kTile;
  }
  auto* lanes = reinterpret_cast<acc(*)[kLanes]>(buf + static_cast<size_t>(n) * kTile);
  std::fill(lanes[0], lanes[0] + static_cast<size_t>(gram_pairs(n)) * kLanes, acc(0));
  for (int64_t base = e0; base < e1; base += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, e1 - base));
    const int padded = (len + kLanes - 1) / kLanes * kLanes;
    for (int i = 0; i < n; ++i) {
      acc* row = buf + static_cast<size_t>(i) * kTile;
      if (live[i]) {
        const scalar_t* g = static_cast<const scalar_t*>(p.ptrs[i * p.K + k]) + base;
#pragma omp simd
        for (int e = 0; e < len; ++e) row[e] = static_cast<acc>(g[e]);
        for (int e = len; e < padded; ++e) row[e] = acc(0);
      } else {
        for (int e = 0; e < padded; ++e) row[e] = acc(0);
      }
    }
    tile_gram(rows, n, padded, lanes);
  }
  for (int i = 0, q = 0; i < n; ++i)
    for (int j = i; j < n; ++j, ++q) sums[q] = live[i] && live[j] ? lane_total(lanes[q]) : acc(0);
}

// One combine task: elements [e0, e1) of parameter k, in tiles of kTile (i in order into an acc tile).
template <typename G, typename O, typename acc>
PAMA_CPU_CLONES void combine_task(const CombineGradsParams& p, int64_t k, int64_t e0, int64_t e1) {
  const auto* coeffs = static_cast<const acc*>(p.coeffs);
  O* out = static_cast<O*>(p.outs[k]);
  acc tmp[kTile];
  for (int64_t base = e0; base < e1; base += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, e1 - base));
#pragma omp simd
    for (int e = 0; e < len; ++e) tmp[e] = acc(0);
    for (int64_t i = 0; i < p.n; ++i) {
      auto* g = static_cast<const G*>(p.ptrs[i * p.K + k]);
      if (g == nullptr) continue;
      const acc ci = coeffs[i];
      g += base;
#pragma omp simd
      for (int e = 0; e < len; ++e) tmp[e] += ci * static_cast<acc>(g[e]);
    }
    O* o = out + base;
    if (p.accumulate) {
#pragma omp simd
      for (int e = 0; e < len; ++e) o[e] = static_cast<O>(static_cast<acc>(o[e]) + tmp[e]);
    } else {
#pragma omp simd
      for (int e = 0; e < len; ++e) o[e] = static_cast<O>(tmp[e]);
    }
  }
}

}  // namespace

void gradient_gram(const GradGramParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    const int P = gram_pairs(n);
    const int64_t ntasks = p.part_offset[p.K];
    auto* part = static_cast<acc*>(p.partials);
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc> buf(static_cast<size_t>(n) * kTile + static_cast<size_t>(P) * kLanes);
      for (int64_t task = t0; task < t1; ++task) {
        int64_t k, c;
        task_block(p.part_offset, p.K, task, k, c);
        const int64_t e0 = c * p.block, e1 = std::min(p.numel[k], e0 + p.block);
        gram_task<scalar_t>(p, k, e0, e1, part + task * P, buf.data());
      }
    });
    finalize_gram(part, ntasks, n, static_cast<acc*>(p.gram), 0, 1);
  });
}

template <typename G, typename O>
void combine_typed(const CombineGradsParams& p) {
  using acc = std::conditional_t<std::is_same_v<G, double> || std::is_same_v<O, double>, double, float>;
  std::vector<int64_t> offset(p.K + 1, 0);
  for (int64_t k = 0; k < p.K; ++k) offset[k + 1] = offset[k] + (p.numel[k] + kGramBlockCpu - 1) / kGramBlockCpu;
  at::parallel_for(0, offset[p.K], 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      int64_t k, c;
      task_block(offset.data(), p.K, task, k, c);
      const int64_t e0 = c * kGramBlockCpu, e1 = std::min(p.numel[k], e0 + kGramBlockCpu);
      combine_task<G, O, acc>(p, k, e0, e1);
    }
  });
}

void combine_gradients(const CombineGradsParams& p, void*) {
  dispatch(p.dtype, [&](auto gtag) {
    dispatch(p.out_dtype, [&](auto otag) { combine_typed<decltype(gtag), decltype(otag)>(p); });
  });
}

void gram_weights(const GramWeightsParams& p, void*) {
  dispatch_acc(p.acc_is_double, [&](auto tag) {
    using acc = decltype(tag);
    gram::Scratch scratch;  // on this thread's stack (the CUDA kernel gets GramWeightsParams::scratch)
    pama::gram_weights(static_cast<const acc*>(p.gram), static_cast<const acc*>(p.prefs), p.n, p.method,
                       static_cast<acc>(p.c), static_cast<acc*>(p.weights), scratch);
  });
}

}  // namespace cpu
}  // namespace pama
