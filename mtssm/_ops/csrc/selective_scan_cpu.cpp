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
// the adjoint recurrence through it. Work is parallel over channels c (every parameter gradient of
// a channel is owned by one task); dB and dC, which sum over the channels of a group, go to
// per-thread partial buffers reduced at the end.
//
// Layouts (all contiguous; the Python side prepares them):
//   u, z, out, pregate: (batch, dim, L)          delta: (batch, K, dim, L)
//   A: (K, dim, N)      D, delta_bias: (K, dim)  perm: (K, L) int64
//   B, C variable: (batch, K, G, L, N)  (note: L before N, so the N loop is contiguous)
//   B, C constant: (K, dim, N)
//   initial_state, last_state: (batch, K, dim, N)   chunk_states: (batch, K, dim, n_chunks, N)

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

// exp for the state transition exp(dt * A), inlined so the N loop vectorises without a call.
// float: Cephes-style range reduction + degree-6 polynomial (max rel. error 1.2e-7, i.e. fp32
// rounding); arguments below -87.3 give ~1e-38 instead of denormals. double: std::exp.
inline float exp_state(float x) {
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

inline double exp_state(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

constexpr int64_t kRowBlock = 4;      // forward: (batch, channel) rows per block
constexpr int64_t kChannelBlock = 2;  // backward: channels per block

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

// Work distribution: every thread of ATen's pool pulls blocks of [0, n) from a shared counter, so a
// thread that is descheduled (another process on a small machine) does not hold the others back,
// as an even static split would. body(worker, next) runs once per worker; next(begin, end) hands
// out the following block and returns false when none is left. Workers are numbered
// 0 .. workers(n, block) - 1, for per-worker buffers.
inline int64_t workers(int64_t n, int64_t block) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + block - 1) / block));
}

template <typename Body>
void parallel_dynamic(int64_t n, int64_t block, Body&& body) {
  std::atomic<int64_t> counter{0};
  auto next = [&](int64_t& begin, int64_t& end) {
    begin = counter.fetch_add(block);
    end = std::min(n, begin + block);
    return begin < n;
  };
  at::parallel_for(0, workers(n, block), 1, [&](int64_t w_begin, int64_t w_end) {
    for (int64_t w = w_begin; w < w_end; ++w) body(w, next);
  });
}

// Step sizes of steps [t0, t0 + len) of one row: dt = softplus?(delta[p] + bias), du = dt * u[p],
// and (for the backward) the softplus derivative sigmoid(delta[p] + bias).
template <typename T>
inline void step_sizes(const ScanShape& s, const T* delta, const T* u, const int64_t* perm, T bias,
                       int64_t t0, int64_t len, T* dt, T* du, T* dsoft) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t p = perm ? perm[t0 + i] : t0 + i;
    dt[i] = delta[p] + bias;
    du[i] = u[p];
  }
  if (s.softplus) {
    if (dsoft) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dsoft[i] = T(1) / (T(1) + std::exp(-dt[i]));
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dt[i] = dt[i] > T(20) ? dt[i] : std::log1p(std::exp(dt[i]));
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) du[i] *= dt[i];
}

