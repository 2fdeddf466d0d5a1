// preference_ops.h — host-side glue of the preference-data ops (preference_ops.cpp), shared with
// cuda/ops_cuda.cpp, which installs the CUDA launcher table and registers the CUDA implementations.
#pragma once

#include <torch/library.h>

#include "launch.h"

namespace pama {

void set_cuda_preference_backend(const PreferenceBackend* table, void* (*stream)());

// Registers the preference op implementations on a dispatch key (CPU here, CUDA in ops_cuda.cpp).
void register_preference_impls(torch::Library& m);

}  // namespace pama
