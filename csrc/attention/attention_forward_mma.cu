// Chooses the tensor-core forward when it serves a call; see attention_forward_mma.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <string>

#include "attention_forward_mma.h"
#include "mma_head_dims.h"

namespace flash_attn_ext::cuda {

bool mma_rows_aligned(const at::Tensor& t) {
  // cp.async moves 16 bytes: every row must start on a 16-byte boundary.
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0 && t.stride(3) == 1;
}

namespace {

template <typename T>
bool dispatch_head_dim(const MmaParams& mp, int64_t dim, int64_t smem, cudaStream_t stream) {
#define FAE_LAUNCH(d) \
  case d: return launch_attention_forward_mma<T, d>(mp, smem, stream);
  switch (dim) {
    FAE_MMA_FORWARD_HEAD_DIMS(FAE_LAUNCH)
    default: return false;
  }
#undef FAE_LAUNCH
}

}  // namespace

const char* mma_ineligible(const AttentionParams& p, bool has_mask, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return "dtype is not float16/bfloat16";
  const int64_t dim = p.dim_qk;
  if (p.dim_v != dim || !mma_forward_head_dim(dim)) {
    static const std::string why =
        std::string("head dim not in {") + mma_forward_head_dims_text() + "} or differs between key and value";
    return why.c_str();
  }
  // The kernel takes the running max of the unscaled scores (one FFMA per exponent), which
  // is the max of the scaled ones only for a positive scale; and it multiplies -inf by the
  // float32 scale * log2(e), which must not round to 0 (NaN) or overflow.
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  if (!(scale_log2 > 0.f) || !std::isfinite(scale_log2)) return "scale <= 0 or outside float32's normal range";
  if (has_mask) return "attn_mask";
  if (p.dropout_p > 0.0) return "dropout";
  if (p.seqlens_k != nullptr) return "per-sequence key lengths";
  if (p.varlen()) return "packed variable-length sequences";
  if (p.softcap > 0.0) return "softcap";
  if (p.alibi_slopes != nullptr) return "alibi_slopes";
  if (p.has_sinks()) return "sinks";  // (the tensor-core forward has no sink term yet)
  if (p.len_q == 0 || p.batch * p.heads_q == 0) return "empty";
  if (!mma_rows_aligned(q) || !mma_rows_aligned(k) || !mma_rows_aligned(v) || !mma_rows_aligned(out))
    return "rows not 16-byte aligned";
  if ((p.len_q + 63) / 64 * p.heads_q * p.batch > 0x7fffffff) return "grid too large";
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return "GPU older than sm_80";
  return nullptr;
}

bool try_attention_forward_mma(const AttentionParams& p, bool has_mask, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  // cuda_fast (kernel_config.h): off = always the safety net (to compare the two), require =
  // raise when this kernel cannot serve the call (tests use it to pin the path they check).
  if (p.config.cuda_fast == PathMode::kOff) return false;
  const bool require = p.config.cuda_fast == PathMode::kRequire;
  const char* why = mma_ineligible(p, has_mask, q, k, v, out);
  TORCH_CHECK(why == nullptr || !require,
              "flash_attn_ext.attention_forward: kernel_config(cuda_fast='require') but the tensor-core kernel "
              "cannot serve this call: ",
              why);
  if (why != nullptr) return false;
  const auto dtype = q.scalar_type();
  const int64_t dim = p.dim_qk;

  MmaParams mp;
  set_common(mp, p, q, k, v);
  mp.out = rows_of<OutRows>(out);
  mp.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t smem = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const bool launched = dtype == at::kHalf ? dispatch_head_dim<__half>(mp, dim, smem, stream)
                                           : dispatch_head_dim<__nv_bfloat16>(mp, dim, smem, stream);
  TORCH_CHECK(launched || !require,
              "flash_attn_ext.attention_forward: kernel_config(cuda_fast='require') but the tensor-core kernel "
              "needs more shared memory than this GPU gives a block (",
              smem, " bytes)");
  return launched;
}

}  // namespace flash_attn_ext::cuda
