// CPU kernels of the mtssm selective-scan family.
//
// One kernel serves the 1-D selective scan (K = 1, identity order) and the fused K-direction 2-D
// scan (K visit orders given by an index table), so neither materialises flipped or transposed
// copies of its input. Rows are (batch b, direction k, channel c); row (b, k, c) runs
//
//     t = 0..L-1, p = perm[k, t] (or t)
//     dt  = softplus?(delta[b, k, c, p] + delta_bias[k, c])
//     h   = exp(dt * A[k, c, :]) * h + dt * u[b, c, p] * B[b, k, g, :, p]
//     y[b, c, p] += <C[b, k, g, :, p], h>
//
// from h = initial_state[b, k, c] (or 0), with g = c / (dim / G). Then
//     o   = y + (sum_k D[k, c]) * u,   out = o * silu(z)   (no z: out = o).
//
// Memory: the forward keeps the state only at chunk starts (chunk_states); the backward walks the
// chunks from last to first, recomputes the states of one chunk into a (chunk, N) buffer and runs
// the adjoint recurrence through it. Work items are groups of channels (every parameter gradient of
// a channel is owned by one item) that walk L chunk by chunk over all their channels, so one
// chunk's rows of B and C (and of their gradients) are shared from cache by the group; dB and dC,
// which sum over the channels of a group, go to per-worker partial buffers reduced at the end.
//
// Two kernel layouts compute this. scan_forward / scan_backward vectorise each step over the N
// state entries of one channel; scan_forward_lanes / scan_backward_lanes (variable B and C, small N)
// vectorise over kLanes channels, B and C of the step being broadcast scalars (see use_lanes).
//
// Kernel layouts (all contiguous; the op wrappers at the end of this file prepare them):
//   u, z, out, pregate: (batch, dim, L)          delta: (batch, K, dim, L)
//   A: (K, dim, N)      D, delta_bias: (K, dim)  perm: (K, L) int64
//   B, C variable: (batch, K, G, L, N)  (note: L before N, so the N loop is contiguous)
//   B, C constant: (K, dim, N)
//   initial_state, last_state: (batch, K, dim, N)   chunk_states: (batch, K, dim, n_chunks, N)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

namespace {

// exp, vectorisable (inlined, no libm call) for float: Cephes-style range reduction + degree-6
// polynomial (max rel. error 1.2e-7, i.e. fp32 rounding); arguments below -87.3 give ~1e-38
// instead of denormals. double: std::exp.
inline float fast_exp(float x) {
  x = std::fmin(std::fmax(x, -87.3f), 88.7f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = std::fma(n, 2.12194440e-4f, std::fma(n, -0.693359375f, x));
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), vectorisable for float: with e = exp(-|x|) in (0, 1]
// and s = e / (2 + e) in (0, 1/3], log1p(e) = 2 atanh(s) = 2 (s + s^3/3 + ... + s^13/13)
// (truncation error below 1e-8). double: libm.
inline float softplus(float x) {
  const float e = fast_exp(-std::fabs(x));
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = std::fma(p, s2, 1.0f / 11.0f);
  p = std::fma(p, s2, 1.0f / 9.0f);
  p = std::fma(p, s2, 1.0f / 7.0f);
  p = std::fma(p, s2, 1.0f / 5.0f);
  p = std::fma(p, s2, 1.0f / 3.0f);
  p = std::fma(p, s2, 1.0f);
  return std::fmax(x, 0.0f) + 2.0f * s * p;
}

inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

struct ScanShape {
  int64_t batch, dim, K, G, L, N, chunk, n_chunks;
  bool variable_B, variable_C, has_D, has_z, has_bias, has_init, has_perm, softplus;
};

// Raw pointers of one call, typed.
template <typename T>
struct ScanArgs {
  const T* u;
  const T* delta;
  const T* A;
  const T* B;
  const T* C;
  const T* D;
  const T* z;
  const T* bias;
  const T* init;
  const int64_t* perm;
};

// Variable B/C: start of the (L, N) block of (b, k, group of c); constant: the (N,) row of c.
template <typename P>
inline P b_row(const ScanShape& s, P base, bool variable, int64_t b, int64_t k, int64_t c) {
  if (variable) {
    const int64_t g = c / (s.dim / s.G);
    return base + ((b * s.K + k) * s.G + g) * s.L * s.N;
  }
  return base + (k * s.dim + c) * s.N;
}

// The pointers and scalars of one scan row (b, k, c).
template <typename T>
struct Row {
  const T* delta;  // (L,) in spatial order
  const T* A;      // (N,)
  const T* B;      // (L, N) variable, (N,) constant
  const T* C;
  const int64_t* perm;  // (L,) visit order, or null for 0..L-1
  T bias;
  int64_t srow;  // (b, k, c) index into per-row state tensors

  Row(const ScanShape& s, const ScanArgs<T>& a, int64_t b, int64_t k, int64_t c)
      : delta(a.delta + ((b * s.K + k) * s.dim + c) * s.L),
        A(a.A + (k * s.dim + c) * s.N),
        B(b_row(s, a.B, s.variable_B, b, k, c)),
        C(b_row(s, a.C, s.variable_C, b, k, c)),
        perm(s.has_perm ? a.perm + k * s.L : nullptr),
        bias(s.has_bias ? a.bias[k * s.dim + c] : T(0)),
        srow((b * s.K + k) * s.dim + c) {}
};

// Scratch memory that each thread keeps between calls, grown to the largest request (Slot tells
// apart buffers a thread uses at the same time). Large buffers allocated per call would be mapped
// and page-faulted in afresh on every call (glibc maps blocks above its mmap threshold directly).
// Contents are undefined on return.
template <typename T, int Slot>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer = std::vector<T>(n);
  return buffer.data();
}

// Hands out consecutive pieces of one scratch block.
template <typename T>
struct Carve {
  T* next;
  T* take(int64_t n) {
    T* piece = next;
    next += n;
    return piece;
  }
};

// Work distribution: every thread of ATen's pool pulls items of [0, n) from a shared counter, so a
// thread that is descheduled (another process on a small machine) does not hold the others back,
// as an even static split would. body(worker, item) runs once per item; workers are numbered
// 0 .. workers(n) - 1, for per-worker buffers, and each worker creates its buffers once
// (make_local(worker)) and hands them to every item it runs.
inline int64_t workers(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
}

template <typename MakeLocal, typename Body>
void parallel_dynamic(int64_t n, MakeLocal&& make_local, Body&& body) {
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, workers(n), 1, [&](int64_t w_begin, int64_t w_end) {
    for (int64_t w = w_begin; w < w_end; ++w) {
      auto local = make_local(w);
      for (int64_t item = counter.fetch_add(1); item < n; item = counter.fetch_add(1)) {
        body(local, item);
      }
    }
  });
}

