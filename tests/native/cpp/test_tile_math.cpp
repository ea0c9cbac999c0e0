// Unit test of the CPU tile kernels (csrc/cpu/tile_math.cpp) against naive double loops.
// tests/native/test_host_programs.py builds it once per instruction set this machine can run (baseline
// x86-64 with FAE_NO_MULTIVERSION, and the run-time-dispatched build), so the portable
// fallback is exercised even on a CPU where the dispatcher would never pick it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cpu/decode_math.h"
#include "cpu/tile_math_bf16.h"
#include "expect.h"
#include "cpu/tile_math.h"

using namespace flash_attn_ext::cpu;

static void check_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, bool accumulate, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  const int64_t lda = (trans_a ? M : K) + 3, ldb = N + 5, ldc = N + 2;
  std::vector<float> A((trans_a ? K : M) * lda), B(K * ldb), C(M * ldc), C0;
  for (auto& x : A) x = nd(rng);
  for (auto& x : B) x = nd(rng);
  for (auto& x : C) x = nd(rng);
  C0 = C;
  const float alpha = 0.75f;
  tile_gemm(trans_a, M, N, K, alpha, A.data(), lda, B.data(), ldb, C.data(), ldc, accumulate);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldc; ++n) {
      if (n >= N) {  // padding between rows must be untouched
        if (C[m * ldc + n] != C0[m * ldc + n] && ++failures <= 10)
          std::printf("FAIL gemm wrote padding m=%ld n=%ld\n", (long)m, (long)n);
        continue;
      }
      double ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += double(trans_a ? A[k * lda + m] : A[m * lda + k]) * B[k * ldb + n];
      ref = alpha * ref + (accumulate ? C0[m * ldc + n] : 0.0);
      if (std::fabs(C[m * ldc + n] - ref) > 1e-4 * (1 + std::sqrt(double(K))) && ++failures <= 10)
        std::printf("FAIL gemm trans=%d M=%ld N=%ld K=%ld m=%ld n=%ld: %g vs %g\n", trans_a, (long)M, (long)N, (long)K,
                    (long)m, (long)n, C[m * ldc + n], ref);
    }
  }
}

