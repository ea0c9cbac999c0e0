// Chooses the tensor-core backward when it serves a call; see attention_backward_mma.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <string>

#include "attention_backward_mma.h"
#include "attention_forward_mma.h"
#include "mma_head_dims.h"

namespace flash_attn_ext::cuda {
namespace {

template <typename T>
bool dispatch_head_dim(const MmaBackwardParams& bp, int64_t dim, int64_t smem, cudaStream_t stream) {
#define FAE_LAUNCH(d) \
  case d: return launch_attention_backward_mma<T, d>(bp, smem, stream);
  switch (dim) {
    FAE_MMA_BACKWARD_HEAD_DIMS(FAE_LAUNCH)
    default: return false;
  }
#undef FAE_LAUNCH
}

}  // namespace

bool try_attention_backward_mma(const AttentionParams& p, bool has_mask, const at::Tensor& grad_out,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                                const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
                                const at::Tensor& dv) {
  if (p.config.cuda_fast == PathMode::kOff) return false;
  const bool require = p.config.cuda_fast == PathMode::kRequire;
  const char* why = mma_ineligible(p, has_mask, q, k, v, grad_out);
  if (why == nullptr && !mma_backward_head_dim(p.dim_qk)) {
    static const std::string not_served =
        std::string("head dim not served by the tensor-core backward (") + mma_backward_head_dims_text() + ")";
    why = not_served.c_str();
  }
  if (why == nullptr && (!mma_rows_aligned(dq) || !mma_rows_aligned(dk) || !mma_rows_aligned(dv)))
    why = "gradient rows not 16-byte aligned";
  if (why == nullptr && (p.len_k + 63) / 64 * p.heads_kv * p.batch > 0x7fffffff) why = "grid too large";
  TORCH_CHECK(why == nullptr || !require,
              "flash_attn_ext.attention_backward: kernel_config(cuda_fast='require') but the tensor-core kernel "
              "cannot serve this call: ",
              why);
  if (why != nullptr) return false;

  MmaBackwardParams bp;
  set_common(bp, p, q, k, v);
  bp.grad_out = rows_of<InRows>(grad_out);
  bp.lse = lse.data_ptr<float>(), bp.delta = delta.data_ptr<float>();
  bp.grad_q = rows_of<OutRows>(dq), bp.grad_k = rows_of<OutRows>(dk), bp.grad_v = rows_of<OutRows>(dv);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t smem = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const bool launched = q.scalar_type() == at::kHalf ? dispatch_head_dim<__half>(bp, p.dim_qk, smem, stream)
                                                     : dispatch_head_dim<__nv_bfloat16>(bp, p.dim_qk, smem, stream);
  TORCH_CHECK(launched || !require,
              "flash_attn_ext.attention_backward: kernel_config(cuda_fast='require') but the tensor-core kernels "
              "need more shared memory than this GPU gives a block (",
              smem, " bytes)");
  return launched;
}

}  // namespace flash_attn_ext::cuda
