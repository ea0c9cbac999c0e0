// KernelConfig's fields by name, as Python sees them (flash_attn_ext.kernel_config): values are
// strings ("auto" / "off" / "require", a tile back end's name, a split count). Host-only.
#pragma once

#include <string>
#include <vector>

#include "kernel_config.h"

namespace flash_attn_ext {

std::vector<std::string> kernel_config_fields();
// "auto", "float", "avx512_bf16", "brgemm" (also the back ends' names: tile_backend_name).
const char* cpu_tiles_name(CpuTiles t);
std::string get_config_field(const KernelConfig& c, const std::string& name);
// ValueError naming the field and the allowed values for anything else; c is unchanged then.
void set_config_field(KernelConfig& c, const std::string& name, const std::string& value);
// Sets one field of the process-wide setting; returns its previous value.
std::string set_kernel_config_field(const std::string& name, const std::string& value);

}  // namespace flash_attn_ext