// NS > 0: the state size known at compile time (the common sizes), so the N loops unroll into
// whole vectors; NS == 0: any N.
template <typename T, int NS>
void scan_forward(const ScanShape& s, const ScanArgs<T>& a, T* out, T* last_state,
                  T* chunk_states, T* pregate) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L;
  parallel_dynamic(s.batch * s.dim, kRowBlock, [&](int64_t, auto&& next) {
    std::vector<T> h(N), dts(s.chunk), dus(s.chunk);
    int64_t begin, end;
    while (next(begin, end))
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.dim, c = row % s.dim;
      const T* u = a.u + (b * s.dim + c) * L;
      T* y = out + (b * s.dim + c) * L;
      std::fill(y, y + L, T(0));
      T d_sum = T(0);
      for (int64_t k = 0; k < s.K; ++k) {
        const T* delta = a.delta + ((b * s.K + k) * s.dim + c) * L;
        const T* A = a.A + (k * s.dim + c) * N;
        const T* Bb = b_row(s, a.B, s.variable_B, b, k, c);
        const T* Cb = b_row(s, a.C, s.variable_C, b, k, c);
        const int64_t* perm = s.has_perm ? a.perm + k * L : nullptr;
        const T bias = s.has_bias ? a.bias[k * s.dim + c] : T(0);
        if (s.has_D) d_sum += a.D[k * s.dim + c];
        const int64_t srow = (b * s.K + k) * s.dim + c;
        if (s.has_init) {
          std::copy(a.init + srow * N, a.init + (srow + 1) * N, h.begin());
        } else {
          std::fill(h.begin(), h.end(), T(0));
        }
        T* cs = chunk_states + srow * s.n_chunks * N;
        for (int64_t j = 0; j < s.n_chunks; ++j) {
          const int64_t t0 = j * s.chunk, len = std::min(L, t0 + s.chunk) - t0;
          std::copy(h.begin(), h.end(), cs + j * N);
          step_sizes(s, delta, u, perm, bias, t0, len, dts.data(), dus.data(), static_cast<T*>(nullptr));
          for (int64_t i = 0; i < len; ++i) {
            const int64_t p = perm ? perm[t0 + i] : t0 + i;
            const T dt = dts[i], du = dus[i];
            const T* Bp = s.variable_B ? Bb + p * N : Bb;
            const T* Cp = s.variable_C ? Cb + p * N : Cb;
            T acc = T(0);
#pragma omp simd reduction(+ : acc)
            for (int64_t n = 0; n < N; ++n) {
              const T hn = exp_state(dt * A[n]) * h[n] + du * Bp[n];
              h[n] = hn;
              acc += Cp[n] * hn;
            }
            y[p] += acc;
          }
        }
        std::copy(h.begin(), h.end(), last_state + srow * N);
      }
      for (int64_t l = 0; l < L; ++l) {
        T o = y[l] + d_sum * u[l];
        if (s.has_z) {
          const T zl = a.z[(b * s.dim + c) * L + l];
          pregate[(b * s.dim + c) * L + l] = o;
          o = o * zl * sigmoid(zl);
        }
        y[l] = o;
      }
    }
  });
}

