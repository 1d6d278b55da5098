// Products on Intel AMX (Advanced Matrix Extensions): C (m x n, fp32) = A (m x k) B (k x n) from fp32 operands
// rounded to bfloat16, multiplied by the tile unit with fp32 accumulation. muon_cpu.cc runs Muon's polar iteration
// through `product`, matmul_cpu.cc the model's large products through `block` (both by default as bf16x3, below).
//
// Why: on a CPU with AMX the tile unit multiplies bf16 far faster than the fp32 vector units (16 x 16 x 32
// multiply-adds per instruction), so even three bf16 products per fp32 one take about half the time of the fp32
// product; a single bf16 product (splits = 1) about a third.
//
// splits = 3 (bf16x3, what XLA's HIGH precision means on TPU) keeps fp32-grade precision: each operand is the sum
// of a bf16 high part and a bf16 low part, and A B ~ Ah Bh + Ah Bl + Al Bh (the dropped Al Bl is ~2^-16 of the
// product). The operands are packed as two pieces per 32-wide k block (high, low), and the three products of a block
// share their tile loads: Ah Bl, then Ah Bh (reloading only B), then Al Bh (reloading only A).
//
// Compiled in where -march=native enables AMX-BF16 and AVX512-BF16 (NANOCHAT_AMX); amx::ready() asks Linux once per
// process for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), and every product loads its tile configuration, so
// other users of the tiles on the same threads (XLA's own kernels) cannot leave a different one behind.
// Layouts: row-major with leading dimensions; m, n and k multiples of 32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define NANOCHAT_AMX 1
#endif

namespace nanochat::amx {

#ifdef NANOCHAT_AMX
inline bool ready() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

constexpr int KB = 32;    // k per tile (32 bf16 = 64 bytes a row)
constexpr int TILE = 512; // bf16 per packed tile: 16 rows x 32
constexpr int KCH = 256;  // k-chunk (in the operands' own k): one chunk's A and B panels stay in L2

inline int pieces(int splits) { return splits == 3 ? 2 : 1; }   // bf16 pieces per operand value

// Packed operand panels of one thread: A (m x kc') in 16-row tiles, B (kc' x n) in VNNI tiles (pairs of k rows
// interleaved per column), kc' = pieces * KCH.
struct Packs {
  std::vector<uint16_t> a, b;
  Packs(int max_m, int max_n, int splits)
      : a(static_cast<size_t>(max_m) * KCH * pieces(splits)), b(static_cast<size_t>(max_n) * KCH * pieces(splits)) {}
};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure() {   // 8 tiles of 16 rows x 64 bytes: C 0-3, A 4-5, B 6-7
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

// 16 floats -> 16 bf16 (round to nearest even): the high part (lo false) or the rounded remainder (lo true).
inline __m256i piece(__m512 v, bool lo) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  if (!lo) return h;
  const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back));
}

// Two rows of 16 bf16 (in the low and high halves of a vector) -> 16 interleaved pairs, by _mm512_permutexvar_epi16.
alignas(64) inline const uint16_t VNNI_ORDER[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// r[i] lane j <- r[j] lane i, for 16 vectors of 16 32-bit lanes: pairs, quads, then 128-bit blocks exchanged.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// A rows [0, m), k [p0, p0 + kc) -> tiles (i / 16, kb) at dst + ((i / 16) * nkb + kb) * TILE, nkb = kc / 32 * np,
// np = pieces(splits): the tile of piece s (0 high, 1 low) of k block b is number b * np + s.
// AT: A is given transposed (k x m, lda), element (i, p) at A[p * lda + i].
template <bool AT>
inline void pack_a(const float* A, int lda, int m, int p0, int kc, int splits, uint16_t* dst) {
  const int np = pieces(splits), nkb = kc / KB * np;
  if constexpr (!AT) {
    for (int i = 0; i < m; ++i)
      for (int kb = 0; kb < kc / KB; ++kb) {
        const float* src = A + static_cast<int64_t>(i) * lda + p0 + kb * KB;
        const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
        for (int s = 0; s < np; ++s) {
          uint16_t* t = dst + ((i / 16) * nkb + kb * np + s) * TILE + (i % 16) * KB;
          const bool lo = s == 1;
          _mm256_storeu_si256((__m256i*)t, piece(v0, lo));
          _mm256_storeu_si256((__m256i*)(t + 16), piece(v1, lo));
        }
      }
  } else {   // k rows paired as in pack_b's VNNI tiles (a pair per 32-bit lane), then a 16 x 16 transpose of pairs
    const __m512i idx = _mm512_load_si512(VNNI_ORDER);
    __m512i r[2][16];
    for (int i = 0; i < m; i += 16)
      for (int kb = 0; kb < kc / KB; ++kb) {
        for (int q = 0; q < 16; ++q) {
          const float* src = A + static_cast<int64_t>(p0 + kb * KB + 2 * q) * lda + i;
          const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + lda);
          for (int s = 0; s < np; ++s)
            r[s][q] = _mm512_permutexvar_epi16(
                idx, _mm512_inserti64x4(_mm512_castsi256_si512(piece(v0, s == 1)), piece(v1, s == 1), 1));
        }
        for (int s = 0; s < np; ++s) {
          transpose16(r[s]);
          uint16_t* t = dst + ((i / 16) * nkb + kb * np + s) * TILE;
          for (int q = 0; q < 16; ++q) _mm512_storeu_si512(t + q * KB, r[s][q]);
        }
      }
  }
}

