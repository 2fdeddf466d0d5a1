// stats.cu — §3 per-objective statistics and §4 Pareto weights on CUDA.
//
// Each statistics launcher runs two kernels on the stream:
//   1. a partials kernel with one block per chunk (grid-stride over the B * chunks_per_row chunks)
//      that writes the chunk's MomentsPartial / IndicatorPartial entries of `partials`;
//   2. a single-block finalize kernel that runs the pama_math.h finalize_* routines with
//      tid = threadIdx.x, nth = blockDim.x and a barrier between phases.
// Every sum has a fixed order (per-thread token order, fixed reduction trees, chunks summed in
// index order by the finalize routines), so the results are bitwise reproducible.
#include "common.cuh"

namespace pama {
namespace cuda {
namespace {

constexpr int kStatsBlock = 256;     // threads of the partials kernels
constexpr int kFinalizeBlock = 256;  // threads of the single-block finalize kernels

// ---- moments ------------------------------------------------------------------------------------
// Chunk partial (MomentsPartial): cnt = #masked tokens, mean_i = Σ masked A_i·inv and
// msd_i = Σ masked ((A_i − mean_i)·rs)², with inv = 1/cnt, rs = 1/sqrt(cnt) (moments_chunk_scales).
// Threads stride over the chunk's tokens; one block reduction per value (2n + 1 per chunk). The
// second pass re-reads the chunk (it is small and mostly still in L1/L2).
template <typename S>
__global__ void __launch_bounds__(kStatsBlock) moments_partials_kernel(StatsParams p) {
  using A = acc_t_of<S>;
  __shared__ A red[block_reduce_slots<kStatsBlock>()];
  const S* adv = static_cast<const S*>(p.advantages);
  A* part = static_cast<A*>(p.partials);
  const int n = static_cast<int>(p.n);
  const int64_t B = p.B, T = p.T, cpr = p.chunks_per_row;
  const MomentsPartial P(n);
  const int64_t nchunks = B * cpr;

  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const ChunkBounds cb = chunk_bounds(chunk, cpr, p.chunk_len, T);
    const int64_t b = cb.b, t_begin = cb.t_begin, t_end = cb.t_end;
    const bool* mrow = p.mask + b * T;
    A* out = part + chunk * P.size();

    A c = A(0);
    for (int64_t t = t_begin + threadIdx.x; t < t_end; t += blockDim.x) c += mrow[t] ? A(1) : A(0);
    const A cnt = block_reduce_sum<kStatsBlock>(c, red);
    if (threadIdx.x == 0) out[P.cnt()] = cnt;
    A inv, rs;
    moments_chunk_scales(cnt, inv, rs);

    for (int i = 0; i < n; ++i) {
      const S* arow = adv + (int64_t(i) * B + b) * T;
      A s = A(0);
      for (int64_t t = t_begin + threadIdx.x; t < t_end; t += blockDim.x)
        if (mrow[t]) s += load(arow, t) * inv;
      const A mean = block_reduce_sum<kStatsBlock>(s, red);  // 0 for an empty chunk
      A q = A(0);
      for (int64_t t = t_begin + threadIdx.x; t < t_end; t += blockDim.x) {
        if (mrow[t]) {
          const A d = (load(arow, t) - mean) * rs;
          q += d * d;
        }
      }
      const A msd = block_reduce_sum<kStatsBlock>(q, red);
      if (threadIdx.x == 0) {
        out[P.mean() + i] = mean;
        out[P.msd() + i] = msd;
      }
    }
  }
}

// The finalize tree of pama_math.h (kMergeLanes lanes, the CPU's order): one thread per lane,
// objective after objective.
template <typename A>
__global__ void __launch_bounds__(kFinalizeBlock, 1) moments_finalize_kernel(StatsParams p) {
  static_assert(kFinalizeBlock == kMergeLanes, "moments_finalize_kernel runs one thread per merge lane");
  __shared__ A s_count[kMergeLanes], s_mean[kMergeLanes], s_msd[kMergeLanes];
  const A* part = static_cast<const A*>(p.partials);
  A* row_count = static_cast<A*>(p.row_count);
  A* stats = static_cast<A*>(p.stats);
  const int n = static_cast<int>(p.n);
  const int l = threadIdx.x;
  row_counts(part, MomentsPartial(n).size(), p.B, p.chunks_per_row, row_count, threadIdx.x, blockDim.x);
  for (int i = 0; i < n; ++i) {
    moments_lane(part, n, i, p.B * p.chunks_per_row, l, s_count[l], s_mean[l], s_msd[l]);
    block_tree([&](int lane, int s) { moments_tree_step(s_count, s_mean, s_msd, lane, s); });
    // lane 0 is complete, and no thread reads another's slots until the next tree's first barrier
    if (l == 0) store_moments(stats, n, i, s_count[0], s_mean[0], s_msd[0]);
  }
  __syncthreads();  // phase 3 reads every row_count
  if (l == 0) finalize_moments_counts(static_cast<const A*>(row_count), n, p.B, stats);
}

// ---- indicators ---------------------------------------------------------------------------------
// One block per chunk; the chunk is walked in tiles of ind_tile<A>() tokens staged in shared memory:
//   (a) token flags: masked-in, and masked-in with u <= 1 + eps_hi (the clip indicator);
//   (b) N tile: N_i = whiten_noon(A_i) for every objective, 0 on masked-out tokens;
//   (c) one thread per token runs pama::thm1 on the token's N vector -> per-token weights c;
//   (d) every partial entry (sumI_i | pos_i | ctok_i | gram_ij with i <= j) is owned by one thread,
//       which adds the tile's tokens to the entry's running sum in token order.
// Entry e of a chunk's IndicatorPartial is thus a plain sequential sum over the chunk's tokens. The
// owner of the Gram pair i <= j writes its sum to gram_ij and gram_ji: I_i I_j and I_j I_i are the
// same product, so both entries get the sum they would get on their own.
// The running sums live in shared memory (each is read and written by its owner thread only, so
// they need no barrier): up to 3n + n(n+1)/2 = 2272 of them do not fit in registers, and keeping
// them there (17 per thread) made ptxas spill on sm_80 at any register budget it chose.
constexpr unsigned char kFlagIn = 1;    // masked-in token
constexpr unsigned char kFlagClip = 2;  // masked-in token with u <= 1 + eps_hi (I_i = N_i)

// Tokens per tile: 32 with float sums; 16 with double sums, which keeps the shared memory of n = 64
// under the 48 KB a launch gets without opting in. The tile length does not change any sum.
template <typename A>
__host__ __device__ constexpr int ind_tile() {
  return sizeof(A) == 8 ? 16 : 32;
}
template <typename A>
__host__ __device__ constexpr int ind_pitch() {
  return ind_tile<A>() + 1;  // padded pitch of the N tile rows (avoids bank conflicts)
}
__host__ __device__ constexpr int ind_owned(int n, bool with_gram) { return 3 * n + (with_gram ? gram_pairs(n) : 0); }

// Dynamic shared memory of indicator_partials_kernel, in this order: mean(n), istd(n),
// N[n][pitch], c[tile][n], running sums(owned) (acc); Gram pairs(n(n+1)/2) (uint16: i | j << 8);
// flags[tile]. At most 39.3 KB (double, n = 64; float: 29.7 KB), under 48 KB.
template <typename A>
constexpr size_t indicator_smem_bytes(int n) {
  return sizeof(A) * (size_t(2 * n) + size_t(n) * ind_pitch<A>() + size_t(ind_tile<A>()) * n + ind_owned(n, true)) +
         sizeof(uint16_t) * gram_pairs(n) + ind_tile<A>();
}
static_assert(indicator_smem_bytes<double>(kMaxObjectives) <= 48 * 1024, "indicator tile over 48 KB");
static_assert(indicator_smem_bytes<float>(kMaxObjectives) <= 48 * 1024, "indicator tile over 48 KB");

// Adds the tile's tokens to the running sum `acc` of owned entry q (see the layout above).
template <typename A>
__device__ __forceinline__ void accumulate_indicator_entry(int q, int n, int len, const A* sN, const A* sC,
                                                           const uint16_t* sPair, const unsigned char* sFlag,
                                                           A& acc) {
  constexpr int pitch = ind_pitch<A>();
  if (q >= 3 * n) {  // gram_ij: Σ I_i I_j
    const int pair = sPair[q - 3 * n];
    const A* ri = sN + (pair & 0xff) * pitch;
    const A* rj = sN + (pair >> 8) * pitch;
    for (int t = 0; t < len; ++t)
      if (sFlag[t] & kFlagClip) acc += ri[t] * rj[t];
    return;
  }
  const int kind = q / n, i = q - kind * n;
  const A* ri = sN + i * pitch;
  if (kind == 0) {  // sumI_i: Σ I_i
    for (int t = 0; t < len; ++t)
      if (sFlag[t] & kFlagClip) acc += ri[t];
  } else if (kind == 1) {  // pos_i: #(N_i > 0)
    for (int t = 0; t < len; ++t)
      if (sFlag[t] & kFlagIn) acc += ri[t] > A(0) ? A(1) : A(0);
  } else {  // ctok_i: Σ thm1 weight c_i
    for (int t = 0; t < len; ++t)
      if (sFlag[t] & kFlagIn) acc += sC[t * n + i];
  }
}

template <typename S>
__global__ void __launch_bounds__(kStatsBlock) indicator_partials_kernel(StatsParams p) {
  using A = acc_t_of<S>;
  constexpr int tile = ind_tile<A>(), pitch = ind_pitch<A>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int n = static_cast<int>(p.n);
  const int owned = ind_owned(n, p.with_gram);
  A* sMean = reinterpret_cast<A*>(smem_raw);
  A* sIstd = sMean + n;
  A* sN = sIstd + n;
  A* sC = sN + n * pitch;
  A* sAcc = sC + tile * n;
  uint16_t* sPair = reinterpret_cast<uint16_t*>(sAcc + ind_owned(n, true));
  unsigned char* sFlag = reinterpret_cast<unsigned char*>(sPair + gram_pairs(n));

  const S* adv = static_cast<const S*>(p.advantages);
  const S* logp = static_cast<const S*>(p.logp);
  const S* old_logp = static_cast<const S*>(p.old_logp);
  const A* stats = static_cast<const A*>(p.stats);
  A* part = static_cast<A*>(p.partials);
  const int64_t B = p.B, T = p.T, cpr = p.chunks_per_row;
  const StatsLayout L(n);
  const IndicatorPartial P(n);
  const A hi = A(1) + static_cast<A>(p.eps_hi);  // same form as ppo_token_loss's upper clip bound

  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    sMean[i] = stats[L.mean() + i];
    sIstd[i] = inv_std(stats[L.var() + i]);
  }
  for (int q = threadIdx.x; q < gram_pairs(n); q += blockDim.x) {
    int i, j;
    gram_pair(q, n, i, j);
    sPair[q] = static_cast<uint16_t>(i | (j << 8));
  }
  __syncthreads();

