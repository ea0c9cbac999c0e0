// Small dense kernels on cache-resident tiles, the inner loops of the CPU attention kernels.
//
// Each float entry point is compiled several times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA,
// and a portable baseline) and the loader picks one for the running CPU (GCC target_clones,
// an ifunc), so one built library runs everywhere and uses the widest vectors it finds.
// The double overloads serve float64 inputs (gradcheck) and are not tuned.
#pragma once

#include <cstdint>

namespace flash_attn_ext::cpu {

// C[M x N] = (accumulate ? C : 0) + alpha * op(A) * B.
// op(A) is A (row-major M x K, leading dim lda) or, with trans_a, A^T where A is K x M.
// B is row-major K x N (leading dim ldb), C row-major M x N (leading dim ldc).
void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc, bool accumulate);
void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
               const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate);

// C[M x N] = A * B^T with A row-major M x K and B row-major N x K: row-by-row dot products,
// for tiles with few rows (decode), where transposing B first would cost more than the product.
void tile_gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc);
void tile_gemm_nt(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                  double* C, int64_t ldc);

// max over x[0, n); -inf for n == 0 or all -inf; NaN if any x is NaN (a NaN input row
// stays NaN instead of turning into a silent zero).
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// x[j] = exp(x[j] - shift) in place (exp(-inf) = 0) and returns the sum. shift is finite.
// x is a row of a score tile: the float version reads x[n, round_up(n, 8)) and sets it to 0
// (the tail as one vector: a scalar tail through the stack stalled on store forwarding and
// was 15% of the forward at S = 3).
float exp_shift_sum(float* x, int64_t n, float shift);
double exp_shift_sum(double* x, int64_t n, double shift);
// x[j] = exp(x[j]) in place for x[j] <= 0 (exp(-inf) = 0, NaN stays NaN): the online softmax's
// rescale factors exp(m_old - m_new) of a whole tile's rows at once (one scalar expf per row
// and key tile was 6% of the bf16 forward's samples on the Xeon with AMX).
void exp_nonpositive(float* x, int64_t n);
void exp_nonpositive(double* x, int64_t n);

// y[0, n) *= a
void scale_row(float* y, int64_t n, float a);
// dst[r * ldd + c] = a * src[r * lds + c] for rows x n floats: the Q load and the output store
// of the attention kernels, which the kernels' own translation units (built for baseline
// x86-64) ran as 16-byte moves.
void scale_rows(const float* src, int64_t lds, int64_t rows, int64_t n, float a, float* dst, int64_t ldd);
// dst[m * ldd + k] = src[k * lds + m] for k < K, m < M: dst = src^T, in 8 x 8 register blocks
// (brgemm reads A row-major: the backward's P^T dO and dS^T Q transposed A with a scalar loop
// that took 8-15% of the float32 backward).
void transpose_tile(const float* src, int64_t lds, int64_t K, int64_t M, float* dst, int64_t ldd);
// dst[c * ldd + r] = src[r * lds + c] for a rows x cols tile of 16-bit values (bf16 bits), and
// 0 for rows <= r < rows_pad: the backward's P^T and dS^T (its scalar loop was ~20% of the bf16
// backward).
void transpose_tile_u16(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, int64_t rows_pad, uint16_t* dst,
                        int64_t ldd);
// out[r] = sum_c a[r * lda + c] * b[r * ldb + c] for r < rows: the backward's delta = rowsum(dO * O).
void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t n, float* out);
void scale_row(double* y, int64_t n, double a);

}  // namespace flash_attn_ext::cpu
