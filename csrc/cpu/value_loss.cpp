// cpu/value_loss.cpp — §5 clipped multi-head value loss, forward and backward.
// The CPU twin of cuda/value_loss.cu: the same stages, the same pama_math.h formulas, at::parallel_for
// over fixed chunks (results do not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../checks.h"
#include "../pama_math.h"
#include "kernels.h"
#include "vec.h"

namespace pama {
namespace cpu {

namespace {

// One chunk of the forward pass: value_partial_size(n) partial sums.
template <typename scalar_t>
PAMA_CPU_CLONES void value_chunk(const ValueLossParams& p, int64_t b, int64_t t0, int64_t t1,
                                 acc_of<scalar_t>* out) {
  using acc = acc_of<scalar_t>;
  const int n = static_cast<int>(p.n);
  const acc clip = static_cast<acc>(p.clip);
  const int64_t BT = p.B * p.T, len = t1 - t0;
  const uint8_t* m = mask_bytes(p.mask) + b * p.T + t0;
  acc cnt = 0, c = 0;
#pragma omp simd reduction(+ : cnt)
  for (int64_t t = 0; t < len; ++t) cnt += keep_or_zero(m[t], acc(1));
  for (int i = 0; i < n; ++i) {
    const int64_t off = i * BT + b * p.T + t0;
    auto* v = static_cast<const scalar_t*>(p.values) + off;
    auto* ov = static_cast<const scalar_t*>(p.old_values) + off;
    auto* ret = static_cast<const scalar_t*>(p.returns) + off;
    acc s = 0, ci = 0;
#pragma omp simd reduction(+ : s, ci)
    for (int64_t t = 0; t < len; ++t) {
      const TokenLoss<acc> r = value_token(static_cast<acc>(v[t]), static_cast<acc>(ov[t]), static_cast<acc>(ret[t]), clip);
      s += keep_or_zero(m[t], r.loss);
      ci += keep_or_zero(m[t], r.clipped);
    }
    c += ci;
    out[2 + i] = s;
  }
  out[0] = cnt;
  out[1] = c;
}

// One chunk of the backward pass (one objective, one row): grad = scale * mask * dl/dV.
template <typename scalar_t>
PAMA_CPU_CLONES void value_backward_chunk(const ValueLossBackwardParams& p, acc_of<scalar_t> scale, int64_t off,
                                          const bool* mask, int64_t len) {
  using acc = acc_of<scalar_t>;
  const acc clip = static_cast<acc>(p.clip);
  auto* v = static_cast<const scalar_t*>(p.values) + off;
  auto* ov = static_cast<const scalar_t*>(p.old_values) + off;
  auto* ret = static_cast<const scalar_t*>(p.returns) + off;
  auto* out = static_cast<scalar_t*>(p.grad_values) + off;
  const uint8_t* m = mask_bytes(mask);
  acc G[kVecTile];
  for (int64_t tt = 0; tt < len; tt += kVecTile) {
    const int tl = static_cast<int>(std::min<int64_t>(kVecTile, len - tt));
    acc* g = std::is_same<scalar_t, acc>::value ? reinterpret_cast<acc*>(out + tt) : G;
#pragma omp simd
    for (int t = 0; t < tl; ++t) {
      const TokenLoss<acc> r = value_token(static_cast<acc>(v[tt + t]), static_cast<acc>(ov[tt + t]),
                                           static_cast<acc>(ret[tt + t]), clip);
      g[t] = keep_or_zero(m[tt + t], scale * r.dlogp);
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
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      value_chunk<scalar_t>(p, b, t0, t1, part + k * ps);
    });
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
    at::parallel_for(0, p.n * p.B, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s % p.B;
        value_backward_chunk<scalar_t>(p, acc(0.5) * g * rs[b], s * p.T, p.mask + b * p.T, p.T);
      }
    });
  });
}

}  // namespace cpu
}  // namespace pama