// Channels per work item. The items walk L chunk by chunk over all their channels, so the B / C
// rows (and their gradients) of a chunk are read from cache by every channel of the group instead
// of streaming the whole (L, N) block once per channel; small dims use smaller groups so that
// every thread still gets several items.
constexpr int64_t kMaxGroup = 8;

inline int64_t group_size(int64_t dim) {
  return std::clamp<int64_t>(dim / (4 * at::get_num_threads()), 1, kMaxGroup);
}

// Given dt = delta + bias and du = u over n entries: dsoft = sigmoid(dt) (the softplus derivative,
// if wanted), dt = softplus(dt), u_raw = u (if wanted), du = dt * u.
template <typename T>
inline void finish_step_sizes(bool use_softplus, int64_t n, T* dt, T* du, T* dsoft, T* u_raw) {
  if (use_softplus) {
    if (dsoft) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dsoft[i] = sigmoid(dt[i]);
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dt[i] = softplus(dt[i]);
  }
  if (u_raw) std::copy(du, du + n, u_raw);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) du[i] *= dt[i];
}

// Step sizes of steps [t0, t0 + len) of one row: dt = softplus?(delta[p] + bias), du = dt * u[p],
// and (for the backward) the softplus derivative sigmoid(delta[p] + bias).
template <typename T>
inline void step_sizes(bool use_softplus, const Row<T>& r, const T* u, int64_t t0, int64_t len,
                       T* dt, T* du, T* dsoft) {
  if (r.perm) {
    for (int64_t i = 0; i < len; ++i) {
      const int64_t p = r.perm[t0 + i];
      dt[i] = r.delta[p] + r.bias;
      du[i] = u[p];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      dt[i] = r.delta[t0 + i] + r.bias;
      du[i] = u[t0 + i];
    }
  }
  finish_step_sizes(use_softplus, len, dt, du, dsoft, static_cast<T*>(nullptr));
}

// K == 1 in spatial order: each output position gets its y from one step, so the epilogue (forward)
// and dy (backward) run per chunk while it is in cache. Otherwise (several directions, or a visit
// order that scatters a chunk over the map) y accumulates over whole rows first.
inline bool per_chunk(const ScanShape& s) { return s.K == 1 && !s.has_perm; }

// out[l] = (y[l] + d_sum * u[l]) (* silu(z[l])) over [l0, l1) of row (b, c), once every direction
// has added its y (see per_chunk).
template <typename T>
void epilogue_row(const ScanShape& s, const ScanArgs<T>& a, T* out, T* pregate, int64_t b,
                  int64_t c, T d_sum, int64_t l0, int64_t l1) {
  const int64_t x = (b * s.dim + c) * s.L;
  const T* u = a.u + x;
  T* y = out + x;
  if (s.has_z) {
    const T* z = a.z + x;
    T* pre = pregate + x;
#pragma omp simd
    for (int64_t l = l0; l < l1; ++l) {
      const T o = y[l] + d_sum * u[l];
      pre[l] = o;
      y[l] = o * z[l] * sigmoid(z[l]);
    }
  } else {
#pragma omp simd
    for (int64_t l = l0; l < l1; ++l) y[l] += d_sum * u[l];
  }
}

// NS > 0: the state size known at compile time (the common sizes), so the N loops unroll into
// whole vectors; NS == 0: any N.
//
// One item is (batch b, a group of channels); for every direction k it walks the chunks in order
// and, inside a chunk, every channel of the group, carrying each channel's state h between chunks.
template <typename T, int NS>
void scan_forward(const ScanShape& s, const ScanArgs<T>& a, T* out, T* last_state,
                  T* chunk_states, T* pregate) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L;
  const int64_t cg = group_size(s.dim), n_groups = (s.dim + cg - 1) / cg;
  struct Local {
    std::vector<T> h, dts, dus;
  };
  auto make_local = [&](int64_t) { return Local{std::vector<T>(cg * N), std::vector<T>(s.chunk), std::vector<T>(s.chunk)}; };
  parallel_dynamic(s.batch * n_groups, make_local, [&](Local& w, int64_t item) {
    const int64_t b = item / n_groups, c0 = (item % n_groups) * cg, c1 = std::min(s.dim, c0 + cg);
    T d_sum[kMaxGroup] = {};
    if (!per_chunk(s)) std::fill(out + (b * s.dim + c0) * L, out + (b * s.dim + c1) * L, T(0));
    for (int64_t k = 0; k < s.K; ++k) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t srow = (b * s.K + k) * s.dim + c;
        T* h = w.h.data() + (c - c0) * N;
        if (s.has_init) {
          std::copy(a.init + srow * N, a.init + (srow + 1) * N, h);
        } else {
          std::fill(h, h + N, T(0));
        }
        if (s.has_D) d_sum[c - c0] += a.D[k * s.dim + c];
      }
      for (int64_t j = 0; j < s.n_chunks; ++j) {
        const int64_t t0 = j * s.chunk, len = std::min(L, t0 + s.chunk) - t0;
        for (int64_t c = c0; c < c1; ++c) {
          const Row<T> r(s, a, b, k, c);
          const T* u = a.u + (b * s.dim + c) * L;
          T* y = out + (b * s.dim + c) * L;
          T* h = w.h.data() + (c - c0) * N;
          const T* A = r.A;
          std::copy(h, h + N, chunk_states + (r.srow * s.n_chunks + j) * N);
          step_sizes(s.softplus, r, u, t0, len, w.dts.data(), w.dus.data(), static_cast<T*>(nullptr));
          for (int64_t i = 0; i < len; ++i) {
            const int64_t p = r.perm ? r.perm[t0 + i] : t0 + i;
            const T dt = w.dts[i], du = w.dus[i];
            const T* Bp = s.variable_B ? r.B + p * N : r.B;
            const T* Cp = s.variable_C ? r.C + p * N : r.C;
            T acc = T(0);
#pragma omp simd reduction(+ : acc)
            for (int64_t n = 0; n < N; ++n) {
              const T hn = fast_exp(dt * A[n]) * h[n] + du * Bp[n];
              h[n] = hn;
              acc += Cp[n] * hn;
            }
            if (!per_chunk(s)) {
              y[p] += acc;  // directions add up
            } else {
              y[p] = acc;
            }
          }
          if (per_chunk(s)) epilogue_row(s, a, out, pregate, b, c, d_sum[c - c0], t0, t0 + len);
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t srow = (b * s.K + k) * s.dim + c;
        std::copy(w.h.data() + (c - c0) * N, w.h.data() + (c - c0 + 1) * N, last_state + srow * N);
      }
    }
    if (!per_chunk(s))
      for (int64_t c = c0; c < c1; ++c) epilogue_row(s, a, out, pregate, b, c, d_sum[c - c0], 0, L);
  });
}

