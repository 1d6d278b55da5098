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
// splits > 0: the products run on the AMX tile unit from bf16 operands (amx.h; 1: bf16, 3: bf16x3), where the CPU
// and the kernel allow it (amx::ready); else, and with splits = 0, in fp32 through simd.h. The Gram form's chain of
// m x m products runs in fp32 either way.
// Requirements, checked in Python: r % 32 == 0 and c % 32 == 0.

#include <utility>
#include <vector>

#include "amx.h"
#include "simd.h"

namespace {

using namespace nanochat;

struct Iteration {
  int64_t r, c;          // one matrix of the stack, our layout
  bool right, gram;
  const float* coeffs;   // (steps, 3)
  int steps;
  int splits;            // 0: fp32 products; 1 or 3: AMX products (amx.h)
  int m() const { return right ? c : r; }   // the short side: A is m x m
  int n() const { return right ? r : c; }
};

// One matrix: w (r x c) -> out (r x c).
void iterate(const Iteration& s, const float* w, float* out) {
  const int m = s.m(), n = s.n();
  if (s.steps == 0) { std::memcpy(out, w, sizeof(float) * m * n); return; }
  const bool tiles = s.splits > 0;
  Packs pk(tiles && !s.gram ? 0 : std::max(m, n));
  std::vector<float> buf(5 * m * m + (s.right || tiles ? 0 : n * m) + (s.gram ? 0 : 2 * m * n));
  float *A = buf.data(), *A2 = A + m * m, *P = A2 + m * m, *T = P + m * m, *Q = T + m * m, *Xt = Q + m * m;
  float* X0 = Xt + (s.right || tiles ? 0 : n * m);
#ifdef NANOCHAT_AMX
  amx::Packs tp(tiles ? n : 0, tiles ? n : 0, s.splits);
#endif
  // C (rows x cols) = A (rows x k) B (k x cols), all row-major, in fp32 through simd.h. The Gram form's chain of
  // m x m products always runs here: its rounding builds up over the iterations (A is never recomputed from X), and
  // at bf16x3's it reached ~2e-4 of the result's largest entry.
  auto chain = [&](const float* a, int lda, const float* b, int ldb, float* c, int ldc, int rows, int cols, int k,
                   bool sym) { product<false>(pk, a, lda, b, ldb, c, ldc, rows, cols, k, sym); };
  // the same on the tile unit when splits asks for it
  auto mul = [&](const float* a, int lda, const float* b, int ldb, float* c, int ldc, int rows, int cols, int k,
                 bool sym) {
#ifdef NANOCHAT_AMX
    if (tiles) return amx::product(tp, a, lda, b, ldb, c, ldc, rows, cols, k, s.splits, sym);
#endif
    chain(a, lda, b, ldb, c, ldc, rows, cols, k, sym);
  };
  // A = X X^T of the current X (x is w's layout: m x n wide, or n x m tall)
  auto gram_of = [&](const float* x) {
#ifdef NANOCHAT_AMX
    if (tiles) {   // the tile packing reads the transposed operand in place
      if (s.right) amx::product<true, false>(tp, x, m, x, m, A, m, m, m, n, s.splits, true);
      else amx::product<false, true>(tp, x, n, x, n, A, m, m, m, n, s.splits, true);
      return;
    }
#endif
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
    if (s.right) mul(x, m, Pm, m, y, m, n, m, m, false);
    else mul(Pm, m, x, n, y, n, m, n, m, false);
  };
  if (s.gram) {
    gram_of(w);
    for (int it = 0; it < s.steps; ++it) {
      chain(A, m, A, m, A2, m, m, m, m, true);
      poly(it);
      if (it == 0) {
        std::memcpy(Q, P, sizeof(float) * m * m);
      } else {
        chain(P, m, Q, m, T, m, m, m, m, true);
        std::swap(Q, T);
      }
      if (it + 1 < s.steps) {                             // A <- A P^2
        chain(P, m, P, m, A2, m, m, m, m, true);
        chain(A, m, A2, m, T, m, m, m, m, true);
        std::swap(A, T);
      }
    }
    apply(Q, w, out);
    return;
  }
  const float* x = w;
  for (int it = 0; it < s.steps; ++it) {   // X0 holds two m x n buffers: iteration it writes X0[it % 2]
    gram_of(x);
    mul(A, m, A, m, A2, m, m, m, m, true);
    poly(it);
    float* y = it + 1 == s.steps ? out : X0 + (it % 2) * m * n;
    apply(P, x, y);
    x = y;
  }
}

ffi::Error PolarIterate(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> coeffs,
                        ffi::ResultBuffer<ffi::F32> out, bool right, bool gram, int64_t splits) {
  auto wd = w.dimensions(), cd = coeffs.dimensions();
  if (wd.size() != 3 || cd.size() != 2 || cd[1] != 3 || wd[1] % NR || wd[2] % NR)
    return ffi::Error::InvalidArgument("muon_cpu: needs w (k, r, c) with r, c multiples of 32 and coeffs (steps, 3)");
  if (splits != 0 && splits != 1 && splits != 3)
    return ffi::Error::InvalidArgument("muon_cpu: splits must be 0, 1 or 3");
  const Iteration s{wd[1], wd[2], right, gram, coeffs.typed_data(), static_cast<int>(cd[0]),
                    amx::ready() ? static_cast<int>(splits) : 0};
  const int64_t size = wd[1] * wd[2];
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, wd[0], [&](int64_t item) { iterate(s, wp + item * size, op + item * size); });
  return ffi::Error::Success();
}

}  // namespace

// Whether polar_iterate's products with splits > 0 run on the tile unit here: built with AMX and granted by Linux.
extern "C" int NanochatAmxReady() { return amx::ready() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatPolarIterate, PolarIterate,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("right")
                                  .Attr<bool>("gram")
                                  .Attr<int64_t>("splits"));
