// gram_solvers.h — the exact weighting solvers on a Gram matrix G [n, n] (docs/algorithms.md §6, "Gram
// solvers"), shared by the CPU and CUDA kernels. Included by pama_math.h; plain C++, no torch headers.
//
// Two problems over the simplex Δ = {p >= 0, Σ p = 1}, both solved in float64 whatever the input dtype:
//   MGDA    min_p  Q(p) = pᵀGp                                  (the min-norm point of the gradients)
//   CAGrad  min_p  F(p) = pᵀb + s·sqrt(pᵀGp),  b = Gw, s = c·sqrt(wᵀGw)
//
// Both are solved through the faces of Δ. On a face S (the coordinates allowed to be nonzero) the
// bordered system  [G_SS 1; 1ᵀ 0] [x; λ] = rhs  gives, for rhs = [0; 1], the min-norm point p0 of the
// affine hull of {g_i : i ∈ S} and, for rhs = [−b_S; 0], a direction p1 (1ᵀp1 = 0) with Gp1 = −b + μ1 on S.
//   MGDA's face candidate is p0.
//   CAGrad's stationarity on the face (b + κ·Gp = ν1 with κ = s/sqrt(pᵀGp)) is solved by p = p0 + p1/κ,
//   and sqrt(pᵀGp) = s/κ then reads κ²·m0 + m1 = s² (m0 = p0ᵀGp0, m1 = p1ᵀGp1, p0ᵀGp1 = 0), so
//   κ = sqrt((s² − m1)/m0) where s² > m1 and m0 > 0. A face whose optimum sits at the kink pᵀGp = 0
//   is covered by its p0 (then Gp0 = 0 and F(p0) = 0).
// Every optimum has a representative of minimal support, and on that support the bordered matrix is
// nonsingular (a null vector would be a direction along which the objective is constant, contradicting
// minimality), so the optimum is one of the face candidates.
//
//   n <= kEnumMaxN: every face is tried (2^n − 1 of them). Each finite candidate is clamped to Δ
//     (negatives to 0, renormalised) and evaluated with the exact objective; the answer is the first
//     candidate, faces in increasing bitmask order, whose objective ties with the smallest (closer than
//     kTieUlps·eps times the two values' magnitudes: rounding cannot order them, so the CPU, CUDA and
//     the reference pick the same face). Exact up to float64 rounding: extra candidates can only be
//     feasible points, never better than the optimum.
//   n > kEnumMaxN: a primal active-set method with the same face solves: from the best vertex, step
//     toward the current face's candidate, drop the coordinate that blocks the step, or, at a face
//     optimum, add the coordinate with the most negative reduced gradient; at most
//     active_set_iters(n) steps (each adds or drops one coordinate), stopping at the first optimum.
//
// G is scaled by 1/max_i G_ii first (both argmins are scale-invariant), so the tolerances below are
// relative to max_i G_ii. Any non-finite entry of G, w or c gives NaN weights (documented rule: never
// a plausible answer from garbage). All loops have fixed bounds; no host interaction (one thread).
// The working arrays (gram::Scratch, 72 KB) come from the caller: a CPU caller keeps them on its stack;
// the CUDA kernels get them in device memory, since a 72 KB stack frame would make the driver raise
// every thread's stack reservation to it (per-thread stack × resident threads: about 20 GB on an H100).
#pragma once

#include <cmath>

