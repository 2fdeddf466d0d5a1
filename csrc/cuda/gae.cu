// gae.cu — §1 token rewards and §2 multi-objective GAE (forward and adjoint) on CUDA.
//
// GAE is a sequential scan along T, so each (objective, row) pair — a "line" of the [n, B, T]
// tensors, line = i * B + b — is scanned by one thread. To keep global memory accesses coalesced,
// a block of kGaeLines threads walks its lines in tiles of kGaeTile time steps: the block stages a
// [lines x steps] tile in shared memory with consecutive threads reading consecutive time steps,
// each thread scans its own line inside the tile, and the block writes the tile back the same way.
// The per-step math is pama::gae_step / pama::gae_adjoint_step (pama_math.h).
#include "common.cuh"

namespace pama {
namespace cuda {
namespace {

constexpr int kGaeLines = 32;             // lines (threads) per block
constexpr int kGaeTile = 32;              // time steps per staged tile
constexpr int kGaePitch = kGaeTile + 1;   // padded row pitch: the scan reads column j of 32 rows
constexpr int kRewardsBlock = 256;

// Shared-memory tile of one block: x/y are the two streamed inputs (overwritten by the two outputs).
template <typename A>
struct GaeTile {
  A x[kGaeLines][kGaePitch];
  A y[kGaeLines][kGaePitch];
  bool m[kGaeLines][kGaePitch];
};

// Copies time steps [t0, t0 + len) of lines [line0, line0 + kGaeLines) into the tile.
// Thread q of the loop reads step j = q % kGaeTile of line l = q / kGaeTile: consecutive threads
// read consecutive addresses of one line.
template <typename S, typename A>
__device__ __forceinline__ void stage_in(GaeTile<A>& tile, const S* x, const S* y, const bool* mask,
                                         int64_t line0, int64_t lines, int64_t B, int64_t T, int64_t t0,
                                         int len) {
  for (int q = threadIdx.x; q < kGaeLines * kGaeTile; q += blockDim.x) {
    const int l = q / kGaeTile, j = q % kGaeTile;
    const int64_t line = line0 + l;
    if (line < lines && j < len) {
      const int64_t off = line * T + t0 + j;
      tile.x[l][j] = load(x, off);
      tile.y[l][j] = load(y, off);
      tile.m[l][j] = mask[(line % B) * T + t0 + j];
    }
  }
}

// Writes the tile's x/y back to time steps [t0, t0 + len) of the block's lines.
template <typename S, typename A>
__device__ __forceinline__ void stage_out(const GaeTile<A>& tile, S* x, S* y, int64_t line0, int64_t lines,
                                          int64_t T, int64_t t0, int len) {
  for (int q = threadIdx.x; q < kGaeLines * kGaeTile; q += blockDim.x) {
    const int l = q / kGaeTile, j = q % kGaeTile;
    const int64_t line = line0 + l;
    if (line < lines && j < len) {
      const int64_t off = line * T + t0 + j;
      store(x, off, tile.x[l][j]);
      store(y, off, tile.y[l][j]);
    }
  }
}

// §2 forward: walking t = T-1 … 0, A[t] = gae_step(...), returns[t] = A[t] + V[t].
// Tile x: rewards in, advantages out; tile y: values in, returns out.
template <typename S>
__global__ void __launch_bounds__(kGaeLines) multi_gae_kernel(GaeParams p) {
  using A = acc_t_of<S>;
  __shared__ GaeTile<A> tile;
  const S* rewards = static_cast<const S*>(p.rewards);
  const S* values = static_cast<const S*>(p.values);
  S* adv = static_cast<S*>(p.advantages);
  S* ret = static_cast<S*>(p.returns);
  const int64_t lines = p.n * p.B, T = p.T;
  const A gamma = static_cast<A>(p.gamma);
  const A gamma_lam = static_cast<A>(p.gamma * p.lam);  // product in double, then cast

  for (int64_t line0 = int64_t(blockIdx.x) * kGaeLines; line0 < lines; line0 += int64_t(gridDim.x) * kGaeLines) {
    const int l = threadIdx.x;  // this thread's line within the block
    const bool active = l < kGaeLines && line0 + l < lines;
    A next_v = A(0), last_a = A(0);
    for (int64_t t_end = T; t_end > 0; t_end -= kGaeTile) {
      const int64_t t0 = t_end > kGaeTile ? t_end - kGaeTile : 0;
      const int len = static_cast<int>(t_end - t0);
      stage_in(tile, rewards, values, p.mask, line0, lines, p.B, T, t0, len);
      __syncthreads();
      if (active) {
        for (int j = len - 1; j >= 0; --j) {
          const A v = tile.y[l][j];
          const A a = gae_step(tile.x[l][j], v, tile.m[l][j], gamma, gamma_lam, next_v, last_a);
          tile.x[l][j] = a;
          tile.y[l][j] = a + v;
        }
      }
      __syncthreads();
      stage_out(tile, adv, ret, line0, lines, T, t0, len);
      __syncthreads();  // the next tile overwrites the shared buffers
    }
  }
}

// Adjoint of §2: walking t = 0 … T-1 with gae_adjoint_step, g_adv = dL/dA + dL/dreturns,
// grad_rewards = g_r, grad_values = dL/dreturns + g_v.
// Tile x: grad_advantages in, grad_rewards out; tile y: grad_returns in, grad_values out.
template <typename S>
__global__ void __launch_bounds__(kGaeLines) multi_gae_backward_kernel(GaeBackwardParams p) {
  using A = acc_t_of<S>;
  __shared__ GaeTile<A> tile;
  const S* g_adv_in = static_cast<const S*>(p.grad_advantages);
  const S* g_ret_in = static_cast<const S*>(p.grad_returns);
  S* g_rew_out = static_cast<S*>(p.grad_rewards);
  S* g_val_out = static_cast<S*>(p.grad_values);
  const int64_t lines = p.n * p.B, T = p.T;
  const A gamma = static_cast<A>(p.gamma);
  const A gamma_lam = static_cast<A>(p.gamma * p.lam);

  for (int64_t line0 = int64_t(blockIdx.x) * kGaeLines; line0 < lines; line0 += int64_t(gridDim.x) * kGaeLines) {
    const int l = threadIdx.x;
    const bool active = l < kGaeLines && line0 + l < lines;
    A c_la = A(0), c_nv = A(0);
    for (int64_t t0 = 0; t0 < T; t0 += kGaeTile) {
      const int len = static_cast<int>(T - t0 < kGaeTile ? T - t0 : kGaeTile);
      stage_in(tile, g_adv_in, g_ret_in, p.mask, line0, lines, p.B, T, t0, len);
      __syncthreads();
      if (active) {
        for (int j = 0; j < len; ++j) {
          const A g_ret = tile.y[l][j];
          const A g_adv = tile.x[l][j] + g_ret;
          A g_r, g_v;
          gae_adjoint_step(g_adv, tile.m[l][j], gamma, gamma_lam, c_la, c_nv, g_r, g_v);
          tile.x[l][j] = g_r;
          tile.y[l][j] = g_ret + g_v;
        }
      }
      __syncthreads();
      stage_out(tile, g_rew_out, g_val_out, line0, lines, T, t0, len);
      __syncthreads();
    }
  }
}

// §1: one block per row (grid-stride over rows). The block first finds the last masked-in t of
// the row (block max; -1 for an empty row), then writes rewards[i, b, t] for every i and t.
template <typename S>
__global__ void __launch_bounds__(kRewardsBlock) token_rewards_kernel(TokenRewardsParams p) {
  using A = acc_t_of<S>;
  __shared__ long long red[block_reduce_slots<kRewardsBlock>()];
  const S* scores = static_cast<const S*>(p.scores);
  const S* old_logp = static_cast<const S*>(p.old_logp);
  const S* ref_logp = static_cast<const S*>(p.ref_logp);
  S* rewards = static_cast<S*>(p.rewards);
  const int64_t n = p.n, B = p.B, T = p.T;
  const A neg_beta = static_cast<A>(-p.beta_kl);

  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const bool* mrow = p.mask + b * T;
    long long last = -1;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
      if (mrow[t]) last = static_cast<long long>(t);  // t increases, so this is the thread's max
    last = block_reduce_max<kRewardsBlock>(last, -1LL, red);

    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const int64_t bt = b * T + t;
      const A kl_term = mrow[t] ? neg_beta * (load(old_logp, bt) - load(ref_logp, bt)) : A(0);
      for (int64_t i = 0; i < n; ++i) {
        A r = kl_term;
        if (static_cast<long long>(t) == last) r += load(scores, i * B + b);
        store(rewards, (i * B + b) * T + t, r);
      }
    }
    // block_reduce_max ends with a barrier after its last shared read, so the next row may reuse red.
  }
}

}  // namespace