// bf16 bits of x, rounded to nearest even (the tests' inputs are finite).
static uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// dot_rows / axpy_rows (the decode inner loops) against double loops, for float and bf16 K/V,
// every row count the decode path serves and head dims with and without a vector tail; rows
// are reached through scattered pointers as in a paged cache.
template <typename T>
static void check_decode_math_for(std::mt19937& rng, T (*store)(float), float (*load)(T)) {
  std::normal_distribution<float> nd;
  for (int64_t rows = 1; rows <= kMaxDecodeRows; ++rows)
    for (int64_t dim : {1, 8, 12, 16, 40, 64, 128, 200})
      for (int64_t cols : {1, 5, 32}) {
        const int64_t ld = cols + 3;
        std::vector<float> q(rows * dim), p(rows * ld), acc(rows * dim), acc0;
        std::vector<T> kv(cols * 2 * (dim + 7));
        for (auto& x : q) x = nd(rng);
        for (auto& x : p) x = nd(rng);
        for (auto& x : acc) x = nd(rng);
        for (auto& x : kv) x = store(nd(rng));
        acc0 = acc;
        std::vector<const T*> rows_ptr(cols);
        for (int64_t c = 0; c < cols; ++c) rows_ptr[c] = kv.data() + ((c * 7) % cols) * 2 * (dim + 7) + c % 2;
        // scores: one entry per key row, all against the same query rows
        std::vector<float> s(rows * ld, -7.f);
        std::vector<float*> sp(cols);
        for (int64_t c = 0; c < cols; ++c) sp[c] = s.data() + c;
        std::vector<const void*> pf(rows_ptr.begin(), rows_ptr.end());
        // bf16 rows meet pair-split q and accumulators (decode_math.h); the references stay in order.
        constexpr bool split = sizeof(T) == 2;
        std::vector<float> qs(q);
        if (split)
          for (int64_t r = 0; r < rows; ++r) {
            to_pair_split(qs.data() + r * dim, dim);
            to_pair_split(acc.data() + r * dim, dim);
          }
        std::vector<const float*> qsp(cols, qs.data());
        dot_rows(cols, qsp.data(), rows_ptr.data(), sp.data(), rows, dim, ld,
                 PrefetchList{pf.data(), cols, dim * int64_t(sizeof(T))});
        axpy_rows(p.data(), ld, rows, cols, rows_ptr.data(), dim, acc.data());
        if (split)
          for (int64_t r = 0; r < rows; ++r) from_pair_split(acc.data() + r * dim, dim);
        if constexpr (sizeof(T) == 2) {
          if (has_bf16_dot()) {  // vdpbf16ps scores: bf16 q (natural order), scale on the sums
            std::vector<uint16_t> qb(rows * dim);
            for (int64_t i = 0; i < rows * dim; ++i) qb[i] = to_bf16(q[i]);
            std::vector<const uint16_t*> qbp(cols, qb.data());
            std::vector<float> sb(rows * ld, -7.f);
            std::vector<float*> sbp(cols);
            for (int64_t c = 0; c < cols; ++c) sbp[c] = sb.data() + c;
            dot_rows_bf16_dot(cols, qbp.data(), rows_ptr.data(), sbp.data(), rows, dim, ld, 0.5f, PrefetchList{});
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < ld; ++c) {
                double ref = 0;
                for (int64_t d = 0; d < dim; ++d)
                  ref += double(from_bf16(qb[r * dim + d])) * from_bf16(rows_ptr[c < cols ? c : 0][d]);
                const bool ok = c < cols ? std::fabs(sb[r * ld + c] - 0.5 * ref) <= 1e-4 * (1 + std::sqrt(double(dim)))
                                         : sb[r * ld + c] == -7.f;
                if (!ok && ++failures <= 10)
                  std::printf("FAIL dot_rows_bf16_dot rows=%ld dim=%ld cols=%ld c=%ld\n", (long)rows, (long)dim,
                              (long)cols, (long)c);
              }
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            double ref = 0;
            for (int64_t d = 0; d < dim; ++d) ref += double(q[r * dim + d]) * load(rows_ptr[c][d]);
            if (std::fabs(s[r * ld + c] - ref) > 1e-4 * (1 + std::sqrt(double(dim))) && ++failures <= 10)
              std::printf("FAIL dot_rows rows=%ld dim=%ld cols=%ld\n", (long)rows, (long)dim, (long)cols);
          }
          for (int64_t c = cols; c < ld; ++c)
            if (s[r * ld + c] != -7.f && ++failures <= 10) std::printf("FAIL dot_rows wrote padding\n");
          for (int64_t d = 0; d < dim; ++d) {
            double ref = acc0[r * dim + d];
            for (int64_t c = 0; c < cols; ++c) ref += double(p[r * ld + c]) * load(rows_ptr[c][d]);
            if (std::fabs(acc[r * dim + d] - ref) > 1e-4 * (1 + std::sqrt(double(cols))) && ++failures <= 10)
              std::printf("FAIL axpy_rows rows=%ld dim=%ld cols=%ld\n", (long)rows, (long)dim, (long)cols);
          }
        }
      }
}

static void check_decode_math(std::mt19937& rng) {
  check_decode_math_for<float>(rng, [](float x) { return x; }, [](float x) { return x; });
  check_decode_math_for<uint16_t>(rng, to_bf16, from_bf16);
}

