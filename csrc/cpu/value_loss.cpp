// cpu/value_loss.cpp — §5 clipped multi-head value loss, forward and backward.
// The CPU twin of cuda/value_loss.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed chunks (results do not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../pama_math.h"
#include "kernels.h"
#include "vec.h"

namespace pama {
namespace cpu {

namespace {

// One chunk of the forward pass: its value_partial_size(n) partial sums into `out`; with kCheck, into
// *bad the sum over masked-in tokens and heads of (v - v) + (old - old) + (ret - ret): 0 when every
// masked-in value is finite, NaN otherwise (the finite checks of the inputs, in this same pass).
// The mask is turned into lane masks of the accumulation type's width once per block of tokens (so
// that the loops over the heads have one element width and vectorise at full width; the byte mask
// among float lanes gave 128-bit vectors and spills), then each head is one loop over the block:
// three streams of loads, selects only (cpu/vec.h). M: the mask's element, uint8_t (the bool mask)
// or float (ValueLossParams::mask_f32); a token is in where its mask is nonzero (NaN too, as to(bool)).
template <typename scalar_t, bool kCheck, typename M>
PAMA_CPU_CLONES void value_chunk(const ValueLossParams& p, const M* mask, int64_t b, int64_t t0, int64_t t1,
                                 acc_of<scalar_t>* out, acc_of<scalar_t>* bad) {
  using acc = acc_of<scalar_t>;
  using K = lane_mask_t<acc>;
  const int n = static_cast<int>(p.n);
  const acc clip = static_cast<acc>(p.clip);
  const int64_t BT = p.B * p.T;
  const M* m = mask + b * p.T;
  K mk[kChunkLen];
  acc cnt = 0, c = 0, nf = 0;
  for (int i = 0; i < n; ++i) out[2 + i] = acc(0);
  for (int64_t u0 = t0; u0 < t1; u0 += kChunkLen) {
    const int len = static_cast<int>(std::min<int64_t>(kChunkLen, t1 - u0));
    acc cb = 0;
#pragma omp simd reduction(+ : cb)
    for (int t = 0; t < len; ++t) {
      mk[t] = lane_mask<K>(m[u0 + t] != M(0));
      cb += keep_lanes(mk[t], acc(1));
    }
    cnt += cb;
    for (int i = 0; i < n; ++i) {
      const int64_t off = i * BT + b * p.T + u0;
      auto* v = static_cast<const scalar_t*>(p.values) + off;
      auto* ov = static_cast<const scalar_t*>(p.old_values) + off;
      auto* ret = static_cast<const scalar_t*>(p.returns) + off;
      acc s = 0, ci = 0, bi = 0;
#pragma omp simd reduction(+ : s, ci, bi)
      for (int t = 0; t < len; ++t) {
        const acc x = static_cast<acc>(v[t]), o = static_cast<acc>(ov[t]), r = static_cast<acc>(ret[t]);
        const TokenLoss<acc> l = value_token(x, o, r, clip);
        s += keep_lanes(mk[t], l.loss);
        ci += keep_lanes(mk[t], l.clipped);
        if (kCheck) bi += keep_lanes(mk[t], (x - x) + (o - o) + (r - r));  // a template constant: no branch
      }
      out[2 + i] += s;
      c += ci;
      nf += bi;
    }
  }
  out[0] = cnt;
  out[1] = c;
  if (kCheck) *bad = nf;
}

// One chunk of the backward pass (one objective, one row): grad = scale * mask * dl/dV.
template <typename scalar_t, typename M>
PAMA_CPU_CLONES void value_backward_chunk(const ValueLossBackwardParams& p, acc_of<scalar_t> scale, int64_t off,
                                          const M* m, int64_t len) {
  using acc = acc_of<scalar_t>;
  using K = lane_mask_t<acc>;
  const acc clip = static_cast<acc>(p.clip);
  auto* v = static_cast<const scalar_t*>(p.values) + off;
  auto* ov = static_cast<const scalar_t*>(p.old_values) + off;
  auto* ret = static_cast<const scalar_t*>(p.returns) + off;
  auto* out = static_cast<scalar_t*>(p.grad_values) + off;
  acc G[kVecTile];
  for (int64_t tt = 0; tt < len; tt += kVecTile) {
    const int tl = static_cast<int>(std::min<int64_t>(kVecTile, len - tt));
    acc* g = std::is_same<scalar_t, acc>::value ? reinterpret_cast<acc*>(out + tt) : G;
#pragma omp simd
    for (int t = 0; t < tl; ++t) {
      const TokenLoss<acc> r = value_token(static_cast<acc>(v[tt + t]), static_cast<acc>(ov[tt + t]),
                                           static_cast<acc>(ret[tt + t]), clip);
      g[t] = keep_lanes(lane_mask<K>(m[tt + t] != M(0)), scale * r.dlogp);
    }
    if (!std::is_same<scalar_t, acc>::value)
      for (int t = 0; t < tl; ++t) out[tt + t] = static_cast<scalar_t>(G[t]);
  }
}

}  // namespace

void value_loss_forward(const ValueLossParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    const int ps = value_partial_size(n);
    auto* part = static_cast<acc*>(p.partials);
    const int64_t nk = p.B * p.chunks_per_row;
    std::vector<acc> bad(p.nonfinite != nullptr ? static_cast<size_t>(nk) : 0);  // per chunk: one writer each
    auto run = [&](auto check, const auto* mask) {
      for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
        value_chunk<scalar_t, decltype(check)::value>(p, mask, b, t0, t1, part + k * ps,
                                                      decltype(check)::value ? bad.data() + k : nullptr);
      });
    };
    const bool f32 = p.mask_f32 != nullptr;
    if (p.nonfinite != nullptr) {
      if (f32) run(std::true_type(), p.mask_f32);
      else run(std::true_type(), mask_bytes(p.mask));
      bool any = false;
      for (int64_t k = 0; k < nk; ++k) any = any || bad[k] != acc(0);
      *p.nonfinite = any;
    } else if (f32) {
      run(std::false_type(), p.mask_f32);
    } else {
      run(std::false_type(), mask_bytes(p.mask));
    }
    finalize_value_loss(part, n, p.B, p.chunks_per_row, p.agg, static_cast<const acc*>(p.denominators),
                        static_cast<acc*>(p.row_scale),
                        static_cast<acc*>(p.loss), static_cast<acc*>(p.metrics));
  });
}

void value_loss_backward(const ValueLossBackwardParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const acc g = static_cast<const acc*>(p.grad_loss)[0];
    auto* rs = static_cast<const acc*>(p.row_scale);
    auto run = [&](const auto* mask) {
      at::parallel_for(0, p.n * p.B, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t b = s % p.B;
          value_backward_chunk<scalar_t>(p, acc(0.5) * g * rs[b], s * p.T, mask + b * p.T, p.T);
        }
      });
    };
    if (p.mask_f32 != nullptr) run(p.mask_f32);
    else run(mask_bytes(p.mask));
  });
}

}  // namespace cpu
}  // namespace pama
