#include "tile_math.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "simd.h"

namespace flash_attn_ext::cpu {
namespace {

// Register-blocked micro-kernel for float: kRows rows x 16 columns of C live in 2*kRows
// 8-float vectors (GCC vector extensions, lowered to AVX2/AVX-512 or SSE by each clone)
// across the whole K loop; each step loads 16 floats of B once and broadcasts one element of
// A per row. The main shape is 5 x 16: 10 accumulators + 2 B vectors + 1 broadcast + alpha
// fit AVX2's 16 registers. 6 x 16 spilled a B vector to the stack (seen in perf annotate)
// and ran 25% slower end to end.
using simd::load8;
using simd::store8;
using simd::v8f;
using simd::v8i;
constexpr int kCols = 16;

template <int kRows>
FAE_INLINE void micro_kernel_f32(int64_t K, float alpha, const float* __restrict A, int64_t a_m, int64_t a_k,
                                 const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                                 bool accumulate) {
  v8f acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = v8f{};
  for (int64_t k = 0; k < K; ++k) {
    const v8f b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + 8);
    for (int r = 0; r < kRows; ++r) {
      const float a = A[r * a_m + k * a_k];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float* c = C + r * ldc;
    v8f c0 = alpha * acc[r][0], c1 = alpha * acc[r][1];
    if (accumulate) {
      c0 += load8(c);
      c1 += load8(c + 8);
    }
    store8(c, c0);
    store8(c + 8, c1);
  }
}

// Any shape, one row at a time: the column tail of the float path and all of float64.
template <typename T>
FAE_INLINE void gemm_rows_generic(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t a_m, int64_t a_k,
                                  const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int kChunk = 32;
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      const int64_t nt = N - n0 < kChunk ? N - n0 : kChunk;
      T acc[kChunk] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T a = A[m * a_m + k * a_k];
        const T* b = B + k * ldb + n0;
        for (int64_t n = 0; n < nt; ++n) acc[n] += a * b[n];
      }
      for (int64_t n = 0; n < nt; ++n) c[n0 + n] = (accumulate ? c[n0 + n] : T(0)) + alpha * acc[n];
    }
  }
}

FAE_INLINE void gemm_f32(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t a_m = trans_a ? 1 : lda;  // element (m, k) of op(A) is A[m * a_m + k * a_k]
  const int64_t a_k = trans_a ? lda : 1;
  const int64_t n_main = N - N % kCols;
  for (int64_t n0 = 0; n0 < n_main; n0 += kCols) {
    int64_t m0 = 0;
    for (; m0 + 5 <= M; m0 += 5)
      micro_kernel_f32<5>(K, alpha, A + m0 * a_m, a_m, a_k, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    const float* a = A + m0 * a_m;
    float* c = C + m0 * ldc + n0;
    switch (M - m0) {
      case 5: micro_kernel_f32<5>(K, alpha, a, a_m, a_k, B + n0, ldb, c, ldc, accumulate); break;
      case 4: micro_kernel_f32<4>(K, alpha, a, a_m, a_k, B + n0, ldb, c, ldc, accumulate); break;
      case 3: micro_kernel_f32<3>(K, alpha, a, a_m, a_k, B + n0, ldb, c, ldc, accumulate); break;
      case 2: micro_kernel_f32<2>(K, alpha, a, a_m, a_k, B + n0, ldb, c, ldc, accumulate); break;
      case 1: micro_kernel_f32<1>(K, alpha, a, a_m, a_k, B + n0, ldb, c, ldc, accumulate); break;
      default: break;
    }
  }
  if (n_main < N)
    gemm_rows_generic<float>(M, N - n_main, K, alpha, A, a_m, a_k, B + n_main, ldb, C + n_main, ldc, accumulate);
}

// exp(x) for x <= 0 (softmax after the max shift), lane-wise on any float vector type V
// (IV its int lanes): 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p the degree-7 Taylor
// polynomial (relative error < 1e-8). Below -87 (where float exp underflows to denormals) the
// result is 0; NaN stays NaN. Every width computes the same bits per lane.
template <typename V, typename IV>
FAE_INLINE V exp_nonpositive(V x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V lo = V{} - 87.0f;
  const V xc = x < lo ? lo : x;
  const V t = xc * kLog2e + kRound;
  const V n = t - kRound;
  const V r = (xc - n * kLn2Hi) - n * kLn2Lo;
  V p = V{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // The low bits of t hold n (two's complement, |n| < 2^22): 2^n through the exponent field.
  const IV e = ((IV)t - 0x4B400000 + 127) << 23;
  const V y = p * (V)e;
  return x < lo ? V{} : y;
}
FAE_INLINE v8f exp_nonpositive8(v8f x) { return exp_nonpositive<v8f, v8i>(x); }
FAE_INLINE simd::v16f exp_nonpositive16(simd::v16f x) { return exp_nonpositive<simd::v16f, simd::v16i>(x); }

}  // namespace

FAE_MULTIVERSION
void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32(trans_a, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
               const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_rows_generic<double>(M, N, K, alpha, A, trans_a ? 1 : lda, trans_a ? lda : 1, B, ldb, C, ldc, accumulate);
}

FAE_MULTIVERSION
void tile_gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc) {
  for (int64_t n = 0; n < N; ++n) {
    const float* b = B + n * ldb;
    for (int64_t m = 0; m < M; ++m) {
      const float* a = A + m * lda;
      v8f acc0 = v8f{}, acc1 = v8f{};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        acc0 += load8(a + k) * load8(b + k);
        acc1 += load8(a + k + 8) * load8(b + k + 8);
      }
      acc0 += acc1;
      float sum = 0.0f;
      for (int t = 0; t < 8; ++t) sum += acc0[t];
      for (; k < K; ++k) sum += a[k] * b[k];
      C[m * ldc + n] = sum;
    }
  }
}

