// Fused causal attention for XLA:CPU in fp32, forward and backward, called through the XLA FFI
// (nanochat_jax/model/attention_cpu.py builds this file with the system's C++ compiler and registers it).
//
// Why: XLA:CPU runs attention as separate batched matmuls and elementwise passes over (B, H, T, T) score arrays that
// live in DRAM; here each (batch, kv head) is one work item whose per-query-block scores (64 x keys) stay in the
// core's L2 cache, the products run through simd.h's packed register-blocked product, and key blocks a query
// block cannot see (causal order, sliding window) are skipped. The backward pass recomputes the probabilities from the
// saved log-sum-exp (FlashAttention-2's recipe, without the online softmax: a 64-row block's whole key range fits
// in L2 at the sequence lengths this CPU path serves).
//
// The Rope variants take q and k before their rotary embedding and RMS norm and apply both while gathering the rows
// (and their gradient before scattering dq and dk), so those cost no passes over (B, T, H, D) arrays of their own.
//
// Layouts (row-major): q, o, dq (B, T, H, D); k, v, dk, dv (B, T, KV, D); lse (B, H, T). Query head h reads kv
// head h / (H / KV) (grouped-query attention). Query i sees keys j with i - window <= j <= i. Requirements, checked
// in Python: T % 64 == 0, D % 32 == 0.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "simd.h"

namespace {

using namespace nanochat;

constexpr int BQ = 64;     // query rows per block; key ranges are multiples of 64 too

// C (m x n) = A (m x k) B (k x n), or += with acc; C (n x d) += A^T B for A (m x n), B (m x d). Both through the
// packed micro-kernel of simd.h: its panels stream contiguous whatever the operands' power-of-two row strides.
void gemm(Packs& pk, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int m, int n, int k,
          bool acc) {
  product<false>(pk, A, lda, B, ldb, C, ldc, m, n, k, false, acc);
}
void gemm_tn(Packs& pk, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int m, int n, int d) {
  product<true>(pk, A, lda, B, ldb, C, ldc, n, d, m, false, true);
}

struct Shape {
  int64_t B, T, H, KV, D, window;
  float scale;
  int64_t G() const { return H / KV; }
  // the key range [ks, ke) a query block starting at row r0 reads: multiples of 64
  int64_t ks(int64_t r0) const { return window >= T ? 0 : std::max<int64_t>(0, (r0 - window) / BQ * BQ); }
};

// Gathers rows t of head h from a (B, T, N, D) array into a contiguous (T, D) one, and back.
void gather(const float* src, float* dst, const Shape& s, int64_t b, int64_t h, int64_t N) {
  for (int64_t t = 0; t < s.T; ++t) std::memcpy(dst + t * s.D, src + ((b * s.T + t) * N + h) * s.D, s.D * 4);
}
void scatter(const float* src, float* dst, const Shape& s, int64_t b, int64_t h, int64_t N) {
  for (int64_t t = 0; t < s.T; ++t) std::memcpy(dst + ((b * s.T + t) * N + h) * s.D, src + t * s.D, s.D * 4);
}
// The same rows transposed: dst (D, T) holds head h's values with positions minor.
void gather_t(const float* src, float* dst, const Shape& s, int64_t b, int64_t h, int64_t N) {
  transpose(src + (b * s.T * N + h) * s.D, N * s.D, dst, s.T, s.T, s.D);
}

// Optional rotary embedding and RMS norm of q and k inside the kernel (the model's rms_norm(apply_rotary(x))), so that
// they cost no passes of their own over (B, T, H, D) arrays: cos, sin (T, D/2) are the half-split rotary tables.
struct Rope {
  const float *cos = nullptr, *sin = nullptr;
  float eps = 0.f;
  bool on() const { return cos != nullptr; }
};

// Row x (D) at position t in place: y = rms_norm(rotate(x)); returns the norm's factor r = 1 / rms(rotate(x)).
float rope_norm_row(float* x, int64_t D, int64_t t, const Rope& rp) {
  const int64_t h = D / 2;
  const float *c = rp.cos + t * h, *sn = rp.sin + t * h;
  float ss = 0.f;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    const float y1 = x1 * c[i] + x2 * sn[i], y2 = -x1 * sn[i] + x2 * c[i];
    x[i] = y1; x[i + h] = y2;
    ss += y1 * y1 + y2 * y2;
  }
  const float r = 1.f / std::sqrt(ss / D + rp.eps);
  for (int64_t i = 0; i < D; ++i) x[i] *= r;
  return r;
}

