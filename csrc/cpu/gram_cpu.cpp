// Ghost Gram of per-sample gradients on the CPU (see dropflat/kernels/gram.py).
//
//   K_ij = sum_{t,s} (a_it . a_js) (d_it . d_js),  a: [N, T, din], d: [N, T, dout]
//
// Pairwise and fused: no [N*T, N*T] similarity buffer (memory O(N*T*(din+dout))
// for transposed copies), and only the pairs j >= i are computed (K is
// symmetric).  For a pair, row t of the similarity matrices is built as
// sum_k a_it[k] * aT_j[k, :] over the contiguous s axis of a transposed copy
// aT_j: [din, T], so the inner loop vectorizes across positions s.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "clones.h"
#include "kernels.h"


namespace dropflat {
namespace {

// [N, T, w] -> [N, w, T]
template <typename F>
std::vector<F> transpose_positions(const F* x, int64_t N, int64_t T, int64_t w) {
  std::vector<F> out(static_cast<size_t>(N * T * w));
#pragma omp parallel for schedule(static) if (N * T * w >= (1 << 16))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < w; ++k) out[(n * w + k) * T + t] = x[(n * T + t) * w + k];
  return out;
}

// out[s] = sum_k x[k] * M[k * T + s]: one row of x_t . x_j^T for every s.  Always
// inlined, so it is compiled for the target of its (cloned) caller.
template <typename F>
inline __attribute__((always_inline)) void row_products(const F* x, const F* M, int64_t width, int64_t T,
                                                        F* out) {
  std::fill(out, out + T, F(0));
  for (int64_t k = 0; k < width; ++k) {
    const F v = x[k];
    const F* row = M + k * T;
#pragma omp simd
    for (int64_t s = 0; s < T; ++s) out[s] += v * row[s];
  }
}

// sum_t sum_s (a_it . a_js)(d_it . d_js) for one pair; ra, rd: scratch of T.
template <typename F>
DROPFLAT_CLONES("arch=x86-64-v3") double pair_value(const F* ai, const F* aTj, const F* di, const F* dTj, int64_t T,
                                       int64_t din, int64_t dout, F* ra, F* rd) {
  double acc = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    row_products(ai + t * din, aTj, din, T, ra);
    row_products(di + t * dout, dTj, dout, T, rd);
    F part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t s = 0; s < T; ++s) part += ra[s] * rd[s];
    acc += static_cast<double>(part);
  }
  return acc;
}

template <typename F>
void ghost_gram(int64_t N, int64_t T, int64_t din, int64_t dout, const F* a, const F* d, F* out) {
  const std::vector<F> aT = transpose_positions(a, N, T, din);
  const std::vector<F> dT = transpose_positions(d, N, T, dout);
  // Row i has N - i pairs: dynamic scheduling balances the triangle.
#pragma omp parallel if (N * N * T * T * (din + dout) >= (1 << 18))
  {
    std::vector<F> ra(static_cast<size_t>(T)), rd(static_cast<size_t>(T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t j = i; j < N; ++j) {
        const double v = pair_value(a + i * T * din, aT.data() + j * din * T, d + i * T * dout,
                                    dT.data() + j * dout * T, T, din, dout, ra.data(), rd.data());
        out[i * N + j] = static_cast<F>(v);
        out[j * N + i] = static_cast<F>(v);
      }
    }
  }
}

}  // namespace

void ghost_gram_cpu_f32(int64_t N, int64_t T, int64_t din, int64_t dout, const float* a, const float* d,
                        float* out) {
  ghost_gram(N, T, din, dout, a, d, out);
}

void ghost_gram_cpu_f64(int64_t N, int64_t T, int64_t din, int64_t dout, const double* a, const double* d,
                        double* out) {
  ghost_gram(N, T, din, dout, a, d, out);
}

}  // namespace dropflat
