// CUDA kernel of flash_attn_ext::merge_attention_states (autograd is device-generic, in
// merge_attention_states_cpu.cpp). One thread per output element; the per-row weights come
// from rows::merge_weights, the function the CPU kernel uses.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/cuda_rows.cuh"
#include "merge_attention_states.h"

namespace flash_attn_ext::cuda {
namespace {

template <typename T, typename L>
__global__ void merge_kernel(const T* out_a, const L* lse_a, const T* out_b, const L* lse_b, T* out, L* lse,
                             int64_t n_rows, int64_t dim) {
  const int64_t n = n_rows * dim, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t r = e / dim;
    const rows::MergeWeights<L> w = rows::merge_weights(lse_a[r], lse_b[r]);
    out[e] = static_cast<T>(w.a * static_cast<L>(out_a[e]) + w.b * static_cast<L>(out_b[e]));
    if (e % dim == 0) lse[r] = w.lse;
  }
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                               const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge_inputs(out_a, lse_a, out_b, lse_b);
  const c10::cuda::CUDAGuard guard(out_a.device());
  const at::Tensor oa = out_a.contiguous(), ob = out_b.contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty(oa.sizes(), oa.options());
  at::Tensor lse = at::empty(la.sizes(), la.options());
  const int64_t n_rows = la.numel(), dim = oa.size(-1);
  if (n_rows == 0) return {out, lse};
  if (dim == 0) {  // no features: only the lse is merged
    lse.copy_(at::logaddexp(la, lb));
    return {out, lse};
  }
  const int64_t n = n_rows * dim;
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>((n + 255) / 256, 1 << 20));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, oa.scalar_type(), "merge_attention_states_cuda", [&] {
    if (la.scalar_type() == at::kDouble) {
      merge_kernel<scalar_t, double><<<blocks, 256, 0, stream>>>(
          oa.data_ptr<scalar_t>(), la.data_ptr<double>(), ob.data_ptr<scalar_t>(), lb.data_ptr<double>(),
          out.data_ptr<scalar_t>(), lse.data_ptr<double>(), n_rows, dim);
    } else {
      merge_kernel<scalar_t, float><<<blocks, 256, 0, stream>>>(
          oa.data_ptr<scalar_t>(), la.data_ptr<float>(), ob.data_ptr<scalar_t>(), lb.data_ptr<float>(),
          out.data_ptr<scalar_t>(), lse.data_ptr<float>(), n_rows, dim);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) { m.impl("merge_attention_states", &merge_attention_states_cuda); }

}  // namespace flash_attn_ext::cuda
