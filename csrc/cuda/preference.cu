// preference.cu — §6-§7 preference-data kernels on CUDA.
//
// - multi_dpo_loss: one block; threads stride over the pairs, per objective a deterministic block
//   reduction of pama::dpo_pair_loss (the pair count B is a batch of pairs, small). Backward is
//   elementwise over the pairs.
// - gradient_gram: multi-tensor. The host splits the parameter table into launches whose pointers
//   travel in the kernel arguments (no host-to-device copy, capturable in a CUDA graph). A block
//   owns kGramBlock elements of one parameter: it stages tiles of all n gradients in shared memory
//   (acc type) and spreads the n(n+1)/2 dot products (times element slices) over its threads; the
//   per-pair totals go to the block's own partial slot in a fixed order, and one finalize block sums
//   the partials in index order (pama::finalize_gram). No atomics: bitwise reproducible.
// - combine_gradients: multi-tensor the same way, elementwise: out = (acc ? out : 0) + Σ_i c_i g_i.
// - gram_weights: one thread runs pama::gram_weights (n <= 64, fixed iteration counts), with the exact
//   solvers' working arrays in device memory from the op (GramWeightsParams::scratch).
#include <algorithm>

#include "common.cuh"

namespace pama {
namespace cuda {
namespace {

constexpr int kPrefBlock = 256;
constexpr int kGramThreads = 256;
constexpr int kGramLaunchPtrs = 256;    // gradient pointers carried by one launch (kernel arguments)
constexpr int kGramLaunchParams = 64;   // parameters carried by one launch
constexpr int kGramMaxItems = (kMaxObjectives * (kMaxObjectives + 1) / 2 + kGramThreads - 1) / kGramThreads;
constexpr int kCombineLaunchParams = 32;
constexpr int64_t kCombineBlock = 8192;  // elements per combine block
static_assert(kGramBlock <= (int64_t(1) << 30), "gram_partials_kernel indexes a block's elements with int");

// ---- multi_dpo_loss -----------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kPrefBlock) dpo_forward_kernel(DpoLossParams p) {
  using A = acc_t_of<S>;
  __shared__ A red[block_reduce_slots<kPrefBlock>()];
  const S* pc = static_cast<const S*>(p.policy_chosen);
  const S* pr = static_cast<const S*>(p.policy_rejected);
  const S* rc = static_cast<const S*>(p.ref_chosen);
  const S* rr = static_cast<const S*>(p.ref_rejected);
  const A* lab = static_cast<const A*>(p.labels);
  const A* lc = static_cast<const A*>(p.chosen_lengths);
  const A* lr = static_cast<const A*>(p.rejected_lengths);
  A* losses = static_cast<A*>(p.losses);
  A* coef = static_cast<A*>(p.coef);
  const A beta = static_cast<A>(p.beta);
  const A inv_b = A(1) / static_cast<A>(p.B > 1 ? p.B : 1);
  for (int64_t i = 0; i < p.n; ++i) {
    A sum = A(0);
    for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
      const A h = dpo_margin(load(pc, b), load(pr, b), load(rc, b), load(rr, b), dpo_length(lc, b), dpo_length(lr, b));
      A cf;
      sum += dpo_pair_loss(beta, label_sign(lab[i * p.B + b]), h, inv_b, cf);
      coef[i * p.B + b] = cf;
    }
    const A total = block_reduce_sum<kPrefBlock>(sum, red);
    if (threadIdx.x == 0) losses[i] = total * inv_b;
  }
}

template <typename S>
__global__ void __launch_bounds__(kPrefBlock) dpo_backward_kernel(DpoLossBackwardParams p) {
  using A = acc_t_of<S>;
  const A* g = static_cast<const A*>(p.grad_losses);
  const A* coef = static_cast<const A*>(p.coef);
  const A* lc = static_cast<const A*>(p.chosen_lengths);
  const A* lr = static_cast<const A*>(p.rejected_lengths);
  S* gc = static_cast<S*>(p.grad_chosen);
  S* gr = static_cast<S*>(p.grad_rejected);
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < p.B; b += int64_t(gridDim.x) * blockDim.x) {
    A gh = A(0);
    for (int64_t i = 0; i < p.n; ++i) gh += g[i] * coef[i * p.B + b];
    store(gc, b, gh / dpo_length(lc, b));
    store(gr, b, gh / dpo_length(lr, b));
  }
}

