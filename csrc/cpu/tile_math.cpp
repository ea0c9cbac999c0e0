#include "tile_math.h"

#include <cmath>
#include <cstring>
#include <limits>

// Run-time dispatch over instruction sets; see tile_math.h. Clang and other compilers get the
// portable build only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FAE_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FAE_MULTIVERSION
#endif
#define FAE_INLINE inline __attribute__((always_inline))

namespace flash_attn_ext::cpu {
namespace {

// Register block: kRows rows of C times kCols columns stay in accumulators across the K loop
// (4 x 32 floats = 16 AVX-512 or 16 AVX2 registers... the compiler spills what does not fit).
constexpr int kRows = 4;
constexpr int kCols = 32;

template <typename T>
FAE_INLINE void gemm_impl(bool trans_a, int64_t M, int64_t N, int64_t K, T alpha,
                          const T* __restrict A, int64_t lda, const T* __restrict B,
                          int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  // Element (m, k) of op(A).
  const int64_t a_m = trans_a ? 1 : lda;
  const int64_t a_k = trans_a ? lda : 1;
  int64_t m0 = 0;
  for (; m0 + kRows <= M; m0 += kRows) {
    int64_t n0 = 0;
    for (; n0 + kCols <= N; n0 += kCols) {
      T acc[kRows][kCols] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T* b = B + k * ldb + n0;
        T a[kRows];
        for (int r = 0; r < kRows; ++r) a[r] = A[(m0 + r) * a_m + k * a_k];
        for (int r = 0; r < kRows; ++r)
          for (int n = 0; n < kCols; ++n) acc[r][n] += a[r] * b[n];
      }
      for (int r = 0; r < kRows; ++r) {
        T* c = C + (m0 + r) * ldc + n0;
        if (accumulate) {
          for (int n = 0; n < kCols; ++n) c[n] += alpha * acc[r][n];
        } else {
          for (int n = 0; n < kCols; ++n) c[n] = alpha * acc[r][n];
        }
      }
    }
    // Column tail: row-at-a-time axpy over the remaining columns.
    if (n0 < N) {
      for (int r = 0; r < kRows; ++r) {
        T* c = C + (m0 + r) * ldc;
        T acc[kCols] = {};
        const int64_t nt = N - n0;
        for (int64_t k = 0; k < K; ++k) {
          const T a = A[(m0 + r) * a_m + k * a_k];
          const T* b = B + k * ldb + n0;
          for (int64_t n = 0; n < nt; ++n) acc[n] += a * b[n];
        }
        for (int64_t n = 0; n < nt; ++n) c[n0 + n] = (accumulate ? c[n0 + n] : T(0)) + alpha * acc[n];
      }
    }
  }
  // Row tail: one row at a time, kCols columns at a time.
  for (; m0 < M; ++m0) {
    T* c = C + m0 * ldc;
    for (int64_t n0 = 0; n0 < N; n0 += kCols) {
      const int64_t nt = N - n0 < kCols ? N - n0 : kCols;
      T acc[kCols] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T a = A[m0 * a_m + k * a_k];
        const T* b = B + k * ldb + n0;
        for (int64_t n = 0; n < nt; ++n) acc[n] += a * b[n];
      }
      for (int64_t n = 0; n < nt; ++n) c[n0 + n] = (accumulate ? c[n0 + n] : T(0)) + alpha * acc[n];
    }
  }
}

// exp(x) for x <= 0 (softmax after the max shift), vectorisable: 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2/2, p the degree-7 Taylor polynomial (relative error < 1e-8).
// Below -87 (where float exp underflows to denormals) the result is 0; NaN stays NaN.
FAE_INLINE float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  // low bits of t hold n (two's complement, |n| < 2^22); scale by 2^n via the exponent.
  const int32_t e = (ti - 0x4B400000 + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(s));
  const float y = p * s;
  return x < -87.0f ? 0.0f : y;
}

}  // namespace

FAE_MULTIVERSION
void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
               bool accumulate) {
  gemm_impl<float>(trans_a, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
               int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc,
               bool accumulate) {
  gemm_impl<double>(trans_a, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

FAE_MULTIVERSION
float row_max(const float* x, int64_t n) {
  // Explicit lanes so the reduction vectorises without -ffast-math.
  constexpr int kLanes = 16;
  float lane[kLanes];
  for (int t = 0; t < kLanes; ++t) lane[t] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int t = 0; t < kLanes; ++t) lane[t] = (x[j + t] > lane[t] || x[j + t] != x[j + t]) ? x[j + t] : lane[t];
  float m = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < kLanes; ++t) m = (lane[t] > m || lane[t] != lane[t]) ? lane[t] : m;
  for (; j < n; ++j) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;
  return m;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;
  return m;
}

FAE_MULTIVERSION
float exp_shift_sum(float* x, int64_t n, float shift) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int t = 0; t < kLanes; ++t) {
      const float e = exp_nonpositive(x[j + t] - shift);
      x[j + t] = e;
      lane[t] += e;
    }
  }
  float sum = 0.0f;
  for (; j < n; ++j) {
    const float e = exp_nonpositive(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  for (int t = 0; t < kLanes; ++t) sum += lane[t];
  return sum;
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

void scale_row(double* y, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) y[j] *= a;
}

}  // namespace flash_attn_ext::cpu
