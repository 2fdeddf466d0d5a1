// ops.h — host-side glue shared by ops.cpp (schemas, checks, CPU kernels) and cuda/ops_cuda.cpp.
// The op implementations are device independent: they validate arguments, allocate outputs and
// workspaces, and run the stages of a launcher table (pama::Backend) chosen by the inputs' device.
#pragma once

#include <torch/library.h>

#include "launch.h"

namespace pama {

// Called once by cuda/ops_cuda.cpp at load time (when the CUDA kernels are compiled in).
using StreamGetter = void* (*)();
void set_cuda_backend(const Backend* table, StreamGetter stream);
bool has_cuda_backend();

// The launcher table of a device and the stream to launch on (nullptr on the CPU); an error naming
// `op` for a device without kernels. Used by every op body (ops.cpp, preference_ops.cpp).
struct Launch {
  const Backend& be;
  void* stream;
};
Launch backend_for_device(const at::Device& d, const char* op);

// The working memory of the weights launchers' exact solvers (Backend::solver_scratch_bytes bytes on
// device `d`, uint8), or an undefined tensor where the backend needs none. Keep it alive until the
// launch is enqueued; the caching allocator orders its reuse on the stream.
at::Tensor solver_scratch(const Launch& L, const at::Device& d);
inline void* scratch_ptr(const at::Tensor& scratch) { return scratch.defined() ? scratch.data_ptr() : nullptr; }

// Registers every op implementation on a dispatch key (CPU in ops.cpp, CUDA in ops_cuda.cpp).
void register_impls(torch::Library& m);

// Registers the Autograd kernels written in C++ (autograd.cpp: pama_policy_loss, multi_value_loss); every other op's
// autograd is registered from Python (pama_ext/op_table.py).
void register_autograd_impls(torch::Library& m);

}  // namespace pama
