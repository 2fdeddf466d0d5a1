// preference_ops.h — host-side glue of the preference-data ops (preference_ops.cpp): their
// registration, called for CPU by registration.cpp and for CUDA by cuda/ops_cuda.cpp.
#pragma once

#include <torch/library.h>

#include "launch.h"

namespace pama {

// Registers the preference op implementations on a dispatch key (CPU here, CUDA in ops_cuda.cpp).
void register_preference_impls(torch::Library& m);

}  // namespace pama
