// The softcapped cross-entropy of the LM head for XLA:CPU in fp32, loss and gradient in one pass over the logits,
// called through the XLA FFI (nanochat_jax/model/attention_cpu.py builds the CPU kernels and registers them).
//
// Why: on XLA:CPU the (tokens, vocab) softcap, softmax and gradient run as separate loop fusions over arrays in DRAM
// that evaluate tanh and exp element by element at a few GFLOP/s. Here one row of logits (vocab floats: 32 KB at a
// vocabulary of 8,192) is read once from DRAM; its tanh is written in place, the row's sum of exponentials taken,
// then the gradient computed from the row while it is still in the core's L1/L2 cache and written over it.
//
// Per row with target y (nanochat's formula: softcap(z) = c tanh(z / c), cross-entropy over the first `vocab`
// columns; padded columns and rows with y < 0 take no part):
//   t = tanh(z / c),  lse = c + log sum_j exp(c (t_j - 1)),  loss = lse - c t_y
//   d loss / d z_j = (exp(c t_j - lse) - [j == y]) (1 - t_j^2)
// The shift by c stands in for the row max: |c t| <= c, so exp(c (t - 1)) lies in [e^-2c, 1] (e^-30 at c = 15).
//
// Layouts (row-major): z and dz (N, V), targets (N,) int32, loss (N,).
//
// Also here: each row's argmax (greedy decoding's next token), which XLA:CPU computes with a (value, index) pair
// reduction at about a tenth of this kernel's rate.
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace {

using namespace nanochat;

constexpr int64_t ROWS_PER_ITEM = 16;   // rows per work item on the thread pool

// tanh(x) from e = exp(-2|x|) in (0, 1]: (1 - e) / (1 + e) with x's sign (absolute error ~1e-7 near 0).
inline vf vtanh(vf x) {
  const vf ax = x < 0 ? -x : x;
  const vf e = vexp(ax * -2.f);
  const vf t = (1.f - e) / (1.f + e);
  return x < 0 ? -t : t;
}

inline float stanh(float x) {
  const float e = std::exp(-2.f * std::fabs(x));
  const float t = (1.f - e) / (1.f + e);
  return x < 0 ? -t : t;
}

struct Xent {
  int64_t N, V, vocab;
  float cap;
  bool grad;
};

// One row: z (V floats) in, its loss out; with grad, dz written over z's memory (the caller aliases them).
void row(const Xent& s, const float* z, float* dz, int32_t y, float* loss) {
  const int64_t nv = s.vocab / W * W;
  const float inv_cap = 1.f / s.cap;
  // pass 1: t = tanh(z / c), stored into dz (in cache for pass 2), and the sum of exp(c (t - 1))
  vf acc = vf{};
  for (int64_t j = 0; j < nv; j += W) {
    const vf t = vtanh(load(z + j) * inv_cap);
    store(dz + j, t);
    acc += vexp((t - 1.f) * s.cap);
  }
  float sum = hsum(acc);
  for (int64_t j = nv; j < s.vocab; ++j) {
    dz[j] = stanh(z[j] * inv_cap);
    sum += std::exp((dz[j] - 1.f) * s.cap);
  }
  if (y < 0) {                                   // an ignored target: no loss, no gradient
    *loss = 0.f;
    if (s.grad) std::memset(dz, 0, s.V * sizeof(float));
    return;
  }
  y = std::min<int32_t>(y, s.vocab - 1);
  const float lse = s.cap + std::log(sum);
  const float ty = dz[y];
  *loss = lse - s.cap * ty;
  if (!s.grad) return;
  // pass 2: the gradient from t, in place
  for (int64_t j = 0; j < nv; j += W) {
    const vf t = load(dz + j);
    store(dz + j, vexp(t * s.cap - lse) * (1.f - t * t));
  }
  for (int64_t j = nv; j < s.vocab; ++j) {
    const float t = dz[j];
    dz[j] = std::exp(t * s.cap - lse) * (1.f - t * t);
  }
  dz[y] -= 1.f - ty * ty;
  if (s.V > s.vocab) std::memset(dz + s.vocab, 0, (s.V - s.vocab) * sizeof(float));
}

ffi::Error SoftcapXent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::S32> targets,
                       ffi::ResultBuffer<ffi::F32> loss, ffi::ResultBuffer<ffi::F32> dz, int64_t vocab, float cap,
                       bool grad) {
  auto zd = z.dimensions();
  const int64_t V = zd.back(), N = V ? z.element_count() / V : 0;
  if (targets.element_count() != N || vocab < 1 || vocab > V || !(cap > 0))
    return ffi::Error::InvalidArgument("xent_cpu: needs targets of one per row, 1 <= vocab <= V, cap > 0");
  const Xent s{N, V, vocab, cap, grad};
  const float* zp = z.typed_data();
  const int32_t* yp = targets.typed_data();
  float* lp = loss->typed_data();
  float* dp = dz->typed_data();
  // Without the alias (dz a fresh buffer) pass 1 still writes t into dz's row: correct either way.
  parallel_for(pool, (N + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, [&](int64_t item) {
    const int64_t r1 = std::min(N, (item + 1) * ROWS_PER_ITEM);
    for (int64_t r = item * ROWS_PER_ITEM; r < r1; ++r) row(s, zp + r * V, dp + r * V, yp[r], lp + r);
  });
  return ffi::Error::Success();
}

// The first index of the row's largest value, as jnp.argmax: one pass keeping each lane's largest value and the
// first index where it occurred (a strict > keeps the first); then the smallest such index among the lanes holding
// the row's maximum. A row holding a NaN gives its first NaN (jnp.argmax's NaN propagation), found by a second,
// scalar scan only then.
int32_t row_argmax(const float* z, int64_t n) {
  vf best = splat(-INFINITY);
  vi at = vi{} - 1, nan = vi{};
  const vi lanes = iota();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf v = load(z + j);
    const vi more = v > best;
    best = more ? v : best;
    at = more ? lanes + static_cast<int32_t>(j) : at;
    nan |= v != v;
  }
  float top = -INFINITY;
  int64_t first = -1;
  bool any_nan = false;
  for (int i = 0; i < W; ++i) {
    any_nan |= nan[i] != 0;
    if (at[i] >= 0 && (best[i] > top || (best[i] == top && at[i] < first))) top = best[i], first = at[i];
  }
  for (; j < n; ++j) {
    any_nan |= z[j] != z[j];
    if (z[j] > top) top = z[j], first = j;
  }
  if (any_nan)
    for (int64_t i = 0; i < n; ++i)
      if (z[i] != z[i]) return static_cast<int32_t>(i);
  return static_cast<int32_t>(first < 0 ? 0 : first);   // every value -inf: index 0
}

// Rows are few (a decode batch) and short: one thread, no pool hand-off.
ffi::Error RowArgmax(ffi::Buffer<ffi::F32> z, ffi::ResultBuffer<ffi::S32> out) {
  auto zd = z.dimensions();
  const int64_t V = zd.size() == 0 ? 0 : zd.back(), N = V ? z.element_count() / V : 0;
  if (V < 1 || V > INT32_MAX || out->element_count() != N)
    return ffi::Error::InvalidArgument("xent_cpu: argmax needs (..., V) logits with 1 <= V < 2^31");
  for (int64_t r = 0; r < N; ++r) out->typed_data()[r] = row_argmax(z.typed_data() + r * V, V);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatRowArgmax, RowArgmax,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatSoftcapXent, SoftcapXent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("vocab")
                                  .Attr<float>("cap")
                                  .Attr<bool>("grad"));
