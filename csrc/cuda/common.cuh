// common.cuh — small device/host helpers shared by the CUDA kernels of pama_ext.
//
// - Scalar<S>: the accumulation type of an input dtype and the conversions S <-> acc
//   (float, double, __half, __nv_bfloat16; acc is double only for double inputs).
// - Deterministic warp/block reductions: a fixed shuffle tree inside each warp, then a fixed tree
//   over the warp sums. For a given block size the order of the additions never changes, so the
//   results are bitwise reproducible. No atomics are used anywhere in pama_ext's kernels.
// - PAMA_DISPATCH_DTYPE: DType int -> (scalar_t, acc_t), in the style of AT_DISPATCH_*.
// - check_launch / argument sanity checks that throw std::runtime_error (no torch headers here).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../pama_math.h"
#include "../launch.h"

namespace pama {
namespace cuda {

// ---- dtype traits ------------------------------------------------------------------------------
template <typename S>
struct Scalar;

template <>
struct Scalar<float> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float a) { return a; }
};
template <>
struct Scalar<double> {
  using acc = double;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double a) { return a; }
};
template <>
struct Scalar<__half> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float a) { return __float2half_rn(a); }
};
template <>
struct Scalar<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float a) { return __float2bfloat16_rn(a); }
};

template <typename S>
using acc_t_of = typename Scalar<S>::acc;

// Element i of a dtype buffer, converted to the accumulation type.
template <typename S>
__device__ __forceinline__ acc_t_of<S> load(const S* p, int64_t i) {
  return Scalar<S>::to_acc(p[i]);
}
// Writes an accumulation-type value into element i of a dtype buffer (round to nearest even).
template <typename S>
__device__ __forceinline__ void store(S* p, int64_t i, acc_t_of<S> v) {
  p[i] = Scalar<S>::from_acc(v);
}

// ---- deterministic reductions ------------------------------------------------------------------
constexpr int kWarpSize = 32;