  const int64_t nchunks = B * cpr;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const ChunkBounds cb = chunk_bounds(chunk, cpr, p.chunk_len, T);
    const int64_t b = cb.b, t_begin = cb.t_begin, t_end = cb.t_end;

    for (int q = threadIdx.x; q < owned; q += kStatsBlock) sAcc[q] = A(0);

    for (int64_t t0 = t_begin; t0 < t_end; t0 += tile) {
      const int len = static_cast<int>(minv<int64_t>(tile, t_end - t0));
      // (a) flags
      for (int j = threadIdx.x; j < tile; j += blockDim.x) {
        unsigned char f = 0;
        if (j < len) {
          const int64_t bt = b * T + t0 + j;
          if (p.mask[bt]) {
            const A u = ppo_ratio(load(logp, bt), load(old_logp, bt));
            f = u <= hi ? (kFlagIn | kFlagClip) : kFlagIn;
          }
        }
        sFlag[j] = f;
      }
      __syncthreads();
      // (b) N tile, coalesced along t
      for (int q = threadIdx.x; q < n * tile; q += blockDim.x) {
        const int i = q / tile, j = q % tile;
        A v = A(0);
        if (sFlag[j] & kFlagIn)
          v = whiten_noon(load(adv, (int64_t(i) * B + b) * T + t0 + j), sMean[i], sIstd[i], p.whiten, p.noon);
        sN[i * pitch + j] = v;
      }
      __syncthreads();
      // (c) Theorem-1 weights of each masked-in token
      for (int j = threadIdx.x; j < tile; j += blockDim.x) {
        A* c = sC + j * n;
        for (int i = 0; i < n; ++i) c[i] = A(0);
        if (sFlag[j] & kFlagIn) thm1(sN + j, int64_t(pitch), n, c, A(1));
      }
      __syncthreads();
      // (d) per-entry accumulation, each owned running sum by its own thread
      for (int q = threadIdx.x; q < owned; q += kStatsBlock) {
        A acc = sAcc[q];
        accumulate_indicator_entry(q, n, len, sN, sC, sPair, sFlag, acc);
        sAcc[q] = acc;
      }
      __syncthreads();  // the next tile overwrites the shared buffers
    }

