// policy_loss.cu — §4 fused Noon-PPO / PAMA policy loss on CUDA.
//
// Forward = two kernels on the stream:
//   1. partials: one block per chunk (grid-stride over the chunks). Threads stride over the chunk's
//      tokens; per masked-in token they combine the whitened/Noon advantages into Ã, evaluate the
//      PPO token loss (and k3 when ref_logp is given), write a_tilde and the gradient coefficient
//      dlogp (what the op's autograd backward scales), and keep five running sums
//      that one deterministic block reduction turns into the chunk's kLossPartialSize entries.
//   2. finalize (single block): finalize_row_scale, barrier, then the rows' sums by pama_math.h's
//      finalize tree (policy_loss_lane per thread, block_tree) and store_policy_loss on thread 0.
// Backward: elementwise grad_logp, recomputing dl/dlogp from a_tilde with the same ppo_token_loss.
#include "common.cuh"

namespace pama {
namespace cuda {
namespace {

constexpr int kLossBlock = 256;
constexpr int kFinalizeBlock = 256;
constexpr int kElementwiseBlock = 256;

// Combined advantage Ã of one masked-in token at flat [B, T] index bt (objective i at i*plane + bt):
// N_i = whiten_noon(A_i); Theorem-1 s* of N, or Σ_i w_i N_i. The s* path keeps a running min / max
// (the same minv / maxv order as thm1, so the same bits) instead of an array of the n values, which
// the compiler placed in local memory (a 256-byte stack frame, 512 for fp64).
template <typename S, typename A>
__device__ __forceinline__ A combined_advantage(const S* adv, int64_t plane, int64_t bt, int n, const A* mean,
                                                const A* istd, const A* w, bool whiten, bool noon, int combine,
                                                const A* pref) {
  if (combine == kCombineTokenThm1) {  // pref (nullptr: none): §4b, Theorem 1 on N_i / ρ_i
    A mn = whiten_noon(load(adv, bt), mean[0], istd[0], whiten, noon);
    if (pref != nullptr) mn = pref_scaled(mn, pref[0]);
    A mx = mn;
    for (int i = 1; i < n; ++i) {
      A x = whiten_noon(load(adv, i * plane + bt), mean[i], istd[i], whiten, noon);
      if (pref != nullptr) x = pref_scaled(x, pref[i]);
      mn = minv(mn, x);
      mx = maxv(mx, x);
    }
    return thm1_value(mn, mx);
  }
  A s = A(0);
  for (int i = 0; i < n; ++i) s += w[i] * whiten_noon(load(adv, i * plane + bt), mean[i], istd[i], whiten, noon);
  return s;
}

template <typename S>
__global__ void __launch_bounds__(kLossBlock) policy_loss_partials_kernel(PolicyLossParams p) {
  using A = acc_t_of<S>;
  __shared__ A sMean[kMaxObjectives];
  __shared__ A sIstd[kMaxObjectives];
  __shared__ A sW[kMaxObjectives];
  __shared__ A sPref[kMaxObjectives];
  __shared__ A red[block_reduce_slots<kLossBlock, kLossPartialSize>()];

  const S* logp = static_cast<const S*>(p.logp);
  const S* old_logp = static_cast<const S*>(p.old_logp);
  const S* ref_logp = static_cast<const S*>(p.ref_logp);
  const S* adv = static_cast<const S*>(p.advantages);
  const A* stats = static_cast<const A*>(p.stats);
  const A* weights = static_cast<const A*>(p.weights);
  const A* seq_weights = static_cast<const A*>(p.seq_weights);
  A* dlogp = static_cast<A*>(p.dlogp);
  // Without return_a_tilde, Ã goes to the token's dlogp slot, which the next store overwrites: the same
  // cache line, no branch (a branch around the store made ptxas cap the kernel at 32 registers and spill)
  A* a_tilde = p.a_tilde != nullptr ? static_cast<A*>(p.a_tilde) : dlogp;
  A* part = static_cast<A*>(p.partials);

  const int n = static_cast<int>(p.n);
  const int64_t B = p.B, T = p.T, cpr = p.chunks_per_row, plane = B * T;
  const StatsLayout L(n);
  const bool weighted = p.combine != kCombineTokenThm1;
  const bool row_weights = weighted && p.weights_per_row;
  const A eps_lo = static_cast<A>(p.eps_lo), eps_hi = static_cast<A>(p.eps_hi);
  const A dual_clip = static_cast<A>(p.dual_clip), beta = static_cast<A>(p.beta_loss);

  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    sMean[i] = stats[L.mean() + i];
    sIstd[i] = inv_std(stats[L.var() + i]);
    if (weighted && !row_weights) sW[i] = weights[i];
    if (p.prefs != nullptr) sPref[i] = pref_factor(static_cast<const A*>(p.prefs), n, i);
  }
  __syncthreads();

  const int64_t nchunks = B * cpr;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const ChunkBounds cb = chunk_bounds(chunk, cpr, p.chunk_len, T);
    const int64_t b = cb.b, t_begin = cb.t_begin, t_end = cb.t_end;
    if (row_weights) {  // a chunk lies in one row: stage that row's weight vector
      __syncthreads();  // (every thread is done with the previous chunk's weights)
      for (int i = threadIdx.x; i < n; i += blockDim.x) sW[i] = seq_weights[b * n + i];
      __syncthreads();
    }

