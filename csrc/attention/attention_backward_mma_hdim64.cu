// Tensor-core backward, head dim 64 (float16 and bfloat16), in its own translation unit.
#include "attention_backward_mma_kernel.cuh"

namespace flash_attn_ext::cuda {
template bool launch_attention_backward_mma<__half, 64>(const MmaBackwardParams&, int64_t, cudaStream_t);
template bool launch_attention_backward_mma<__nv_bfloat16, 64>(const MmaBackwardParams&, int64_t, cudaStream_t);
}  // namespace flash_attn_ext::cuda
