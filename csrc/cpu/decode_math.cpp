#include "decode_math.h"

#include <cstdlib>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "simd.h"

namespace flash_attn_ext::cpu {
namespace {

using simd::load8;
using simd::store8;
using simd::v8f;

// Entry e of n requests its share of the list's rows, so the requests spread evenly over the
// arithmetic instead of going out in one burst the miss queues would drop.
FAE_INLINE void prefetch_share(const PrefetchList& list, int64_t e, int64_t n) {
  if (list.rows == nullptr || n == 0) return;
  for (int64_t i = e * list.count / n; i < (e + 1) * list.count / n; ++i) {
    const char* row = static_cast<const char*>(list.rows[i]);
    for (int64_t off = 0; off < list.bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
}

FAE_INLINE float widen(float x) { return x; }
FAE_INLINE float widen(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FAE_INLINE float widen(int8_t x) { return static_cast<float>(x); }
FAE_INLINE float widen(Fp8E4M3 x) {  // the scalar form of simd::load8_e4m3
  const uint32_t em = x.bits & 0x7fu;
  float f;
  if (em == 0x7fu) {
    f = std::numeric_limits<float>::quiet_NaN();
  } else if (em < 8) {
    f = static_cast<float>(em) * (1.0f / 512.0f);
  } else {
    const uint32_t u = (em << 20) + (120u << 23);
    std::memcpy(&f, &u, sizeof(f));
  }
  return (x.bits & 0x80u) ? -f : f;
}
FAE_INLINE v8f load8(const Fp8E4M3* p) { return simd::load8_e4m3(&p->bits); }

// bf16 rows are read as 32-bit words, 16 elements a vector: a shift gives the even elements
// and a mask the odd ones as two float vectors, no shuffles. The float rows they meet (scaled
// q, the accumulators) are kept pair-split to match (see decode_math.h).
FAE_INLINE void load16_split(const uint16_t* p, v8f& even, v8f& odd) {
  simd::v8u w;
  std::memcpy(&w, p, sizeof(w));
  even = (v8f)(w << 16);
  odd = (v8f)(w & 0xffff0000u);
}

template <int kRows>
FAE_INLINE void dot_rows_bf16_n(const float* __restrict q, int64_t dim, const uint16_t* __restrict k, float* s,
                                int64_t ld_s) {
  v8f acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = v8f{};
  const int64_t split_end = dim - dim % 16;
  for (int64_t d = 0; d < split_end; d += 16) {
    v8f ke, ko;
    load16_split(k + d, ke, ko);
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] += load8(q + r * dim + d) * ke;
      acc[r][1] += load8(q + r * dim + d + 8) * ko;
    }
  }
  float sums[kRows + 3];
  for (int r = 0; r < kRows; ++r) acc[r][0] += acc[r][1];
  for (int r = 0; r < kRows; r += 4)
    simd::hsum4(acc[r][0], r + 1 < kRows ? acc[r + 1][0] : v8f{}, r + 2 < kRows ? acc[r + 2][0] : v8f{},
                r + 3 < kRows ? acc[r + 3][0] : v8f{}, sums + r);
  for (int r = 0; r < kRows; ++r) {
    float sum = sums[r];
    for (int64_t t = split_end; t < dim; ++t) sum += q[r * dim + t] * widen(k[t]);
    s[r * ld_s] = sum;
  }
}

template <int kRows>
FAE_INLINE void axpy_rows_bf16_n(const float* __restrict p, int64_t ld_p, int64_t cols, const uint16_t* const* v,
                                 int64_t dim, float* __restrict acc) {
  const int64_t split_end = dim - dim % 16;
  for (int64_t d = 0; d < split_end; d += 16) {
    v8f a[kRows][2];
    for (int r = 0; r < kRows; ++r) {
      a[r][0] = load8(acc + r * dim + d);
      a[r][1] = load8(acc + r * dim + d + 8);
    }
    for (int64_t c = 0; c < cols; ++c) {
      v8f ve, vo;
      load16_split(v[c] + d, ve, vo);
      for (int r = 0; r < kRows; ++r) {
        const float pr = p[r * ld_p + c];
        a[r][0] += pr * ve;
        a[r][1] += pr * vo;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      store8(acc + r * dim + d, a[r][0]);
      store8(acc + r * dim + d + 8, a[r][1]);
    }
  }
  for (int64_t d = split_end; d < dim; ++d)
    for (int r = 0; r < kRows; ++r) {
      float sum = acc[r * dim + d];
      for (int64_t c = 0; c < cols; ++c) sum += p[r * ld_p + c] * widen(v[c][d]);
      acc[r * dim + d] = sum;
    }
}

// kRows query rows against one key row. kUnroll independent accumulators per row keep the
// FMA pipes busy when rows are few (one row alone would wait on its own FMA latency).
template <int kRows, typename src_t>
FAE_INLINE void dot_rows_n(const float* __restrict q, int64_t dim, const src_t* __restrict k, float* s, int64_t ld_s) {
  constexpr int kUnroll = kRows >= 4 ? 1 : 4 / kRows;
  v8f acc[kRows][kUnroll];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kUnroll; ++u) acc[r][u] = v8f{};
  int64_t d = 0;
  for (; d + 8 * kUnroll <= dim; d += 8 * kUnroll)
    for (int u = 0; u < kUnroll; ++u) {
      const v8f kv = load8(k + d + 8 * u);
      for (int r = 0; r < kRows; ++r) acc[r][u] += load8(q + r * dim + d + 8 * u) * kv;
    }
  for (; d + 8 <= dim; d += 8) {
    const v8f kv = load8(k + d);
    for (int r = 0; r < kRows; ++r) acc[r][0] += load8(q + r * dim + d) * kv;
  }
  float sums[kRows + 3];
  for (int r = 0; r < kRows; ++r)
    for (int u = 1; u < kUnroll; ++u) acc[r][0] += acc[r][u];
  for (int r = 0; r < kRows; r += 4)  // four rows' horizontal sums in one shuffle tree
    simd::hsum4(acc[r][0], r + 1 < kRows ? acc[r + 1][0] : v8f{}, r + 2 < kRows ? acc[r + 2][0] : v8f{},
                r + 3 < kRows ? acc[r + 3][0] : v8f{}, sums + r);
  for (int r = 0; r < kRows; ++r) {
    float sum = sums[r];
    for (int64_t t = d; t < dim; ++t) sum += q[r * dim + t] * widen(k[t]);
    s[r * ld_s] = sum;
  }
}

// Entry e: rows of q[e] against key row k[e] into s[e], with its share of the prefetch list.
template <int kRows, typename src_t>
FAE_INLINE void dot_list_n(int64_t n, const float* const* q, const src_t* const* k, float* const* s, int64_t dim,
                           int64_t ld_s, const PrefetchList& prefetch) {
  for (int64_t e = 0; e < n; ++e) {
    prefetch_share(prefetch, e, n);
    if constexpr (std::is_same_v<src_t, uint16_t>)
      dot_rows_bf16_n<kRows>(q[e], dim, k[e], s[e], ld_s);
    else
      dot_rows_n<kRows>(q[e], dim, k[e], s[e], ld_s);
  }
}

template <typename src_t>
FAE_INLINE void dot_list_any(int64_t n, const float* const* q, const src_t* const* k, float* const* s, int64_t rows,
                             int64_t dim, int64_t ld_s, const PrefetchList& prefetch) {
  switch (rows) {
    case 1: return dot_list_n<1>(n, q, k, s, dim, ld_s, prefetch);
    case 2: return dot_list_n<2>(n, q, k, s, dim, ld_s, prefetch);
    case 3: return dot_list_n<3>(n, q, k, s, dim, ld_s, prefetch);
    case 4: return dot_list_n<4>(n, q, k, s, dim, ld_s, prefetch);
    case 5: return dot_list_n<5>(n, q, k, s, dim, ld_s, prefetch);
    case 6: return dot_list_n<6>(n, q, k, s, dim, ld_s, prefetch);
    case 7: return dot_list_n<7>(n, q, k, s, dim, ld_s, prefetch);
    default: return dot_list_n<8>(n, q, k, s, dim, ld_s, prefetch);
  }
}

// kRows accumulator rows x (8 * kWidth) features stay in registers across the whole key tile;
// each step loads one V row's slice once and broadcasts one probability per row. Eight rows
// use one vector each so 8 accumulators + V + broadcast fit AVX2's 16 registers.
template <int kRows, typename src_t>
FAE_INLINE void axpy_rows_n(const float* __restrict p, int64_t ld_p, int64_t cols, const src_t* const* v, int64_t dim,
                            float* __restrict acc) {
  constexpr int kWidth = kRows <= 4 ? 2 : 1;
  int64_t d = 0;
  for (; d + 8 * kWidth <= dim; d += 8 * kWidth) {
    v8f a[kRows][kWidth];
    for (int r = 0; r < kRows; ++r)
      for (int w = 0; w < kWidth; ++w) a[r][w] = load8(acc + r * dim + d + 8 * w);
    for (int64_t c = 0; c < cols; ++c) {
      v8f vv[kWidth];
      for (int w = 0; w < kWidth; ++w) vv[w] = load8(v[c] + d + 8 * w);
      for (int r = 0; r < kRows; ++r) {
        const float pr = p[r * ld_p + c];
        for (int w = 0; w < kWidth; ++w) a[r][w] += pr * vv[w];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int w = 0; w < kWidth; ++w) store8(acc + r * dim + d + 8 * w, a[r][w]);
  }
  for (; d < dim; ++d)  // features past the last full vector (head dims that are not multiples of 16)
    for (int r = 0; r < kRows; ++r) {
      float sum = acc[r * dim + d];
      for (int64_t c = 0; c < cols; ++c) sum += p[r * ld_p + c] * widen(v[c][d]);
      acc[r * dim + d] = sum;
    }
}

template <int kRows, typename src_t>
FAE_INLINE void axpy_rows_pick(const float* p, int64_t ld_p, int64_t cols, const src_t* const* v, int64_t dim,
                               float* acc) {
  if constexpr (std::is_same_v<src_t, uint16_t>)
    axpy_rows_bf16_n<kRows>(p, ld_p, cols, v, dim, acc);
  else
    axpy_rows_n<kRows>(p, ld_p, cols, v, dim, acc);
}

template <typename src_t>
FAE_INLINE void axpy_rows_any(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const src_t* const* v,
                              int64_t dim, float* acc) {
  for (int64_t r0 = 0; r0 < rows;) {
    const float* pr = p + r0 * ld_p;
    float* ar = acc + r0 * dim;
    switch (rows - r0) {
      case 1:
        axpy_rows_pick<1>(pr, ld_p, cols, v, dim, ar);
        r0 += 1;
        break;
      case 2:
        axpy_rows_pick<2>(pr, ld_p, cols, v, dim, ar);
        r0 += 2;
        break;
      case 3:
        axpy_rows_pick<3>(pr, ld_p, cols, v, dim, ar);
        r0 += 3;
        break;
      case 4:
        axpy_rows_pick<4>(pr, ld_p, cols, v, dim, ar);
        r0 += 4;
        break;
      case 5:
        axpy_rows_pick<5>(pr, ld_p, cols, v, dim, ar);
        r0 += 5;
        break;
      case 6:
        axpy_rows_pick<6>(pr, ld_p, cols, v, dim, ar);
        r0 += 6;
        break;
      case 7:
        axpy_rows_pick<7>(pr, ld_p, cols, v, dim, ar);
        r0 += 7;
        break;
      default:
        axpy_rows_pick<8>(pr, ld_p, cols, v, dim, ar);
        r0 += 8;
        break;
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FAE_NO_MULTIVERSION)
#define FAE_BF16_DOT 1
#define FAE_TARGET_BF16 __attribute__((target("avx512bf16,avx512vl,avx512f,avx512bw"), always_inline))

// vdpbf16ps: 16 bf16 products of q and k per instruction, summed in pairs into 8 fp32 lanes
// (half the instructions of widen-then-FMA, and no widening at all).
template <int kRows>
FAE_TARGET_BF16 inline void dot_rows_bf16_dp_n(const uint16_t* __restrict q, int64_t dim, const uint16_t* __restrict k,
                                               float scale, float* s, int64_t ld_s) {
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t main_end = dim - dim % 16;
  for (int64_t d = 0; d < main_end; d += 16) {
    const __m256bh kv = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + d));
    for (int r = 0; r < kRows; ++r)
      acc[r] =
          _mm256_dpbf16_ps(acc[r], (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * dim + d)), kv);
  }
  float sums[kRows + 3];
  for (int r = 0; r < kRows; r += 4)
    simd::hsum4((v8f)acc[r], r + 1 < kRows ? (v8f)acc[r + 1] : v8f{}, r + 2 < kRows ? (v8f)acc[r + 2] : v8f{},
                r + 3 < kRows ? (v8f)acc[r + 3] : v8f{}, sums + r);
  for (int r = 0; r < kRows; ++r) {
    float sum = sums[r];
    for (int64_t t = main_end; t < dim; ++t) sum += widen(q[r * dim + t]) * widen(k[t]);
    s[r * ld_s] = scale * sum;
  }
}

template <int kRows>
__attribute__((target("avx512bf16,avx512vl,avx512f,avx512bw"))) void dot_list_bf16_dp_n(
    int64_t n, const uint16_t* const* q, const uint16_t* const* k, float* const* s, int64_t dim, int64_t ld_s,
    float scale, const PrefetchList& prefetch) {
  for (int64_t e = 0; e < n; ++e) {
    prefetch_share(prefetch, e, n);
    dot_rows_bf16_dp_n<kRows>(q[e], dim, k[e], scale, s[e], ld_s);
  }
}
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FAE_NO_MULTIVERSION)
#define FAE_Q8_AVX2 1
#define FAE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline))

// 8 stored codes widened to float in registers. int8: vpmovsxbd, vcvtdq2ps (GCC's vector
// extensions scalarise this 8 -> 32 bit widening, measured 2.4-3.1x the bf16 cache's decode
// time, so the loops below use intrinsics). e4m3: its exponent and mantissa moved up 7 bits
// and the sign to bit 15 make an fp16 of the value times 2^-8, subnormals included (both
// formats' subnormals line up), so vcvtph2ps and a multiply by 256 give it exactly.
FAE_TARGET_AVX2 inline v8f widen8_avx2(const int8_t* p) {
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
FAE_TARGET_AVX2 inline v8f widen8_avx2(const Fp8E4M3* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i em = _mm_and_si128(b, _mm_set1_epi16(0x7f));
  // the NaN codes (0x7f, 0xff) read as NaN, as the portable loop and torch read them: their
  // fp16 gets an all-ones exponent (its mantissa is not zero)
  const __m128i nan = _mm_and_si128(_mm_cmpeq_epi16(em, _mm_set1_epi16(0x7f)), _mm_set1_epi16(0x7c00));
  const __m128i h =
      _mm_or_si128(_mm_or_si128(_mm_slli_epi16(em, 7), nan), _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
  return (v8f)_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
}

// dot_rows_n with the AVX2 widening. (The loops are written again rather than shared with the
// templates above through a loader argument: GCC inlines the always_inline intrinsics only into
// functions that carry their target, so every function of the chain needs the attribute; tried,
// the shared form fails to compile with "target specific option mismatch".)
template <int kRows, typename src_t>
FAE_TARGET_AVX2 inline void dot_q8_n(const float* __restrict q, int64_t dim, const src_t* __restrict k, float* s,
                                     int64_t ld_s) {
  constexpr int kUnroll = kRows >= 4 ? 1 : 4 / kRows;
  v8f acc[kRows][kUnroll];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kUnroll; ++u) acc[r][u] = v8f{};
  int64_t d = 0;
  for (; d + 8 * kUnroll <= dim; d += 8 * kUnroll)
    for (int u = 0; u < kUnroll; ++u) {
      const v8f kv = widen8_avx2(k + d + 8 * u);
      for (int r = 0; r < kRows; ++r) acc[r][u] += load8(q + r * dim + d + 8 * u) * kv;
    }
  for (; d + 8 <= dim; d += 8) {
    const v8f kv = widen8_avx2(k + d);
    for (int r = 0; r < kRows; ++r) acc[r][0] += load8(q + r * dim + d) * kv;
  }
  float sums[kRows + 3];
  for (int r = 0; r < kRows; ++r)
    for (int u = 1; u < kUnroll; ++u) acc[r][0] += acc[r][u];
  for (int r = 0; r < kRows; r += 4)
    simd::hsum4(acc[r][0], r + 1 < kRows ? acc[r + 1][0] : v8f{}, r + 2 < kRows ? acc[r + 2][0] : v8f{},
                r + 3 < kRows ? acc[r + 3][0] : v8f{}, sums + r);
  for (int r = 0; r < kRows; ++r) {
    float sum = sums[r];
    for (int64_t t = d; t < dim; ++t) sum += q[r * dim + t] * widen(k[t]);
    s[r * ld_s] = sum;
  }
}

template <int kRows, typename src_t>
FAE_TARGET_AVX2 inline void dot_list_q8_n(int64_t n, const float* const* q, const src_t* const* k, float* const* s,
                                          int64_t dim, int64_t ld_s, const PrefetchList& prefetch) {
  for (int64_t e = 0; e < n; ++e) {
    prefetch_share(prefetch, e, n);
    dot_q8_n<kRows>(q[e], dim, k[e], s[e], ld_s);
  }
}

template <typename src_t>
__attribute__((target("avx2,fma,f16c"))) void dot_list_q8(int64_t n, const float* const* q, const src_t* const* k,
                                                          float* const* s, int64_t rows, int64_t dim, int64_t ld_s,
                                                          const PrefetchList& prefetch) {
  switch (rows) {
    case 1: return dot_list_q8_n<1>(n, q, k, s, dim, ld_s, prefetch);
    case 2: return dot_list_q8_n<2>(n, q, k, s, dim, ld_s, prefetch);
    case 3: return dot_list_q8_n<3>(n, q, k, s, dim, ld_s, prefetch);
    case 4: return dot_list_q8_n<4>(n, q, k, s, dim, ld_s, prefetch);
    case 5: return dot_list_q8_n<5>(n, q, k, s, dim, ld_s, prefetch);
    case 6: return dot_list_q8_n<6>(n, q, k, s, dim, ld_s, prefetch);
    case 7: return dot_list_q8_n<7>(n, q, k, s, dim, ld_s, prefetch);
    default: return dot_list_q8_n<8>(n, q, k, s, dim, ld_s, prefetch);
  }
}

// axpy_rows_n with the AVX2 widening.
template <int kRows, typename src_t>
FAE_TARGET_AVX2 inline void axpy_q8_n(const float* __restrict p, int64_t ld_p, int64_t cols, const src_t* const* v,
                                      int64_t dim, float* __restrict acc) {
  constexpr int kWidth = kRows <= 4 ? 2 : 1;
  int64_t d = 0;
  for (; d + 8 * kWidth <= dim; d += 8 * kWidth) {
    v8f a[kRows][kWidth];
    for (int r = 0; r < kRows; ++r)
      for (int w = 0; w < kWidth; ++w) a[r][w] = load8(acc + r * dim + d + 8 * w);
    for (int64_t c = 0; c < cols; ++c) {
      v8f vv[kWidth];
      for (int w = 0; w < kWidth; ++w) vv[w] = widen8_avx2(v[c] + d + 8 * w);
      for (int r = 0; r < kRows; ++r) {
        const float pr = p[r * ld_p + c];
        for (int w = 0; w < kWidth; ++w) a[r][w] += pr * vv[w];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int w = 0; w < kWidth; ++w) store8(acc + r * dim + d + 8 * w, a[r][w]);
  }
  for (; d < dim; ++d)
    for (int r = 0; r < kRows; ++r) {
      float sum = acc[r * dim + d];
      for (int64_t c = 0; c < cols; ++c) sum += p[r * ld_p + c] * widen(v[c][d]);
      acc[r * dim + d] = sum;
    }
}

template <typename src_t>
__attribute__((target("avx2,fma,f16c"))) void axpy_q8(const float* p, int64_t ld_p, int64_t rows, int64_t cols,
                                                      const src_t* const* v, int64_t dim, float* acc) {
  for (int64_t r0 = 0; r0 < rows;) {
    const float* pr = p + r0 * ld_p;
    float* ar = acc + r0 * dim;
    const int64_t left = rows - r0;
    if (left >= 8) {
      axpy_q8_n<8>(pr, ld_p, cols, v, dim, ar);
      r0 += 8;
    } else if (left >= 4) {
      axpy_q8_n<4>(pr, ld_p, cols, v, dim, ar);
      r0 += 4;
    } else if (left >= 2) {
      axpy_q8_n<2>(pr, ld_p, cols, v, dim, ar);
      r0 += 2;
    } else {
      axpy_q8_n<1>(pr, ld_p, cols, v, dim, ar);
      r0 += 1;
    }
  }
}
#endif

}  // namespace

bool has_bf16_dot() {
#ifdef FAE_BF16_DOT
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

void dot_rows_bf16_dot(int64_t n, const uint16_t* const* q, const uint16_t* const* k, float* const* s, int64_t rows,
                       int64_t dim, int64_t ld_s, float scale, const PrefetchList& prefetch) {
#ifdef FAE_BF16_DOT
  if (!has_bf16_dot()) std::abort();
  switch (rows) {
    case 1: return dot_list_bf16_dp_n<1>(n, q, k, s, dim, ld_s, scale, prefetch);
    case 2: return dot_list_bf16_dp_n<2>(n, q, k, s, dim, ld_s, scale, prefetch);
    case 3: return dot_list_bf16_dp_n<3>(n, q, k, s, dim, ld_s, scale, prefetch);
    case 4: return dot_list_bf16_dp_n<4>(n, q, k, s, dim, ld_s, scale, prefetch);
    case 5: return dot_list_bf16_dp_n<5>(n, q, k, s, dim, ld_s, scale, prefetch);
    case 6: return dot_list_bf16_dp_n<6>(n, q, k, s, dim, ld_s, scale, prefetch);
    case 7: return dot_list_bf16_dp_n<7>(n, q, k, s, dim, ld_s, scale, prefetch);
    default: return dot_list_bf16_dp_n<8>(n, q, k, s, dim, ld_s, scale, prefetch);
  }
#else
  (void)n, (void)q, (void)k, (void)s, (void)rows, (void)dim, (void)ld_s, (void)scale, (void)prefetch;
  std::abort();  // callers check has_bf16_dot() first
#endif
}

void to_pair_split(float* x, int64_t dim) {
  float block[16];
  for (int64_t d = 0; d + 16 <= dim; d += 16) {
    for (int t = 0; t < 8; ++t) {
      block[t] = x[d + 2 * t];
      block[8 + t] = x[d + 2 * t + 1];
    }
    std::memcpy(x + d, block, sizeof(block));
  }
}

void from_pair_split(float* x, int64_t dim) {
  float block[16];
  for (int64_t d = 0; d + 16 <= dim; d += 16) {
    for (int t = 0; t < 8; ++t) {
      block[2 * t] = x[d + t];
      block[2 * t + 1] = x[d + 8 + t];
    }
    std::memcpy(x + d, block, sizeof(block));
  }
}

FAE_MULTIVERSION
void dot_rows(int64_t n, const float* const* q, const float* const* k, float* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& prefetch) {
  dot_list_any(n, q, k, s, rows, dim, ld_s, prefetch);
}

FAE_MULTIVERSION
void dot_rows(int64_t n, const float* const* q, const uint16_t* const* k_bf16, float* const* s, int64_t rows,
              int64_t dim, int64_t ld_s, const PrefetchList& prefetch) {
  dot_list_any(n, q, k_bf16, s, rows, dim, ld_s, prefetch);
}

void dot_rows(int64_t n, const double* const* q, const double* const* k, double* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& /*prefetch*/) {
  for (int64_t e = 0; e < n; ++e)
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0.0;
      for (int64_t d = 0; d < dim; ++d) sum += q[e][r * dim + d] * k[e][d];
      s[e][r * ld_s] = sum;
    }
}

FAE_MULTIVERSION
void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const float* const* v, int64_t dim,
               float* acc) {
  axpy_rows_any(p, ld_p, rows, cols, v, dim, acc);
}

FAE_MULTIVERSION
void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const uint16_t* const* v_bf16, int64_t dim,
               float* acc) {
  axpy_rows_any(p, ld_p, rows, cols, v_bf16, dim, acc);
}

bool has_q8_avx2() {
#ifdef FAE_Q8_AVX2
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// The 8-bit cache loops: AVX2 where asked and present, else the portable templates (compiled
// for the baseline only: GCC scalarises their 8-byte widening, so they serve correctness on
// CPUs without AVX2, not speed).
void dot_rows(int64_t n, const float* const* q, const int8_t* const* k_int8, float* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& prefetch, bool avx2) {
#ifdef FAE_Q8_AVX2
  if (avx2 && has_q8_avx2()) return dot_list_q8(n, q, k_int8, s, rows, dim, ld_s, prefetch);
#endif
  (void)avx2;
  dot_list_any(n, q, k_int8, s, rows, dim, ld_s, prefetch);
}

void dot_rows(int64_t n, const float* const* q, const Fp8E4M3* const* k_fp8, float* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& prefetch, bool avx2) {
#ifdef FAE_Q8_AVX2
  if (avx2 && has_q8_avx2()) return dot_list_q8(n, q, k_fp8, s, rows, dim, ld_s, prefetch);
#endif
  (void)avx2;
  dot_list_any(n, q, k_fp8, s, rows, dim, ld_s, prefetch);
}

void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const int8_t* const* v_int8, int64_t dim,
               float* acc, bool avx2) {
#ifdef FAE_Q8_AVX2
  if (avx2 && has_q8_avx2()) return axpy_q8(p, ld_p, rows, cols, v_int8, dim, acc);
#endif
  (void)avx2;
  axpy_rows_any(p, ld_p, rows, cols, v_int8, dim, acc);
}

void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const Fp8E4M3* const* v_fp8, int64_t dim,
               float* acc, bool avx2) {
#ifdef FAE_Q8_AVX2
  if (avx2 && has_q8_avx2()) return axpy_q8(p, ld_p, rows, cols, v_fp8, dim, acc);
#endif
  (void)avx2;
  axpy_rows_any(p, ld_p, rows, cols, v_fp8, dim, acc);
}

void axpy_rows(const double* p, int64_t ld_p, int64_t rows, int64_t cols, const double* const* v, int64_t dim,
               double* acc) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const double pr = p[r * ld_p + c];
      for (int64_t d = 0; d < dim; ++d) acc[r * dim + d] += pr * v[c][d];
    }
}

}  // namespace flash_attn_ext::cpu
