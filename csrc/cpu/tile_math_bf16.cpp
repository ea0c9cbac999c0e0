#include "tile_math_bf16.h"

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FAE_NO_MULTIVERSION)
#define FAE_BF16_GEMM 1
#include <immintrin.h>
#endif

namespace flash_attn_ext::cpu {

#ifdef FAE_BF16_GEMM
namespace {

#define FAE_BF16_TARGET __attribute__((target("avx512bf16,avx512vl,avx512f,avx512bw")))
#define FAE_BF16_INLINE FAE_BF16_TARGET inline __attribute__((always_inline))

// kRows x (16 * kVecs) block of C in kRows * kVecs zmm accumulators over the whole K loop:
// per K pair, kVecs loads of B and one 32-bit broadcast of A per row. 12 x 32 uses 24
// accumulators + 2 B + 1 A of the 32 registers. `tail` masks the last vector's columns.
template <int kRows, int kVecs>
FAE_BF16_INLINE void micro_kernel(int64_t K2, float alpha, const uint16_t* __restrict A, int64_t lda,
                                  const uint32_t* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                                  bool accumulate, __mmask16 tail) {
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512bh b[kVecs];
    for (int v = 0; v < kVecs; ++v)
      b[v] = (__m512bh)(v + 1 < kVecs ? _mm512_loadu_si512(B + k2 * ldb + 16 * v)
                                      : _mm512_maskz_loadu_epi32(tail, B + k2 * ldb + 16 * v));
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * k2, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) {
      const __mmask16 m = v + 1 < kVecs ? __mmask16(0xFFFF) : tail;
      float* c = C + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], scale);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, c));
      _mm512_mask_storeu_ps(c, m, x);
    }
}

template <int kVecs>
FAE_BF16_INLINE void rows_block(int64_t M, int64_t K2, float alpha, const uint16_t* A, int64_t lda, const uint32_t* B,
                                int64_t ldb, float* C, int64_t ldc, bool accumulate, __mmask16 tail) {
  constexpr int kMain = 12;
  int64_t m = 0;
  for (; m + kMain <= M; m += kMain)
    micro_kernel<kMain, kVecs>(K2, alpha, A + m * lda, lda, B, ldb, C + m * ldc, ldc, accumulate, tail);
  const uint16_t* a = A + m * lda;
  float* c = C + m * ldc;
  // clang-format cannot lay out a run of macro-made case labels:
  // clang-format off
  switch (M - m) {
#define FAE_CASE(n) \
  case n: return micro_kernel<n, kVecs>(K2, alpha, a, lda, B, ldb, c, ldc, accumulate, tail);
    FAE_CASE(1) FAE_CASE(2) FAE_CASE(3) FAE_CASE(4) FAE_CASE(5) FAE_CASE(6)
    FAE_CASE(7) FAE_CASE(8) FAE_CASE(9) FAE_CASE(10) FAE_CASE(11)
#undef FAE_CASE
    default: return;
  }
  // clang-format on
}

FAE_BF16_TARGET void gemm_bf16(int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
                               const uint32_t* Bp, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t K2 = K / 2;
  int64_t n = 0;
  for (; n + 32 <= N; n += 32) rows_block<2>(M, K2, alpha, A, lda, Bp + n, ldb, C + n, ldc, accumulate, 0xFFFF);
  if (n + 16 < N) {  // 17..31 columns left: a full vector and a masked one
    rows_block<2>(M, K2, alpha, A, lda, Bp + n, ldb, C + n, ldc, accumulate, __mmask16((1u << (N - n - 16)) - 1));
  } else if (n < N) {  // 1..16 columns left
    const int64_t left = N - n;
    rows_block<1>(M, K2, alpha, A, lda, Bp + n, ldb, C + n, ldc, accumulate,
                  left == 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1));
  }
}

FAE_BF16_TARGET void to_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, int64_t cols_pad, uint16_t* dst,
                             int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)));
    if (c < cols) {
      const __mmask16 m = __mmask16((1u << (cols - c)) - 1);
      _mm256_mask_storeu_epi16(d + c, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + c)));
    }
    for (c = cols; c < cols_pad; ++c) d[c] = 0;
  }
}

}  // namespace
#endif

bool has_bf16_gemm() {
#ifdef FAE_BF16_GEMM
  static const bool has =
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

void tile_gemm_bf16(int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#ifdef FAE_BF16_GEMM
  if (!has_bf16_gemm() || K % 2 != 0) std::abort();  // callers check and pad
  gemm_bf16(M, N, K, alpha, A, lda, Bp, ldb, C, ldc, accumulate);
#else
  (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)lda, (void)Bp, (void)ldb, (void)C, (void)ldc, (void)accumulate;
  std::abort();
#endif
}

void pack_bf16_transposed(const uint16_t* const* rows, int64_t n, int64_t dim, uint32_t* Bp, int64_t ld) {
  const int64_t pairs = dim / 2;
  for (int64_t r = 0; r < n; ++r) {
    const uint16_t* x = rows[r];
    for (int64_t k2 = 0; k2 < pairs; ++k2) {
      uint32_t w;
      std::memcpy(&w, x + 2 * k2, sizeof(w));
      Bp[k2 * ld + r] = w;
    }
    if (dim % 2) Bp[pairs * ld + r] = x[dim - 1];
  }
}

void pack_bf16_row_pairs(const uint16_t* const* rows, int64_t n, int64_t dim, uint32_t* Bp, int64_t ld) {
  for (int64_t r = 0; r + 1 < n; r += 2) {
    const uint16_t* lo = rows[r];
    const uint16_t* hi = rows[r + 1];
    uint32_t* out = Bp + (r / 2) * ld;
    for (int64_t c = 0; c < dim; ++c) out[c] = uint32_t(lo[c]) | (uint32_t(hi[c]) << 16);
  }
  if (n % 2) {
    const uint16_t* lo = rows[n - 1];
    uint32_t* out = Bp + (n / 2) * ld;
    for (int64_t c = 0; c < dim; ++c) out[c] = lo[c];
  }
}

void floats_to_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, int64_t cols_pad, uint16_t* dst,
                    int64_t ldd) {
#ifdef FAE_BF16_GEMM
  if (has_bf16_gemm()) return to_bf16(src, lds, rows, cols, cols_pad, dst, ldd);
#endif
  for (int64_t r = 0; r < rows; ++r)  // round to nearest even by hand (NaN stays NaN)
    for (int64_t c = 0; c < cols_pad; ++c) {
      if (c >= cols) {
        dst[r * ldd + c] = 0;
        continue;
      }
      uint32_t bits;
      std::memcpy(&bits, src + r * lds + c, sizeof(bits));
      const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
      dst[r * ldd + c] = nan ? uint16_t((bits >> 16) | 0x40u) : uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
}

}  // namespace flash_attn_ext::cpu