// ---- gradient_gram -----------------------------------------------------------------------------
struct GramLaunch {
  const void* ptrs[kGramLaunchPtrs];               // i-major [n][np]; nullptr = zero gradient
  int64_t numel[kGramLaunchParams];
  int64_t first_block[kGramLaunchParams + 1];      // prefix sums of the parameters' block counts
  int64_t part_base;                               // partial index of this launch's first block
  int64_t block;                                   // elements per block
  int n, np;
  void* partials;                                  // acc [*, gram_pairs(n)]
};

// Elements per shared-memory tile, and element slices per pair (items = pairs * slices).
__host__ __device__ inline int gram_tile(int n) { return minv(256, maxv(32, 4096 / n)); }
__host__ __device__ inline int gram_slices(int pairs) { return pairs >= kGramThreads ? 1 : kGramThreads / pairs; }
inline size_t gram_smem_entries(int n) {
  const int P = gram_pairs(n);
  return static_cast<size_t>(std::max(n * gram_tile(n), P * gram_slices(P)));
}

// An item's descriptor packed in 32 bits: the tile offsets of rows i and j (< n * E <= 4096, 12 bits
// each) and its first element (its slice, < kGramThreads = 256, 8 bits). Three int arrays of
// kGramMaxItems made the float kernels spill on sm_80.
struct GramItem {
  static_assert(kGramThreads <= 256, "GramItem keeps the slice in 8 bits");
  __device__ static unsigned pack(int xo, int yo, int slice) {
    return unsigned(xo) | (unsigned(yo) << 12) | (unsigned(slice) << 24);
  }
  __device__ static int x(unsigned d) { return int(d & 0xfffu); }
  __device__ static int y(unsigned d) { return int((d >> 12) & 0xfffu); }
  __device__ static int slice(unsigned d) { return int(d >> 24); }
};

// Resident blocks per SM the register budget is sized for: 4 (64 registers) with float sums,
// 3 (85 registers) with double sums, whose item sums take two registers each.
template <typename S>
constexpr int gram_min_blocks() {
  return sizeof(acc_t_of<S>) == 8 ? 3 : 4;
}

template <typename S>
__global__ void __launch_bounds__(kGramThreads, gram_min_blocks<S>()) gram_partials_kernel(GramLaunch L) {
  using A = acc_t_of<S>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  const int n = L.n, P = gram_pairs(n), E = gram_tile(n), SL = gram_slices(P), items = P * SL;
  // One register per item: the tile offsets of its two rows and its first element (GramItem).
  unsigned desc[kGramMaxItems];
#pragma unroll
  for (int m = 0; m < kGramMaxItems; ++m) {
    const int item = threadIdx.x + m * kGramThreads;
    int i = 0, j = 0;
    if (item < items) gram_pair(item % P, n, i, j);
    desc[m] = GramItem::pack(i * E, j * E, item < items ? item / P : 0);
  }
  A* part = static_cast<A*>(L.partials);
  const int64_t nblocks = L.first_block[L.np];
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
    int kk = 0;
    while (L.first_block[kk + 1] <= blk) ++kk;
    const int64_t e0 = (blk - L.first_block[kk]) * L.block;
    const int blen = static_cast<int>(minv<int64_t>(L.block, L.numel[kk] - e0));  // this block's elements
    A acc[kGramMaxItems];
#pragma unroll
    for (int m = 0; m < kGramMaxItems; ++m) acc[m] = A(0);
    for (int base = 0; base < blen; base += E) {
      const int len = minv(E, blen - base);
      __syncthreads();  // the previous tile (or reduction) is no longer read
      // tile[i * E + e] = g_i[base + e]; (i, e) advance by kGramThreads entries without a division
      for (int x = threadIdx.x, i = x / E, e = x % E; i < n; x += kGramThreads) {
        const S* g = static_cast<const S*>(L.ptrs[i * L.np + kk]);
        tile[x] = (g != nullptr && e < len) ? load(g + e0, base + e) : A(0);
        e += kGramThreads;
        while (e >= E) {
          e -= E;
          ++i;
        }
      }
      __syncthreads();
#pragma unroll
      for (int m = 0; m < kGramMaxItems; ++m) {
        if (threadIdx.x + m * kGramThreads < items) {
          const A* x = tile + GramItem::x(desc[m]);
          const A* y = tile + GramItem::y(desc[m]);
          A s = acc[m];
          for (int e = GramItem::slice(desc[m]); e < E; e += SL) s += x[e] * y[e];
          acc[m] = s;
        }
      }
    }
    // per-pair totals over the slices, in slice order
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kGramMaxItems; ++m) {
      const int item = threadIdx.x + m * kGramThreads;
      if (item < items) tile[item] = acc[m];  // item = slice * P + pair
    }
    __syncthreads();
    A* out = part + (L.part_base + blk) * P;
    for (int q = threadIdx.x; q < P; q += kGramThreads) {
      A s = A(0);
      for (int r = 0; r < SL; ++r) s += tile[r * P + q];
      out[q] = s;
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kGramThreads, 1) gram_finalize_kernel(const A* partials, int64_t nparts, int n, A* G) {
  finalize_gram(partials, nparts, n, G, threadIdx.x, blockDim.x);
}