void tile_gemm_nt(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                  double* C, int64_t ldc) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) sum += A[m * lda + k] * B[n * ldb + k];
      C[m * ldc + n] = sum;
    }
}

FAE_MULTIVERSION
float row_max(const float* x, int64_t n) {
  // Two 8-lane running maxima; NaNs are tracked separately (x != x) so the max itself is a
  // plain compare-and-select the compiler keeps in vector registers.
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  v8f m0 = v8f{} + kNegInf, m1 = m0;
  v8i nan = v8i{};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v8f a = load8(x + j), b = load8(x + j + 8);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
    nan |= (a != a) | (b != b);
  }
  m0 = m1 > m0 ? m1 : m0;
  float m = kNegInf;
  bool has_nan = false;
  for (int t = 0; t < 8; ++t) {
    m = m0[t] > m ? m0[t] : m;
    has_nan |= nan[t] != 0;
  }
  for (; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    has_nan |= x[j] != x[j];
  }
  return has_nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;
  return m;
}

FAE_MULTIVERSION
float exp_shift_sum(float* x, int64_t n, float shift) {
  // 16 lanes while they last (the exp is the forward's cost once AMX does the products: at
  // 8 lanes it was a quarter of the bf16 forward's samples on the Xeon), then 8.
  simd::v16f sum16 = simd::v16f{};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const simd::v16f e = exp_nonpositive16(simd::load16(x + j) - shift);
    simd::store16(x + j, e);
    sum16 += e;
  }
  v8f sum8, high;
  std::memcpy(&sum8, &sum16, sizeof(sum8));
  std::memcpy(&high, reinterpret_cast<const char*>(&sum16) + sizeof(sum8), sizeof(high));
  sum8 += high;
  for (; j + 8 <= n; j += 8) {
    const v8f e = exp_nonpositive8(load8(x + j) - shift);
    store8(x + j, e);
    sum8 += e;
  }
  if (j < n) {  // tail: the row's padding is read and its lanes replaced by -inf, whose exp is 0
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const v8f neg_inf = v8f{} - std::numeric_limits<float>::infinity();
    const v8f t = lane < static_cast<int32_t>(n - j) ? load8(x + j) - shift : neg_inf;
    const v8f e = exp_nonpositive8(t);
    sum8 += e;
    store8(x + j, e);
  }
  float sum = 0.0f;
  for (int t = 0; t < 8; ++t) sum += sum8[t];
  return sum;
}