// Lanes layout for small state sizes: the channels of a group are the vector lanes (kLanes of
// them, padded), so every operation of a step is one vector operation over the group while B and C
// of the step are broadcast scalars; with N-wide vectors (scan_forward) a state of 4 fills a
// quarter of a register. A lane group lies inside one B/C group (it shares B and C).
//
// The group's rows (u, delta, y and their gradients) are worked on lane-interleaved, (L, kLanes)
// (position-major), copied in and out once per row: a step at position p then reads and writes
// one short vector at p * kLanes, where the row layout would touch kLanes cache lines (a visit
// order that runs across rows, e.g. column-major, reuses none of them for many steps).
constexpr int64_t kLanes = 8;
constexpr int64_t kMaxLanesState = 16;

struct LaneGroups {
  int64_t per_bc, per_g, count;  // channels per B/C group, lane groups per B/C group, total
  LaneGroups(const ScanShape& s)
      : per_bc(s.dim / s.G), per_g((s.dim / s.G + kLanes - 1) / kLanes), count(s.G * per_g) {}
  // First channel and number of active lanes of lane group q.
  std::pair<int64_t, int64_t> range(int64_t q) const {
    const int64_t c0 = (q / per_g) * per_bc + (q % per_g) * kLanes;
    return {c0, std::min(kLanes, (q / per_g + 1) * per_bc - c0)};
  }
};

// dst[l * kLanes + i] = rows[i * row_stride + l] for the nl active lanes i, 0 for the others.
template <typename T>
void interleave(const T* rows, int64_t row_stride, int64_t nl, int64_t L, T* dst) {
  constexpr int64_t kBlock = 256;  // positions per block: kLanes rows of it stay in L1
  for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
    const int64_t l1 = std::min(L, l0 + kBlock);
    for (int64_t i = 0; i < kLanes; ++i) {
      const T* src = rows + i * row_stride;
      for (int64_t l = l0; l < l1; ++l) dst[l * kLanes + i] = i < nl ? src[l] : T(0);
    }
  }
}

// rows[i * row_stride + l] (+)= src[l * kLanes + i] for the nl active lanes i.
template <typename T, bool kAdd>
void deinterleave(const T* src, int64_t nl, int64_t L, T* rows, int64_t row_stride) {
  constexpr int64_t kBlock = 256;
  for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
    const int64_t l1 = std::min(L, l0 + kBlock);
    for (int64_t i = 0; i < nl; ++i) {
      T* dst = rows + i * row_stride;
      for (int64_t l = l0; l < l1; ++l) {
        if constexpr (kAdd) {
          dst[l] += src[l * kLanes + i];
        } else {
          dst[l] = src[l * kLanes + i];
        }
      }
    }
  }
}

// Step sizes of steps [t0, t0 + len) from the interleaved delta and u, lane-interleaved
// (dt[i * kLanes + l]); padded lanes (delta = u = bias = 0) keep a zero state. dsoft as in
// step_sizes; u_raw (optional) receives u.
template <typename T>
inline void lane_step_sizes(bool use_softplus, const T* delta, const T* u, const T* bias,
                            const int64_t* perm, int64_t t0, int64_t len, T* dt, T* du, T* dsoft,
                            T* u_raw) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t p = perm ? perm[t0 + i] : t0 + i;
    const T* dp = delta + p * kLanes;
    const T* up = u + p * kLanes;
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      dt[i * kLanes + l] = dp[l] + bias[l];
      du[i * kLanes + l] = up[l];
    }
  }
  finish_step_sizes(use_softplus, len * kLanes, dt, du, dsoft, u_raw);
}

// Per-direction constants of a lane group, lane vectors: A (N of them), delta bias, and the state
// (initial state or 0) / the carried dL/dh (dlast or 0). Padded lanes are 0.
template <typename T>
void lane_constants(const ScanShape& s, const ScanArgs<T>& a, const T* state_in, int64_t srow0,
                    int64_t k, int64_t c0, int64_t nl, int64_t N, T* A, T* bias, T* state) {
  std::fill(A, A + N * kLanes, T(0));
  std::fill(state, state + N * kLanes, T(0));
  std::fill(bias, bias + kLanes, T(0));
  for (int64_t l = 0; l < nl; ++l) {
    for (int64_t n = 0; n < N; ++n) {
      A[n * kLanes + l] = a.A[(k * s.dim + c0 + l) * N + n];
      if (state_in) state[n * kLanes + l] = state_in[(srow0 + l) * N + n];
    }
    if (s.has_bias) bias[l] = a.bias[k * s.dim + c0 + l];
  }
}

template <typename T, int NS>
void scan_forward_lanes(const ScanShape& s, const ScanArgs<T>& a, T* out, T* last_state,
                        T* chunk_states, T* pregate) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L, V = kLanes;
  const LaneGroups lg(s);
  struct Local {
    T *h, *A, *bias, *dts, *dus, *u, *delta, *y;
  };
  auto make_local = [&](int64_t) {
    Carve<T> m{thread_scratch<T, 0>((2 * N + 1 + 2 * s.chunk + 3 * L) * V)};
    return Local{m.take(N * V), m.take(N * V), m.take(V), m.take(s.chunk * V),
                 m.take(s.chunk * V), m.take(L * V), m.take(L * V), m.take(L * V)};
  };
  parallel_dynamic(s.batch * lg.count, make_local, [&](Local& w, int64_t item) {
    const int64_t b = item / lg.count;
    const auto [c0, nl] = lg.range(item % lg.count);
    const int64_t grp = c0 / lg.per_bc;
    T* h = w.h;
    T* y = w.y;
    T d_sum[kLanes] = {};
    interleave(a.u + (b * s.dim + c0) * L, L, nl, L, w.u);
    std::fill(y, y + L * V, T(0));
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t bc = ((b * s.K + k) * s.G + grp) * L * N;
      const int64_t srow0 = (b * s.K + k) * s.dim + c0;
      const int64_t* perm = s.has_perm ? a.perm + k * L : nullptr;
      interleave(a.delta + srow0 * L, L, nl, L, w.delta);
      lane_constants(s, a, s.has_init ? a.init : nullptr, srow0, k, c0, nl, N, w.A,
                     w.bias, h);
      if (s.has_D)
        for (int64_t l = 0; l < nl; ++l) d_sum[l] += a.D[k * s.dim + c0 + l];
      for (int64_t j = 0; j < s.n_chunks; ++j) {
        const int64_t t0 = j * s.chunk, len = std::min(L, t0 + s.chunk) - t0;
        for (int64_t l = 0; l < nl; ++l)
          for (int64_t n = 0; n < N; ++n)
            chunk_states[((srow0 + l) * s.n_chunks + j) * N + n] = h[n * V + l];
        lane_step_sizes(s.softplus, w.delta, w.u, w.bias, perm, t0, len,
                        w.dts, w.dus, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
        for (int64_t i = 0; i < len; ++i) {
          const int64_t p = perm ? perm[t0 + i] : t0 + i;
          const T* Bp = a.B + bc + p * N;
          const T* Cp = a.C + bc + p * N;
          const T* dt = w.dts + i * V;
          const T* du = w.dus + i * V;
          T* yp = y + p * V;
          for (int64_t n = 0; n < N; ++n) {
            const T bn = Bp[n], cn = Cp[n];
            T* hn = h + n * V;
            const T* An = w.A + n * V;
#pragma omp simd
            for (int64_t l = 0; l < V; ++l) {
              const T v = fast_exp(dt[l] * An[l]) * hn[l] + du[l] * bn;
              hn[l] = v;
              yp[l] += cn * v;  // directions add up
            }
          }
        }
      }
      for (int64_t l = 0; l < nl; ++l)
        for (int64_t n = 0; n < N; ++n) last_state[(srow0 + l) * N + n] = h[n * V + l];
    }
    deinterleave<T, false>(y, nl, L, out + (b * s.dim + c0) * L, L);
    for (int64_t l = 0; l < nl; ++l) epilogue_row(s, a, out, pregate, b, c0 + l, d_sum[l], 0, L);
  });
}

