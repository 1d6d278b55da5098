// y = x w for a few rows of x (a decode step: one row per sequence), fp32, called through the XLA FFI
// (nanochat_jax/model/attention_cpu.py builds this file and registers it).
//
// Why: a decode step multiplies each weight matrix by a handful of rows, so its time is the time it takes to read
// the weights once from memory. XLA:CPU's GEMM packs the weight matrix into panels for more than one row (every
// weight read and written again per step), and its threads split the columns, so each reads short runs of every
// row. Here each thread reads a contiguous range of w's rows, whole rows at a time: KS rows side by side, left to
// right (long sequential runs, which DRAM and the hardware prefetchers stream best), with every row group of x's
// accumulators in registers for those KS rows and the next KS rows prefetched; the threads' partial sums are added
// at the end (m x n, small next to w).
//
// Layouts (row-major): x (m, k), w (k, n), y (m, n). Requirement, checked in Python: n % 32 == 0.
#include <algorithm>
#include <cstdint>
#include <vector>

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

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || wd[1] % NR)
    return ffi::Error::InvalidArgument("matmul_cpu: needs x (m, k) and w (k, n) with n a multiple of 32");
  const int64_t m = xd[0], k = wd[0], n = wd[1];
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  if (k * n * 4 < SERIAL || pool.num_threads() <= 1) {
    panels(xp, k, wp, n, yp, m, k);
    return ffi::Error::Success();
  }
  // one contiguous range of w's rows per pool thread (with the caller taking one too, a third range would leave a
  // core to do two), partial sums apart
  const int64_t items = pool.num_threads(), per = ((k + KS - 1) / KS + items - 1) / items * KS;
  std::vector<float> part(static_cast<size_t>(items - 1) * m * n);
  parallel_for(pool, items, [&](int64_t t) {
    const int64_t p0 = std::min(k, t * per), p1 = std::min(k, (t + 1) * per);
    float* out = t == 0 ? yp : part.data() + (t - 1) * m * n;
    if (p1 > p0) panels(xp + p0, k, wp + p0 * n, n, out, m, p1 - p0);
    else std::fill(out, out + m * n, 0.f);
  });
  for (int64_t t = 1; t < items; ++t)
    for (int64_t i = 0; i < m * n; ++i) yp[i] += part[(t - 1) * m * n + i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
