// The quantization of a KV-cache row, shared by the CPU and CUDA appends so both write the
// same bytes: one scale per (position, head), symmetric, no zero point (LMDeploy / vLLM's
// int8_per_token_head; llama.cpp's q8_0 with one block per row).
//   int8:  scale = amax / 127, q = round_half_even(x / scale), clamped to [-127, 127];
//   fp8 (float8_e4m3fn): scale = amax / 448, q = e4m3(x / scale) (round to nearest even).
// A row of zeros gets scale 0 and zeros. The scale is computed per row when the row is
// written, so no calibration is needed; the reader computes cache[d] * scale.
#pragma once

#include <c10/util/Float8_e4m3fn.h>

#include <cmath>
#include <cstdint>

#include "../common/host_device.h"

namespace flash_attn_ext::quant {

enum class Kind { kInt8, kFp8E4M3 };

// The largest magnitude a stored element takes: the row's amax maps to it exactly.
FAE_HOST_DEVICE float max_code(Kind kind) { return kind == Kind::kInt8 ? 127.0f : 448.0f; }

FAE_HOST_DEVICE float row_scale(float amax, Kind kind) { return amax / max_code(kind); }

// x / scale as the stored byte. scale 0 (a zero row) stores 0.
FAE_HOST_DEVICE uint8_t encode(float x, float scale, Kind kind) {
  const float lim = max_code(kind);
  float y = scale > 0.0f ? x / scale : 0.0f;
  y = y > lim ? lim : (y < -lim ? -lim : y);  // x / (amax / lim) may land an ulp past lim
  if (kind == Kind::kInt8) {
#if defined(__CUDA_ARCH__)
    const float r = rintf(y);  // ties to even (the device's rounding mode is fixed)
#else
    const float r = __builtin_roundevenf(y);  // ties to even whatever fesetround set
#endif
    const auto q = static_cast<int8_t>(static_cast<int>(r));
    return static_cast<uint8_t>(q);
  }
  return c10::Float8_e4m3fn(y).x;  // round to nearest even
}

}  // namespace flash_attn_ext::quant
