// registration.cpp — the one registration file: every schema of torch.ops.pama_ext (the RL ops of
// ops.cpp and the preference ops of preference_ops.cpp, listed in pama_ext/schemas.def), their CPU
// implementations (the op bodies run the CPU launcher tables of cpu/tables.cpp; cuda/ops_cuda.cpp
// registers the same bodies for CUDA), the vocabulary ops that pama_ext.vocab is tested against, and the Python module init.
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"
#include "pama_math.h"
#include "preference_ops.h"

// Every op schema, from the one list pama_ext/schemas.def (which pama_ext/op_table.py parses too).
TORCH_LIBRARY(pama_ext, m) {
#define PAMA_EXT_OP(schema) m.def(schema);
#include "../pama_ext/schemas.def"
#undef PAMA_EXT_OP
}

// Which device kernels are compiled in (for `pama-ext info`).
namespace {
bool has_cuda_kernels() { return pama::has_cuda_backend(); }
// The vocabularies and layouts defined in pama_math.h, for pama_ext.vocab to be tested against.
std::vector<std::string> weighting_methods() {
  return std::vector<std::string>(pama::kMethodNames, pama::kMethodNames + pama::kNumMethods);
}
std::vector<int64_t> stats_layout(int64_t n) {
  TORCH_CHECK_VALUE(n >= 1 && n <= pama::kMaxObjectives, "stats_layout: n must be in [1, ", pama::kMaxObjectives,
                    "], got ", n);
  const pama::StatsLayout L(static_cast<int>(n));
  return {L.count(), L.num_seqs(), L.mean(), L.var(), L.abar(), L.pos(), L.ctok(), L.cseq(), L.gram(), L.size()};
}
}  // namespace
TORCH_LIBRARY_FRAGMENT(pama_ext, m) {
  m.def("has_cuda_kernels() -> bool", [] { return has_cuda_kernels(); });
  m.def("weighting_methods() -> str[]", &weighting_methods);
  m.def("stats_layout(int n) -> int[]", &stats_layout);
}

TORCH_LIBRARY_IMPL(pama_ext, CPU, m) {
  pama::register_impls(m);
  pama::register_preference_impls(m);
}

TORCH_LIBRARY_IMPL(pama_ext, Autograd, m) { pama::register_autograd_impls(m); }

// The extension is imported as the Python module pama_ext._C; loading it runs the registrations
// above. It defines no Python functions of its own: everything is reached through torch.ops.
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pama_ext compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
