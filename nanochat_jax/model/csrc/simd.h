// SIMD helpers shared by the CPU kernels (attention_cpu.cc, xent_cpu.cc, muon_cpu.cc): GCC vector types of the
// machine's widest float vector, the register-blocked matmul micro-kernel and the packed product around it, a
// transpose, a vectorised exp, and a parallel loop on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace nanochat {

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int W = 16;   // floats per SIMD vector
#else
constexpr int W = 8;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

inline float hsum(vf v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m; return m; }
inline vi iota() { vi v; for (int i = 0; i < W; ++i) v[i] = i; return v; }

constexpr int NR = 2 * W;  // micro-kernel columns

// C (R x NR) (+)= A (R x k) B (k x NR); AT: A is stored transposed, element (r, p) at A[p * lda + r] (a packed
// panel has lda = R).
// PF: prefetch B's row PF rows ahead (B read once from memory with a long row stride, which the hardware prefetchers
// do not follow across pages).
template <bool AT, int R, int PF = 0>
inline void micro(const float* A, int lda, const float* B, int ldb, float* C, int ldc, int k, bool acc) {
  vf c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    c0[r] = acc ? load(C + r * ldc) : vf{};
    c1[r] = acc ? load(C + r * ldc + W) : vf{};
  }
  for (int p = 0; p < k; ++p) {
    if constexpr (PF > 0) {
      for (int line = 0; line < NR * 4; line += 64) __builtin_prefetch(B + (p + PF) * ldb + line / 4);
    }
    const vf b0 = load(B + p * ldb), b1 = load(B + p * ldb + W);
    for (int r = 0; r < R; ++r) {
      const float a = AT ? A[p * lda + r] : A[r * lda + p];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) { store(C + r * ldc, c0[r]); store(C + r * ldc + W, c1[r]); }
}

constexpr int KC = 4096 / NR;   // k-chunk: a packed B panel (KC x NR, 16 KB) stays in L1 over a row sweep
#if defined(__AVX512F__)
constexpr int MP = 12;    // rows of a micro tile: 2 x 12 accumulators + 2 B vectors + 1 broadcast of 32 registers
#else
constexpr int MP = 6;     // 2 x 6 accumulators + 2 B vectors + 1 broadcast of 16 registers
#endif

// Packing buffers for `product`, one set per thread: the A chunk of every row (rows x KC) and one B panel.
struct Packs {
  std::vector<float> a, b;
  explicit Packs(int max_rows) : a(static_cast<size_t>(max_rows) * KC), b(KC * NR) {}
};

// C (m x n) = A (m x k) B (k x n), row-major with leading dimensions; AT: A is stored transposed (k x m, lda).
// GotoBLAS's loop order: per k-chunk, A's rows packed into panels of MP rows (4 or 2 for the last few: m is even), each
// k step's values contiguous, then per column panel the B panel packed contiguous (kc x NR) and swept by every row
// panel, so both operands stream from contiguous memory whatever their leading dimensions (power-of-two strides
// would map a panel's rows to a few cache sets). sym: C is symmetric (m == n), so only the tiles that reach the
// diagonal or lie above it are computed, and the lower triangle is then copied from the upper one.
// For one or two column panels A is read in place instead (its packing would be used once or twice: ~25% of such a
// product's multiply-adds). acc: C += A B instead. m % 2 == 0, n % NR == 0.
template <bool AT>
void product(Packs& pk, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int m, int n, int k,
             bool sym, bool acc = false) {
  float *ap = pk.a.data(), *bp = pk.b.data();
  auto rows_at = [m](int i) { return m - i >= MP ? MP : m - i >= 4 ? 4 : 2; };
  const bool pack_a = n > 2 * NR;   // A's panels are reused by every column panel: for one or two, read A in place
  for (int p0 = 0; p0 < k; p0 += KC) {
    const int kc = std::min(KC, k - p0);
    for (int i = 0; pack_a && i < m; i += rows_at(i)) {
      const int R = rows_at(i);
      float* dst = ap + i * kc;
      for (int p = 0; p < kc; ++p)
        for (int r = 0; r < R; ++r) dst[p * R + r] = AT ? A[(p0 + p) * lda + i + r] : A[(i + r) * lda + p0 + p];
    }
    for (int j = 0; j < n; j += NR) {
      for (int p = 0; p < kc; ++p) std::memcpy(bp + p * NR, B + (p0 + p) * ldb + j, NR * sizeof(float));
      const int rows = sym ? std::min(m, j + NR) : m;   // tiles starting above row j + NR reach the diagonal
      for (int i = 0; i < rows; i += rows_at(i)) {
        const int R = rows_at(i);
        float* c = C + i * ldc + j;
        const bool add = acc || p0 > 0;
        if (!pack_a) {
          const float* a = AT ? A + p0 * lda + i : A + i * lda + p0;
          if (R == MP) micro<AT, MP>(a, lda, bp, NR, c, ldc, kc, add);
          else if (R == 4) micro<AT, 4>(a, lda, bp, NR, c, ldc, kc, add);
          else micro<AT, 2>(a, lda, bp, NR, c, ldc, kc, add);
        } else if (R == MP) micro<true, MP>(ap + i * kc, MP, bp, NR, c, ldc, kc, add);
        else if (R == 4) micro<true, 4>(ap + i * kc, 4, bp, NR, c, ldc, kc, add);
        else micro<true, 2>(ap + i * kc, 2, bp, NR, c, ldc, kc, add);
      }
    }
  }
  if (sym)
    for (int i = 1; i < m; ++i)
      for (int j = 0; j < i; ++j) C[i * ldc + j] = C[j * ldc + i];
}

// dst (cols x rows, ldd) = src (rows x cols, lds)^T, in 16 x 16 blocks: a block's 16 source rows and 16 destination
// rows stay in L1 while it is copied (the row-by-row loop wrote each float to a different cache line).
inline void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  constexpr int64_t TB = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += TB)
    for (int64_t j0 = 0; j0 < cols; j0 += TB) {
      const int64_t i1 = std::min(rows, i0 + TB), j1 = std::min(cols, j0 + TB);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * ldd + i] = src[i * lds + j];
    }
}
inline void transpose(const float* src, float* dst, int64_t rows, int64_t cols) {   // (rows, cols) -> (cols, rows)
  transpose(src, cols, dst, rows, rows, cols);
}

// exp(x) for x <= 0 (scores minus their row max): x = n ln2 + r with |r| <= ln2/2, 2^n written into the exponent
// bits, e^r by Cephes' degree-6 polynomial (relative error ~1e-7). Inputs below -87 are clamped (e^-87 ~ 1.6e-38,
// far below the row sum's rounding); masked positions never reach it.
inline vf vexp(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;   // round to nearest (2^23 + 2^22 trick)
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale; std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// Runs fn(item) for item in [0, n) on XLA's intra-op thread pool and the calling thread, items handed out one by
// one; returns when every item is done. A pool task that starts late finds no item left and touches only `job`.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct Job { std::atomic<int64_t> next{0}, done{0}; };
  auto job = std::make_shared<Job>();
  std::function<void(int64_t)> body = fn;
  auto work = [job, n, &body] {
    for (int64_t i; (i = job->next.fetch_add(1)) < n;) { body(i); job->done.fetch_add(1); }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job, n, work] { work(); });
  work();
  while (job->done.load() < n) std::this_thread::yield();
}

}  // namespace nanochat
