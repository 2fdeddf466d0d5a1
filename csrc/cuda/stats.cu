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

template <typename A>
__global__ void __launch_bounds__(kFinalizeBlock) moments_finalize_kernel(StatsParams p) {
  const A* part = static_cast<const A*>(p.partials);
  A* row_count = static_cast<A*>(p.row_count);
  A* stats = static_cast<A*>(p.stats);
  const int n = static_cast<int>(p.n);
  finalize_moments_rows(part, n, p.B, p.chunks_per_row, row_count, threadIdx.x, blockDim.x);
  __syncthreads();  // phase 2 reads every row_count
  finalize_moments_stats(part, n, p.B, p.chunks_per_row, static_cast<const A*>(row_count), stats, threadIdx.x,
                         blockDim.x);
}

// ---- indicators ---------------------------------------------------------------------------------
// One block per chunk; the chunk is walked in tiles of kIndTile tokens staged in shared memory:
//   (a) token flags: masked-in, and masked-in with u <= 1 + eps_hi (the clip indicator);
//   (b) N tile: N_i = whiten_noon(A_i) for every objective, 0 on masked-out tokens;
//   (c) one thread per token runs pama::thm1 on the token's N vector -> per-token weights c;
//   (d) every partial entry e (sumI_i | pos_i | ctok_i | gram_ij) is owned by one thread, which
//       adds the tile's tokens to its register accumulator in token order.
// Entry e of a chunk's IndicatorPartial is thus a plain sequential sum over the chunk's tokens.
constexpr int kIndTile = 32;
constexpr int kIndPitch = kIndTile + 1;  // padded pitch of the N tile rows (avoids bank conflicts)
constexpr int kIndMaxEntries = 3 * kMaxObjectives + kMaxObjectives * kMaxObjectives;
constexpr int kIndEntriesPerThread = (kIndMaxEntries + kStatsBlock - 1) / kStatsBlock;
constexpr unsigned char kFlagIn = 1;    // masked-in token
constexpr unsigned char kFlagClip = 2;  // masked-in token with u <= 1 + eps_hi (I_i = N_i)

// Dynamic shared memory of indicator_partials_kernel: mean(n), istd(n), N[n][kIndPitch],
// c[kIndTile][n] (acc), then flags[kIndTile]. At most 34.3 KB (double, n = 64), under 48 KB.
template <typename A>
constexpr size_t indicator_smem_bytes(int n) {
  return sizeof(A) * (size_t(2 * n) + size_t(n) * kIndPitch + size_t(kIndTile) * n) + kIndTile;
}

// Adds the tile's contribution to partial entry e (see IndicatorPartial) into `acc`.
template <typename A>
__device__ __forceinline__ void accumulate_indicator_entry(int e, int n, int len, const A* sN, const A* sC,
                                                           const unsigned char* sFlag, A& acc) {
  if (e < n) {  // sumI_i: Σ I_i
    const A* row = sN + e * kIndPitch;
    for (int j = 0; j < len; ++j)
      if (sFlag[j] & kFlagClip) acc += row[j];
  } else if (e < 2 * n) {  // pos_i: #(N_i > 0)
    const A* row = sN + (e - n) * kIndPitch;
    for (int j = 0; j < len; ++j)
      if (sFlag[j] & kFlagIn) acc += row[j] > A(0) ? A(1) : A(0);
  } else if (e < 3 * n) {  // ctok_i: Σ thm1 weight c_i
    const int i = e - 2 * n;
    for (int j = 0; j < len; ++j)
      if (sFlag[j] & kFlagIn) acc += sC[j * n + i];
  } else {  // gram_ij: Σ I_i I_j
    const int g = e - 3 * n;
    const A* ri = sN + (g / n) * kIndPitch;
    const A* rj = sN + (g % n) * kIndPitch;
    for (int j = 0; j < len; ++j)
      if (sFlag[j] & kFlagClip) acc += ri[j] * rj[j];
  }
}