// tile_gemm_bf16 (vdpbf16ps) against exact bf16 products summed in double, over the shapes the
// attention kernels use (partial column vectors, row tails, odd K padded), both packings, and
// floats_to_bf16's rounding (nearest even) against the scalar rule.
static void check_bf16_gemm(std::mt19937& rng) {
  std::normal_distribution<float> nd;
  for (int64_t M : {1, 5, 12, 13, 64})
    for (int64_t N : {1, 15, 16, 17, 32, 33, 64, 80})
      for (int64_t K : {1, 2, 63, 64, 128})
        for (bool acc : {false, true}) {
          const int64_t K2 = K + K % 2, lda = K2 + 2, ldb = N + 3, ldc = N + 1;
          std::vector<uint16_t> A(M * lda, 0), X(N * K), Y(K * N);  // X: B^T rows; Y: B rows
          for (auto& x : A) x = to_bf16(nd(rng));
          for (int64_t m = 0; m < M; ++m)
            for (int64_t k = K; k < K2; ++k) A[m * lda + k] = 0;
          for (auto& x : X) x = to_bf16(nd(rng));
          for (int64_t k = 0; k < K; ++k)
            for (int64_t n = 0; n < N; ++n) Y[k * N + n] = X[n * K + k];
          std::vector<const uint16_t*> xrows(N), yrows(K);
          for (int64_t n = 0; n < N; ++n) xrows[n] = X.data() + n * K;
          for (int64_t k = 0; k < K; ++k) yrows[k] = Y.data() + k * N;
          std::vector<uint32_t> P1(K2 / 2 * ldb, 0xFFFFFFFFu), P2(K2 / 2 * ldb, 0xFFFFFFFFu);
          pack_bf16_transposed(xrows.data(), N, K, P1.data(), ldb);
          pack_bf16_row_pairs(yrows.data(), K, N, P2.data(), ldb);
          for (int64_t e = 0; e < K2 / 2; ++e)
            for (int64_t n = 0; n < N; ++n)
              if (P1[e * ldb + n] != P2[e * ldb + n] && ++failures <= 10)
                std::printf("FAIL bf16 packings differ K=%ld N=%ld\n", (long)K, (long)N);
          if (!has_bf16_gemm()) continue;
          std::vector<float> C(M * ldc, 0.25f);
          const std::vector<float> C0 = C;
          tile_gemm_bf16(M, N, K2, 0.5f, A.data(), lda, P1.data(), ldb, C.data(), ldc, acc);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < ldc; ++n) {
              if (n >= N) {  // the padding column of C is never written
                if (C[m * ldc + n] != C0[m * ldc + n] && ++failures <= 10) std::printf("FAIL bf16 gemm wrote past N\n");
                continue;
              }
              double ref = 0, mag = 0;
              for (int64_t k = 0; k < K; ++k) {
                const double p = double(from_bf16(A[m * lda + k])) * from_bf16(X[n * K + k]);
                ref += p, mag += std::fabs(p);
              }
              ref = 0.5 * ref + (acc ? 0.25 : 0.0);
              if (std::fabs(C[m * ldc + n] - ref) > 1e-6 * (mag + 1) && ++failures <= 10)
                std::printf("FAIL bf16 gemm M=%ld N=%ld K=%ld acc=%d: %g vs %g\n", (long)M, (long)N, (long)K, acc,
                            C[m * ldc + n], ref);
            }
        }
  std::vector<float> f(37);
  for (auto& x : f) x = nd(rng) * 1e3f;
  f[3] = 1.00390625f;  // exactly between two bf16 values: rounds to the even one (1.0)
  std::vector<uint16_t> h(40, 0xFFFF);
  floats_to_bf16(f.data(), 37, 1, 37, 40, h.data(), 40);
  for (int64_t c = 0; c < 40; ++c) {
    const uint16_t want = c < 37 ? to_bf16(f[c]) : 0;
    if (h[c] != want && ++failures <= 10) std::printf("FAIL floats_to_bf16 c=%ld: %04x vs %04x\n", (long)c, h[c], want);
  }
  if (h[3] != 0x3f80 && ++failures <= 10) std::printf("FAIL floats_to_bf16: ties to even\n");
}