// Per-worker partial sums of variable dB and dC, (batch, K, G, L, N) each, zeroed; the backward
// kernels add a step's dB / dC (a sum over the channels of a B/C group) into their worker's own.
template <typename T>
struct BCPartials {
  int64_t n_workers, numel;
  T* base;  // n_workers dB blocks, then n_workers dC blocks
  BCPartials(const ScanShape& s, int64_t workers)
      : n_workers(workers), numel(s.batch * s.K * s.G * s.L * s.N),
        base(thread_scratch<T, 1>(2 * workers * numel)) {
    std::fill(base, base + 2 * n_workers * numel, T(0));
  }
  T* dB(int64_t w) const { return base + w * numel; }
  T* dC(int64_t w) const { return base + (n_workers + w) * numel; }
  // dst[i] = the sum over workers of part[w * numel + i] (part: dB(0) or dC(0)).
  void reduce(const T* part, T* dst) const {
    at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T acc = T(0);
        for (int64_t w = 0; w < n_workers; ++w) acc += part[w * numel + i];
        dst[i] = acc;
      }
    });
  }
};

// Over [l0, l1) of row (b, c): dz, dy (the gradient reaching every direction's y, into the row's
// dy buffer, indexed by l), the D-skip part of du; returns the row's part of dD (see per_chunk).
template <typename T>
T dy_segment(const ScanShape& s, const ScanArgs<T>& a, const T* dout, const T* pregate, T* du_out,
             T* dz_out, T* dy, int64_t b, int64_t c, int64_t l0, int64_t l1) {
  const int64_t x = (b * s.dim + c) * s.L;
  const T* u = a.u + x;
  const T* go = dout + x;
  T d_sum = T(0);
  if (s.has_D)
    for (int64_t k = 0; k < s.K; ++k) d_sum += a.D[k * s.dim + c];
  if (s.has_z) {
    const T* z = a.z + x;
    const T* pre = pregate + x;
    T* dz = dz_out + x;
#pragma omp simd
    for (int64_t l = l0; l < l1; ++l) {
      const T sg = sigmoid(z[l]);
      dz[l] = go[l] * pre[l] * sg * (T(1) + z[l] * (T(1) - sg));
      dy[l] = go[l] * z[l] * sg;
    }
  } else {
    std::copy(go + l0, go + l1, dy + l0);
  }
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t l = l0; l < l1; ++l) {
    acc += dy[l] * u[l];
    du_out[x + l] = d_sum * dy[l];
  }
  return acc;
}

