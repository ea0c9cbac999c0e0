// Tensor-core forward, head dim 32 (float16 and bfloat16): one translation unit per head dim
// keeps the build parallel and each unit small.
#include "attention_forward_mma_kernel.cuh"

namespace flash_attn_ext::cuda {
template bool launch_attention_forward_mma<__half, 32>(const MmaParams&, int64_t, cudaStream_t);
template bool launch_attention_forward_mma<__nv_bfloat16, 32>(const MmaParams&, int64_t, cudaStream_t);
}  // namespace flash_attn_ext::cuda
