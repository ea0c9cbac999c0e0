// Counter-based dropout mask shared by CPU and CUDA kernels.
//
// The keep/drop decision of element (batch*head, query i, key j) is a pure function of
// (seed, offset, bh, i, j): Philox4x32-10 (Salmon et al., SC'11) keyed by the seed, one
// call per four consecutive keys. Forward and backward regenerate the same mask in any
// tile order and on any number of threads, and CPU and CUDA draw the same mask.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace flash_attn_ext {

struct Philox4 {
  uint32_t x[4];
};

FAE_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  Philox4 r;
  r.x[0] = c0;
  r.x[1] = c1;
  r.x[2] = c2;
  r.x[3] = c3;
  return r;
}

// Elements are kept when their 24-bit uniform draw is >= p * 2^24.
FAE_HOST_DEVICE uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

// Keep-bits of keys [4*j4, 4*j4 + 4) for one (bh, i): bit t set = key 4*j4 + t kept.
FAE_HOST_DEVICE uint32_t dropout_keep_bits4(uint64_t seed, uint64_t offset, int64_t bh, int64_t i, int64_t j4,
                                            uint32_t threshold) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(j4), static_cast<uint32_t>(i), static_cast<uint32_t>(bh),
                                  static_cast<uint32_t>(offset) ^ (static_cast<uint32_t>(bh >> 32) << 16),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  uint32_t bits = 0;
  for (int t = 0; t < 4; ++t) bits |= ((r.x[t] >> 8) >= threshold ? 1u : 0u) << t;
  return bits;
}

FAE_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, int64_t bh, int64_t i, int64_t j,
                                  uint32_t threshold) {
  return (dropout_keep_bits4(seed, offset, bh, i, j >> 2, threshold) >> (j & 3)) & 1u;
}

}  // namespace flash_attn_ext