// The adjoint of scan_forward. One item is a group of channels (all batches, so every parameter
// gradient of a channel has one writer); for every (b, k) it walks the chunks from last to first
// and, inside a chunk, every channel of the group: it recomputes the chunk's states from the
// stored chunk start into a (chunk, N) buffer and runs the adjoint recurrence through it, carrying
// each channel's dL/dh between chunks. dB and dC, which sum over the channels sharing a B/C group,
// go to per-worker partial buffers reduced at the end.
template <typename T, int NS>
void scan_backward(const ScanShape& s, const ScanArgs<T>& a, const T* dout, const T* dlast,
                   const T* chunk_states, const T* pregate, T* du_out, T* ddelta_out, T* dA_out,
                   T* dB_out, T* dC_out, T* dD_out, T* dz_out, T* dbias_out, T* dinit_out) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L;
  const int64_t cg = group_size(s.dim), n_groups = (s.dim + cg - 1) / cg;
  // dB / dC partials: variable -> (batch, K, G, L, N) per worker; constant -> owned by channel.
  const BCPartials<T> parts(s, workers(n_groups));

  struct Local {
    T* dB_mine;
    T* dC_mine;
    // Per chunk: recomputed states, transitions, step sizes. Per channel of the group: dy over L,
    // the carried dL/dh and the parameter-gradient accumulators.
    std::vector<T> hs, as, dts, dus, dsoft, dy, g, dA_acc, dB_const, dC_const;
  };
  auto make_local = [&](int64_t w) {
    return Local{s.variable_B ? parts.dB(w) : nullptr, s.variable_C ? parts.dC(w) : nullptr,
                 std::vector<T>((s.chunk + 1) * N), std::vector<T>(s.chunk * N),
                 std::vector<T>(s.chunk), std::vector<T>(s.chunk), std::vector<T>(s.chunk),
                 std::vector<T>(cg * L), std::vector<T>(cg * N), std::vector<T>(cg * N),
                 std::vector<T>(cg * N), std::vector<T>(cg * N)};
  };
  parallel_dynamic(n_groups, make_local, [&](Local& w, int64_t item) {
    const int64_t c0 = item * cg, c1 = std::min(s.dim, c0 + cg);
    for (int64_t b = 0; b < s.batch; ++b) {
      T dD_row[kMaxGroup] = {};
      if (!per_chunk(s))
        for (int64_t c = c0; c < c1; ++c) dD_row[c - c0] = dy_segment(s, a, dout, pregate, du_out, dz_out, w.dy.data() + (c - c0) * L, b, c, 0, L);
      for (int64_t k = 0; k < s.K; ++k) {
        T dbias_acc[kMaxGroup] = {};
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t srow = (b * s.K + k) * s.dim + c, o = (c - c0) * N;
          if (dlast) {
            std::copy(dlast + srow * N, dlast + (srow + 1) * N, w.g.begin() + o);
          } else {
            std::fill(w.g.begin() + o, w.g.begin() + o + N, T(0));
          }
          std::fill(w.dA_acc.begin() + o, w.dA_acc.begin() + o + N, T(0));
          std::fill(w.dB_const.begin() + o, w.dB_const.begin() + o + N, T(0));
          std::fill(w.dC_const.begin() + o, w.dC_const.begin() + o + N, T(0));
        }
        for (int64_t j = s.n_chunks - 1; j >= 0; --j) {
          const int64_t t0 = j * s.chunk, len = std::min(L, t0 + s.chunk) - t0;
          for (int64_t c = c0; c < c1; ++c) {
            const Row<T> r(s, a, b, k, c);
            const int64_t x = (b * s.dim + c) * L, o = (c - c0) * N;
            const T* u = a.u + x;
            const T* A = r.A;
            const T* dy = w.dy.data() + (c - c0) * L;
            T* ddelta = ddelta_out + r.srow * L;
            T* dBb = s.variable_B ? b_row(s, w.dB_mine, true, b, k, c) : w.dB_const.data() + o;
            T* dCb = s.variable_C ? b_row(s, w.dC_mine, true, b, k, c) : w.dC_const.data() + o;
            T* g = w.g.data() + o;
            T* dA_acc = w.dA_acc.data() + o;
            T* hs = w.hs.data();
            T* as = w.as.data();
            if (per_chunk(s)) dD_row[c - c0] += dy_segment(s, a, dout, pregate, du_out, dz_out, w.dy.data() + (c - c0) * L, b, c, t0, t0 + len);
            step_sizes(s.softplus, r, u, t0, len, w.dts.data(), w.dus.data(), w.dsoft.data());
            // Recompute states h_{t0-1} .. h_{t0+len-1} into hs[0 .. len] and exp(dt*A) into as.
            std::copy(chunk_states + (r.srow * s.n_chunks + j) * N,
                      chunk_states + (r.srow * s.n_chunks + j + 1) * N, hs);
            for (int64_t i = 0; i < len; ++i) {
              const int64_t p = r.perm ? r.perm[t0 + i] : t0 + i;
              const T dt = w.dts[i], dux = w.dus[i];
              const T* Bp = s.variable_B ? r.B + p * N : r.B;
              const T* hp = hs + i * N;
              T* hn = hs + (i + 1) * N;
              T* at = as + i * N;
#pragma omp simd
              for (int64_t n = 0; n < N; ++n) {
                at[n] = fast_exp(dt * A[n]);
                hn[n] = at[n] * hp[n] + dux * Bp[n];
              }
            }
            T dbias = T(0);
            for (int64_t i = len - 1; i >= 0; --i) {
              const int64_t p = r.perm ? r.perm[t0 + i] : t0 + i;
              const T dt = w.dts[i], dux = w.dus[i];
              const T dyp = dy[p];
              const T* Bp = s.variable_B ? r.B + p * N : r.B;
              const T* Cp = s.variable_C ? r.C + p * N : r.C;
              const T* hp = hs + i * N;        // h_{t-1}
              const T* hc = hs + (i + 1) * N;  // h_t
              const T* at = as + i * N;
              T* dBp = s.variable_B ? dBb + p * N : dBb;
              T* dCp = s.variable_C ? dCb + p * N : dCb;
              T d_dux = T(0), d_dt = T(0);
#pragma omp simd reduction(+ : d_dux, d_dt)
              for (int64_t n = 0; n < N; ++n) {
                const T gn = g[n] + Cp[n] * dyp;  // dL/dh_t
                dCp[n] += dyp * hc[n];
                dBp[n] += gn * dux;
                d_dux += gn * Bp[n];
                const T da = gn * hp[n] * at[n];  // dL/d(dt*A[n])
                d_dt += da * A[n];
                dA_acc[n] += da * dt;
                g[n] = gn * at[n];  // dL/dh_{t-1} through this step
              }
              du_out[x + p] += d_dux * dt;
              d_dt += d_dux * u[p];
              const T d_raw = s.softplus ? d_dt * w.dsoft[i] : d_dt;
              ddelta[p] = d_raw;
              dbias += d_raw;
            }
            dbias_acc[c - c0] += dbias;
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t srow = (b * s.K + k) * s.dim + c, o = (c - c0) * N, pc = (k * s.dim + c) * N;
          if (s.has_init) std::copy(w.g.begin() + o, w.g.begin() + o + N, dinit_out + srow * N);
          for (int64_t n = 0; n < N; ++n) dA_out[pc + n] += w.dA_acc[o + n];
          if (!s.variable_B)
            for (int64_t n = 0; n < N; ++n) dB_out[pc + n] += w.dB_const[o + n];
          if (!s.variable_C)
            for (int64_t n = 0; n < N; ++n) dC_out[pc + n] += w.dC_const[o + n];
          if (s.has_bias) dbias_out[k * s.dim + c] += dbias_acc[c - c0];
          if (s.has_D) dD_out[k * s.dim + c] += dD_row[c - c0];
        }
      }
    }
  });
  if (s.variable_B) parts.reduce(parts.dB(0), dB_out);
  if (s.variable_C) parts.reduce(parts.dC(0), dC_out);
}

