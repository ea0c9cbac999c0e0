#include "tile_backend.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "../common/kernel_config_names.h"
#include "simd.h"
#include "tile_math.h"
#include "tile_math_bf16.h"

// ATen's brgemm entry points by product type (feature macros of ATen/native/CPUBlas.h; headers
// without them get no brgemm back end and every call runs our own tiles).
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define FAE_BRGEMM_BF16 1
#endif
#if defined(CPUBLAS_BRGEMM_F32F32F32)
#define FAE_BRGEMM_F32 1
#endif

namespace flash_attn_ext::cpu {
namespace {

// Per-thread scratch of the brgemm wrappers: op(A) transposed, and a product to scale.
std::vector<float>& scratch(int which, int64_t n) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b;
}

// C = alpha * T (+ C): T the M x N product brgemm wrote with leading dim ldt. Multiversioned:
// this file's baseline build ran it as 4-float moves, 5% of the bf16 forward on the Xeon (AMX).
FAE_MULTIVERSION
void apply_alpha(int64_t M, int64_t N, float alpha, const float* T, int64_t ldt, float* C, int64_t ldc,
                 bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    const float* t = T + m * ldt;
    float* c = C + m * ldc;
    if (accumulate) {
      for (int64_t n = 0; n < N; ++n) c[n] += alpha * t[n];
    } else {
      for (int64_t n = 0; n < N; ++n) c[n] = alpha * t[n];
    }
  }
}

// Runs product(out, ld_out, add_C) with alpha applied: in place when alpha is 1 (brgemm
// accumulates itself) or when C starts empty, through scratch otherwise.
template <typename F>
void with_alpha(int64_t M, int64_t N, float alpha, float* C, int64_t ldc, bool accumulate, F&& product) {
  if (alpha == 1.0f) return product(C, ldc, accumulate);
  if (!accumulate) {
    product(C, ldc, false);
    return apply_alpha(M, N, alpha, C, ldc, C, ldc, false);
  }
  float* t = scratch(1, M * N).data();
  product(t, N, false);
  apply_alpha(M, N, alpha, t, N, C, ldc, true);
}

bool zero_sized(int64_t M, int64_t N, int64_t K, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return true;
  if (K > 0) return false;
  if (!accumulate)
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
  return true;
}

// One small product: oneDNN throws where it has no kernel for the type on this CPU.
bool trial(c10::ScalarType dtype, std::string* why) {
  try {
#if defined(FAE_BRGEMM_BF16)
    if (dtype == c10::kBFloat16) {
      const c10::BFloat16 a[4] = {1.0f, 2.0f, 3.0f, 4.0f}, b[32] = {};
      float c[2 * 16] = {};
      at::native::cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      return true;
    }
#endif
#if defined(FAE_BRGEMM_F32)
    if (dtype == c10::kFloat) {
      const float a[4] = {1, 2, 3, 4}, b[32] = {};
      float c[2 * 16] = {};
      at::native::cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a, b, c, false);
      return true;
    }
#endif
    *why = std::string("this torch's ATen/native/CPUBlas.h has no brgemm for ") + c10::toString(dtype);
    return false;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    *why = "oneDNN brgemm threw for " + std::string(c10::toString(dtype)) + ": " + msg.substr(0, msg.find('\n'));
    return false;
  }
}

}  // namespace

// A back end is the setting that names it.
static_assert(static_cast<int>(CpuTiles::kFloat) == static_cast<int>(TileBackend::kFloat) &&
              static_cast<int>(CpuTiles::kAvx512Bf16) == static_cast<int>(TileBackend::kAvx512Bf16) &&
              static_cast<int>(CpuTiles::kBrgemm) == static_cast<int>(TileBackend::kBrgemm));

const char* tile_backend_name(TileBackend b) { return cpu_tiles_name(static_cast<CpuTiles>(b)); }

bool brgemm_available(c10::ScalarType dtype, std::string* why) {
  struct Result {
    std::once_flag once;
    bool ok = false;
    std::string why;
  };
  static Result bf16, f32;
  if (dtype != c10::kBFloat16 && dtype != c10::kFloat) {
    if (why != nullptr)
      *why = std::string("no brgemm back end for ") + c10::toString(dtype) +
             " (oneDNN's f16 brgemm needs AMX-FP16, never seen on this project's machines)";
    return false;
  }
  Result& r = dtype == c10::kBFloat16 ? bf16 : f32;
  std::call_once(r.once, [&] { r.ok = trial(dtype, &r.why); });
  if (why != nullptr) *why = r.why;
  return r.ok;
}