template <typename S>
__global__ void __launch_bounds__(kStatsBlock) indicator_partials_kernel(StatsParams p) {
  using A = acc_t_of<S>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int n = static_cast<int>(p.n);
  A* sMean = reinterpret_cast<A*>(smem_raw);
  A* sIstd = sMean + n;
  A* sN = sIstd + n;
  A* sC = sN + n * kIndPitch;
  unsigned char* sFlag = reinterpret_cast<unsigned char*>(sC + kIndTile * n);

  const S* adv = static_cast<const S*>(p.advantages);
  const S* logp = static_cast<const S*>(p.logp);
  const S* old_logp = static_cast<const S*>(p.old_logp);
  const A* stats = static_cast<const A*>(p.stats);
  A* part = static_cast<A*>(p.partials);
  const int64_t B = p.B, T = p.T, cpr = p.chunks_per_row;
  const StatsLayout L(n);
  const IndicatorPartial P(n);
  const int entries = P.size(p.with_gram);
  const A hi = A(1) + static_cast<A>(p.eps_hi);  // same form as ppo_token_loss's upper clip bound

  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    sMean[i] = stats[L.mean() + i];
    sIstd[i] = inv_std(stats[L.var() + i]);
  }
  __syncthreads();

  const int64_t nchunks = B * cpr;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const ChunkBounds cb = chunk_bounds(chunk, cpr, p.chunk_len, T);
    const int64_t b = cb.b, t_begin = cb.t_begin, t_end = cb.t_end;

    A acc[kIndEntriesPerThread];
#pragma unroll
    for (int r = 0; r < kIndEntriesPerThread; ++r) acc[r] = A(0);

    for (int64_t t0 = t_begin; t0 < t_end; t0 += kIndTile) {
      const int len = static_cast<int>(minv<int64_t>(kIndTile, t_end - t0));
      // (a) flags
      for (int j = threadIdx.x; j < kIndTile; j += blockDim.x) {
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
      for (int q = threadIdx.x; q < n * kIndTile; q += blockDim.x) {
        const int i = q / kIndTile, j = q % kIndTile;
        A v = A(0);
        if (sFlag[j] & kFlagIn)
          v = whiten_noon(load(adv, (int64_t(i) * B + b) * T + t0 + j), sMean[i], sIstd[i], p.whiten, p.noon);
        sN[i * kIndPitch + j] = v;
      }
      __syncthreads();
      // (c) Theorem-1 weights of each masked-in token
      for (int j = threadIdx.x; j < kIndTile; j += blockDim.x) {
        A* c = sC + j * n;
        for (int i = 0; i < n; ++i) c[i] = A(0);
        if (sFlag[j] & kFlagIn) thm1(sN + j, int64_t(kIndPitch), n, c, A(1));
      }
      __syncthreads();
      // (d) per-entry accumulation
#pragma unroll
      for (int r = 0; r < kIndEntriesPerThread; ++r) {
        const int e = threadIdx.x + r * kStatsBlock;
        if (e < entries) accumulate_indicator_entry(e, n, len, sN, sC, sFlag, acc[r]);
      }
      __syncthreads();  // the next tile overwrites the shared buffers
    }

    A* out = part + chunk * entries;
#pragma unroll
    for (int r = 0; r < kIndEntriesPerThread; ++r) {
      const int e = threadIdx.x + r * kStatsBlock;
      if (e < entries) out[e] = acc[r];
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kFinalizeBlock) indicator_finalize_kernel(StatsParams p) {
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
// finalize_weights is sequential by design (n <= 64, once per step): one thread.
template <typename A>
__global__ void __launch_bounds__(1) pareto_weights_kernel(WeightsParams p) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  finalize_weights(static_cast<const A*>(p.stats), p.n, p.method, p.granularity, static_cast<const A*>(p.prefs),
                   static_cast<A>(p.cagrad_c), static_cast<A*>(p.weights));
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