template <typename T, int NS>
void scan_backward(const ScanShape& s, const ScanArgs<T>& a, const T* dout, const T* dlast,
                   const T* chunk_states, const T* pregate, T* du_out, T* ddelta_out, T* dA_out,
                   T* dB_out, T* dC_out, T* dD_out, T* dz_out, T* dbias_out, T* dinit_out) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L;
  // dB / dC partials: variable -> (batch, K, G, L, N) per thread; constant -> owned by channel.
  const int64_t n_threads = workers(s.dim, kChannelBlock);
  const int64_t dBC_numel = s.batch * s.K * s.G * L * N;
  std::vector<T> dB_part(s.variable_B ? n_threads * dBC_numel : 0, T(0));
  std::vector<T> dC_part(s.variable_C ? n_threads * dBC_numel : 0, T(0));

  parallel_dynamic(s.dim, kChannelBlock, [&](int64_t tid, auto&& next) {
    T* dB_mine = s.variable_B ? dB_part.data() + tid * dBC_numel : nullptr;
    T* dC_mine = s.variable_C ? dC_part.data() + tid * dBC_numel : nullptr;
    std::vector<T> hs((s.chunk + 1) * N), as(s.chunk * N), g(N), dy(L), dA_acc(N);
    std::vector<T> dts(s.chunk), dus(s.chunk), dsoft(s.chunk);
    std::vector<T> dB_const(s.variable_B ? 0 : N), dC_const(s.variable_C ? 0 : N);
    int64_t begin, end;
    while (next(begin, end))
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t b = 0; b < s.batch; ++b) {
        const int64_t xrow = (b * s.dim + c) * L;
        const T* u = a.u + xrow;
        // d(out)/d(o) and dz; dy is the gradient reaching every direction's y.
        T d_sum = T(0);
        if (s.has_D)
          for (int64_t k = 0; k < s.K; ++k) d_sum += a.D[k * s.dim + c];
        T dD_row = T(0);
        for (int64_t l = 0; l < L; ++l) {
          T go = dout[xrow + l];
          if (s.has_z) {
            const T zl = a.z[xrow + l];
            const T sg = sigmoid(zl);
            dz_out[xrow + l] = go * pregate[xrow + l] * sg * (T(1) + zl * (T(1) - sg));
            go = go * zl * sg;
          }
          dy[l] = go;
          dD_row += go * u[l];
          du_out[xrow + l] = d_sum * go;
        }
        for (int64_t k = 0; k < s.K; ++k) {
          if (s.has_D) dD_out[k * s.dim + c] += dD_row;
          const int64_t srow = (b * s.K + k) * s.dim + c;
          const T* delta = a.delta + srow * L;
          T* ddelta = ddelta_out + srow * L;
          const T* A = a.A + (k * s.dim + c) * N;
          const T* Bb = b_row(s, a.B, s.variable_B, b, k, c);
          const T* Cb = b_row(s, a.C, s.variable_C, b, k, c);
          T* dBb = s.variable_B ? b_row(s, dB_mine, true, b, k, c) : nullptr;
          T* dCb = s.variable_C ? b_row(s, dC_mine, true, b, k, c) : nullptr;
          const int64_t* perm = s.has_perm ? a.perm + k * L : nullptr;
          const T bias = s.has_bias ? a.bias[k * s.dim + c] : T(0);
          const T* cs = chunk_states + srow * s.n_chunks * N;
          std::fill(dA_acc.begin(), dA_acc.end(), T(0));
          if (!s.variable_B) std::fill(dB_const.begin(), dB_const.end(), T(0));
          if (!s.variable_C) std::fill(dC_const.begin(), dC_const.end(), T(0));
          T dbias_acc = T(0);
          if (dlast) {
            std::copy(dlast + srow * N, dlast + (srow + 1) * N, g.begin());
          } else {
            std::fill(g.begin(), g.end(), T(0));
          }
          // g holds dL/dh_t + (not yet) C_t * dy_t: we carry a_{t+1} * g_{t+1} between steps.
          for (int64_t j = s.n_chunks - 1; j >= 0; --j) {
            const int64_t t0 = j * s.chunk, len = std::min(L, t0 + s.chunk) - t0;
            step_sizes(s, delta, u, perm, bias, t0, len, dts.data(), dus.data(), dsoft.data());
            // Recompute states h_{t0-1} .. h_{t0+len-1} into hs[0 .. len] and exp(dt*A) into as.
            std::copy(cs + j * N, cs + (j + 1) * N, hs.begin());
            for (int64_t i = 0; i < len; ++i) {
              const int64_t p = perm ? perm[t0 + i] : t0 + i;
              const T dt = dts[i], dux = dus[i];
              const T* Bp = s.variable_B ? Bb + p * N : Bb;
              const T* hp = hs.data() + i * N;
              T* hn = hs.data() + (i + 1) * N;
              T* at = as.data() + i * N;
#pragma omp simd
              for (int64_t n = 0; n < N; ++n) {
                at[n] = exp_state(dt * A[n]);
                hn[n] = at[n] * hp[n] + dux * Bp[n];
              }
            }
            for (int64_t i = len - 1; i >= 0; --i) {
              const int64_t p = perm ? perm[t0 + i] : t0 + i;
              const T dt = dts[i], dux = dus[i];
              const T up = u[p];
              const T dyp = dy[p];
              const T* Bp = s.variable_B ? Bb + p * N : Bb;
              const T* Cp = s.variable_C ? Cb + p * N : Cb;
              const T* hp = hs.data() + i * N;        // h_{t-1}
              const T* hc = hs.data() + (i + 1) * N;  // h_t
              const T* at = as.data() + i * N;
              T* dBp = s.variable_B ? dBb + p * N : dB_const.data();
              T* dCp = s.variable_C ? dCb + p * N : dC_const.data();
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
              du_out[xrow + p] += d_dux * dt;
              d_dt += d_dux * up;
              const T d_raw = s.softplus ? d_dt * dsoft[i] : d_dt;
              ddelta[p] = d_raw;
              dbias_acc += d_raw;
            }
          }
          if (s.has_init) std::copy(g.begin(), g.end(), dinit_out + srow * N);
          T* dA = dA_out + (k * s.dim + c) * N;
          for (int64_t n = 0; n < N; ++n) dA[n] += dA_acc[n];
          if (!s.variable_B)
            for (int64_t n = 0; n < N; ++n) dB_out[(k * s.dim + c) * N + n] += dB_const[n];
          if (!s.variable_C)
            for (int64_t n = 0; n < N; ++n) dC_out[(k * s.dim + c) * N + n] += dC_const[n];
          if (s.has_bias) dbias_out[k * s.dim + c] += dbias_acc;
        }
      }
    }
  });
  // Reduce the per-thread partials of variable B / C.
  auto reduce = [&](const std::vector<T>& part, T* dst) {
    at::parallel_for(0, dBC_numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T acc = T(0);
        for (int64_t th = 0; th < n_threads; ++th) acc += part[th * dBC_numel + i];
        dst[i] = acc;
      }
    });
  };
  if (s.variable_B) reduce(dB_part, dB_out);
  if (s.variable_C) reduce(dC_part, dC_out);
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

}  // namespace

