// The environment switches the kernels read (documented in the README), parsed in one place
// for the CPU and CUDA code alike. Torch-free.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace flash_attn_ext {

// True when the variable is set and starts with '0' (the "turn this path off" knobs).
inline bool env_is_zero(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && env[0] == '0';
}

// Split-KV: FLASH_ATTN_EXT_NUM_SPLITS=n (> 0) forces n key ranges per task (tests run both
// paths with it); otherwise `automatic`, the kernel's own choice.
inline int64_t split_count(int64_t automatic) {
  if (const char* env = std::getenv("FLASH_ATTN_EXT_NUM_SPLITS")) {
    const int64_t forced = std::atoll(env);
    if (forced > 0) return forced;
  }
  return automatic;
}

}  // namespace flash_attn_ext
