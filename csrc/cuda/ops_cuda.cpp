// ops_cuda.cpp — registers the CUDA launchers (cuda/*.cu) as the CUDA implementation of every op.
// The op bodies are the device-independent ones of ops.cpp and preference_ops.cpp; this file only
// supplies the launcher table (both op families) and the current stream, so tensors → structs →
// launch happens on the caller's stream.
// c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h: the stream is all this file needs, and the
// latter pulls in the cuBLAS/cuSPARSE/cuSOLVER headers, which a minimal CUDA toolkit lacks.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "../preference_ops.h"
#include "../launch.h"
#include "../pama_math.h"  // gram::Scratch

namespace {

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

const pama::Backend kCudaTable{"cuda",
                               pama::cuda::kChunkLen,
                               pama::cuda::kGramBlock,
                               /*single_pass_loss=*/false,
                               /*value_loss_checks=*/false,
                               /*float_mask=*/false,
                               /*solver_scratch_bytes=*/static_cast<int64_t>(sizeof(pama::gram::Scratch)),
                               &pama::cuda::launch_token_rewards,
                               &pama::cuda::launch_multi_gae,
                               &pama::cuda::launch_multi_gae_backward,
                               &pama::cuda::launch_stats_moments,
                               &pama::cuda::launch_stats_indicators,
                               &pama::cuda::launch_pareto_weights,
                               &pama::cuda::launch_policy_loss_forward,
                               &pama::cuda::launch_policy_loss_backward,
                               &pama::cuda::launch_value_loss_forward,
                               &pama::cuda::launch_value_loss_backward,
                               &pama::cuda::launch_dpo_loss_forward,
                               &pama::cuda::launch_dpo_loss_backward,
                               &pama::cuda::launch_gradient_gram,
                               &pama::cuda::launch_combine_gradients,
                               &pama::cuda::launch_gram_weights};

const bool kRegistered = (pama::set_cuda_backend(&kCudaTable, &current_stream), true);

}  // namespace

TORCH_LIBRARY_IMPL(pama_ext, CUDA, m) { pama::register_impls(m); }
TORCH_LIBRARY_IMPL(pama_ext, CUDA, m) { pama::register_preference_impls(m); }