// The adjoint of scan_forward_lanes (variable B and C). One item is a lane group (all batches, so
// every parameter gradient of its channels has one writer); per (b, k) it walks the chunks from
// last to first, recomputes the chunk's states and runs the adjoint recurrence on whole lane
// vectors, on interleaved u, dy, delta and du / ddelta rows; dB and dC of a step are sums over the
// lanes, into per-worker partials as in scan_backward.
template <typename T, int NS>
void scan_backward_lanes(const ScanShape& s, const ScanArgs<T>& a, const T* dout, const T* dlast,
                         const T* chunk_states, const T* pregate, T* du_out, T* ddelta_out,
                         T* dA_out, T* dB_out, T* dC_out, T* dD_out, T* dz_out, T* dbias_out,
                         T* dinit_out) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L, V = kLanes;
  const LaneGroups lg(s);
  const BCPartials<T> parts(s, workers(lg.count));
  struct Local {
    T* dB_mine;
    T* dC_mine;
    // Per chunk: states and transitions, step sizes (lane-interleaved). Lane vectors of A, the
    // delta bias, the carried dL/dh and dA. Interleaved rows: u, dy, delta, du, ddelta. dy rows.
    T *hs, *as, *dts, *dus, *dsoft, *ub, *A, *bias, *g, *dA_acc, *u, *dy, *delta, *du, *ddelta, *dy_rows;
  };
  auto make_local = [&](int64_t w) {
    const int64_t c = s.chunk * V;
    Carve<T> m{thread_scratch<T, 0>((2 * s.chunk + 1) * N * V + 4 * c + (3 * N + 1) * V + 6 * L * V)};
    return Local{parts.dB(w), parts.dC(w),
                 m.take((s.chunk + 1) * N * V), m.take(s.chunk * N * V), m.take(c), m.take(c),
                 m.take(c), m.take(c), m.take(N * V), m.take(V), m.take(N * V), m.take(N * V),
                 m.take(L * V), m.take(L * V), m.take(L * V), m.take(L * V), m.take(L * V),
                 m.take(L * V)};
  };
  parallel_dynamic(lg.count, make_local, [&](Local& w, int64_t item) {
    const auto [c0, nl] = lg.range(item);
    const int64_t grp = c0 / lg.per_bc;
    T* g = w.g;
    T* dA_acc = w.dA_acc;
    for (int64_t b = 0; b < s.batch; ++b) {
      T dD_row[kLanes] = {};
      for (int64_t l = 0; l < nl; ++l)
        dD_row[l] = dy_segment(s, a, dout, pregate, du_out, dz_out, w.dy_rows + l * L, b, c0 + l, 0, L);
      interleave(w.dy_rows, L, nl, L, w.dy);
      interleave(a.u + (b * s.dim + c0) * L, L, nl, L, w.u);
      std::fill(w.du, w.du + L * V, T(0));
      for (int64_t k = 0; k < s.K; ++k) {
        const int64_t bc = ((b * s.K + k) * s.G + grp) * L * N;
        const int64_t srow0 = (b * s.K + k) * s.dim + c0;
        const int64_t* perm = s.has_perm ? a.perm + k * L : nullptr;
        interleave(a.delta + srow0 * L, L, nl, L, w.delta);
        lane_constants(s, a, dlast, srow0, k, c0, nl, N, w.A, w.bias, g);
        std::fill(dA_acc, dA_acc + N * V, T(0));
        T dbias[kLanes] = {};
        for (int64_t j = s.n_chunks - 1; j >= 0; --j) {
          const int64_t t0 = j * s.chunk, len = std::min(L, t0 + s.chunk) - t0;
          lane_step_sizes(s.softplus, w.delta, w.u, w.bias, perm, t0, len,
                          w.dts, w.dus, w.dsoft, w.ub);
          T* hs = w.hs;
          for (int64_t l = 0; l < V; ++l)  // the chunk's start state
            for (int64_t n = 0; n < N; ++n)
              hs[n * V + l] = l < nl ? chunk_states[((srow0 + l) * s.n_chunks + j) * N + n] : T(0);
          for (int64_t i = 0; i < len; ++i) {  // states h_{t0} .. into hs[1 ..], exp(dt*A) into as
            const int64_t p = perm ? perm[t0 + i] : t0 + i;
            const T* Bp = a.B + bc + p * N;
            const T* dt = w.dts + i * V;
            const T* du = w.dus + i * V;
            for (int64_t n = 0; n < N; ++n) {
              const T bn = Bp[n];
              const T* An = w.A + n * V;
              const T* hp = hs + (i * N + n) * V;
              T* hn = hs + ((i + 1) * N + n) * V;
              T* at = w.as + (i * N + n) * V;
#pragma omp simd
              for (int64_t l = 0; l < V; ++l) {
                at[l] = fast_exp(dt[l] * An[l]);
                hn[l] = at[l] * hp[l] + du[l] * bn;
              }
            }
          }
          for (int64_t i = len - 1; i >= 0; --i) {
            const int64_t p = perm ? perm[t0 + i] : t0 + i;
            const T* Bp = a.B + bc + p * N;
            const T* Cp = a.C + bc + p * N;
            T* dBp = w.dB_mine + bc + p * N;
            T* dCp = w.dC_mine + bc + p * N;
            const T* dt = w.dts + i * V;
            const T* dux = w.dus + i * V;
            const T* dyp = w.dy + p * V;
            T d_dux[kLanes] = {}, d_dt[kLanes] = {};
            for (int64_t n = 0; n < N; ++n) {
              const T bn = Bp[n], cn = Cp[n];
              const T* An = w.A + n * V;
              const T* hp = hs + (i * N + n) * V;        // h_{t-1}
              const T* hc = hs + ((i + 1) * N + n) * V;  // h_t
              const T* at = w.as + (i * N + n) * V;
              T* gv = g + n * V;
              T* dAn = dA_acc + n * V;
              T sc = T(0), sb = T(0);
#pragma omp simd reduction(+ : sc, sb)
              for (int64_t l = 0; l < V; ++l) {
                const T gn = gv[l] + cn * dyp[l];  // dL/dh_t
                sc += dyp[l] * hc[l];
                sb += gn * dux[l];
                d_dux[l] += gn * bn;
                const T da = gn * hp[l] * at[l];  // dL/d(dt*A[n])
                d_dt[l] += da * An[l];
                dAn[l] += da * dt[l];
                gv[l] = gn * at[l];  // dL/dh_{t-1} through this step
              }
              dCp[n] += sc;
              dBp[n] += sb;
            }
            const T* ui = w.ub + i * V;
            const T* ds = w.dsoft + i * V;
            T* dup = w.du + p * V;
            T* ddp = w.ddelta + p * V;
#pragma omp simd
            for (int64_t l = 0; l < V; ++l) {
              dup[l] += d_dux[l] * dt[l];
              const T dd = d_dt[l] + d_dux[l] * ui[l];
              ddp[l] = s.softplus ? dd * ds[l] : dd;
              dbias[l] += ddp[l];
            }
          }
        }
        deinterleave<T, false>(w.ddelta, nl, L, ddelta_out + srow0 * L, L);
        for (int64_t l = 0; l < nl; ++l) {
          const int64_t srow = srow0 + l, pc = (k * s.dim + c0 + l) * N;
          for (int64_t n = 0; n < N; ++n) {
            if (s.has_init) dinit_out[srow * N + n] = g[n * V + l];
            dA_out[pc + n] += dA_acc[n * V + l];
          }
          if (s.has_bias) dbias_out[k * s.dim + c0 + l] += dbias[l];
          if (s.has_D) dD_out[k * s.dim + c0 + l] += dD_row[l];
        }
      }
      deinterleave<T, true>(w.du, nl, L, du_out + (b * s.dim + c0) * L, L);
    }
  });
  parts.reduce(parts.dB(0), dB_out);
  parts.reduce(parts.dC(0), dC_out);
}

// The lanes kernels serve variable B and C up to N = 16. Measured against the N-vectorised kernels
// on the 4-direction 2-D scan (112x144 map, dim 32, 2 threads): forward 2.4x, backward 1.6x at
// N = 4, 1.0x / 1.04x at N = 16; on 1-D scans in spatial order they are about even up to N = 16 and
// slower beyond.
inline bool use_lanes(const ScanShape& s) {
  return s.variable_B && s.variable_C && s.N <= kMaxLanesState;
}