TileChoice choose_tiles(c10::ScalarType dtype, CpuTiles s) {
  if (dtype == c10::kDouble) return {TileBackend::kFloat, "float64 runs the double tiles"};
  const bool bf16 = dtype == c10::kBFloat16;
  std::string no_brgemm;
  const bool brgemm = brgemm_available(dtype, &no_brgemm);
  const bool own_bf16 = bf16 && has_bf16_gemm();
  const std::string no_own_bf16 = bf16 ? "this CPU has no AVX512-BF16" : "avx512_bf16 tiles are for bfloat16 only";
  switch (s) {
    case CpuTiles::kFloat: return {TileBackend::kFloat, "set: float"};
    case CpuTiles::kBrgemm:
      if (brgemm) return {TileBackend::kBrgemm, "set: brgemm"};
      return {TileBackend::kFloat, "set: brgemm, unavailable (" + no_brgemm + "): float"};
    case CpuTiles::kAvx512Bf16:
      if (own_bf16) return {TileBackend::kAvx512Bf16, "set: avx512_bf16"};
      return {TileBackend::kFloat, "set: avx512_bf16, unavailable (" + no_own_bf16 + "): float"};
    case CpuTiles::kAuto: break;
  }
  // auto: brgemm wherever it runs (benchmarks/NOTES.md #27). The library is the default unless
  // our kernels measure faster, and they do not: on the AMD EPYC Zen 4 (AVX512-BF16, no AMX),
  // interleaved in one process, brgemm took 0.98-1.05 of our vdpbf16ps tiles' time in the bf16
  // forward and 0.92-1.02 in forward+backward, 0.93-0.95 of our float tiles' in the float32
  // forward; issue 16 measured 4-15x (bf16, AMX) and 1.6-2x (float32) on an Intel Xeon. Our
  // tiles remain for where oneDNN has no kernel (AVX2-only CPUs for bf16, torch without it).
  if (brgemm) return {TileBackend::kBrgemm, "auto: brgemm"};
  std::string why_not = "brgemm unavailable: " + no_brgemm;
  if (own_bf16) return {TileBackend::kAvx512Bf16, "auto: avx512_bf16 (" + why_not + ")"};
  if (bf16) why_not += "; " + no_own_bf16;
  return {TileBackend::kFloat, "auto: float (" + why_not + ")"};
}

void tiles_gemm(TileBackend b, bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if defined(FAE_BRGEMM_F32)
  if (b == TileBackend::kBrgemm) {
    if (zero_sized(M, N, K, C, ldc, accumulate)) return;
    int64_t ld_a = lda;
    if (trans_a) {  // brgemm reads A row-major: transpose the K x M operand first
      float* t = scratch(0, M * K).data();
      transpose_tile(A, lda, K, M, t, K);
      A = t;
      ld_a = K;
    }
    return with_alpha(M, N, alpha, C, ldc, accumulate, [&](float* out, int64_t ld_out, bool add) {
      at::native::cpublas::brgemm(M, N, K, ld_a, ldb, ld_out, add, A, B, out, false);
    });
  }
#endif
  tile_gemm(trans_a, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void tiles_gemm(TileBackend, bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  tile_gemm(trans_a, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void tiles_gemm_bf16(TileBackend b, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
                     const uint32_t* Bp, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if defined(FAE_BRGEMM_BF16)
  if (b == TileBackend::kBrgemm) {
    if (zero_sized(M, N, K, C, ldc, accumulate)) return;
    const auto* a = reinterpret_cast<const c10::BFloat16*>(A);
    const auto* bp = reinterpret_cast<const c10::BFloat16*>(Bp);
    return with_alpha(M, N, alpha, C, ldc, accumulate, [&](float* out, int64_t ld_out, bool add) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ld_out, add, a, bp, out, true);
    });
  }
#endif
  (void)b;
  tile_gemm_bf16(M, N, K, alpha, A, lda, Bp, ldb, C, ldc, accumulate);
}

void tiles_release(TileBackend b) {
#if defined(FAE_BRGEMM_BF16)
  if (b == TileBackend::kBrgemm) at::native::cpublas::brgemm_release(true);
#else
  (void)b;
#endif
}

}  // namespace flash_attn_ext::cpu
