// Muon's orthogonalisation for XLA:CPU in fp32: the Polar Express / Newton-Schulz polynomial iteration over a stack
// of matrices, called through the XLA FFI (nanochat_jax/model/attention_cpu.py builds this file and registers it).
//
// Why: XLA:CPU runs each product of the iteration over the whole stack in turn and splits every small (m x m)
// product over the threads, so the stack's operands cross the caches once per product; here one thread carries one
// matrix through all its iterations while its m x m operands stay in its caches, and every product whose result is
// symmetric (X X^T, and any product of two polynomials in the same Gram matrix, which commute) computes only the
// tiles that reach the diagonal or lie above it and mirrors them: about half the multiply-adds.
//
// The stack w (k, r, c) is row-major, in our (in, out) layout. Not right: X = w is wide (m = r <= n = c); A = X X^T
// and X <- p(A) X. right: w is tall (m = c), X = w^T; A = w^T w and w <- w p(A) (the transpose of the same step).
// p(A) = a I + b A + c A^2 with coeffs[s] = (a, b, c) for iteration s. gram: the polynomial is carried on the small
// A instead (A <- A p(A)^2, Q <- p(A) Q) and X is multiplied once, by Q, at the end (optim/muon.py, _iterate_gram).
// Requirements, checked in Python: r % 32 == 0 and c % 32 == 0.

#include <utility>
#include <vector>

#include "simd.h"

namespace {

using namespace nanochat;

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
// GotoBLAS's loop order: per k-chunk, A's rows packed into panels of MP rows (2 for the last few: m is even), each
// k step's values contiguous, then per column panel the B panel packed contiguous (kc x NR) and swept by every row
// panel, so both operands stream from contiguous memory whatever their leading dimensions (power-of-two strides
// would map a panel's rows to a few cache sets). sym: C is symmetric (m == n), so only the tiles that reach the
// diagonal or lie above it are computed, and the lower triangle is then copied from the upper one.
// m % 2 == 0, n % NR == 0.
template <bool AT>
void product(Packs& pk, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int m, int n, int k,
             bool sym) {
  float *ap = pk.a.data(), *bp = pk.b.data();
  auto rows_at = [m](int i) { return m - i >= MP ? MP : 2; };
  for (int p0 = 0; p0 < k; p0 += KC) {
    const int kc = std::min(KC, k - p0);
    for (int i = 0; i < m; i += rows_at(i)) {
      const int R = rows_at(i);
      float* dst = ap + i * kc;
      for (int p = 0; p < kc; ++p)
        for (int r = 0; r < R; ++r) dst[p * R + r] = AT ? A[(p0 + p) * lda + i + r] : A[(i + r) * lda + p0 + p];
    }
    for (int j = 0; j < n; j += NR) {
      for (int p = 0; p < kc; ++p) std::memcpy(bp + p * NR, B + (p0 + p) * ldb + j, NR * sizeof(float));
      const int rows = sym ? std::min(m, j + NR) : m;   // tiles starting above row j + NR reach the diagonal
      for (int i = 0; i < rows; i += rows_at(i)) {
        if (rows_at(i) == MP) micro<true, MP>(ap + i * kc, MP, bp, NR, C + i * ldc + j, ldc, kc, p0 > 0);
        else micro<true, 2>(ap + i * kc, 2, bp, NR, C + i * ldc + j, ldc, kc, p0 > 0);
      }
    }
  }
  if (sym)
    for (int i = 1; i < m; ++i)
      for (int j = 0; j < i; ++j) C[i * ldc + j] = C[j * ldc + i];
}

struct Iteration {
  int64_t r, c;          // one matrix of the stack, our layout
  bool right, gram;
  const float* coeffs;   // (steps, 3)
  int steps;
  int m() const { return right ? c : r; }   // the short side: A is m x m
  int n() const { return right ? r : c; }
};

// One matrix: w (r x c) -> out (r x c).
void iterate(const Iteration& s, const float* w, float* out) {
  const int m = s.m(), n = s.n();
  if (s.steps == 0) { std::memcpy(out, w, sizeof(float) * m * n); return; }
  Packs pk(std::max(m, n));
  std::vector<float> buf(5 * m * m + (s.right ? 0 : n * m) + (s.gram ? 0 : 2 * m * n));
  float *A = buf.data(), *A2 = A + m * m, *P = A2 + m * m, *T = P + m * m, *Q = T + m * m, *Xt = Q + m * m;
  float* X0 = Xt + (s.right ? 0 : n * m);
  // A = X X^T of the current X (x is w's layout: m x n wide, or n x m tall)
  auto gram_of = [&](const float* x) {
    if (s.right) {
      product<true>(pk, x, m, x, m, A, m, m, m, n, true);
    } else {
      transpose(x, Xt, m, n);
      product<false>(pk, x, n, Xt, m, A, m, m, m, n, true);
    }
  };
  // P = a I + b A + c A^2 for iteration it (A2 holds A^2)
  auto poly = [&](int it) {
    const float a = s.coeffs[3 * it], b = s.coeffs[3 * it + 1], c = s.coeffs[3 * it + 2];
    for (int i = 0; i < m * m; ++i) P[i] = b * A[i] + c * A2[i];
    for (int i = 0; i < m; ++i) P[i * m + i] += a;
  };
  // out = X P (right) or P X, for the m x m matrix P
  auto apply = [&](const float* Pm, const float* x, float* y) {
    if (s.right) product<false>(pk, x, m, Pm, m, y, m, n, m, m, false);
    else product<false>(pk, Pm, m, x, n, y, n, m, n, m, false);
  };
  if (s.gram) {
    gram_of(w);
    for (int it = 0; it < s.steps; ++it) {
      product<false>(pk, A, m, A, m, A2, m, m, m, m, true);
      poly(it);
      if (it == 0) {
        std::memcpy(Q, P, sizeof(float) * m * m);
      } else {
        product<false>(pk, P, m, Q, m, T, m, m, m, m, true);
        std::swap(Q, T);
      }
      if (it + 1 < s.steps) {                             // A <- A P^2
        product<false>(pk, P, m, P, m, A2, m, m, m, m, true);
        product<false>(pk, A, m, A2, m, T, m, m, m, m, true);
        std::swap(A, T);
      }
    }
    apply(Q, w, out);
    return;
  }
  const float* x = w;
  for (int it = 0; it < s.steps; ++it) {   // X0 holds two m x n buffers: iteration it writes X0[it % 2]
    gram_of(x);
    product<false>(pk, A, m, A, m, A2, m, m, m, m, true);
    poly(it);
    float* y = it + 1 == s.steps ? out : X0 + (it % 2) * m * n;
    apply(P, x, y);
    x = y;
  }
}

ffi::Error PolarIterate(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> coeffs,
                        ffi::ResultBuffer<ffi::F32> out, bool right, bool gram) {
  auto wd = w.dimensions(), cd = coeffs.dimensions();
  if (wd.size() != 3 || cd.size() != 2 || cd[1] != 3 || wd[1] % NR || wd[2] % NR)
    return ffi::Error::InvalidArgument("muon_cpu: needs w (k, r, c) with r, c multiples of 32 and coeffs (steps, 3)");
  const Iteration s{wd[1], wd[2], right, gram, coeffs.typed_data(), static_cast<int>(cd[0])};
  const int64_t size = wd[1] * wd[2];
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, wd[0], [&](int64_t item) { iterate(s, wp + item * size, op + item * size); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatPolarIterate, PolarIterate,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("right")
                                  .Attr<bool>("gram"));