// Calls fn(std::integral_constant<int, NS>) with NS = N for the common state sizes, else 0.
template <typename Fn>
void dispatch_state_size(int64_t N, Fn&& fn) {
  switch (N) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

ScanShape make_shape(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                     const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                     const at::Tensor& z, const at::Tensor& bias, const at::Tensor& init,
                     const at::Tensor& perm, bool softplus_flag, int64_t chunk) {
  ScanShape s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.L = u.size(2);
  s.K = delta.size(1);
  s.N = A.size(2);
  s.variable_B = B.dim() == 5;
  s.variable_C = C.dim() == 5;
  s.G = s.variable_B ? B.size(2) : (s.variable_C ? C.size(2) : 1);
  TORCH_CHECK(!(s.variable_B && s.variable_C) || B.size(2) == C.size(2),
              "B and C must have the same number of groups");
  s.chunk = std::max<int64_t>(1, chunk);
  s.n_chunks = std::max<int64_t>(1, (s.L + s.chunk - 1) / s.chunk);
  s.has_D = D.defined() && D.numel() > 0;
  s.has_z = z.defined() && z.numel() > 0;
  s.has_bias = bias.defined() && bias.numel() > 0;
  s.has_init = init.defined() && init.numel() > 0;
  s.has_perm = perm.defined() && perm.numel() > 0;
  s.softplus = softplus_flag;
  return s;
}

template <typename T>
ScanArgs<T> make_args(const ScanShape& s, const at::Tensor& u, const at::Tensor& delta,
                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                      const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias,
                      const at::Tensor& init, const at::Tensor& perm) {
  ScanArgs<T> a;
  a.u = u.data_ptr<T>();
  a.delta = delta.data_ptr<T>();
  a.A = A.data_ptr<T>();
  a.B = B.data_ptr<T>();
  a.C = C.data_ptr<T>();
  a.D = s.has_D ? D.data_ptr<T>() : nullptr;
  a.z = s.has_z ? z.data_ptr<T>() : nullptr;
  a.bias = s.has_bias ? bias.data_ptr<T>() : nullptr;
  a.init = s.has_init ? init.data_ptr<T>() : nullptr;
  a.perm = s.has_perm ? perm.data_ptr<int64_t>() : nullptr;
  return a;
}

// ---------------------------------------------------------------------------------------------
// The ops: argument checks, layout preparation, dispatch to the kernels.
// ---------------------------------------------------------------------------------------------

using OptTensor = std::optional<at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// fp64 when u, delta, A, B or C is fp64, else fp32 (fp16 and bf16 are computed in fp32).
at::ScalarType compute_dtype(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& C) {
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C}) {
    if (t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

void check_dims(const at::Tensor& t, const char* name, const char* layout,
                std::initializer_list<int64_t> want) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(want.size()), "mtssm::selective_scan: ", name,
              " must be ", layout, ", got shape ", t.sizes());
  int64_t i = 0;
  for (int64_t w : want) {
    TORCH_CHECK(w < 0 || t.size(i) == w, "mtssm::selective_scan: ", name, " must be ", layout,
                ", got shape ", t.sizes());
    ++i;
  }
}

// Checks every input against u: (batch, dim, L), delta: (batch, K, dim, L), A: (K, dim, N).
void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                  const OptTensor& z, const OptTensor& bias, const OptTensor& init,
                  const OptTensor& perm, int64_t chunk) {
  check_dims(u, "u", "(batch, dim, L)", {-1, -1, -1});
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  check_dims(delta, "delta", "(batch, K, dim, L) like u", {batch, -1, dim, L});
  const int64_t K = delta.size(1);
  check_dims(A, "A", "(K, dim, N)", {K, dim, -1});
  const int64_t N = A.size(2);
  int64_t groups = -1;
  for (auto [M, name] : {std::pair{&B, "B"}, std::pair{&C, "C"}}) {
    if (M->dim() == 3) {
      check_dims(*M, name, "(K, dim, N) or (batch, K, G, N, L)", {K, dim, N});
      continue;
    }
    check_dims(*M, name, "(batch, K, G, N, L) or (K, dim, N)", {batch, K, -1, N, L});
    const int64_t G = M->size(2);
    TORCH_CHECK(G >= 1 && dim % G == 0, "mtssm::selective_scan: dim = ", dim,
                " must be divisible by the groups G = ", G, " of ", name);
    TORCH_CHECK(groups < 0 || groups == G, "mtssm::selective_scan: B and C must have the same "
                "number of groups, got ", groups, " and ", G);
    groups = G;
  }
  if (present(D)) check_dims(*D, "D", "(K, dim)", {K, dim});
  if (present(bias)) check_dims(*bias, "delta_bias", "(K, dim)", {K, dim});
  if (present(z)) check_dims(*z, "z", "(batch, dim, L) like u", {batch, dim, L});
  if (present(init)) check_dims(*init, "initial_state", "(batch, K, dim, N)", {batch, K, dim, N});
  if (present(perm)) check_dims(*perm, "perm", "(K, L)", {K, L});
  TORCH_CHECK(chunk >= 1, "mtssm::selective_scan: chunk_size must be >= 1, got ", chunk);
}

at::Tensor prep(const at::Tensor& t, at::ScalarType cdt) { return t.to(cdt).contiguous(); }

at::Tensor prep(const OptTensor& t, at::ScalarType cdt, const at::Tensor& empty) {
  return present(t) ? prep(*t, cdt) : empty;
}

// Variable B/C (batch, K, G, N, L) to the kernel's (batch, K, G, L, N), converted in the same copy.
at::Tensor prep_bc(const at::Tensor& M, at::ScalarType cdt) {
  if (M.dim() != 5) return prep(M, cdt);
  auto out = at::empty({M.size(0), M.size(1), M.size(2), M.size(4), M.size(3)},
                       M.options().dtype(cdt));
  out.copy_(M.transpose(-1, -2));
  return out;
}

at::Tensor prep_perm(const OptTensor& perm, const at::Tensor& u) {
  return present(perm) ? perm->to(at::kLong).contiguous()
                       : at::empty({0}, u.options().dtype(at::kLong));
}

// The op's inputs in the kernels' layouts: contiguous, in the compute dtype, variable B and C as
// (batch, K, G, L, N), perm int64; absent optional inputs are the empty tensor ``empty``.
struct KernelInputs {
  at::Tensor u, delta, A, B, C, D, z, bias, init, perm, empty;

  KernelInputs(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
               const at::Tensor& B_in, const at::Tensor& C_in, const OptTensor& D_in,
               const OptTensor& z_in, const OptTensor& bias_in, const OptTensor& init_in,
               const OptTensor& perm_in, at::ScalarType cdt)
      : u(prep(u_in, cdt)),
        delta(prep(delta_in, cdt)),
        A(prep(A_in, cdt)),
        B(prep_bc(B_in, cdt)),
        C(prep_bc(C_in, cdt)),
        empty(at::empty({0}, u_in.options().dtype(cdt))) {
    D = prep(D_in, cdt, empty);
    z = prep(z_in, cdt, empty);
    bias = prep(bias_in, cdt, empty);
    init = prep(init_in, cdt, empty);
    perm = prep_perm(perm_in, u);
  }
};

