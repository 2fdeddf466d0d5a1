// value_loss.cu — §5 multi-head clipped value loss on CUDA.
//
// Forward = two kernels on the stream:
//   1. partials: one block per chunk (grid-stride over the chunks). The block counts the chunk's
//      masked-in tokens, then for each head i sums pama::value_token_loss over them; per-thread
//      sums go through a deterministic block reduction into value_partial_size(n) entries
//      [cnt, Σ clipped over heads, Σ l_i (n)].
//   2. finalize (single block, one thread per lane of pama_math.h's finalize tree): row_scale, loss,
//      metrics by the phases of pama::finalize_value_loss.
// Backward: elementwise grad_values[i, b, t] = grad_loss * 0.5 * mask * row_scale[b] * dl_i/dV.
#include "common.cuh"

namespace pama {
namespace cuda {
namespace {

constexpr int kValueBlock = 256;
constexpr int kElementwiseBlock = 256;

template <typename S>
__global__ void __launch_bounds__(kValueBlock) value_loss_partials_kernel(ValueLossParams p) {
  using A = acc_t_of<S>;
  __shared__ A red[block_reduce_slots<kValueBlock>()];
  const S* values = static_cast<const S*>(p.values);
  const S* old_values = static_cast<const S*>(p.old_values);
  const S* returns = static_cast<const S*>(p.returns);
  A* part = static_cast<A*>(p.partials);
  const int n = static_cast<int>(p.n);
  const int64_t B = p.B, T = p.T, cpr = p.chunks_per_row;
  const int psize = value_partial_size(n);
  const A clip = static_cast<A>(p.clip);
  const int64_t nchunks = B * cpr;

  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const ChunkBounds cb = chunk_bounds(chunk, cpr, p.chunk_len, T);
    const int64_t b = cb.b, t_begin = cb.t_begin, t_end = cb.t_end;
    const bool* mrow = p.mask + b * T;
    A* out = part + chunk * psize;

    A c = A(0);
    for (int64_t t = t_begin + threadIdx.x; t < t_end; t += blockDim.x) c += mrow[t] ? A(1) : A(0);
    const A cnt = block_reduce_sum<kValueBlock>(c, red);

    A clipped_sum = A(0);  // this thread's clipped tokens, over all heads
    for (int i = 0; i < n; ++i) {
      const int64_t row = (int64_t(i) * B + b) * T;
      A ls = A(0);
      for (int64_t t = t_begin + threadIdx.x; t < t_end; t += blockDim.x) {
        if (mrow[t]) {
          A dv;
          bool clipped;
          ls += value_token_loss(load(values, row + t), load(old_values, row + t), load(returns, row + t), clip, dv,
                                 clipped);
          clipped_sum += clipped ? A(1) : A(0);
        }
      }
      const A head = block_reduce_sum<kValueBlock>(ls, red);
      if (threadIdx.x == 0) out[2 + i] = head;
    }
    const A clipped_total = block_reduce_sum<kValueBlock>(clipped_sum, red);
    if (threadIdx.x == 0) {
      out[0] = cnt;
      out[1] = clipped_total;
    }
  }
}

// The phases of pama_math.h's value-loss finalize, one thread per lane of the finalize tree (the
// CPU's order); acc[0, kMergeLanes) is reused by the per-head trees once every thread has read the
// totals, acc[2 * kMergeLanes] keeps Σ clipped.
template <typename A>
__global__ void __launch_bounds__(kMergeLanes, 1) value_loss_finalize_kernel(ValueLossParams p) {
  __shared__ A acc[3 * kMergeLanes];
  const A* part = static_cast<const A*>(p.partials);
  A* row_scale = static_cast<A*>(p.row_scale);
  A* metrics = static_cast<A*>(p.metrics);
  const int n = static_cast<int>(p.n);
  const int l = threadIdx.x;
  row_counts(part, value_partial_size(n), p.B, p.chunks_per_row, row_scale, l, kMergeLanes);
  __syncthreads();  // the lanes read every row count
  value_counts_lane(part, n, p.B, p.chunks_per_row, static_cast<const A*>(row_scale), l, acc);
  block_tree([&](int lane, int s) { lanes_add(acc, 3, lane, s); });
  A total, nseq;
  value_denominators(static_cast<const A*>(acc), static_cast<const A*>(p.denominators), total, nseq);
  value_scale_rows(p.agg, total, nseq, p.B, row_scale, l, kMergeLanes);
  __syncthreads();  // every thread has read the totals, and the lanes read every row_scale
  for (int i = 0; i < n; ++i) {
    value_head_lane(part, n, i, p.B, p.chunks_per_row, static_cast<const A*>(row_scale), l, acc);
    block_tree([&](int lane, int s) { lanes_add(acc, 1, lane, s); });
    // no thread reads another's slot until the next tree's first barrier
    if (l == 0) metrics[1 + i] = A(0.5) * acc[0];
  }
  if (l == 0) store_value_loss(n, total, acc[2 * kMergeLanes], static_cast<A*>(p.loss), metrics);
}

template <typename S>
__global__ void __launch_bounds__(kElementwiseBlock) value_loss_backward_kernel(ValueLossBackwardParams p) {
  using A = acc_t_of<S>;
  const S* values = static_cast<const S*>(p.values);
  const S* old_values = static_cast<const S*>(p.old_values);
  const S* returns = static_cast<const S*>(p.returns);
  const A* row_scale = static_cast<const A*>(p.row_scale);
  S* grad = static_cast<S*>(p.grad_values);
  const A g_loss = static_cast<const A*>(p.grad_loss)[0];
  const A clip = static_cast<A>(p.clip);
  const int64_t n = p.n, T = p.T, plane = p.B * p.T;

  // One thread per token (b, t), looping over the heads: the mask and row_scale are read once and
  // for each head consecutive threads touch consecutive addresses.
  for (int64_t bt = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; bt < plane;
       bt += int64_t(gridDim.x) * blockDim.x) {
    const bool m = p.mask[bt];
    const A scale = m ? A(0.5) * g_loss * row_scale[bt / T] : A(0);  // same association as the CPU kernel
    for (int64_t i = 0; i < n; ++i) {
      const int64_t idx = i * plane + bt;
      A g = A(0);  // masked-out tokens get an exact 0, whatever grad_loss is
      if (m) {
        A dv;
        bool clipped;
        value_token_loss(load(values, idx), load(old_values, idx), load(returns, idx), clip, dv, clipped);
        g = scale * dv;
      }
      store(grad, idx, g);
    }
  }
}

}  // namespace

void launch_value_loss_forward(const ValueLossParams& p, void* stream) {
  if (p.n < 0) throw std::runtime_error("pama_ext: value_loss_forward: negative number of heads");
  check_chunking(p.B, p.T, p.chunk_len, p.chunks_per_row, "value_loss_forward");
  const cudaStream_t s = as_stream(stream);
  const int64_t nchunks = p.B * p.chunks_per_row;
  PAMA_DISPATCH_DTYPE(p.dtype, "value_loss_forward", [&] {
    launch_chunked_reduction(p, nchunks, s, value_loss_partials_kernel<scalar_t>, kValueBlock, 0,
                             value_loss_finalize_kernel<acc_t>, kMergeLanes, "value_loss_forward");
  });
}

void launch_value_loss_backward(const ValueLossBackwardParams& p, void* stream) {
  const int64_t tokens = p.B * p.T;
  if (p.n <= 0 || tokens <= 0) return;  // empty grad_values
  PAMA_DISPATCH_DTYPE(p.dtype, "value_loss_backward", [&] {
    value_loss_backward_kernel<scalar_t>
        <<<grid_blocks(tokens, kElementwiseBlock), kElementwiseBlock, 0, as_stream(stream)>>>(p);
  });
  check_launch("value_loss_backward_kernel");
}

}  // namespace cuda
}  // namespace pama