// The gradient through rope_norm_row in place: dy (D) on its output y (D, the normed row) -> d x.
// Norm: dz = r (dy - y mean(dy y)); rotation (orthogonal): dx1 = dz1 cos - dz2 sin, dx2 = dz1 sin + dz2 cos.
void rope_norm_grad_row(float* dy, const float* y, float r, int64_t D, int64_t t, const Rope& rp) {
  float dot = 0.f;
  for (int64_t i = 0; i < D; ++i) dot += dy[i] * y[i];
  const float mean = dot / D;
  const int64_t h = D / 2;
  const float *c = rp.cos + t * h, *sn = rp.sin + t * h;
  for (int64_t i = 0; i < h; ++i) {
    const float z1 = r * (dy[i] - y[i] * mean), z2 = r * (dy[i + h] - y[i + h] * mean);
    dy[i] = z1 * c[i] - z2 * sn[i];
    dy[i + h] = z1 * sn[i] + z2 * c[i];
  }
}

// Row i of a block (absolute position pos) over keys [ks, ke): the valid columns are lo..hi.
struct Row {
  int64_t lo, hi;
  Row(const Shape& s, int64_t pos) : lo(std::max<int64_t>(0, pos - s.window)), hi(pos) {}
};

// Softmax numerator of one score row in place (s covers keys ks..ke): e^(scale s - m) on the valid columns, 0
// elsewhere; returns the row's log-sum-exp and writes 1 / sum to inv.
float softmax_row(float* s, int64_t ks, int64_t ke, const Row& row, float scale, float* inv) {
  const vi lane = iota();
  vf mx = splat(-INFINITY);
  for (int64_t j = ks; j < ke; j += W) {
    const vi col = lane + (int32_t)j;
    const vf x = load(s + (j - ks)) * scale;
    mx = (col >= (int32_t)row.lo) & (col <= (int32_t)row.hi) & (x > mx) ? x : mx;
  }
  const float m = hmax(mx);
  vf sum = vf{};
  for (int64_t j = ks; j < ke; j += W) {
    const vi col = lane + (int32_t)j;
    const vf e = vexp(load(s + (j - ks)) * scale - m);
    const vf p = (col >= (int32_t)row.lo) & (col <= (int32_t)row.hi) ? e : vf{};
    store(s + (j - ks), p);
    sum += p;
  }
  const float l = hsum(sum);
  *inv = 1.f / l;
  return m + std::log(l);
}

// The probabilities of one score row in place from its saved log-sum-exp.
void probs_row(float* s, int64_t ks, int64_t ke, const Row& row, float scale, float lse) {
  const vi lane = iota();
  for (int64_t j = ks; j < ke; j += W) {
    const vi col = lane + (int32_t)j;
    const vf e = vexp(load(s + (j - ks)) * scale - lse);
    store(s + (j - ks), (col >= (int32_t)row.lo) & (col <= (int32_t)row.hi) ? e : vf{});
  }
}

