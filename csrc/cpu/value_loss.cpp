// cpu/value_loss.cpp — §5 clipped multi-head value loss, forward and backward.
// The CPU twin of cuda/value_loss.cu: the same stages, the same pama_math.h formulas, at::parallel_for
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

void value_loss_forward(const ValueLossParams& p, void*) {
  dispatch(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_of<scalar_t>;
    const int n = static_cast<int>(p.n);
    const int ps = value_partial_size(n);
    auto* part = static_cast<acc*>(p.partials);
    auto* v = static_cast<const scalar_t*>(p.values);
    auto* ov = static_cast<const scalar_t*>(p.old_values);
    auto* ret = static_cast<const scalar_t*>(p.returns);
    const acc clip = static_cast<acc>(p.clip);
    const int64_t BT = p.B * p.T;
    for_chunks(p.B, p.T, p.chunk_len, p.chunks_per_row, [&](int64_t k, int64_t b, int64_t t0, int64_t t1) {
      acc* out = part + k * ps;
      std::fill(out, out + ps, acc(0));
      const bool* m = p.mask + b * p.T;
      for (int64_t t = t0; t < t1; ++t) out[0] += m[t] ? acc(1) : acc(0);
      for (int i = 0; i < n; ++i) {
        const int64_t off = i * BT + b * p.T;
        acc s = 0, c = 0;
        for (int64_t t = t0; t < t1; ++t) {
          if (!m[t]) continue;
          acc dv;
          bool clipped;
          s += value_token_loss(static_cast<acc>(v[off + t]), static_cast<acc>(ov[off + t]),
                                static_cast<acc>(ret[off + t]), clip, dv, clipped);
          c += clipped ? acc(1) : acc(0);
        }
        out[1] += c;
        out[2 + i] = s;
      }
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
    auto* v = static_cast<const scalar_t*>(p.values);
    auto* ov = static_cast<const scalar_t*>(p.old_values);
    auto* ret = static_cast<const scalar_t*>(p.returns);
    auto* rs = static_cast<const acc*>(p.row_scale);
    auto* out = static_cast<scalar_t*>(p.grad_values);
    const acc clip = static_cast<acc>(p.clip);
    at::parallel_for(0, p.n * p.B, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s % p.B, off = s * p.T;
        const acc scale = acc(0.5) * g * rs[b];
        const bool* m = p.mask + b * p.T;
        for (int64_t t = 0; t < p.T; ++t) {
          if (!m[t]) {
            out[off + t] = scalar_t(0);
            continue;
          }
          acc dv;
          bool clipped;
          value_token_loss(static_cast<acc>(v[off + t]), static_cast<acc>(ov[off + t]),
                           static_cast<acc>(ret[off + t]), clip, dv, clipped);
          out[off + t] = static_cast<scalar_t>(scale * dv);
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace pama