// Returns (out, last_state, chunk_states, pregate); see the schema in TORCH_LIBRARY below.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> selective_scan_cpu(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const OptTensor& D_in, const OptTensor& z_in,
    const OptTensor& bias_in, const OptTensor& init_in, const OptTensor& perm_in,
    bool softplus_flag, int64_t chunk) {
  check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, init_in, perm_in, chunk);
  const auto cdt = compute_dtype(u_in, delta_in, A_in, B_in, C_in);
  const KernelInputs in(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, init_in, perm_in,
                        cdt);
  const auto& [u, delta, A, B, C, D, z, bias, init, perm, empty] = in;
  const ScanShape s = make_shape(u, delta, A, B, C, D, z, bias, init, perm, softplus_flag, chunk);
  auto out = at::empty_like(u);
  auto last = at::empty({s.batch, s.K, s.dim, s.N}, u.options());
  auto chunk_states = at::empty({s.batch, s.K, s.dim, s.n_chunks, s.N}, u.options());
  auto pregate = s.has_z ? at::empty_like(u) : empty;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mtssm_scan_fwd", [&] {
    const auto a = make_args<scalar_t>(s, u, delta, A, B, C, D, z, bias, init, perm);
    dispatch_state_size(s.N, [&](auto ns) {
      auto fwd = use_lanes(s) ? scan_forward_lanes<scalar_t, decltype(ns)::value>
                              : scan_forward<scalar_t, decltype(ns)::value>;
      fwd(
          s, a, out.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(),
          chunk_states.data_ptr<scalar_t>(), s.has_z ? pregate.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {out.to(u_in.scalar_type()), last, chunk_states, pregate};
}

// The gradient of one input in its own dtype (contiguous), or an empty tensor for an absent one.
at::Tensor grad_as(const at::Tensor& g, const OptTensor& input, const at::Tensor& u_in) {
  return present(input) ? g.to(input->scalar_type()).contiguous() : at::empty({0}, u_in.options());
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) in the inputs' shapes and
// dtypes; absent optional inputs give empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
selective_scan_backward_cpu(const at::Tensor& dout_in, const OptTensor& dlast_in,
                            const at::Tensor& u_in, const at::Tensor& delta_in,
                            const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& C_in,
                            const OptTensor& D_in, const OptTensor& z_in,
                            const OptTensor& bias_in, const OptTensor& init_in,
                            const OptTensor& perm_in, const at::Tensor& chunk_states,
                            const at::Tensor& pregate, bool softplus_flag, int64_t chunk) {
  check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, init_in, perm_in, chunk);
  const auto cdt = chunk_states.scalar_type();
  TORCH_CHECK(cdt == compute_dtype(u_in, delta_in, A_in, B_in, C_in),
              "mtssm::selective_scan_backward: chunk_states has dtype ", cdt,
              ", not the forward's compute dtype");
  const KernelInputs in(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, init_in, perm_in,
                        cdt);
  const auto& [u, delta, A, B, C, D, z, bias, init, perm, empty] = in;
  const auto dout = prep(dout_in, cdt), dlast = prep(dlast_in, cdt, empty);
  const ScanShape s = make_shape(u, delta, A, B, C, D, z, bias, init, perm, softplus_flag, chunk);
  check_dims(dout, "dout", "(batch, dim, L) like u", {s.batch, s.dim, s.L});
  check_dims(chunk_states, "chunk_states", "(batch, K, dim, n_chunks, N)",
             {s.batch, s.K, s.dim, s.n_chunks, s.N});
  TORCH_CHECK(chunk_states.is_contiguous(), "mtssm::selective_scan_backward: chunk_states must "
              "be contiguous");
  if (s.has_z) {
    check_dims(pregate, "pregate", "(batch, dim, L) like u", {s.batch, s.dim, s.L});
    TORCH_CHECK(pregate.scalar_type() == cdt && pregate.is_contiguous(),
                "mtssm::selective_scan_backward: pregate must be contiguous in the compute dtype");
  }
  const bool has_dlast = dlast.numel() > 0;
  if (has_dlast) check_dims(dlast, "dlast_state", "(batch, K, dim, N)", {s.batch, s.K, s.dim, s.N});
  auto opts = u.options();
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(delta);
  auto dA = at::zeros_like(A);
  auto dB = at::zeros_like(B);
  auto dC = at::zeros_like(C);
  auto dD = s.has_D ? at::zeros_like(D) : at::empty({0}, opts);
  auto dz = s.has_z ? at::empty_like(z) : at::empty({0}, opts);
  auto dbias = s.has_bias ? at::zeros_like(bias) : at::empty({0}, opts);
  auto dinit = s.has_init ? at::empty_like(init) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mtssm_scan_bwd", [&] {
    const auto a = make_args<scalar_t>(s, u, delta, A, B, C, D, z, bias, init, perm);
    dispatch_state_size(s.N, [&](auto ns) {
      auto bwd = use_lanes(s) ? scan_backward_lanes<scalar_t, decltype(ns)::value>
                              : scan_backward<scalar_t, decltype(ns)::value>;
      bwd(
          s, a, dout.data_ptr<scalar_t>(), has_dlast ? dlast.data_ptr<scalar_t>() : nullptr,
          chunk_states.data_ptr<scalar_t>(), s.has_z ? pregate.data_ptr<scalar_t>() : nullptr,
          du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
          dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(),
          s.has_D ? dD.data_ptr<scalar_t>() : nullptr, s.has_z ? dz.data_ptr<scalar_t>() : nullptr,
          s.has_bias ? dbias.data_ptr<scalar_t>() : nullptr,
          s.has_init ? dinit.data_ptr<scalar_t>() : nullptr);
    });
  });
  // The kernels give variable dB / dC in their (batch, K, G, L, N) layout.
  if (s.variable_B) dB = dB.transpose(-1, -2);
  if (s.variable_C) dC = dC.transpose(-1, -2);
  return {grad_as(du, u_in, u_in),       grad_as(ddelta, delta_in, u_in),
          grad_as(dA, A_in, u_in),       grad_as(dB, B_in, u_in),
          grad_as(dC, C_in, u_in),       grad_as(dD, D_in, u_in),
          grad_as(dz, z_in, u_in),       grad_as(dbias, bias_in, u_in),
          grad_as(dinit, init_in, u_in)};
}

}  // namespace

// The schemas of the mtssm scan ops: the one definition of their signatures. Where this library
// cannot be built, mtssm/_ops/_library.py reads these strings from this file and defines the same
// ops from Python. Keep each schema as C string literals inside one m.def( ... ).
//
// mtssm::selective_scan: the unified K-direction scan (shapes in the comment at the top of this
// file, before the kernels' own layouts: B, C variable are (batch, K, G, N, L) here). Returns
// (out (batch, dim, L) in u's dtype, last_state (batch, K, dim, N), chunk_states
// (batch, K, dim, n_chunks, N), pregate (batch, dim, L), empty without z), the last three in the
// compute dtype (fp64 when u, delta, A, B or C is fp64, else fp32).
// mtssm::selective_scan_backward: the gradients of the inputs, in their shapes and dtypes.
TORCH_LIBRARY(mtssm, m) {
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, Tensor? initial_state, Tensor? perm, bool delta_softplus, "
      "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_backward(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, "
      "Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "Tensor? initial_state, Tensor? perm, Tensor chunk_states, Tensor pregate, "
      "bool delta_softplus, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtssm, CPU, m) {
  m.impl("selective_scan", &selective_scan_cpu);
  m.impl("selective_scan_backward", &selective_scan_backward_cpu);
}
