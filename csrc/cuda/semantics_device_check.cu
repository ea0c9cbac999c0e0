// Compiles the shared semantics headers for the device on every build with CUDA, so a
// host-only construct slipping into attention_semantics.h or dropout_philox.h fails CI
// (which has nvcc but no GPU). The fused CUDA kernels themselves are not written yet
// (issue 3); until then the Python layer serves CUDA tensors through PyTorch's SDPA and
// counts it as a fallback.
#include <cstdint>

#include "../common/attention_semantics.h"
#include "../common/dropout_philox.h"

namespace flash_attn_ext {

__global__ void semantics_device_check_kernel(AttentionParams p, int64_t* visible_count,
                                              uint32_t* keep_bits) {
  const int64_t i = blockIdx.x;
  const KeyRange band = visible_key_range(i, i + 1, p.align_offset, p.window_left,
                                          p.window_right, p.len_k);
  int64_t n = 0;
  for (int64_t j = band.begin; j < band.end; ++j)
    n += key_visible(i, j, p.align_offset, p.window_left, p.window_right) ? 1 : 0;
  visible_count[i] = n;
  keep_bits[i] = dropout_keep_bits4(p.dropout_seed, p.dropout_offset, 0, i, 0,
                                    dropout_threshold(p.dropout_p));
}

}  // namespace flash_attn_ext