void forward(ffi::ThreadPool& pool, const Shape& s, const float* q, const float* k, const float* v, float* o, float* lse,
             const Rope& rp) {
  const int64_t T = s.T, D = s.D;
  parallel_for(pool, s.B * s.KV, [&](int64_t item) {
    const int64_t b = item / s.KV, n = item % s.KV;
    std::vector<float> kt(D * T), vc(T * D), qc(T * D), oc(T * D), sc(BQ * T), inv(BQ);
    Packs pk(T);
    if (rp.on()) {   // k's rows rotated and normed, then transposed (qc serves as the staging buffer)
      gather(k, qc.data(), s, b, n, s.KV);
      for (int64_t t = 0; t < T; ++t) rope_norm_row(qc.data() + t * D, D, t, rp);
      transpose(qc.data(), kt.data(), T, D);
    } else {
      gather_t(k, kt.data(), s, b, n, s.KV);
    }
    gather(v, vc.data(), s, b, n, s.KV);
    for (int64_t h = n * s.G(); h < (n + 1) * s.G(); ++h) {
      gather(q, qc.data(), s, b, h, s.H);
      if (rp.on())
        for (int64_t t = 0; t < T; ++t) rope_norm_row(qc.data() + t * D, D, t, rp);
      float* lse_h = lse + (b * s.H + h) * T;
      for (int64_t r0 = 0; r0 < T; r0 += BQ) {
        const int64_t ks = s.ks(r0), ke = r0 + BQ, nk = ke - ks;
        gemm(pk, qc.data() + r0 * D, D, kt.data() + ks, T, sc.data(), T, BQ, nk, D, false);     // scores
        for (int64_t i = 0; i < BQ; ++i)
          lse_h[r0 + i] = softmax_row(sc.data() + i * T, ks, ke, Row(s, r0 + i), s.scale, &inv[i]);
        float* out = oc.data() + r0 * D;
        gemm(pk, sc.data(), T, vc.data() + ks * D, D, out, D, BQ, D, nk, false);                  // P V
        for (int64_t i = 0; i < BQ; ++i)
          for (int64_t d = 0; d < D; d += W) store(out + i * D + d, load(out + i * D + d) * inv[i]);
      }
      scatter(oc.data(), o, s, b, h, s.H);
    }
  });
}

void backward(ffi::ThreadPool& pool, const Shape& s, const float* q, const float* k, const float* v, const float* o, const float* lse,
              const float* dout, float* dq, float* dk, float* dv, const Rope& rp) {
  const int64_t T = s.T, D = s.D;
  parallel_for(pool, s.B * s.KV, [&](int64_t item) {
    const int64_t b = item / s.KV, n = item % s.KV;
    std::vector<float> kc(T * D), kt(D * T), vt(D * T), tmp(T * D), qc(T * D), doc(T * D), dqc(T * D),
        dkc(T * D, 0.f), dvc(T * D, 0.f), pc(BQ * T), dpc(BQ * T), delta(T), rq(rp.on() ? T : 0),
        rk(rp.on() ? T : 0);
    Packs pk(T);
    gather(k, kc.data(), s, b, n, s.KV);
    if (rp.on()) {   // the normed rows the forward pass used, and their norm factors for the gradient
      for (int64_t t = 0; t < T; ++t) rk[t] = rope_norm_row(kc.data() + t * D, D, t, rp);
      transpose(kc.data(), kt.data(), T, D);
    } else {
      gather_t(k, kt.data(), s, b, n, s.KV);
    }
    gather_t(v, vt.data(), s, b, n, s.KV);
    for (int64_t h = n * s.G(); h < (n + 1) * s.G(); ++h) {
      gather(q, qc.data(), s, b, h, s.H);
      if (rp.on())
        for (int64_t t = 0; t < T; ++t) rq[t] = rope_norm_row(qc.data() + t * D, D, t, rp);
      gather(dout, doc.data(), s, b, h, s.H);
      gather(o, tmp.data(), s, b, h, s.H);
      for (int64_t t = 0; t < T; ++t) {     // delta_i = dO_i . O_i, the softmax backward's row term
        vf acc = vf{};
        for (int64_t d = 0; d < D; d += W) acc += load(doc.data() + t * D + d) * load(tmp.data() + t * D + d);
        delta[t] = hsum(acc);
      }
      const float* lse_h = lse + (b * s.H + h) * T;
      for (int64_t r0 = 0; r0 < T; r0 += BQ) {
        const int64_t ks = s.ks(r0), ke = r0 + BQ, nk = ke - ks;
        const float* qb = qc.data() + r0 * D;
        const float* dob = doc.data() + r0 * D;
        gemm(pk, qb, D, kt.data() + ks, T, pc.data(), T, BQ, nk, D, false);                       // scores
        for (int64_t i = 0; i < BQ; ++i) probs_row(pc.data() + i * T, ks, ke, Row(s, r0 + i), s.scale, lse_h[r0 + i]);
        gemm_tn(pk, pc.data(), T, dob, D, dvc.data() + ks * D, D, BQ, nk, D);                     // dV += P^T dO
        gemm(pk, dob, D, vt.data() + ks, T, dpc.data(), T, BQ, nk, D, false);                     // dP = dO V^T
        for (int64_t i = 0; i < BQ; ++i) {                                                     // dS = P (dP - delta)
          float* p = pc.data() + i * T;
          const float* dp = dpc.data() + i * T;
          const vf di = splat(delta[r0 + i]);
          for (int64_t j = 0; j < nk; j += W) store(p + j, load(p + j) * (load(dp + j) - di) * s.scale);
        }
        gemm(pk, pc.data(), T, kc.data() + ks * D, D, dqc.data() + r0 * D, D, BQ, D, nk, false);  // dQ = dS K
        gemm_tn(pk, pc.data(), T, qb, D, dkc.data() + ks * D, D, BQ, nk, D);                      // dK += dS^T Q
      }
      if (rp.on())
        for (int64_t t = 0; t < T; ++t) rope_norm_grad_row(dqc.data() + t * D, qc.data() + t * D, rq[t], D, t, rp);
      scatter(dqc.data(), dq, s, b, h, s.H);
    }
    if (rp.on())
      for (int64_t t = 0; t < T; ++t) rope_norm_grad_row(dkc.data() + t * D, kc.data() + t * D, rk[t], D, t, rp);
    scatter(dkc.data(), dk, s, b, n, s.KV);
    scatter(dvc.data(), dv, s, b, n, s.KV);
  });
}

