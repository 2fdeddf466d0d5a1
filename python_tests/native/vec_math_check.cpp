// Accuracy sweep of cpu/vec.h's float functions against the C library in double (python_tests/
// test_vec_math.py compiles this for the ISAs the library's kernels are cloned for and runs it).
// Prints one line per function: "<name> <points> <max error in ulps> <argument of the max> <bad>",
// bad = the count of results that are not finite where the reference is, or vice versa.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cpu/vec.h"

namespace {

float from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
uint32_t to_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// |got - want| in units of the float ulp at want (the spacing of floats around the exact value;
// the smallest normal's spacing below it).
double ulps(float got, double want) {
  const double a = std::fabs(want);
  int e;
  std::frexp(a < std::numeric_limits<float>::min() ? std::numeric_limits<float>::min() : a, &e);
  const double ulp = std::ldexp(1.0, e - 24);
  return std::fabs(static_cast<double>(got) - want) / ulp;
}

// Every float of [lo, hi] (both ends included) whose bit pattern is a multiple of `stride` past lo,
// evaluated in blocks so that the loop over vec_fn vectorises like a kernel's tile loop.
template <typename VF, typename RF>
void sweep(const char* name, float lo, float hi, uint32_t stride, VF vec_fn, RF ref_fn) {
  constexpr int kBlock = 1024;
  float xs[kBlock], ys[kBlock];
  double worst = 0;
  float worst_x = lo;
  long points = 0, bad = 0;
  const uint32_t b0 = to_bits(lo), b1 = to_bits(hi);  // lo, hi >= 0: bits are ordered like values
  uint64_t b = b0;
  bool last = false;
  while (!last) {
    int m = 0;
    for (; m < kBlock && !last; ++m) {
      if (b >= b1) {
        b = b1;
        last = true;
      }
      xs[m] = from_bits(static_cast<uint32_t>(b));
      b += stride;
    }
#pragma omp simd
    for (int i = 0; i < m; ++i) ys[i] = vec_fn(xs[i]);
    for (int i = 0; i < m; ++i) {
      const double want = ref_fn(static_cast<double>(xs[i]));
      ++points;
      if (std::isfinite(want) != std::isfinite(ys[i])) {
        ++bad;
        continue;
      }
      const double u = ulps(ys[i], want);
      if (u > worst) {
        worst = u;
        worst_x = xs[i];
      }
    }
  }
  std::printf("%s %ld %.4f %.9g %ld\n", name, points, worst, worst_x, bad);
}

}  // namespace

int main(int argc, char** argv) {
  const uint32_t stride = argc > 1 ? static_cast<uint32_t>(std::strtoul(argv[1], nullptr, 10)) : 1;
  // log1p on [0, 1]: the subnormals and 0 are included (the ends), then [0.5, 1] densely (the
  // reduction's second branch, where the result is largest)
  sweep("vlog1p", 0.0f, 1.0f, stride, [](float x) { return pama::cpu::vlog1p(x); },
        [](double x) { return std::log1p(x); });
  sweep("vlog1p_hi", 0.5f, 1.0f, stride > 64 ? stride / 64 : 1, [](float x) { return pama::cpu::vlog1p(x); },
        [](double x) { return std::log1p(x); });
  // exp(-a) for a in [0, 86] (DPO's exp(-|z|); below -86 vexp returns 0 by contract)
  sweep("vexp_neg", 0.0f, 86.0f, stride, [](float a) { return pama::cpu::vexp(-a); },
        [](double a) { return std::exp(-a); });
  return 0;
}
