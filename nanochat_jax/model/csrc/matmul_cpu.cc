// y = x w for a few rows of x (a decode step: one row per sequence), fp32, called through the XLA FFI
// (nanochat_jax/model/attention_cpu.py builds this file and registers it).
//
// Why: a decode step multiplies each weight matrix by a handful of rows, so its time is the time it takes to read
// the weights once from memory. XLA:CPU's GEMM packs the weight matrix into panels for more than one row (every
// weight read and written again per step), and its threads split the columns, so each reads short runs of every
// row. Here each thread reads a contiguous range of w's rows, whole rows at a time: KS rows side by side, left to
// right (long sequential runs, which DRAM and the hardware prefetchers stream best), with every row group of x's
// accumulators in registers for those KS rows and the next KS rows prefetched (for one row of x, RS of w's rows
// summed into y in w's own order: one_row); the threads' partial sums are added at the end (m x n, small next to w).
//
// Layouts (row-major): x (m, k), w (k, n), y (m, n). Requirement, checked in Python: n % 32 == 0.
//
// Also here: the model's large products (training's forward and backward matmuls, the LM head) on the AMX tile unit
// as bf16x3 (amx.h), where the CPU has one; see TileMatmul below.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "simd.h"

namespace {

using namespace nanochat;

constexpr int KS = 16;            // rows of w side by side: 16 sequential streams; accumulators reloaded per 16 rows
constexpr int64_t SERIAL = 1 << 16;   // weights below 64 KB: one thread (waking the pool costs more)

// y (m x n) = x[:, :kk] w[:kk, :] over NR-wide panels, w's rows KS at a time; rows of x in register groups of MP,
// 8 (where MP > 8), 4, 2, 1. The first row group of each chunk prefetches the next chunk's rows of the panel.
template <int R>
inline void tile(const float* a, int64_t k, const float* b, int64_t n, float* c, int kc, bool acc, bool first) {
  if (first) micro<false, R, KS>(a, k, b, n, c, n, kc, acc);
  else micro<false, R>(a, k, b, n, c, n, kc, acc);
}

void panels(const float* x, int64_t k, const float* w, int64_t n, float* y, int64_t m, int64_t kk) {
  auto rows_at = [m](int64_t i) {
    const int64_t left = m - i;
    return left >= MP ? MP : MP > 8 && left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
  };
  for (int64_t p0 = 0; p0 < kk; p0 += KS) {
    const int kc = static_cast<int>(std::min<int64_t>(KS, kk - p0));
    for (int64_t j = 0; j < n; j += NR) {
      const float* b = w + p0 * n + j;
      for (int64_t i = 0; i < m; i += rows_at(i)) {
        const float* a = x + i * k + p0;
        float* c = y + i * n + j;
        const bool acc = p0 > 0, first = i == 0;
        switch (rows_at(i)) {
          case MP: tile<MP>(a, k, b, n, c, kc, acc, first); break;
          case 8: tile<8>(a, k, b, n, c, kc, acc, first); break;
          case 4: tile<4>(a, k, b, n, c, kc, acc, first); break;
          case 2: tile<2>(a, k, b, n, c, kc, acc, first); break;
          default: tile<1>(a, k, b, n, c, kc, acc, first);
        }
      }
    }
  }
}

// y (1 x n) = x[:kk] w[:kk, :] for one row of x (batch-1 decoding), as a sum of w's rows: RS rows at a time, each
// read left to right (RS sequential streams, prefetched PF floats ahead), into y, which stays in L1 (the head's
// 8,192 columns are 32 KB). With one row of x, the panels' register blocking saves nothing, and reading w in its
// own order streams it faster than the panels' KS short runs per row.
constexpr int RS = 8;
constexpr int PF = 128;
void one_row(const float* x, const float* w, int64_t n, float* y, int64_t kk) {
  std::fill(y, y + n, 0.f);
  int64_t p = 0;
  for (; p + RS <= kk; p += RS) {
    vf a[RS];
    const float* r[RS];
    for (int i = 0; i < RS; ++i) a[i] = splat(x[p + i]), r[i] = w + (p + i) * n;
    for (int64_t j = 0; j < n; j += W) {
      vf s = load(y + j);
      for (int i = 0; i < RS; ++i) __builtin_prefetch(r[i] + j + PF);
      for (int i = 0; i < RS; ++i) s += a[i] * load(r[i] + j);
      store(y + j, s);
    }
  }
  for (; p < kk; ++p) {
    const vf a = splat(x[p]);
    for (int64_t j = 0; j < n; j += W) store(y + j, load(y + j) + a * load(w + p * n + j));
  }
}

// y (m x n) = x[:, :kk] w[:kk, :]
void rows_product(const float* x, int64_t k, const float* w, int64_t n, float* y, int64_t m, int64_t kk) {
  if (m == 1) one_row(x, w, n, y, kk);
  else panels(x, k, w, n, y, m, kk);
}

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || wd[1] % NR)
    return ffi::Error::InvalidArgument("matmul_cpu: needs x (m, k) and w (k, n) with n a multiple of 32");
  const int64_t m = xd[0], k = wd[0], n = wd[1];
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  if (k * n * 4 < SERIAL || pool.num_threads() <= 1) {
    rows_product(xp, k, wp, n, yp, m, k);
    return ffi::Error::Success();
  }
  // one contiguous range of w's rows per pool thread (with the caller taking one too, a third range would leave a
  // core to do two), partial sums apart
  const int64_t items = pool.num_threads(), per = ((k + KS - 1) / KS + items - 1) / items * KS;
  std::vector<float> part(static_cast<size_t>(items - 1) * m * n);
  parallel_for(pool, items, [&](int64_t t) {
    const int64_t p0 = std::min(k, t * per), p1 = std::min(k, (t + 1) * per);
    float* out = t == 0 ? yp : part.data() + (t - 1) * m * n;
    if (p1 > p0) rows_product(xp + p0, k, wp + p0 * n, n, out, m, p1 - p0);
    else std::fill(out, out + m * n, 0.f);
  });
  for (int64_t t = 1; t < items; ++t)
    for (int64_t i = 0; i < m * n; ++i) yp[i] += part[(t - 1) * m * n + i];
  return ffi::Error::Success();
}