    // the owned running sums to the chunk's IndicatorPartial: q < 3n is entry q (sumI, pos, ctok);
    // a Gram pair goes to gram_ij and gram_ji
    A* out = part + chunk * P.size(p.with_gram);
    for (int q = threadIdx.x; q < owned; q += kStatsBlock) {
      if (q < 3 * n) {
        out[q] = sAcc[q];
      } else {
        const int pair = sPair[q - 3 * n], i = pair & 0xff, j = pair >> 8;
        out[P.gram() + i * n + j] = sAcc[q];
        out[P.gram() + j * n + i] = sAcc[q];
      }
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kFinalizeBlock, 1) indicator_finalize_kernel(StatsParams p) {
  const A* part = static_cast<const A*>(p.partials);
  const A* row_count = static_cast<const A*>(p.row_count);
  A* stats = static_cast<A*>(p.stats);
  A* seq_weights = static_cast<A*>(p.seq_weights);
  const int n = static_cast<int>(p.n);
  finalize_indicator_totals(part, n, p.B, p.chunks_per_row, p.with_gram, stats, threadIdx.x, blockDim.x);
  finalize_indicator_rows(part, n, p.B, p.chunks_per_row, p.with_gram, row_count, seq_weights, threadIdx.x,
                          blockDim.x);
  __syncthreads();  // cseq reads every row of seq_weights
  finalize_indicator_cseq(n, p.B, row_count, static_cast<const A*>(seq_weights), stats, threadIdx.x,
                          blockDim.x);
}

// ---- Pareto weights -----------------------------------------------------------------------------
// finalize_weights is sequential by design (n <= 64, once per step): one thread, with the exact
// solvers' working arrays in p.scratch (device memory; see gram_solvers.h).
template <typename A>
__global__ void __launch_bounds__(1) pareto_weights_kernel(WeightsParams p) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  finalize_weights(static_cast<const A*>(p.stats), p.n, p.method, p.granularity, static_cast<const A*>(p.prefs),
                   static_cast<A>(p.cagrad_c), static_cast<A*>(p.weights), *static_cast<gram::Scratch*>(p.scratch));
}

}  // namespace