// ---- combine_gradients ---------------------------------------------------------------------------
struct CombineLaunch {
  const void* ptrs[kGramLaunchPtrs];  // i-major [n][np]; nullptr = zero gradient
  void* outs[kCombineLaunchParams];
  int64_t numel[kCombineLaunchParams];
  int64_t first_block[kCombineLaunchParams + 1];
  const void* coeffs;  // acc [n]
  int n, np;
  bool accumulate;
};

template <typename G, typename O>
using combine_acc_t =
    typename std::conditional<std::is_same<G, double>::value || std::is_same<O, double>::value, double, float>::type;

template <typename G, typename O>
__global__ void __launch_bounds__(kPrefBlock) combine_kernel(CombineLaunch L) {
  using A = combine_acc_t<G, O>;
  using AO = acc_t_of<O>;
  __shared__ A cs[kMaxObjectives];
  for (int i = threadIdx.x; i < L.n; i += blockDim.x) cs[i] = static_cast<const A*>(L.coeffs)[i];
  __syncthreads();
  const int64_t nblocks = L.first_block[L.np];
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
    int kk = 0;
    while (L.first_block[kk + 1] <= blk) ++kk;
    const int64_t e0 = (blk - L.first_block[kk]) * kCombineBlock;
    const int64_t e1 = e0 + kCombineBlock < L.numel[kk] ? e0 + kCombineBlock : L.numel[kk];
    O* out = static_cast<O*>(L.outs[kk]);
    for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
      A s = A(0);
      for (int i = 0; i < L.n; ++i) {
        const G* g = static_cast<const G*>(L.ptrs[i * L.np + kk]);
        if (g != nullptr) s += cs[i] * static_cast<A>(load(g, e));
      }
      if (L.accumulate) s = static_cast<A>(load(out, e)) + s;
      store(out, e, static_cast<AO>(s));
    }
  }
}

// ---- gram_weights --------------------------------------------------------------------------------
template <typename A>
__global__ void __launch_bounds__(1) gram_weights_kernel(GramWeightsParams p) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  gram_weights(static_cast<const A*>(p.gram), static_cast<const A*>(p.prefs), p.n, p.method, static_cast<A>(p.c),
               static_cast<A*>(p.weights), *static_cast<gram::Scratch*>(p.scratch));
}

}  // namespace

void launch_dpo_loss_forward(const DpoLossParams& p, void* stream) {
  const cudaStream_t s = as_stream(stream);
  PAMA_DISPATCH_DTYPE(p.dtype, "multi_dpo_loss", [&] {
    dpo_forward_kernel<scalar_t><<<1, kPrefBlock, 0, s>>>(p);
    check_launch("multi_dpo_loss");
  });
}