// C (m x n) = op(A) op(B) for large fp32 operands, as bf16x3 on the AMX tile unit: op(A) = A (m x k) or, with at,
// A given as (k x m); op(B) = B (k x n) or, with bt, B given as (n x k). So the backward pass's dx = g w^T and
// dw = x^T g take their operands as they lie, as the forward's y = x w does.
//
// Why: the tile unit multiplies bf16 far faster than the fp32 vector units; as three bf16 products per fp32 one
// (amx.h) the model's block and head products take about half their fp32 time, at fp32-grade precision (the dropped
// low x low term is ~2^-16 of each product; accumulation is fp32).
//
// How: B is packed once, all of k, by groups of columns in parallel. Then each work item, a block of MC rows of
// A and a range of columns, packs its rows of A one k chunk of GK at a time (in L2) and multiplies them by the
// packed B panels into C, 32 x 32 blocks of C accumulated in tiles. Items sharing a column range are numbered
// together, so the threads read the same part of the packed B at about the same time. Each element of C is computed
// by one item in a fixed order: the result does not depend on the thread count. Requirements, checked in Python:
// m, n, k multiples of 32.
constexpr int MC = 256;   // rows of A per work item: its packed chunk (MC x GK, two pieces) stays in L2
constexpr int GK = 512;   // k per packed chunk of A
constexpr int ITEMS = 8;  // at least this many work items where the rows allow (column ranges split further)

#ifdef NANOCHAT_AMX
// Where A has few rows (a weight gradient: m = the layer's width, k = the tokens) the roles turn: A is packed once
// and each item, a range of NB columns, packs its columns of B one k chunk at a time, so B (there the large
// operand) is read and converted once and its packed form never leaves L2.
constexpr int FEW_ROWS = 512;   // m up to this: B streamed (A packed whole: m x k x 4 bytes, in L3)
constexpr int NB = 128;         // columns per item then: its chunks of A (m x GK), B and its C block fit L2

template <bool AT, bool BT>
void tile_matmul_few_rows(ffi::ThreadPool& pool, const float* A, const float* B, float* C, int m, int n, int k) {
  constexpr int np = 2;
  const int lda = AT ? m : k, ldb = BT ? k : n, nkb = k / amx::KB * np;
  const size_t group = static_cast<size_t>(nkb) * amx::TILE;   // packed elements per 16 rows of A
  std::vector<uint16_t> ap(static_cast<size_t>(m) * k * np);
  parallel_for(pool, m / 32, [&](int64_t item) {
    const int i0 = static_cast<int>(item) * 32;
    amx::pack_a<AT>(AT ? A + i0 : A + static_cast<int64_t>(i0) * lda, lda, 32, 0, k, 3, ap.data() + i0 / 16 * group);
  });
  parallel_for(pool, (n + NB - 1) / NB, [&](int64_t item) {
    const int j0 = static_cast<int>(item) * NB, cols = std::min(NB, n - j0);
    thread_local std::vector<uint16_t> bp;
    bp.resize(static_cast<size_t>(NB) * GK * np);
    amx::configure();
    for (int p0 = 0; p0 < k; p0 += GK) {
      const int kc = std::min(GK, k - p0), nkc = kc / amx::KB * np;
      const size_t at = static_cast<size_t>(p0) / amx::KB * np * amx::TILE;   // the chunk within a 16-row group
      amx::pack_b<BT>(BT ? B + static_cast<int64_t>(j0) * ldb : B + j0, ldb, cols, p0, kc, 3, bp.data());
      for (int j = 0; j < cols; j += 32) {
        const uint16_t* b0 = bp.data() + static_cast<size_t>(j / 16) * nkc * amx::TILE;
        for (int i = 0; i < m; i += 32) {
          const uint16_t* a0 = ap.data() + i / 16 * group + at;
          amx::block(a0, a0 + group, b0, b0 + static_cast<size_t>(nkc) * amx::TILE, nkc, np,
                     C + static_cast<int64_t>(i) * n + j0 + j, n, p0 > 0);
        }
      }
    }
    _tile_release();
  });
}