void launch_stats_moments(const StatsParams& p, void* stream) {
  check_objectives(p.n, "stats_moments");
  check_chunking(p.B, p.T, p.chunk_len, p.chunks_per_row, "stats_moments");
  const cudaStream_t s = as_stream(stream);
  const int64_t nchunks = p.B * p.chunks_per_row;
  PAMA_DISPATCH_DTYPE(p.dtype, "stats_moments", [&] {
    launch_chunked_reduction(p, nchunks, s, moments_partials_kernel<scalar_t>, kStatsBlock, 0,
                             moments_finalize_kernel<acc_t>, kFinalizeBlock, "stats_moments");
  });
}

void launch_stats_indicators(const StatsParams& p, void* stream) {
  check_objectives(p.n, "stats_indicators");
  check_chunking(p.B, p.T, p.chunk_len, p.chunks_per_row, "stats_indicators");
  const cudaStream_t s = as_stream(stream);
  const int64_t nchunks = p.B * p.chunks_per_row;
  PAMA_DISPATCH_DTYPE(p.dtype, "stats_indicators", [&] {
    launch_chunked_reduction(p, nchunks, s, indicator_partials_kernel<scalar_t>, kStatsBlock,
                             indicator_smem_bytes<acc_t>(static_cast<int>(p.n)), indicator_finalize_kernel<acc_t>,
                             kFinalizeBlock, "stats_indicators");
  });
}

void launch_pareto_weights(const WeightsParams& p, void* stream) {
  check_objectives(p.n, "pareto_weights");
  check_scratch(p.scratch, "pareto_weights");
  const cudaStream_t s = as_stream(stream);
  if (p.acc_is_double) {
    pareto_weights_kernel<double><<<1, 1, 0, s>>>(p);
  } else {
    pareto_weights_kernel<float><<<1, 1, 0, s>>>(p);
  }
  check_launch("pareto_weights_kernel");
}

}  // namespace cuda
}  // namespace pama