// B rows [p0, p0 + kc), columns [0, n) -> VNNI tiles (j / 16, kb): tile row r holds k rows 2r and 2r + 1 of the
// block interleaved column by column. BT: B is given transposed (n x k, ldb), element (p, j) at B[j * ldb + p]: a
// column's consecutive k pairs are then adjacent, and the tile is a 16 x 16 transpose of those pairs.
template <bool BT>
inline void pack_b(const float* B, int ldb, int n, int p0, int kc, int splits, uint16_t* dst) {
  const int np = pieces(splits), nkb = kc / KB * np;
  if constexpr (!BT) {
    const __m512i idx = _mm512_load_si512(VNNI_ORDER);
    for (int kb = 0; kb < kc / KB; ++kb)
      for (int r = 0; r < 16; ++r) {
        const float* r0 = B + static_cast<int64_t>(p0 + kb * KB + 2 * r) * ldb;
        const float* r1 = r0 + ldb;
        for (int j = 0; j < n; j += 16) {
          const __m512 v0 = _mm512_loadu_ps(r0 + j), v1 = _mm512_loadu_ps(r1 + j);
          for (int s = 0; s < np; ++s) {
            const bool lo = s == 1;
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(piece(v0, lo)), piece(v1, lo), 1);
            uint16_t* t = dst + ((j / 16) * nkb + kb * np + s) * TILE + r * KB;
            _mm512_storeu_si512(t, _mm512_permutexvar_epi16(idx, both));
          }
        }
      }
  } else {
    alignas(64) uint32_t tmp[16][16];   // [column][k pair]
    for (int j = 0; j < n; j += 16)
      for (int kb = 0; kb < kc / KB; ++kb)
        for (int s = 0; s < np; ++s) {
          const bool lo = s == 1;
          for (int c = 0; c < 16; ++c) {
            const float* src = B + static_cast<int64_t>(j + c) * ldb + p0 + kb * KB;
            _mm256_store_si256((__m256i*)tmp[c], piece(_mm512_loadu_ps(src), lo));
            _mm256_store_si256((__m256i*)tmp[c] + 1, piece(_mm512_loadu_ps(src + 16), lo));
          }
          uint32_t* t = reinterpret_cast<uint32_t*>(dst + ((j / 16) * nkb + kb * np + s) * TILE);
          for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c) t[r * 16 + c] = tmp[c][r];
        }
  }
}

// The 32 x 32 block of C at c (row stride ldc) = (or += with load) the product of A's two 16-row tiles a0, a1 and
// B's two 16-column tiles b0, b1 over nkb packed k tiles: with np = 2 the tiles alternate high and low pieces.
inline void block(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1, int nkb, int np,
                  float* c, int ldc, bool load) {
  const int64_t cs = static_cast<int64_t>(ldc) * 4;
  if (load) {
    _tile_loadd(0, c, cs); _tile_loadd(1, c + 16, cs);
    _tile_loadd(2, c + 16 * ldc, cs); _tile_loadd(3, c + 16 * ldc + 16, cs);
  } else {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  }
  // each multiply issued as soon as its operands are loaded
  auto step = [](const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1) {
    _tile_loadd(4, a0, 64); _tile_loadd(6, b0, 64); _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1, 64); _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1, 64); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  };
  if (np == 1) {
    for (int kb = 0; kb < nkb; ++kb) step(a0 + kb * TILE, a1 + kb * TILE, b0 + kb * TILE, b1 + kb * TILE);
  } else {
    for (int kb = 0; kb < nkb; kb += 2) {   // tiles kb: high pieces, kb + 1: low pieces
      const int h = kb * TILE, l = h + TILE;
      step(a0 + h, a1 + h, b0 + l, b1 + l);                          // Ah Bl
      _tile_loadd(6, b0 + h, 64); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);   // Ah Bh
      _tile_loadd(7, b1 + h, 64); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(4, a0 + l, 64); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);   // Al Bh
      _tile_loadd(5, a1 + l, 64); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, cs); _tile_stored(1, c + 16, cs);
  _tile_stored(2, c + 16 * ldc, cs); _tile_stored(3, c + 16 * ldc + 16, cs);
}

// C (m x n) = A B, or C += A B with acc; AT / BT: A / B given transposed (pack_a, pack_b). sym: C is symmetric
// (m == n): only the 32 x 32 blocks on or above the diagonal are computed, the lower triangle copied from the upper.
template <bool AT = false, bool BT = false>
inline void product(Packs& pk, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int m, int n,
                    int k, int splits, bool sym, bool acc = false) {
  configure();
  for (int p0 = 0; p0 < k; p0 += KCH) {
    const int kc = std::min(KCH, k - p0), np = pieces(splits), nkb = kc / KB * np;
    pack_a<AT>(A, lda, m, p0, kc, splits, pk.a.data());
    pack_b<BT>(B, ldb, n, p0, kc, splits, pk.b.data());
    for (int j = 0; j < n; j += 32) {
      const uint16_t* b0 = pk.b.data() + (j / 16) * nkb * TILE;
      for (int i = 0; i < (sym ? std::min(m, j + 32) : m); i += 32) {
        const uint16_t* a0 = pk.a.data() + (i / 16) * nkb * TILE;
        block(a0, a0 + nkb * TILE, b0, b0 + nkb * TILE, nkb, np, C + static_cast<int64_t>(i) * ldc + j, ldc,
              acc || p0 > 0);
      }
    }
  }
  _tile_release();
  if (sym)
    for (int i = 1; i < m; ++i)
      for (int j = 0; j < i; ++j) C[static_cast<int64_t>(i) * ldc + j] = C[static_cast<int64_t>(j) * ldc + i];
}

#else
inline bool ready() { return false; }
#endif

}  // namespace nanochat::amx
