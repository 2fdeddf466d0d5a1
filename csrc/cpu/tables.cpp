// cpu/tables.cpp — the CPU launcher table (pama::Backend, both op families), the counterpart of
// cuda/ops_cuda.cpp's.
#include "kernels.h"

namespace pama {
namespace cpu {

const Backend& table() {
  static const Backend t{"cpu",
                         kChunkLen,
                         kGramBlockCpu,
                         /*single_pass_loss=*/true,
                         /*value_loss_checks=*/true,
                         /*float_mask=*/true,
                         /*solver_scratch_bytes=*/0,
                         &token_rewards,
                         &multi_gae,
                         &multi_gae_backward,
                         &stats_moments,
                         &stats_indicators,
                         &pareto_weights,
                         &policy_loss_forward,
                         &policy_loss_backward,
                         &value_loss_forward,
                         &value_loss_backward,
                         &dpo_loss_forward,
                         &dpo_loss_backward,
                         &gradient_gram,
                         &combine_gradients,
                         &gram_weights};
  return t;
}

}  // namespace cpu
}  // namespace pama