void launch_dpo_loss_backward(const DpoLossBackwardParams& p, void* stream) {
  if (p.B == 0) return;
  const cudaStream_t s = as_stream(stream);
  PAMA_DISPATCH_DTYPE(p.dtype, "multi_dpo_loss_backward", [&] {
    dpo_backward_kernel<scalar_t><<<grid_blocks(p.B, kPrefBlock), kPrefBlock, 0, s>>>(p);
    check_launch("multi_dpo_loss_backward");
  });
}

void launch_gradient_gram(const GradGramParams& p, void* stream) {
  check_objectives(p.n, "gradient_gram");
  const cudaStream_t s = as_stream(stream);
  const int n = static_cast<int>(p.n);
  const int per = std::max(1, std::min(kGramLaunchParams, kGramLaunchPtrs / n));
  PAMA_DISPATCH_DTYPE(p.dtype, "gradient_gram", [&] {
    const size_t smem = gram_smem_entries(n) * sizeof(acc_t);
    for (int64_t k0 = 0; k0 < p.K; k0 += per) {
      GramLaunch L{};
      L.np = static_cast<int>(std::min<int64_t>(per, p.K - k0));
      L.n = n;
      L.block = p.block;
      L.partials = p.partials;
      L.part_base = p.part_offset[k0];
      L.first_block[0] = 0;
      for (int kk = 0; kk < L.np; ++kk) {
        L.numel[kk] = p.numel[k0 + kk];
        L.first_block[kk + 1] = p.part_offset[k0 + kk + 1] - L.part_base;
        for (int i = 0; i < n; ++i) L.ptrs[i * L.np + kk] = p.ptrs[i * p.K + k0 + kk];
      }
      const int64_t nblocks = L.first_block[L.np];
      if (nblocks == 0) continue;
      gram_partials_kernel<scalar_t><<<grid_blocks(nblocks, 1), kGramThreads, smem, s>>>(L);
      check_launch("gradient_gram");
    }
    gram_finalize_kernel<acc_t><<<1, kGramThreads, 0, s>>>(static_cast<const acc_t*>(p.partials), p.part_offset[p.K],
                                                           n, static_cast<acc_t*>(p.gram));
    check_launch("gradient_gram (finalize)");
  });
}

void launch_combine_gradients(const CombineGradsParams& p, void* stream) {
  check_objectives(p.n, "combine_gradients");
  const cudaStream_t s = as_stream(stream);
  const int n = static_cast<int>(p.n);
  const int per = std::max(1, std::min(kCombineLaunchParams, kGramLaunchPtrs / n));
  PAMA_DISPATCH_DTYPE(p.dtype, "combine_gradients", [&] {
    using grad_t = scalar_t;
    PAMA_DISPATCH_DTYPE(p.out_dtype, "combine_gradients", [&] {
      for (int64_t k0 = 0; k0 < p.K; k0 += per) {
        CombineLaunch L{};
        L.np = static_cast<int>(std::min<int64_t>(per, p.K - k0));
        L.n = n;
        L.coeffs = p.coeffs;
        L.accumulate = p.accumulate;
        L.first_block[0] = 0;
        for (int kk = 0; kk < L.np; ++kk) {
          L.numel[kk] = p.numel[k0 + kk];
          L.outs[kk] = p.outs[k0 + kk];
          L.first_block[kk + 1] = L.first_block[kk] + (L.numel[kk] + kCombineBlock - 1) / kCombineBlock;
          for (int i = 0; i < n; ++i) L.ptrs[i * L.np + kk] = p.ptrs[i * p.K + k0 + kk];
        }
        const int64_t nblocks = L.first_block[L.np];
        if (nblocks == 0) continue;
        combine_kernel<grad_t, scalar_t><<<grid_blocks(nblocks, 1), kPrefBlock, 0, s>>>(L);
        check_launch("combine_gradients");
      }
    });
  });
}

void launch_gram_weights(const GramWeightsParams& p, void* stream) {
  check_objectives(p.n, "gram_weights");
  check_scratch(p.scratch, "gram_weights");
  const cudaStream_t s = as_stream(stream);
  if (p.acc_is_double) {
    gram_weights_kernel<double><<<1, 1, 0, s>>>(p);
  } else {
    gram_weights_kernel<float><<<1, 1, 0, s>>>(p);
  }
  check_launch("gram_weights");
}

}  // namespace cuda
}  // namespace pama