int main() {
  std::mt19937 rng(7);
  for (bool t : {false, true})
    for (int64_t M : {1, 4, 5, 6, 11, 64})
      for (int64_t N : {1, 7, 16, 17, 33, 64})
        for (int64_t K : {1, 3, 64, 80})
          for (bool acc : {false, true}) check_gemm(t, M, N, K, acc, rng);

  // tile_gemm_nt: C = A B^T with both operands row-major over K.
  std::normal_distribution<float> nd;
  for (int64_t M : {1, 3, 4})
    for (int64_t N : {1, 17, 64})
      for (int64_t K : {1, 15, 16, 40, 128}) {
        std::vector<float> A(M * (K + 2)), B(N * (K + 1)), C(M * (N + 3), -7.f);
        for (auto& x : A) x = nd(rng);
        for (auto& x : B) x = nd(rng);
        tile_gemm_nt(M, N, K, A.data(), K + 2, B.data(), K + 1, C.data(), N + 3);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double ref = 0;
            for (int64_t k = 0; k < K; ++k) ref += double(A[m * (K + 2) + k]) * B[n * (K + 1) + k];
            if (std::fabs(C[m * (N + 3) + n] - ref) > 1e-4 * (1 + std::sqrt(double(K))) && ++failures <= 10)
              std::printf("FAIL gemm_nt M=%ld N=%ld K=%ld\n", (long)M, (long)N, (long)K);
          }
      }

  // transpose_tile: exact, 8 x 8 blocks and both tails, padding between rows untouched.
  for (int64_t K : {1, 7, 8, 9, 64})
    for (int64_t M : {1, 8, 13, 64}) {
      const int64_t lds = M + 3, ldd = K + 5;
      std::vector<float> src(K * lds), dst(M * ldd, -7.f);
      for (auto& x : src) x = nd(rng);
      transpose_tile(src.data(), lds, K, M, dst.data(), ldd);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < ldd; ++k) {
          const float want = k < K ? src[k * lds + m] : -7.f;
          if (dst[m * ldd + k] != want && ++failures <= 10)
            std::printf("FAIL transpose K=%ld M=%ld m=%ld k=%ld\n", (long)K, (long)M, (long)m, (long)k);
        }
    }

  // transpose_tile_u16: exact, zero rows up to rows_pad, nothing past it written.
  for (int64_t rows : {1, 7, 8, 9, 64})
    for (int64_t cols : {1, 8, 13, 64}) {
      const int64_t lds = cols + 3, rows_pad = rows + rows % 2, ldd = rows_pad + 4;
      std::vector<uint16_t> src(rows * lds), dst(cols * ldd, 0xBEEF);
      for (auto& x : src) x = static_cast<uint16_t>(rng());
      transpose_tile_u16(src.data(), lds, rows, cols, rows_pad, dst.data(), ldd);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = 0; r < ldd; ++r) {
          const uint16_t want = r < rows ? src[r * lds + c] : r < rows_pad ? 0 : 0xBEEF;
          if (dst[c * ldd + r] != want && ++failures <= 10)
            std::printf("FAIL transpose_u16 rows=%ld cols=%ld r=%ld c=%ld\n", (long)rows, (long)cols, (long)r, (long)c);
        }
    }

  // exp_shift_sum: every length (vector body and tail), -inf -> 0, relative error < 1e-6.
  std::uniform_real_distribution<float> ud(-30.f, 0.f);
  for (int64_t n = 0; n <= 40; ++n) {
    const int64_t padded = (n + 7) / 8 * 8;  // a tile row: the padding is read and zeroed
    std::vector<float> x(n);
    for (auto& v : x) v = ud(rng);
    if (n > 3) x[2] = -std::numeric_limits<float>::infinity();
    std::vector<float> y(padded, std::numeric_limits<float>::quiet_NaN());
    std::copy(x.begin(), x.end(), y.begin());
    const float shift = -1.5f;
    const float sum = exp_shift_sum(y.data(), n, shift);
    for (int64_t j = n; j < padded; ++j)
      if (y[j] != 0.0f && ++failures <= 10) std::printf("FAIL exp padding n=%ld j=%ld: %g\n", (long)n, (long)j, y[j]);
    double ref_sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double ref = std::exp(double(x[j]) - shift);
      ref_sum += ref;
      if (std::fabs(y[j] - ref) > 1e-6 * ref + 1e-30 && ++failures <= 10)
        std::printf("FAIL exp n=%ld j=%ld x=%g: %g vs %g\n", (long)n, (long)j, x[j], y[j], ref);
    }
    if (std::fabs(sum - ref_sum) > 1e-5 * (ref_sum + 1) && ++failures <= 10)
      std::printf("FAIL exp sum n=%ld: %g vs %g\n", (long)n, sum, ref_sum);
  }
  // row_max: the max, -inf when empty, NaN when any element is NaN.
  for (int64_t n = 1; n <= 40; ++n) {
    std::vector<float> x(n);
    for (auto& v : x) v = ud(rng);
    x[n / 2] = 5.f;
    if (row_max(x.data(), n) != 5.f && ++failures <= 10) std::printf("FAIL row_max n=%ld\n", (long)n);
    x[n - 1] = std::numeric_limits<float>::quiet_NaN();
    if (!std::isnan(row_max(x.data(), n)) && ++failures <= 10) std::printf("FAIL row_max NaN n=%ld\n", (long)n);
  }
  if (row_max(static_cast<const float*>(nullptr), 0) != -std::numeric_limits<float>::infinity()) ++failures;
  check_decode_math(rng);
  check_bf16_gemm(rng);
  std::printf("bf16 GEMM (AVX512-BF16): %s\n", has_bf16_gemm() ? "tested" : "not on this CPU/build (packing tested)");
  std::printf("bf16 dot (AVX512-BF16): %s\n", has_bf16_dot() ? "tested" : "not on this CPU/build");
  return expect_summary("tile and decode kernels");
}
