// Chooses the tensor-core forward when it serves a call; see attention_forward_mma.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "attention_forward_mma.h"

namespace flash_attn_ext::cuda {

bool mma_rows_aligned(const at::Tensor& t) {
  // cp.async moves 16 bytes: every row must start on a 16-byte boundary.
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
         t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 && t.stride(3) == 1;
}

namespace {

template <typename T>
bool dispatch_head_dim(const MmaParams& mp, int64_t dim, int64_t smem, cudaStream_t stream) {
  switch (dim) {
    case 32: return launch_attention_forward_mma<T, 32>(mp, smem, stream);
    case 64: return launch_attention_forward_mma<T, 64>(mp, smem, stream);
    case 96: return launch_attention_forward_mma<T, 96>(mp, smem, stream);
    case 128: return launch_attention_forward_mma<T, 128>(mp, smem, stream);
    case 192: return launch_attention_forward_mma<T, 192>(mp, smem, stream);
    case 256: return launch_attention_forward_mma<T, 256>(mp, smem, stream);
    default: return false;
  }
}


}  // namespace

const char* mma_ineligible(const AttentionParams& p, bool has_mask, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return "dtype is not float16/bfloat16";
  const int64_t dim = p.dim_qk;
  if (p.dim_v != dim || (dim != 32 && dim != 64 && dim != 96 && dim != 128 && dim != 192 && dim != 256))
    return "head dim not in {32, 64, 96, 128, 192, 256} or differs between key and value";
  if (has_mask) return "attn_mask";
  if (p.dropout_p > 0.0) return "dropout";
  if (p.seqlens_k != nullptr) return "per-sequence key lengths";
  if (p.varlen()) return "packed variable-length sequences";
  if (p.softcap > 0.0) return "softcap";
  if (p.alibi_slopes != nullptr) return "alibi_slopes";
  if (p.len_q == 0 || p.batch * p.heads_q == 0) return "empty";
  if (!mma_rows_aligned(q) || !mma_rows_aligned(k) || !mma_rows_aligned(v) || !mma_rows_aligned(out))
    return "rows not 16-byte aligned";
  if ((p.len_q + 63) / 64 * p.heads_q * p.batch > 0x7fffffff) return "grid too large";
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return "GPU older than sm_80";
  return nullptr;
}

bool try_attention_forward_mma(const AttentionParams& p, bool has_mask, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse) {
  // FLASH_ATTN_EXT_CUDA_FAST: "0" = always the safety net (to compare the two), "require" =
  // raise when this kernel cannot serve the call (tests use it to pin the path they check).
  const char* env = std::getenv("FLASH_ATTN_EXT_CUDA_FAST");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  const char* why = mma_ineligible(p, has_mask, q, k, v, out);
  TORCH_CHECK(why == nullptr || env == nullptr || std::strcmp(env, "require") != 0,
              "flash_attn_ext.attention_forward: FLASH_ATTN_EXT_CUDA_FAST=require but the tensor-core kernel "
              "cannot serve this call: ", why);
  if (why != nullptr) return false;
  const auto dtype = q.scalar_type();
  const int64_t dim = p.dim_qk;

  MmaParams mp;
  set_qkvo(mp, q, k, v, out);
  mp.lse = lse.data_ptr<float>();
  mp.p = p;
  mp.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t smem = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const bool launched = dtype == at::kHalf ? dispatch_head_dim<__half>(mp, dim, smem, stream)
                                           : dispatch_head_dim<__nv_bfloat16>(mp, dim, smem, stream);
  TORCH_CHECK(launched || env == nullptr || std::strcmp(env, "require") != 0,
              "flash_attn_ext.attention_forward: FLASH_ATTN_EXT_CUDA_FAST=require but the tensor-core kernel "
              "needs more shared memory than this GPU gives a block (", smem, " bytes)");
  return launched;
}

}  // namespace flash_attn_ext::cuda