FAE_MULTIVERSION
void exp_nonpositive(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) simd::store16(x + j, exp_nonpositive16(simd::load16(x + j)));
  for (; j + 8 <= n; j += 8) store8(x + j, exp_nonpositive8(load8(x + j)));
  if (j < n) {  // the tail through a local vector: x's padding is not ours to read here
    float t[8] = {};
    std::memcpy(t, x + j, (n - j) * sizeof(float));
    store8(t, exp_nonpositive8(load8(t)));
    std::memcpy(x + j, t, (n - j) * sizeof(float));
  }
}

void exp_nonpositive(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}

double exp_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

FAE_MULTIVERSION
void scale_row(float* y, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) y[j] *= a;
}

FAE_MULTIVERSION
void scale_rows(const float* src, int64_t lds, int64_t rows, int64_t n, float a, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict s = src + r * lds;
    float* __restrict d = dst + r * ldd;
    for (int64_t c = 0; c < n; ++c) d[c] = a * s[c];
  }
}

// r[0..8) = the rows of an 8 x 8 block of 32-bit lanes -> out[j] = its column j: pairs of rows
// interleaved, then pairs of pairs, then halves.
FAE_INLINE void transpose8x8(const v8f* r, v8f* out) {
  v8f t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = FAE_SHUFFLE8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = FAE_SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = FAE_SHUFFLE8(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = FAE_SHUFFLE8(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = FAE_SHUFFLE8(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = FAE_SHUFFLE8(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = FAE_SHUFFLE8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    out[j + 4] = FAE_SHUFFLE8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

FAE_MULTIVERSION
void transpose_tile(const float* src, int64_t lds, int64_t K, int64_t M, float* dst, int64_t ldd) {
  int64_t k0 = 0;
  for (; k0 + 8 <= K; k0 += 8) {
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) {
      v8f r[8], c[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(src + (k0 + i) * lds + m0);
      transpose8x8(r, c);
      for (int j = 0; j < 8; ++j) store8(dst + (m0 + j) * ldd + k0, c[j]);
    }
    for (; m0 < M; ++m0)
      for (int i = 0; i < 8; ++i) dst[m0 * ldd + k0 + i] = src[(k0 + i) * lds + m0];
  }
  for (; k0 < K; ++k0)
    for (int64_t m = 0; m < M; ++m) dst[m * ldd + k0] = src[k0 * lds + m];
}

FAE_MULTIVERSION
void transpose_tile_u16(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, int64_t rows_pad, uint16_t* dst,
                        int64_t ldd) {
  using simd::v8u;
  using simd::v8u16;
  int64_t r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {  // 16-bit lanes widened to 32, the float network, narrowed
      v8f r[8], c[8];
      for (int i = 0; i < 8; ++i) {
        v8u16 h;
        std::memcpy(&h, src + (r0 + i) * lds + c0, sizeof(h));
        r[i] = (v8f) __builtin_convertvector(h, v8u);
      }
      transpose8x8(r, c);
      for (int j = 0; j < 8; ++j) {
        const v8u16 h = __builtin_convertvector((v8u)c[j], v8u16);
        std::memcpy(dst + (c0 + j) * ldd + r0, &h, sizeof(h));
      }
    }
    for (; c0 < cols; ++c0)
      for (int i = 0; i < 8; ++i) dst[c0 * ldd + r0 + i] = src[(r0 + i) * lds + c0];
  }
  for (int64_t c = 0; c < cols; ++c) {
    uint16_t* d = dst + c * ldd;
    for (int64_t r = r0; r < rows; ++r) d[r] = src[r * lds + c];
    for (int64_t r = rows; r < rows_pad; ++r) d[r] = 0;
  }
}

FAE_MULTIVERSION
void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = a + r * lda;
    const float* y = b + r * ldb;
    v8f acc = v8f{};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) acc += load8(x + c) * load8(y + c);
    float sum = simd::hsum(acc);
    for (; c < n; ++c) sum += x[c] * y[c];
    out[r] = sum;
  }
}

void scale_row(double* y, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) y[j] *= a;
}

}  // namespace flash_attn_ext::cpu