// Returns (out, last_state, chunk_states, pregate); pregate is empty without z.
std::vector<at::Tensor> scan_fwd(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B,
                                 at::Tensor C, at::Tensor D, at::Tensor z, at::Tensor bias,
                                 at::Tensor init, at::Tensor perm, bool softplus_flag,
                                 int64_t chunk) {
  const ScanShape s = make_shape(u, delta, A, B, C, D, z, bias, init, perm, softplus_flag, chunk);
  auto out = at::empty_like(u);
  auto last = at::empty({s.batch, s.K, s.dim, s.N}, u.options());
  auto chunk_states = at::empty({s.batch, s.K, s.dim, s.n_chunks, s.N}, u.options());
  auto pregate = s.has_z ? at::empty_like(u) : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mtssm_scan_fwd", [&] {
    const auto a = make_args<scalar_t>(s, u, delta, A, B, C, D, z, bias, init, perm);
    dispatch_state_size(s.N, [&](auto ns) {
      scan_forward<scalar_t, decltype(ns)::value>(
          s, a, out.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(),
          chunk_states.data_ptr<scalar_t>(), s.has_z ? pregate.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {out, last, chunk_states, pregate};
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, dbias, dinit); absent inputs give empty tensors.
// dB / dC come back in the layout they were given in ((batch, K, G, L, N) or (K, dim, N)).
std::vector<at::Tensor> scan_bwd(at::Tensor dout, at::Tensor dlast, at::Tensor u,
                                 at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C,
                                 at::Tensor D, at::Tensor z, at::Tensor bias, at::Tensor init,
                                 at::Tensor perm, at::Tensor chunk_states, at::Tensor pregate,
                                 bool softplus_flag, int64_t chunk) {
  const ScanShape s = make_shape(u, delta, A, B, C, D, z, bias, init, perm, softplus_flag, chunk);
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
  const bool has_dlast = dlast.defined() && dlast.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "mtssm_scan_bwd", [&] {
    const auto a = make_args<scalar_t>(s, u, delta, A, B, C, D, z, bias, init, perm);
    dispatch_state_size(s.N, [&](auto ns) {
    scan_backward<scalar_t, decltype(ns)::value>(
        s, a, dout.data_ptr<scalar_t>(), has_dlast ? dlast.data_ptr<scalar_t>() : nullptr,
        chunk_states.data_ptr<scalar_t>(), s.has_z ? pregate.data_ptr<scalar_t>() : nullptr,
        du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
        dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(),
        s.has_D ? dD.data_ptr<scalar_t>() : nullptr, s.has_z ? dz.data_ptr<scalar_t>() : nullptr,
        s.has_bias ? dbias.data_ptr<scalar_t>() : nullptr,
        s.has_init ? dinit.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {du, ddelta, dA, dB, dC, dD, dz, dbias, dinit};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd", &scan_fwd, "mtssm selective scan forward (CPU)");
  m.def("scan_bwd", &scan_bwd, "mtssm selective scan backward (CPU)");
}