// Decode: t new queries over a KV cache, q (B, t, H, D), keys (B, KV, D, S), values (B, KV, S, D), mask (B, t, S)
// -> y (B, t, H, D). Each row reads only the span between its first and last visible key (the filled prefix, or
// the window), in the cache's own layouts: keys with positions minor for the scores, values with the head dim
// minor for the weighted sum. A row that sees no key gets zeros.
struct CacheShape { int64_t B, t, H, KV, D, S; float scale; };

// out[j - j0] = q . keys[:, j] for j in [j0, j1); keys (D, S).
void cache_scores(const float* q, const float* keys, const CacheShape& s, int64_t j0, int64_t j1, float* out) {
  int64_t j = j0;
  for (; j + 4 * W <= j1; j += 4 * W) {
    vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
    for (int64_t d = 0; d < s.D; ++d) {
      const float* kr = keys + d * s.S + j;
      a0 += q[d] * load(kr); a1 += q[d] * load(kr + W); a2 += q[d] * load(kr + 2 * W); a3 += q[d] * load(kr + 3 * W);
    }
    store(out + j - j0, a0); store(out + j - j0 + W, a1); store(out + j - j0 + 2 * W, a2);
    store(out + j - j0 + 3 * W, a3);
  }
  for (; j + W <= j1; j += W) {
    vf a = vf{};
    for (int64_t d = 0; d < s.D; ++d) a += q[d] * load(keys + d * s.S + j);
    store(out + j - j0, a);
  }
  for (; j < j1; ++j) {
    float a = 0;
    for (int64_t d = 0; d < s.D; ++d) a += q[d] * keys[d * s.S + j];
    out[j - j0] = a;
  }
}

void cached_row(const float* q, const float* keys, const float* vals, const bool* m, const CacheShape& s,
                float* sc, float* out) {
  int64_t lo = 0, hi = s.S - 1;
  while (lo < s.S && !m[lo]) ++lo;
  while (hi >= lo && !m[hi]) --hi;
  if (lo > hi) { std::fill(out, out + s.D, 0.f); return; }
  const int64_t n = hi + 1 - lo, nv = (n + W - 1) / W * W;     // sc holds nv >= n floats
  cache_scores(q, keys, s, lo, hi + 1, sc);
  auto visible = [&](int64_t j) {   // lanes j .. j + W - 1 (relative to lo) that are in the span and visible
    vi v;
    for (int i = 0; i < W; ++i) v[i] = (j + i < n && m[lo + j + i]) ? -1 : 0;
    return v;
  };
  vf mx = splat(-INFINITY);
  for (int64_t j = 0; j < nv; j += W) {
    const vf x = load(sc + j) * s.scale;
    mx = visible(j) & (x > mx) ? x : mx;
  }
  const float mmax = hmax(mx);
  vf sum = vf{};
  for (int64_t j = 0; j < nv; j += W) {
    const vf p = visible(j) ? vexp(load(sc + j) * s.scale - mmax) : vf{};
    store(sc + j, p);
    sum += p;
  }
  const float inv = 1.f / hsum(sum);
  vf acc[256 / W];
  const int64_t nd = s.D / W;
  for (int64_t c = 0; c < nd; ++c) acc[c] = vf{};
  for (int64_t j = 0; j < n; ++j) {
    const float p = sc[j];
    if (p == 0.f) continue;
    const float* vr = vals + (lo + j) * s.D;
    for (int64_t c = 0; c < nd; ++c) acc[c] += p * load(vr + c * W);
  }
  for (int64_t c = 0; c < nd; ++c) store(out + c * W, acc[c] * inv);
}