    // [Σ l, Σ k3, Σ clipped, Σ (old_logp - logp), Σ (Ã > 0)] over this thread's masked-in tokens
    A sums[kLossPartialSize] = {A(0), A(0), A(0), A(0), A(0)};
    for (int64_t t = t_begin + threadIdx.x; t < t_end; t += blockDim.x) {
      const int64_t bt = b * T + t;
      A at = A(0), coef = A(0);  // coef: dl/dlogp + beta_loss · dk3/dlogp (the backward's, unscaled)
      if (p.mask[bt]) {
        at = combined_advantage(adv, plane, bt, n, sMean, sIstd, sW, p.whiten, p.noon, p.combine,
                                  p.prefs != nullptr ? sPref : nullptr);
        const A lp = load(logp, bt), olp = load(old_logp, bt);
        A dl;
        bool clipped;
        const A l = ppo_token_loss(at, lp, olp, eps_lo, eps_hi, dual_clip, dl, clipped);
        A k3 = A(0), dk = A(0);
        if (ref_logp != nullptr) k3 = k3_kl(lp, load(ref_logp, bt), dk);
        coef = dl + beta * dk;
        sums[0] += l;
        sums[1] += k3;
        sums[2] += clipped ? A(1) : A(0);
        sums[3] += olp - lp;
        sums[4] += at > A(0) ? A(1) : A(0);
      }
      a_tilde[bt] = at;
      dlogp[bt] = coef;  // after a_tilde[bt]: the order matters when a_tilde is dlogp
    }
    block_reduce_sum_vec<kLossBlock>(sums, red);
    if (threadIdx.x == 0) {
      A* out = part + chunk * kLossPartialSize;
#pragma unroll
      for (int q = 0; q < kLossPartialSize; ++q) out[q] = sums[q];
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kFinalizeBlock, 1) policy_loss_finalize_kernel(PolicyLossParams p) {
  static_assert(kFinalizeBlock == kMergeLanes, "policy_loss_finalize_kernel runs one thread per tree lane");
  __shared__ A acc[kLossPartialSize * kMergeLanes];
  const A* stats = static_cast<const A*>(p.stats);
  const A* row_count = static_cast<const A*>(p.row_count);
  A* row_scale = static_cast<A*>(p.row_scale);
  const StatsLayout L(static_cast<int>(p.n));
  finalize_row_scale(row_count, p.B, p.agg, stats[L.count()], stats[L.num_seqs()], row_scale, threadIdx.x,
                     blockDim.x);
  __syncthreads();  // the lanes read every row_scale
  policy_loss_lane(static_cast<const A*>(p.partials), p.B, p.chunks_per_row, static_cast<const A*>(row_scale),
                   static_cast<int>(threadIdx.x), acc);
  block_tree([&](int lane, int s) { lanes_add(acc, kLossPartialSize, lane, s); });
  if (threadIdx.x == 0)
    store_policy_loss(acc, static_cast<int>(p.n), stats, static_cast<const A*>(p.weights),
                      static_cast<A>(p.beta_loss), static_cast<A*>(p.loss), static_cast<A*>(p.metrics));
}

// grad_logp[b, t] = mask ? (grad_loss * row_scale[b]) * (dl/dlogp + beta_loss * dk3/dlogp) : 0
// (the same association as the CPU kernel, so both round alike).
template <typename S>
__global__ void __launch_bounds__(kElementwiseBlock) policy_loss_backward_kernel(PolicyLossBackwardParams p) {
  using A = acc_t_of<S>;
  const S* logp = static_cast<const S*>(p.logp);
  const S* old_logp = static_cast<const S*>(p.old_logp);
  const S* ref_logp = static_cast<const S*>(p.ref_logp);
  const A* a_tilde = static_cast<const A*>(p.a_tilde);
  const A* row_scale = static_cast<const A*>(p.row_scale);
  S* grad = static_cast<S*>(p.grad_logp);
  const A g_loss = static_cast<const A*>(p.grad_loss)[0];
  const A eps_lo = static_cast<A>(p.eps_lo), eps_hi = static_cast<A>(p.eps_hi);
  const A dual_clip = static_cast<A>(p.dual_clip), beta = static_cast<A>(p.beta_loss);
  const int64_t total = p.B * p.T;

  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    A g = A(0);  // masked-out tokens get an exact 0, whatever grad_loss is
    if (p.mask[idx]) {
      const A lp = load(logp, idx);
      A dl;
      bool clipped;
      ppo_token_loss(a_tilde[idx], lp, load(old_logp, idx), eps_lo, eps_hi, dual_clip, dl, clipped);
      A dk = A(0);
      if (ref_logp != nullptr) k3_kl(lp, load(ref_logp, idx), dk);
      const A scale = g_loss * row_scale[idx / p.T];
      g = scale * (dl + beta * dk);
    }
    store(grad, idx, g);
  }
}

}  // namespace

void launch_policy_loss_forward(const PolicyLossParams& p, void* stream) {
  check_objectives(p.n, "policy_loss_forward");
  check_chunking(p.B, p.T, p.chunk_len, p.chunks_per_row, "policy_loss_forward");
  const cudaStream_t s = as_stream(stream);
  const int64_t nchunks = p.B * p.chunks_per_row;
  PAMA_DISPATCH_DTYPE(p.dtype, "policy_loss_forward", [&] {
    launch_chunked_reduction(p, nchunks, s, policy_loss_partials_kernel<scalar_t>, kLossBlock, 0,
                             policy_loss_finalize_kernel<acc_t>, kFinalizeBlock, "policy_loss_forward");
  });
}

void launch_policy_loss_backward(const PolicyLossBackwardParams& p, void* stream) {
  const int64_t total = p.B * p.T;
  if (total <= 0) return;  // empty grad_logp
  PAMA_DISPATCH_DTYPE(p.dtype, "policy_loss_backward", [&] {
    policy_loss_backward_kernel<scalar_t>
        <<<grid_blocks(total, kElementwiseBlock), kElementwiseBlock, 0, as_stream(stream)>>>(p);
  });
  check_launch("policy_loss_backward_kernel");
}

}  // namespace cuda
}  // namespace pama
