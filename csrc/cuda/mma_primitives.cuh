// Warp-level building blocks of the tensor-core kernels (attention_forward_mma_kernel.cuh,
// attention_backward_mma_kernel.cuh): cp.async copies, ldmatrix fragment loads, mma.sync
// m16n8k16 with float32 accumulators, 16-bit packing. With FAE_SIMT_EMULATION defined they
// come instead from the host emulator that macro names (tests/native/cpp/simt_emulator.h), and the
// kernels run unchanged on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "mma_layout.h"

#ifdef FAE_SIMT_EMULATION
#include FAE_SIMT_EMULATION
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/cuda/CUDAException.h>

#define FAE_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace flash_attn_ext::cuda::mma_detail {

#ifndef FAE_SIMT_EMULATION
// cp.async, ldmatrix and bf16 mma need sm_80. A build that also targets older GPUs (say
// FLASH_ATTN_EXT_CUDA_ARCHS="75;80") compiles these to a trap there; the dispatchers never
// launch the tensor-core kernels below sm_80, and the safety net still serves those GPUs.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FAE_SM80_ASM(...) __trap()
#else
#define FAE_SM80_ASM(...) asm volatile(__VA_ARGS__)
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy; zero-fills when !valid (rows past the sequence end).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  [[maybe_unused]] const int bytes = valid ? 16 : 0;
  [[maybe_unused]] const size_t global = __cvta_generic_to_global(src);
  // "memory": no shared-memory access may be moved across the copy's issue.
  FAE_SM80_ASM("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { FAE_SM80_ASM("cp.async.commit_group;\n" :: : "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { FAE_SM80_ASM("cp.async.wait_group 0;\n" :: : "memory"); }
// 2^x on the MUFU unit alone: ex2.approx.ftz (about 2 ulp; subnormal inputs and results flush
// to 0, far below a 16-bit output's resolution; -inf gives 0, NaN stays NaN). exp2f without
// fast math wraps the same MUFU in a range fix-up of 3-5 more instructions per score.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Waits until at most one committed group is still in flight (a double buffer's next stage).
__device__ __forceinline__ void cp_async_wait_one() { FAE_SM80_ASM("cp.async.wait_group 1;\n" :: : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  FAE_SM80_ASM("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]),
               "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");  // reads shared memory the compiler does not see
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  FAE_SM80_ASM("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]),
               "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

// d += a (16x16, row) * b (16x8, col), float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  FAE_SM80_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n" : "+f"(d[0]),
      "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  FAE_SM80_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n" : "+f"(d[0]),
      "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One 16-byte piece from src to dst (both 16-byte aligned): a 128-bit load and store, e.g. a
// staged output row piece from shared to global memory.
__device__ __forceinline__ void copy_16(void* dst, const void* src) {
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
}

// Two floats as one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

#endif  // FAE_SIMT_EMULATION

// Copies rows [row0, row0 + kRows) of a (position, feature) slice of 16-bit elements into
// shared rows of kStride elements, with kThreads threads; rows at or past row0 + n_valid are
// zero-filled. The trip count is a constant, so the copies unroll: where the threads cover
// whole rows per pass (kThreads a multiple of the row's 16-byte pieces), each thread keeps one
// column and steps its source pointer by a fixed number of rows, about 5 instructions per
// copy instead of a division and a 64-bit multiply-add.
template <int kRows, int kDim, int kStride, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* slice, int64_t row_stride, int64_t row0,
                                          int64_t n_valid, int tid) {
  constexpr int kChunks = kDim / 8;  // 16-byte chunks per row
  static_assert(kRows * kChunks % kThreads == 0, "every thread copies the same number of pieces");
  constexpr int kPasses = kRows * kChunks / kThreads;
  const int valid_rows = static_cast<int>(n_valid < kRows ? n_valid : kRows);
  if constexpr (kThreads % kChunks == 0) {
    constexpr int kRowStep = kThreads / kChunks;
    const int r0 = tid / kChunks, col = (tid % kChunks) * 8;
    const uint16_t* src = slice + (row0 + r0) * row_stride + col;
    const uint32_t dst = smem_u32(smem + r0 * kStride + col);
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const bool valid = r0 + i * kRowStep < valid_rows;
      cp_async_16(dst + i * kRowStep * kStride * 2, valid ? src : slice, valid);
      src += kRowStep * row_stride;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int c = tid + i * kThreads, r = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = r < valid_rows;
      const uint16_t* src = valid ? slice + (row0 + r) * row_stride + col : slice;
      cp_async_16(smem_u32(smem + r * kStride + col), src, valid);
    }
  }
}

// The A fragments of one k16 step from the accumulators of the two adjacent n8 tiles it spans
// (P or dS feeding the next product without leaving registers).
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
#pragma unroll
  for (int reg = 0; reg < 4; ++reg) {
    const float* acc = mma_layout::a_reg_tile(reg) == 0 ? lo : hi;
    a[reg] = pack2<T>(acc[mma_layout::a_reg_first_element(reg)], acc[mma_layout::a_reg_first_element(reg) + 1]);
  }
}

}  // namespace flash_attn_ext::cuda::mma_detail