namespace pama {
namespace gram {

constexpr int kMaxN = 64;        // = kMaxObjectives
constexpr int kEnumMaxN = 8;     // support enumeration up to here (255 faces at n = 8)
constexpr double kTieUlps = 64.0;  // objective ties: within kTieUlps·eps of the objective's magnitude
constexpr double kEps = 2.220446049250313e-16;
PAMA_HD int active_set_iters(int n) { return 8 * n + 32; }

enum Problem : int { kMinNorm = 0, kCagrad = 1 };

struct Scratch {
  double G[kMaxN * kMaxN];            // G / max_i G_ii
  double K[(kMaxN + 1) * (kMaxN + 3)]; // bordered system of one face, two right-hand sides
  double b[kMaxN], p0[kMaxN], p1[kMaxN], q[kMaxN], cur[kMaxN], best[kMaxN], Gp[kMaxN], Ga[kMaxN];
  double wv[kMaxN];        // the user weights w (uniform when none)
  double grad[2 * kMaxN];  // solve_active_set's gradient and its error bounds
  int idx[kMaxN];
};

PAMA_HD double absd(double x) { return x < 0 ? -x : x; }

PAMA_HD double quad(const double* G, int n, const double* x) {
  double s = 0;
  for (int i = 0; i < n; ++i) {
    if (x[i] == 0) continue;
    double r = 0;
    for (int j = 0; j < n; ++j) r += G[i * n + j] * x[j];
    s += x[i] * r;
  }
  return s;
}

// pᵀGp = |Σ p_i g_i|² is 0 up to rounding (p >= 0): at or below kTieUlps·eps·pᵀ|G|p, the bound of
// its rounding error. That is CAGrad's kink, where the direction Σ p_i g_i vanishes.
PAMA_HD bool at_kink(const double* G, int n, const double* p, double* Q) {
  double q = 0, a = 0;
  for (int i = 0; i < n; ++i) {
    if (p[i] == 0) continue;
    double r = 0, ra = 0;
    for (int j = 0; j < n; ++j) {
      r += G[i * n + j] * p[j];
      ra += absd(G[i * n + j]) * p[j];
    }
    q += p[i] * r;
    a += p[i] * ra;
  }
  *Q = q;
  return !(q > kTieUlps * kEps * a);
}

// The objective at p (on Δ) and, in *mag, the magnitude its rounding error scales with
// (the same sums over |terms|): two values closer than kTieUlps·eps·(mag + mag') are a tie.
PAMA_HD double objective(const Scratch& w, int n, int problem, double s, const double* p, double* mag) {
  double Q = 0, A = 0;
  for (int i = 0; i < n; ++i) {
    if (p[i] == 0) continue;
    double r = 0, ra = 0;
    for (int j = 0; j < n; ++j) {
      r += w.G[i * n + j] * p[j];
      ra += absd(w.G[i * n + j]) * p[j];
    }
    Q += p[i] * r;
    A += p[i] * ra;
  }
  if (problem == kMinNorm) {
    *mag = A;
    return Q;
  }
  double lin = 0, la = 0;
  for (int i = 0; i < n; ++i) {
    lin += p[i] * w.b[i];
    la += p[i] * absd(w.b[i]);
  }
  *mag = la + s * std::sqrt(A);
  return lin + s * std::sqrt(Q > 0 ? Q : 0);
}

// Solves [G_SS 1; 1ᵀ 0][x; λ] = [0 | −b_S; 1 | 0] for the face S = idx[0..m), with G_SS scaled by
// 1/max_{i∈S} G_ii (x is invariant under that joint scaling). Writes p0, p1 over all n coordinates
// (0 outside S). Returns false when a pivot is 0 or the result is not finite (a singular face).
PAMA_HD bool face_solve(Scratch& w, int n, int m, bool with_b) {
  const int R = m + 1, C = m + 3;
  double sc = 0;
  for (int a = 0; a < m; ++a) sc = sc > w.G[w.idx[a] * n + w.idx[a]] ? sc : w.G[w.idx[a] * n + w.idx[a]];
  const double inv = sc > 0 ? 1.0 / sc : 1.0;
  double* K = w.K;
  for (int a = 0; a < R; ++a) {
    for (int c = 0; c < R; ++c) {
      K[a * C + c] = (a < m && c < m) ? w.G[w.idx[a] * n + w.idx[c]] * inv : (a == m && c == m ? 0.0 : 1.0);
    }
    K[a * C + m + 1] = a < m ? 0.0 : 1.0;
    K[a * C + m + 2] = (a < m && with_b) ? -w.b[w.idx[a]] * inv : 0.0;
  }
  for (int col = 0; col < R; ++col) {  // Gaussian elimination, partial pivoting
    int piv = col;
    for (int r = col + 1; r < R; ++r)
      if (absd(K[r * C + col]) > absd(K[piv * C + col])) piv = r;
    if (!(absd(K[piv * C + col]) > 0)) return false;
    if (piv != col)
      for (int c = col; c < C; ++c) {
        const double t = K[col * C + c];
        K[col * C + c] = K[piv * C + c];
        K[piv * C + c] = t;
      }
    for (int r = col + 1; r < R; ++r) {
      const double f = K[r * C + col] / K[col * C + col];
      if (f == 0) continue;
      for (int c = col; c < C; ++c) K[r * C + c] -= f * K[col * C + c];
    }
  }
  for (int rhs = m + 1; rhs < C; ++rhs) {  // back substitution
    for (int r = R - 1; r >= 0; --r) {
      double v = K[r * C + rhs];
      for (int c = r + 1; c < R; ++c) v -= K[r * C + c] * K[c * C + rhs];
      K[r * C + rhs] = v / K[r * C + r];
    }
  }
  for (int i = 0; i < n; ++i) w.p0[i] = w.p1[i] = 0;
  for (int a = 0; a < m; ++a) {
    const double x0 = K[a * C + m + 1], x1 = K[a * C + m + 2];
    if (!std::isfinite(x0) || !std::isfinite(x1)) return false;
    w.p0[w.idx[a]] = x0;
    w.p1[w.idx[a]] = x1;
  }
  return true;
}

// The face's candidate into w.q: MGDA p0; CAGrad p0 + p1/κ where that exists, else p0 (the kink).
// Sets *ray (CAGrad only) when the objective is unbounded below on the face's affine hull along p1
// (s² < m1): the active-set method then moves along p1 to the boundary.
PAMA_HD void face_candidate(Scratch& w, int n, int problem, double s, bool* ray) {
  *ray = false;
  for (int i = 0; i < n; ++i) w.q[i] = w.p0[i];
  if (problem != kCagrad) return;
  const double m0 = quad(w.G, n, w.p0), m1 = quad(w.G, n, w.p1), s2 = s * s;
  if (s2 > m1 && m0 > 0) {
    const double kappa = std::sqrt((s2 - m1) / m0);
    for (int i = 0; i < n; ++i) w.q[i] = w.p0[i] + w.p1[i] / kappa;
  } else if (s2 < m1) {
    *ray = true;
  }
}

// x clamped to Δ: negatives to 0, then divided by the sum. False when nothing positive is left.
PAMA_HD bool to_simplex(double* x, int n) {
  double t = 0;
  for (int i = 0; i < n; ++i) {
    x[i] = x[i] > 0 ? x[i] : 0;
    t += x[i];
  }
  if (!(t > 0)) return false;
  for (int i = 0; i < n; ++i) x[i] /= t;
  return true;
}

// Support enumeration (n <= kEnumMaxN). Result in w.best.
PAMA_HD void solve_enumerate(Scratch& w, int n, int problem, double s) {
  const unsigned full = (1u << n) - 1u;
  double fbest = 0, ebest = 0;
  bool have = false;
  // pass 1: the smallest objective over all face candidates; pass 2: the first candidate tying with it
  for (int pass = 0; pass < 2; ++pass) {
    for (unsigned mask = 1; mask <= full; ++mask) {
      int m = 0;
      for (int i = 0; i < n; ++i)
        if (mask & (1u << i)) w.idx[m++] = i;
      if (!face_solve(w, n, m, problem == kCagrad)) continue;
      // candidates of this face: p0 (MGDA; CAGrad's kink) and, for CAGrad, the smooth stationary point
      const int ncand = problem == kCagrad ? 2 : 1;
      for (int k = 0; k < ncand; ++k) {
        if (k == 0) {
          for (int i = 0; i < n; ++i) w.cur[i] = w.p0[i];
        } else {
          bool ray;
          face_candidate(w, n, problem, s, &ray);
          for (int i = 0; i < n; ++i) w.cur[i] = w.q[i];
        }
        if (!to_simplex(w.cur, n)) continue;
        double mag;
        const double f = objective(w, n, problem, s, w.cur, &mag);
        if (!std::isfinite(f)) continue;
        if (pass == 0) {
          if (!have || f < fbest) {
            fbest = f;
            ebest = mag;
          }
          have = true;
        } else if (f <= fbest + kTieUlps * kEps * (ebest + mag)) {
          for (int i = 0; i < n; ++i) w.best[i] = w.cur[i];
          return;
        }
      }
    }
    if (!have) break;
  }
  // unreachable for finite G (every vertex is a nonsingular face); keep a defined answer
  for (int i = 0; i < n; ++i) w.best[i] = i == 0 ? 1.0 : 0.0;
}

// Partial derivatives of the objective at p (w.cur) into grad, the face value ν = pᵀ∇ (the common
// value on the support at a face optimum) and, in err, the magnitude each grad_j − ν rounds with.
// At CAGrad's kink (pᵀGp ~ 0) the one-sided derivative toward vertex j is b_j + s·sqrt(G_jj).
PAMA_HD void gradient(Scratch& w, int n, int problem, double s, double* grad, double* nu, double* err) {
  double Q = 0, A = 0;
  for (int i = 0; i < n; ++i) {
    double r = 0, ra = 0;
    for (int j = 0; j < n; ++j) {
      r += w.G[i * n + j] * w.cur[j];
      ra += absd(w.G[i * n + j]) * w.cur[j];
    }
    w.Gp[i] = r;
    w.Ga[i] = ra;
    Q += w.cur[i] * r;
    A += w.cur[i] * ra;
  }
  if (problem == kMinNorm) {
    for (int i = 0; i < n; ++i) {
      grad[i] = w.Gp[i];
      err[i] = w.Ga[i] + A;
    }
    *nu = Q;
    return;
  }
  if (Q > kTieUlps * kEps * A) {
    const double kappa = s / std::sqrt(Q);
    double v = 0, va = 0;
    for (int i = 0; i < n; ++i) {
      grad[i] = w.b[i] + kappa * w.Gp[i];
      v += w.cur[i] * grad[i];
      va += w.cur[i] * (absd(w.b[i]) + kappa * w.Ga[i]);
    }
    for (int i = 0; i < n; ++i) err[i] = absd(w.b[i]) + kappa * w.Ga[i] + va;
    *nu = v;
  } else {
    for (int i = 0; i < n; ++i) {
      const double d = w.G[i * n + i];
      grad[i] = w.b[i] + s * std::sqrt(d > 0 ? d : 0);
      err[i] = absd(grad[i]);
    }
    *nu = 0;
  }
}

// Primal active-set method (n > kEnumMaxN). Result in w.best. grad needs 2n entries.
PAMA_HD void solve_active_set(Scratch& w, int n, int problem, double s, double* grad) {
  double* err = grad + n;
  // start at the best vertex
  int k0 = 0;
  double f0 = 0;
  for (int i = 0; i < n; ++i) {
    const double d = w.G[i * n + i];
    const double f = problem == kMinNorm ? d : w.b[i] + s * std::sqrt(d > 0 ? d : 0);
    if (i == 0 || f < f0) {
      f0 = f;
      k0 = i;
    }
  }
  bool free_[kMaxN];
  for (int i = 0; i < n; ++i) {
    w.cur[i] = i == k0 ? 1.0 : 0.0;
    free_[i] = i == k0;
  }
  // Near-ties are decided by index (the first coordinate within rounding of the best), and weights
  // at rounding level are set to 0, so that two summation orders (CPU, CUDA, the reference) take the
  // same path where G is singular and the weights are not unique.
  const double tie = kTieUlps * kEps;
  const int iters = active_set_iters(n);
  for (int it = 0; it < iters; ++it) {
    int m = 0;
    for (int i = 0; i < n; ++i)
      if (free_[i]) w.idx[m++] = i;
    bool ray = false;
    if (!face_solve(w, n, m, problem == kCagrad)) break;  // singular: only rounding leads here; keep p
    face_candidate(w, n, problem, s, &ray);
    // direction d = q − p (or p1 on a ray); the largest step in [0, 1] (any length on a ray) keeping
    // p >= 0, and the first coordinate that blocks it
    const double limit = ray ? INFINITY : 1.0;
    double tmin = limit;
    for (int a = 0; a < m; ++a) {
      const int i = w.idx[a];
      const double d = ray ? w.p1[i] : w.q[i] - w.cur[i];
      if (d < 0 && w.cur[i] / -d < tmin) tmin = w.cur[i] / -d;
    }
    int block = -1;
    for (int a = 0; a < m && tmin < limit && block < 0; ++a) {
      const int i = w.idx[a];
      const double d = ray ? w.p1[i] : w.q[i] - w.cur[i];
      if (d < 0 && w.cur[i] / -d <= tmin + tie * (1 + tmin)) block = i;
    }
    if (block < 0 && ray) break;  // unbounded with no blocking coordinate: cannot happen on Δ
    const double alpha = block >= 0 ? tmin : 1.0;
    for (int a = 0; a < m; ++a) {
      const int i = w.idx[a];
      w.cur[i] += alpha * (ray ? w.p1[i] : w.q[i] - w.cur[i]);
    }
    if (block >= 0) {
      w.cur[block] = 0;
      free_[block] = false;
    }
    for (int i = 0; i < n; ++i)
      if (w.cur[i] <= tie) w.cur[i] = 0;
    to_simplex(w.cur, n);
    if (block >= 0) continue;
    // at the face's optimum: add the first coordinate whose reduced gradient is (within rounding)
    // the most negative, or stop
    for (int i = 0; i < n; ++i) free_[i] = w.cur[i] > 0;
    double nu;
    gradient(w, n, problem, s, grad, &nu, err);
    double gmin = INFINITY;
    for (int i = 0; i < n; ++i)
      if (!free_[i] && grad[i] < nu - tie * err[i] && grad[i] < gmin) gmin = grad[i];
    int add = -1;
    for (int i = 0; i < n && add < 0; ++i)
      if (!free_[i] && grad[i] < nu - tie * err[i] && grad[i] <= gmin + tie * err[i]) add = i;
    if (add < 0) break;  // optimal
    free_[add] = true;
  }
  for (int i = 0; i < n; ++i) w.best[i] = w.cur[i];
}

// Scales G into w.G (1/max_i G_ii), sets w.b = Gw and returns s (CAGrad) in the scaled units.
// Returns false on any non-finite input.
template <typename T>
PAMA_HD bool prepare(Scratch& w, const T* G, int n, const double* wv, double c, double* s) {
  double sc = 0;
  bool finite = std::isfinite(c);
  for (int i = 0; i < n * n; ++i) finite = finite && std::isfinite(static_cast<double>(G[i]));
  for (int i = 0; i < n; ++i) {
    finite = finite && std::isfinite(wv[i]);
    const double d = static_cast<double>(G[i * n + i]);
    sc = sc > d ? sc : d;
  }
  if (!finite) return false;
  const double inv = sc > 0 ? 1.0 / sc : 1.0;
  for (int i = 0; i < n * n; ++i) w.G[i] = static_cast<double>(G[i]) * inv;
  double wGw = 0;
  for (int i = 0; i < n; ++i) {
    double r = 0;
    for (int j = 0; j < n; ++j) r += w.G[i * n + j] * wv[j];
    w.b[i] = r;
    wGw += wv[i] * r;
  }
  *s = c * std::sqrt(wGw > 0 ? wGw : 0);
  return true;
}

PAMA_HD void solve(Scratch& w, int n, int problem, double s, double* grad) {
  if (n <= kEnumMaxN)
    solve_enumerate(w, n, problem, s);
  else
    solve_active_set(w, n, problem, s, grad);
}

}  // namespace gram

// ---- §4 / §6 MGDA: argmin_{c ∈ Δ} cᵀGc (exact; see gram_solvers.h) ------------------------------
template <typename T>
PAMA_HD void mgda_weights(const T* G, int n, T* c, gram::Scratch& w) {
  double s;
  for (int i = 0; i < n; ++i) w.wv[i] = 0;
  if (!gram::prepare(w, G, n, w.wv, 0.0, &s)) {
    for (int i = 0; i < n; ++i) c[i] = static_cast<T>(NAN);
    return;
  }
  gram::solve(w, n, gram::kMinNorm, 0.0, w.grad);
  for (int i = 0; i < n; ++i) c[i] = static_cast<T>(w.best[i]);
}

// ---- §6 CAGrad (clip = false) / CAGrad-clip as in RACO (clip = true): final coefficients a [n] ----
// w: user weights [n] or nullptr (uniform). p* = argmin_{p ∈ Δ} pᵀb + s·sqrt(pᵀGp) (exact, float64);
// p̃ = min(p*, w) (clip) or p*; a = w + s/‖g_p̃‖·p̃, with a = w where ‖g_p̃‖² is 0 up to rounding
// (gram::at_kink: the direction Σ p̃_i g_i vanishes, at a Pareto-stationary point without clipping).
template <typename T>
PAMA_HD void cagrad_weights(const T* G, const T* wp, int n, T c, bool clip, T* a, gram::Scratch& w) {
  double s;
  double* wv = w.wv;
  for (int i = 0; i < n; ++i) wv[i] = wp != nullptr ? static_cast<double>(wp[i]) : 1.0 / n;
  if (!gram::prepare(w, G, n, wv, static_cast<double>(c), &s)) {
    for (int i = 0; i < n; ++i) a[i] = static_cast<T>(NAN);
    return;
  }
  gram::solve(w, n, gram::kCagrad, s, w.grad);
  double* pt = w.cur;
  for (int i = 0; i < n; ++i) pt[i] = clip ? (w.best[i] < wv[i] ? w.best[i] : wv[i]) : w.best[i];
  double nrm2;
  const double scale = gram::at_kink(w.G, n, pt, &nrm2) ? 0.0 : s / std::sqrt(nrm2);
  for (int i = 0; i < n; ++i) a[i] = static_cast<T>(wv[i] + scale * pt[i]);
}

}  // namespace pama