void launch_token_rewards(const TokenRewardsParams& p, void* stream) {
  if (p.n <= 0 || p.B <= 0 || p.T <= 0) return;  // empty output: nothing to write
  const unsigned int grid = grid_blocks(p.B, 1);
  PAMA_DISPATCH_DTYPE(p.dtype, "token_rewards", [&] {
    token_rewards_kernel<scalar_t><<<grid, kRewardsBlock, 0, as_stream(stream)>>>(p);
  });
  check_launch("token_rewards_kernel");
}

void launch_multi_gae(const GaeParams& p, void* stream) {
  if (p.n <= 0 || p.B <= 0 || p.T <= 0) return;
  const unsigned int grid = grid_blocks(p.n * p.B, kGaeLines);
  PAMA_DISPATCH_DTYPE(p.dtype, "multi_gae", [&] {
    multi_gae_kernel<scalar_t><<<grid, kGaeLines, 0, as_stream(stream)>>>(p);
  });
  check_launch("multi_gae_kernel");
}

void launch_multi_gae_backward(const GaeBackwardParams& p, void* stream) {
  if (p.n <= 0 || p.B <= 0 || p.T <= 0) return;
  const unsigned int grid = grid_blocks(p.n * p.B, kGaeLines);
  PAMA_DISPATCH_DTYPE(p.dtype, "multi_gae_backward", [&] {
    multi_gae_backward_kernel<scalar_t><<<grid, kGaeLines, 0, as_stream(stream)>>>(p);
  });
  check_launch("multi_gae_backward_kernel");
}

}  // namespace cuda
}  // namespace pama
