// The process-wide KernelConfig (kernel_config.h): its defaults from the environment, parsed
// once here (the only file of csrc that reads the environment), and its fields by name for
// Python (flash_attn_ext.kernel_config, through the ops _kernel_config / _set_kernel_config).
#include "kernel_config_names.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace flash_attn_ext {
namespace {

// The documented environment defaults (README, "Kernel configuration"). A variable that is set
// but malformed raises when the library first reads the setting: a typo must not go unnoticed.
KernelConfig from_environment() {
  KernelConfig c;
  const auto env = [](const char* name) -> const char* {
    const char* v = std::getenv(name);
    return v != nullptr && v[0] != '\0' ? v : nullptr;
  };
  // "0" / "off": off; "auto" (and "1", the older "on", where "1" does not mean require): auto;
  // require_value (nullptr for the auto | off fields): require.
  const auto mode = [&](const char* name, PathMode& field, const char* require_value) {
    const char* v = env(name);
    if (v == nullptr) return;
    const auto is = [v](const char* s) { return s != nullptr && std::strcmp(v, s) == 0; };
    if (is(require_value))
      field = PathMode::kRequire;
    else if (is("0") || is("off"))
      field = PathMode::kOff;
    else if (is("auto") || is("1"))
      field = PathMode::kAuto;
    else
      TORCH_CHECK_VALUE(false, "flash_attn_ext: environment variable ", name, " must be '0', 'off', 'auto'",
                        require_value ? " or '" : "", require_value ? require_value : "", require_value ? "'" : "",
                        ", got '", v, "'");
  };
  mode("FLASH_ATTN_EXT_CUDA_FAST", c.cuda_fast, "require");
  mode("FLASH_ATTN_EXT_CUDA_DEVICE_CHECKS", c.cuda_device_checks, "require");
  mode("FLASH_ATTN_EXT_CPU_DECODE", c.cpu_decode, "require");
  mode("FLASH_ATTN_EXT_CPU_BF16_DOT", c.cpu_bf16_dot, nullptr);
  mode("FLASH_ATTN_EXT_CPU_Q8_AVX2", c.cpu_q8_avx2, nullptr);
  mode("FLASH_ATTN_EXT_CPU_KT_CACHE", c.cpu_kt_cache, nullptr);
  mode("FLASH_ATTN_EXT_CPU_BWD_HEAD_PASSES", c.cpu_bwd_head_passes, "1");
  if (const char* v = env("FLASH_ATTN_EXT_CPU_TILES")) set_config_field(c, "cpu_tiles", v);
  // Older spelling of cpu_tiles=float (kept: documented before the typed setting existed).
  if (const char* v = env("FLASH_ATTN_EXT_CPU_BF16_GEMM"); v != nullptr && v[0] == '0') c.cpu_tiles = CpuTiles::kFloat;
  if (const char* v = env("FLASH_ATTN_EXT_NUM_SPLITS")) set_config_field(c, "num_splits", v);
  return c;
}

std::mutex& config_mutex() {
  static std::mutex m;
  return m;
}

KernelConfig& config_storage() {
  static KernelConfig c = from_environment();
  return c;
}

const char* mode_name(PathMode m) {
  switch (m) {
    case PathMode::kAuto: return "auto";
    case PathMode::kOff: return "off";
    case PathMode::kRequire: return "require";
  }
  return "?";
}

struct ModeField {
  const char* name;
  PathMode KernelConfig::* member;
  bool has_require;  // auto | off only, otherwise
};

constexpr ModeField kModeFields[] = {
    {"cuda_fast", &KernelConfig::cuda_fast, true},
    {"cuda_device_checks", &KernelConfig::cuda_device_checks, true},
    {"cpu_decode", &KernelConfig::cpu_decode, true},
    {"cpu_bf16_dot", &KernelConfig::cpu_bf16_dot, false},
    {"cpu_q8_avx2", &KernelConfig::cpu_q8_avx2, false},
    {"cpu_kt_cache", &KernelConfig::cpu_kt_cache, false},
    {"cpu_bwd_head_passes", &KernelConfig::cpu_bwd_head_passes, true},
};

}  // namespace

const char* cpu_tiles_name(CpuTiles t) {
  switch (t) {
    case CpuTiles::kAuto: return "auto";
    case CpuTiles::kFloat: return "float";
    case CpuTiles::kAvx512Bf16: return "avx512_bf16";
    case CpuTiles::kBrgemm: return "brgemm";
  }
  return "?";
}

KernelConfig current_kernel_config() {
  std::lock_guard<std::mutex> lock(config_mutex());
  return config_storage();
}

std::vector<std::string> kernel_config_fields() {
  std::vector<std::string> names;
  for (const ModeField& f : kModeFields) names.emplace_back(f.name);
  names.emplace_back("cpu_tiles");
  names.emplace_back("num_splits");
  return names;
}

std::string get_config_field(const KernelConfig& c, const std::string& name) {
  for (const ModeField& f : kModeFields)
    if (name == f.name) return mode_name(c.*f.member);
  if (name == "cpu_tiles") return cpu_tiles_name(c.cpu_tiles);
  if (name == "num_splits") return std::to_string(c.num_splits);
  TORCH_CHECK_VALUE(false, "flash_attn_ext.kernel_config: no setting named '", name, "'");
}

void set_config_field(KernelConfig& c, const std::string& name, const std::string& value) {
  for (const ModeField& f : kModeFields) {
    if (name != f.name) continue;
    if (value == "auto")
      c.*f.member = PathMode::kAuto;
    else if (value == "off")
      c.*f.member = PathMode::kOff;
    else if (value == "require" && f.has_require)
      c.*f.member = PathMode::kRequire;
    else
      TORCH_CHECK_VALUE(false, "flash_attn_ext.kernel_config: ", name,
                        f.has_require ? " must be 'auto', 'off' or 'require'" : " must be 'auto' or 'off'", ", got '",
                        value, "'");
    return;
  }
  if (name == "cpu_tiles") {
    for (CpuTiles t : {CpuTiles::kAuto, CpuTiles::kFloat, CpuTiles::kAvx512Bf16, CpuTiles::kBrgemm}) {
      if (value == cpu_tiles_name(t)) {
        c.cpu_tiles = t;
        return;
      }
    }
    TORCH_CHECK_VALUE(false, "flash_attn_ext.kernel_config: cpu_tiles must be 'auto', 'float', 'avx512_bf16' or ",
                      "'brgemm', got '", value, "'");
  }
  if (name == "num_splits") {
    char* end = nullptr;
    const long long n = std::strtoll(value.c_str(), &end, 10);
    TORCH_CHECK_VALUE(!value.empty() && *end == '\0' && n >= 0 && n <= 1024,
                      "flash_attn_ext.kernel_config: num_splits must be an integer in [0, 1024] (0 = automatic), got '",
                      value, "'");
    c.num_splits = static_cast<int32_t>(n);
    return;
  }
  TORCH_CHECK_VALUE(false, "flash_attn_ext.kernel_config: no setting named '", name, "'");
}

std::string set_kernel_config_field(const std::string& name, const std::string& value) {
  std::lock_guard<std::mutex> lock(config_mutex());
  KernelConfig next = config_storage();
  const std::string previous = get_config_field(next, name);
  set_config_field(next, name, value);  // validates before anything changes
  config_storage() = next;
  return previous;
}

}  // namespace flash_attn_ext
