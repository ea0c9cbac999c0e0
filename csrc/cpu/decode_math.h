// The two inner loops of CPU decode (csrc/attention/attention_decode_cpu.cpp), reading K and
// V straight from the cache in their storage type: a decode step touches every cached element
// once, so widening a tile into a float buffer first (a store and a reload per element) cost
// more than the arithmetic. Rows are the query rows sharing one KV head (at most kMaxRows);
// they stay in registers against each K/V row.
//
// The float overloads are compiled per instruction set (see simd.h); bf16 is passed as its
// raw bits (uint16_t) so this stays torch-free; float64 is plain loops.
#pragma once

#include <cstdint>

namespace flash_attn_ext::cpu {

constexpr int64_t kMaxDecodeRows = 8;

// A float8_e4m3fn cache element as its raw byte (kept torch-free like bf16's uint16_t).
struct Fp8E4M3 {
  uint8_t bits;
};

// Rows the caller reads next (count rows of bytes each), requested by the score loop while it
// computes: entry e of n asks for rows [e * count / n, (e + 1) * count / n).
struct PrefetchList {
  const void* const* rows = nullptr;
  int64_t count = 0, bytes = 0;
};

// bf16 K/V are widened 16 elements at a time as even and odd halves, so the float rows that
// meet them are stored "pair-split": in every full block of 16 features, the 8 even-indexed
// ones, then the 8 odd-indexed ones (features past the last full block stay in order). With
// bf16 K/V, the q rows given to dot_rows and the acc rows given to axpy_rows are pair-split;
// to_pair_split / from_pair_split convert a row in place.
void to_pair_split(float* x, int64_t dim);
void from_pair_split(float* x, int64_t dim);

// For each entry e < n: s[e][r * ld_s] = sum_d q[e][r * dim + d] * k[e][d] for r < rows; the
// scores of a key tile, entries listed in the cache's memory order (one pointer per key row,
// so strided and paged caches read in place); meanwhile it requests the prefetch list.
void dot_rows(int64_t n, const float* const* q, const float* const* k, float* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& prefetch);
void dot_rows(int64_t n, const float* const* q, const uint16_t* const* k_bf16, float* const* s, int64_t rows,
              int64_t dim, int64_t ld_s, const PrefetchList& prefetch);
void dot_rows(int64_t n, const double* const* q, const double* const* k, double* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& prefetch);
// Quantized caches: the scores against the stored codes (int8, or e4m3 bytes) widened in
// registers; the caller multiplies each key's scores by its scale afterwards. avx2: the AVX2
// loops where has_q8_avx2() (vpmovsxbd / vcvtph2ps widening), else the portable ones (the
// same for axpy_rows below).
bool has_q8_avx2();
void dot_rows(int64_t n, const float* const* q, const int8_t* const* k_int8, float* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& prefetch, bool avx2);
void dot_rows(int64_t n, const float* const* q, const Fp8E4M3* const* k_fp8, float* const* s, int64_t rows, int64_t dim,
              int64_t ld_s, const PrefetchList& prefetch, bool avx2);

// Scores of bf16 q rows (natural order, unscaled) against bf16 key rows with AVX512-BF16's
// vdpbf16ps: exact bf16 products, summed in float32, times scale. Only where has_bf16_dot()
// (a CPU with AVX512-BF16 and a GCC build); otherwise dot_rows on pair-split float q.
bool has_bf16_dot();
void dot_rows_bf16_dot(int64_t n, const uint16_t* const* q, const uint16_t* const* k, float* const* s, int64_t rows,
                       int64_t dim, int64_t ld_s, float scale, const PrefetchList& prefetch);

// acc[r * dim + d] += sum_c p[r * ld_p + c] * v[c][d] for r < rows, c < cols, d < dim: the
// probabilities of a key tile times its V rows (one pointer per row, so strided and paged
// caches read in place).
void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const float* const* v, int64_t dim,
               float* acc);
void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const uint16_t* const* v_bf16, int64_t dim,
               float* acc);
void axpy_rows(const double* p, int64_t ld_p, int64_t rows, int64_t cols, const double* const* v, int64_t dim,
               double* acc);
// Quantized caches: p already carries each V row's scale (the caller folds it in).
void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const int8_t* const* v_int8, int64_t dim,
               float* acc, bool avx2);
void axpy_rows(const float* p, int64_t ld_p, int64_t rows, int64_t cols, const Fp8E4M3* const* v_fp8, int64_t dim,
               float* acc, bool avx2);

}  // namespace flash_attn_ext::cpu