// After the call lane 0 holds the sum of the 32 lanes' values (fixed shuffle tree). The other
// lanes hold partial sums and must not use the result. All 32 lanes must call it.
template <typename A>
__device__ __forceinline__ A warp_reduce_sum(A v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_reduce_max(A v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    A o = __shfl_down_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Number of shared-memory slots block_reduce_* needs for K values per thread.
template <int kBlock, int K = 1>
__host__ __device__ constexpr int block_reduce_slots() {
  return (kBlock / kWarpSize + 1) * K;
}

// Sums K values over the block; on return every thread holds the K block totals in v.
// Preconditions: launched with exactly kBlock threads (kBlock a multiple of 32), called by every
// thread of the block (block-uniform control flow), smem has block_reduce_slots<kBlock, K>() slots.
// The two barriers make back-to-back calls on the same smem safe: a slot is only rewritten after
// every thread has passed the barrier that follows its last read.
template <int kBlock, int K, typename A>
__device__ __forceinline__ void block_reduce_sum_vec(A (&v)[K], A* smem) {
  static_assert(kBlock % kWarpSize == 0 && kBlock <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kBlock / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A s = warp_reduce_sum(v[k]);
    if (lane == 0) smem[warp * K + k] = s;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      A s = lane < kWarps ? smem[lane * K + k] : A(0);
      s = warp_reduce_sum(s);
      if (lane == 0) smem[kWarps * K + k] = s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = smem[kWarps * K + k];
}

// Single-value version of block_reduce_sum_vec (same preconditions, block_reduce_slots<kBlock>()).
template <int kBlock, typename A>
__device__ __forceinline__ A block_reduce_sum(A v, A* smem) {
  A a[1] = {v};
  block_reduce_sum_vec<kBlock, 1>(a, smem);
  return a[0];
}

// Maximum over the block (same preconditions as block_reduce_sum); `lowest` is the identity.
template <int kBlock, typename A>
__device__ __forceinline__ A block_reduce_max(A v, A lowest, A* smem) {
  static_assert(kBlock % kWarpSize == 0 && kBlock <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kBlock / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  A m = warp_reduce_max(v);
  if (lane == 0) smem[warp] = m;
  __syncthreads();
  if (warp == 0) {
    A x = lane < kWarps ? smem[lane] : lowest;
    x = warp_reduce_max(x);
    if (lane == 0) smem[kWarps] = x;
  }
  __syncthreads();
  return smem[kWarps];
}

// ---- launch helpers ----------------------------------------------------------------------------
// Upper bound on the blocks of one launch; every kernel loops (grid-stride) over the rest.
constexpr int64_t kMaxGridBlocks = int64_t(1) << 20;

inline unsigned int grid_blocks(int64_t work_items, int64_t items_per_block) {
  int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxGridBlocks) blocks = kMaxGridBlocks;
  return static_cast<unsigned int>(blocks);
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Throws if the last launch (or an earlier asynchronous error) failed. Does not synchronise.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pama_ext: CUDA kernel '") + kernel + "' failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// The shape of every reducing op: one block per chunk writes that chunk's partials, then a single
// block runs the shared finalize routines. The finalize always runs, so the outputs it defines
// (statistics, loss, metrics) are zeros for an empty batch too. The finalize kernels declare
// __launch_bounds__(threads, 1): with one block there is no occupancy to trade registers for, and
// without the 1 ptxas capped the double moments finalize at 64 registers and spilled (sm_90).
template <typename P>
inline void launch_chunked_reduction(const P& p, int64_t nchunks, cudaStream_t s, void (*partials)(P),
                                     int partials_threads, size_t partials_smem, void (*finalize)(P),
                                     int finalize_threads, const char* name) {
  if (nchunks > 0) {
    partials<<<grid_blocks(nchunks, 1), partials_threads, partials_smem, s>>>(p);
    check_launch(name);
  }
  finalize<<<1, finalize_threads, 0, s>>>(p);
  check_launch(name);
}

// pama_math.h's finalize tree (serial_tree's order) with one thread per lane: blockDim.x must be
// kMergeLanes, and every thread of the block calls it. A barrier before each level and after the last.
template <typename Step>
__device__ __forceinline__ void block_tree(Step step) {
  const int l = threadIdx.x;
  for (int s = 1; s < kMergeLanes; s *= 2) {
    __syncthreads();
    if (l % (2 * s) == 0) step(l, s);
  }
  __syncthreads();
}

// The weights kernels take the exact solvers' working arrays from the op (Backend::solver_scratch_bytes).
inline void check_scratch(const void* scratch, const char* launcher) {
  if (scratch == nullptr)
    throw std::runtime_error(std::string("pama_ext: ") + launcher +
                             ": no solver scratch (the op must allocate Backend::solver_scratch_bytes)");
}

// The kernels keep per-objective arrays of kMaxObjectives entries.
inline void check_objectives(int64_t n, const char* launcher) {
  if (n < 1 || n > kMaxObjectives)
    throw std::runtime_error(std::string("pama_ext: ") + launcher + ": number of objectives n=" +
                             std::to_string(n) + " must be in [1, " + std::to_string(kMaxObjectives) +
                             "]");
}

// The chunks of a row must cover [0, T) (launch.h), otherwise outputs would be left unwritten.
inline void check_chunking(int64_t B, int64_t T, int64_t chunk_len, int64_t chunks_per_row,
                           const char* launcher) {
  const bool bad_sign = B < 0 || T < 0 || chunk_len < 0 || chunks_per_row < 0;
  const bool uncovered = B > 0 && T > 0 && (chunk_len < 1 || chunks_per_row < (T + chunk_len - 1) / chunk_len);
  if (bad_sign || uncovered)
    throw std::runtime_error(std::string("pama_ext: ") + launcher + ": chunks (chunk_len=" +
                             std::to_string(chunk_len) + ", chunks_per_row=" + std::to_string(chunks_per_row) +
                             ") do not cover T=" + std::to_string(T));
}

}  // namespace cuda
}  // namespace pama

// DType int -> `scalar_t` (storage type) and `acc_t` (accumulation type), then calls the lambda
// given as the last argument, e.g.
//   PAMA_DISPATCH_DTYPE(p.dtype, "multi_gae", [&] { kernel<scalar_t><<<g, b, 0, s>>>(p); });
#define PAMA_DISPATCH_DTYPE(DTYPE, NAME, ...)                                                       \
  [&] {                                                                                             \
    switch (static_cast<int>(DTYPE)) {                                                              \
      case ::pama::kFloat32: {                                                                      \
        using scalar_t = float;                                                                     \
        using acc_t = float;                                                                        \
        return __VA_ARGS__();                                                                       \
      }                                                                                             \
      case ::pama::kFloat64: {                                                                      \
        using scalar_t = double;                                                                    \
        using acc_t = double;                                                                       \
        return __VA_ARGS__();                                                                       \
      }                                                                                             \
      case ::pama::kFloat16: {                                                                      \
        using scalar_t = __half;                                                                    \
        using acc_t = float;                                                                        \
        return __VA_ARGS__();                                                                       \
      }                                                                                             \
      case ::pama::kBFloat16: {                                                                     \
        using scalar_t = __nv_bfloat16;                                                             \
        using acc_t = float;                                                                        \
        return __VA_ARGS__();                                                                       \
      }                                                                                             \
      default:                                                                                      \
        throw std::runtime_error(std::string("pama_ext: ") + (NAME) + ": unsupported dtype code " + \
                                 std::to_string(static_cast<int>(DTYPE)));                          \
    }                                                                                               \
  }()
