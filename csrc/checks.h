// checks.h — argument checks shared by every op file (ops.cpp, preference_ops.cpp), and the dtype
// code mapping both ways (tensor dtype -> code for the launch structs, code -> C++ type for the CPU
// launchers). Messages name the op and the argument and say what was expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <string>

#include "launch.h"
#include "pama_math.h"

namespace pama {

// DType code of a floating scalar type, -1 for anything else.
inline int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: return -1;
  }
}

// The CPU launchers' way back from a dtype code: calls f with a value of the element type.
template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kFloat16: f(c10::Half{}); break;
    case kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "pama_ext: unsupported dtype code ", dtype);
  }
}
// The same for a stage that works in the accumulation type only: f(double{}) or f(float{}).
template <typename F>
void dispatch_acc(bool acc_is_double, F&& f) {
  if (acc_is_double)
    f(double{});
  else
    f(float{});
}

// Accumulation type of an element type (C++), the counterpart of acc_type below.
template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

inline void check_defined(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_float(const at::Tensor& t, const char* op, const std::string& name) {
  check_defined(t, op, name);
  TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expect, const char* op, const std::string& name,
                        const char* meaning) {
  TORCH_CHECK(t.sizes() == expect, op, ": ", name, " must have shape ", meaning, " = ", expect, ", got ",
              shape_str(t));
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const std::string& name,
                       const char* meaning) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be ", rank, "-D ", meaning, ", got shape ", shape_str(t));
}

inline void check_num_objectives(int64_t n, const char* op, const std::string& name) {
  TORCH_CHECK(n >= 1 && n <= kMaxObjectives, op, ": ", name, " has n = ", n, " objectives; n must be in [1, ",
              kMaxObjectives, "]");
}

// Scalar options. NaN fails every comparison, so it is rejected with the rest.
inline void check_unit_interval(double v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0 && v <= 1, op, ": ", name, " must be a finite number in [0, 1], got ",
                    v);
}
inline void check_nonneg_finite(double v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, op, ": ", name, " must be finite and >= 0, got ", v);
}

// A weighting method's name -> pama::Method (kMethodNames); from_gram: the op takes a Gram matrix,
// where pama (which needs the per-token indicators) does not apply.
inline int parse_method(const std::string& s, const char* op, bool from_gram) {
  std::string names;
  for (int m = from_gram ? 1 : 0; m < kNumMethods; ++m) {
    if (s == kMethodNames[m]) return m;
    names += std::string(names.empty() ? "'" : ", '") + kMethodNames[m] + "'";
  }
  const bool is_pama = s == kMethodNames[kMethodPama];
  TORCH_CHECK_VALUE(false, op, ": method must be one of ", names, ", got '", s, "'",
                    is_pama ? " (pama needs the per-token statistics: use pareto_weights)" : "");
  return -1;  // unreachable
}

}  // namespace pama
