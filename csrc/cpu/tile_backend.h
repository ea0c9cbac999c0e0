// The tile products of the CPU attention kernels (forward, backward, varlen, split-KV), behind
// one interface with interchangeable back ends. The attention loops own the online softmax,
// masks, windows, dropout, softcap and ALiBi; a back end owns only the products:
//   kFloat       our register-blocked float kernel (tile_math.h; every x86-64 CPU, any dtype
//                widened to float);
//   kAvx512Bf16  our vdpbf16ps kernel (tile_math_bf16.h; bf16 on CPUs with AVX512-BF16);
//   kBrgemm      oneDNN's batch-reduce GEMM through ATen (at::native::cpublas::brgemm): AMX
//                tiles where oneDNN finds them, AVX-512 otherwise; bf16 and float32.
// Which one runs is decided per call from the call's KernelConfig::cpu_tiles (in Python
// flash_attn_ext.kernel_config(cpu_tiles=...) or flash_attn_ext.cpu_tiles), the CPU and the
// torch build, with the reason given as a string.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "../common/kernel_config.h"

namespace flash_attn_ext::cpu {

enum class TileBackend : int { kFloat = 0, kAvx512Bf16 = 1, kBrgemm = 2 };

const char* tile_backend_name(TileBackend b);

struct TileChoice {
  TileBackend backend;
  std::string reason;  // why this back end, and why not the preferred ones
};

// The back end the CPU kernels use for inputs of `dtype` under `setting`. float64
// always runs kFloat (double tiles). A setting the dtype, CPU or torch cannot serve falls back
// to what can (the reason says so). auto: brgemm wherever oneDNN runs it (bf16, float32); our
// vdpbf16ps tiles for bf16 on AVX512-BF16 CPUs where it does not; our float tiles otherwise
// (float16 always, until oneDNN has an f16 kernel for the CPU).
TileChoice choose_tiles(c10::ScalarType dtype, CpuTiles setting);

// Whether brgemm runs here for bf16 / float32 (a one-time trial call; oneDNN throws on CPUs it
// has no kernel for) and, if not, why.
bool brgemm_available(c10::ScalarType dtype, std::string* why = nullptr);

// C[M x N] = (accumulate ? C : 0) + alpha * op(A) * B in float, as tile_gemm (tile_math.h):
// op(A) = A (M x K, lda) or, with trans_a, A^T of a K x M A; B row-major K x N.
void tiles_gemm(TileBackend b, bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);
void tiles_gemm(TileBackend b, bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate);

// The bf16 product of tile_gemm_bf16 (tile_math_bf16.h): A bf16 rows (lda even), B packed by
// pairs of its K rows (the VNNI layout oneDNN reads too), K even. b is kAvx512Bf16 or kBrgemm.
void tiles_gemm_bf16(TileBackend b, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
                     const uint32_t* Bp, int64_t ldb, float* C, int64_t ldc, bool accumulate);

// End of a thread's tile work: releases oneDNN's AMX tile configuration (brgemm only).
void tiles_release(TileBackend b);

}  // namespace flash_attn_ext::cpu