void cached(ffi::ThreadPool& pool, const CacheShape& s, const float* q, const float* k, const float* v,
            const bool* mask, float* y) {
  const int64_t G = s.H / s.KV;
  parallel_for(pool, s.B * s.KV, [&](int64_t item) {
    const int64_t b = item / s.KV, n = item % s.KV;
    const float* keys = k + (b * s.KV + n) * s.D * s.S;
    const float* vals = v + (b * s.KV + n) * s.S * s.D;
    std::vector<float> sc(s.S + W);
    for (int64_t i = 0; i < s.t; ++i)
      for (int64_t h = n * G; h < (n + 1) * G; ++h) {
        const int64_t row = (b * s.t + i) * s.H + h;
        cached_row(q + row * s.D, keys, vals, mask + (b * s.t + i) * s.S, s, sc.data(), y + row * s.D);
      }
  });
}

ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> y,
                           float scale) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const CacheShape s{qd[0], qd[1], qd[2], kd[1], qd[3], kd[3], scale};
  if (s.D % W || s.D > 256 || s.H % s.KV)
    return ffi::Error::InvalidArgument("attention_cpu: needs a head dim that is a multiple of 16 and <= 256, H % KV == 0");
  cached(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, float scale, int64_t window) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], qd[2], kd[2], qd[3], window, scale};
}

ffi::Error check(const Shape& s) {
  if (s.T % BQ || s.D % NR || s.H % s.KV)
    return ffi::Error::InvalidArgument("attention_cpu: needs T % 64 == 0, head dim % 32 == 0, H % KV == 0");
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale,
                            int64_t window) {
  const Shape s = shape_of(q, k, scale, window);
  if (auto err = check(s); err.failure()) return err;
  forward(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(), lse->typed_data(), Rope{});
  return ffi::Error::Success();
}

ffi::Error check_rope(const Shape& s, ffi::Buffer<ffi::F32>& cos, ffi::Buffer<ffi::F32>& sin) {
  auto cd = cos.dimensions(), sd = sin.dimensions();
  if (cd.size() != 2 || sd.size() != 2 || cd[0] != s.T || cd[1] * 2 != s.D || sd[0] != s.T || sd[1] * 2 != s.D)
    return ffi::Error::InvalidArgument("attention_cpu: cos and sin must be (T, D / 2)");
  return ffi::Error::Success();
}

// q and k before their rotary embedding and RMS norm, which the kernel applies (Rope).
ffi::Error AttentionRopeForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale,
                                int64_t window, float eps) {
  const Shape s = shape_of(q, k, scale, window);
  if (auto err = check(s); err.failure()) return err;
  if (auto err = check_rope(s, cos, sin); err.failure()) return err;
  forward(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(), lse->typed_data(),
          Rope{cos.typed_data(), sin.typed_data(), eps});
  return ffi::Error::Success();
}

ffi::Error AttentionRopeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                 ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                 ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                                 ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                                 ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t window, float eps) {
  const Shape s = shape_of(q, k, scale, window);
  if (auto err = check(s); err.failure()) return err;
  if (auto err = check_rope(s, cos, sin); err.failure()) return err;
  backward(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(), dout.typed_data(),
           dq->typed_data(), dk->typed_data(), dv->typed_data(), Rope{cos.typed_data(), sin.typed_data(), eps});
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t window) {
  const Shape s = shape_of(q, k, scale, window);
  if (auto err = check(s); err.failure()) return err;
  backward(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(), dout.typed_data(),
           dq->typed_data(), dk->typed_data(), dv->typed_data(), Rope{});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatCachedAttention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatAttentionRopeForward, AttentionRopeForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanochatAttentionRopeBackward, AttentionRopeBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("eps"));