template <bool AT, bool BT>
void tile_matmul(ffi::ThreadPool& pool, const float* A, const float* B, float* C, int m, int n, int k) {
  constexpr int np = 2;
  const int lda = AT ? m : k, ldb = BT ? k : n, nkb = k / amx::KB * np;
  std::vector<uint16_t> bp(static_cast<size_t>(k) * n * np);
  parallel_for(pool, n / 32, [&](int64_t item) {
    const int j0 = static_cast<int>(item) * 32;
    amx::pack_b<BT>(BT ? B + static_cast<int64_t>(j0) * ldb : B + j0, ldb, 32, 0, k, 3,
                    bp.data() + static_cast<size_t>(j0 / 16) * nkb * amx::TILE);
  });
  const int mb = (m + MC - 1) / MC, nb = std::min(n / 32, (ITEMS + mb - 1) / mb);
  const int nc = (n / 32 + nb - 1) / nb * 32;
  parallel_for(pool, static_cast<int64_t>(mb) * nb, [&](int64_t item) {
    const int i0 = static_cast<int>(item % mb) * MC, rows = std::min(MC, m - i0);
    const int j0 = static_cast<int>(item / mb) * nc, j1 = std::min(n, j0 + nc);
    thread_local std::vector<uint16_t> ap;
    ap.resize(static_cast<size_t>(MC) * GK * np);
    amx::configure();
    for (int p0 = 0; p0 < k; p0 += GK) {
      const int kc = std::min(GK, k - p0), nkc = kc / amx::KB * np;
      amx::pack_a<AT>(AT ? A + i0 : A + static_cast<int64_t>(i0) * lda, lda, rows, p0, kc, 3, ap.data());
      for (int j = j0; j < j1; j += 32) {
        const uint16_t* b0 = bp.data() + (static_cast<size_t>(j / 16) * nkb + p0 / amx::KB * np) * amx::TILE;
        for (int i = 0; i < rows; i += 32) {
          const uint16_t* a0 = ap.data() + static_cast<size_t>(i / 16) * nkc * amx::TILE;
          amx::block(a0, a0 + nkc * amx::TILE, b0, b0 + static_cast<size_t>(nkb) * amx::TILE, nkc, np,
                     C + static_cast<int64_t>(i0 + i) * n + j, n, p0 > 0);
        }
      }
    }
    _tile_release();
  });
}
#endif

ffi::Error TileMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool at, bool bt) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2)
    return ffi::Error::InvalidArgument("matmul_cpu: tile_matmul needs two matrices");
  const int64_t m = at ? ad[1] : ad[0], k = at ? ad[0] : ad[1], n = bt ? bd[0] : bd[1];
  if ((bt ? bd[1] : bd[0]) != k || m % 32 || n % 32 || k % 32)
    return ffi::Error::InvalidArgument("matmul_cpu: tile_matmul needs matching k and m, n, k multiples of 32");
  if (!amx::ready())
    return ffi::Error::InvalidArgument("matmul_cpu: tile_matmul needs the AMX tile unit");
#ifdef NANOCHAT_AMX
  const float *ap = a.typed_data(), *bp = b.typed_data();
  float* cp = c->typed_data();
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  auto run = [&](auto at_, auto bt_) {
    constexpr bool AT = decltype(at_)::value, BT = decltype(bt_)::value;
    if (m <= FEW_ROWS) tile_matmul_few_rows<AT, BT>(pool, ap, bp, cp, mi, ni, ki);
    else tile_matmul<AT, BT>(pool, ap, bp, cp, mi, ni, ki);
  };
  using T = std::true_type;
  using F = std::false_type;
  if (at && bt) run(T{}, T{});
  else if (at) run(T{}, F{});
  else if (bt) run(F{}, T{});
  else run(F{}, F{});
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatTileMatmul, TileMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("at")
                                  .Attr<bool>("bt"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
