// bfloat16 tile GEMM on AVX512-BF16 (vdpbf16ps: exact products of bf16 pairs summed in float32),
// for the bf16 attention kernels: twice the multiply rate of widening to float and using FMAs,
// and half the bytes per operand. The B operand is packed by pairs of its K rows, the layout
// the instruction reads; A is plain bf16 rows (a pair of adjacent K elements is one 32-bit word).
// Everything here runs only where has_bf16_gemm() is true (the CPU has AVX512-BF16 and this
// is a GCC x86-64 build); callers keep their float path for other CPUs.
#pragma once

#include <cstdint>

namespace flash_attn_ext::cpu {

bool has_bf16_gemm();

// C[M x N] = (accumulate ? C : 0) + alpha * A * B.
// A: bf16 bits, row-major M x K, leading dim lda (even); K even (pad A and B with zeros).
// Bp: B (K x N) packed by row pairs: Bp[(k / 2) * ldb + n] holds B[k][n] in its low and
// B[k + 1][n] in its high 16 bits; ldb >= N. C: float, row-major, leading dim ldc.
void tile_gemm_bf16(int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate);

// Packs B = X^T for the n rows X[r] (dim bf16 each, at rows[r]): Bp[(k / 2) * ld + r] =
// (X[r][k], X[r][k + 1]); an odd dim's last pair has a zero high half.
void pack_bf16_transposed(const uint16_t* const* rows, int64_t n, int64_t dim, uint32_t* Bp, int64_t ld);

// Packs B = X for the n rows X[r] (dim bf16 each, at rows[r]): Bp[(r / 2) * ld + c] =
// (X[r][c], X[r + 1][c]); an odd n's last pair has a zero high half.
void pack_bf16_row_pairs(const uint16_t* const* rows, int64_t n, int64_t dim, uint32_t* Bp, int64_t ld);

// dst[r][c] = bf16(src[r][c]) rounded to nearest even for c < cols, 0 for cols <= c < cols_pad.
void floats_to_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, int64_t cols_pad, uint16_t* dst,
                    int64_t ldd);

}  // namespace flash_attn_ext::cpu
