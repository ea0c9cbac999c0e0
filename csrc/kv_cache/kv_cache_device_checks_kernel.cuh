// The kernels of the KV-cache ops' device-side checks (kv_cache_device_checks.h): the values of
// cache_seqlens and the block table checked where they live, so a call reads nothing back to
// the host and can be captured in a CUDA graph. Torch-free: included by
// kv_cache_device_checks_cuda.cu and, with FAE_SIMT_EMULATION, by
// tests/native/cpp/test_kv_cache_device_checks_emulated.cpp.
//
// A sequence whose values are bad is skipped, never used: check_lengths_kernel gives it start
// -1 (the append kernel writes none of its rows) and key length 0 (the attention kernels read
// none of its keys), poison_skipped_kernel then sets its outputs to NaN, and the reasons are
// or'ed into an error word that the next host-checked call (or check_kvcache_errors) raises.
#pragma once

#include <cstdint>

#ifdef FAE_SIMT_EMULATION
#include FAE_SIMT_EMULATION
#else
#define FAE_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace flash_attn_ext::cuda {

// Why sequences were skipped: bits of DeviceCheckErrors::reasons.
enum DeviceCheckReason : uint32_t {
  kNegativeLength = 1u,  // cache_seqlens[b] < 0
  kPastCapacity = 2u,    // cache_seqlens[b] + new_len > the positions the cache holds for b
  kBadBlock = 4u,        // a block_table entry the sequence uses is not a block of the cache
};

// The device's error word, accumulated over calls until the host reads and clears it.
struct DeviceCheckErrors {
  uint32_t reasons;  // DeviceCheckReason bits
  uint32_t skipped;  // sequences skipped (wraps after 2^32; reasons, the flag, never clears by itself)
};

struct DeviceLengthsParams {
  const void* seqlens;  // cache_seqlens: (batch,) int32 or int64, any stride
  bool seqlens_int64;
  int64_t seqlens_stride;      // in elements
  int64_t new_len;             // positions appended by this call (L_new)
  int64_t capacity;            // positions a sequence holds: S_max, or blocks_per_seq * block_size
  bool rolling;                // a rolling cache: any length >= 0 is valid, its start is len mod capacity
  const int32_t* block_table;  // (batch, blocks_per_seq) contiguous, or nullptr
  int64_t blocks_per_seq, block_size, num_blocks;
  int64_t* starts;  // out: the slot of the first new position (rolling: len mod capacity); -1 skipped
  int64_t* lens_k;  // out, or nullptr: the keys the sequence attends to (len + new_len); 0 skipped
  DeviceCheckErrors* errors;
};

constexpr int kCheckThreads = 128;

// One block per sequence: thread 0 reads and bounds the length, then the block checks the
// table entries of the blocks the sequence uses (strided over the threads: a long sequence's
// table has thousands), and thread 0 writes the verdict.
__global__ void __launch_bounds__(kCheckThreads) check_lengths_kernel(DeviceLengthsParams p) {
  FAE_DYNAMIC_SMEM(int64_t, shared);  // [0]: blocks used, [1]: reasons, [2]: start
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) {
    const int64_t len = p.seqlens_int64 ? static_cast<const int64_t*>(p.seqlens)[b * p.seqlens_stride]
                                        : static_cast<const int32_t*>(p.seqlens)[b * p.seqlens_stride];
    uint32_t reasons = 0;
    if (len < 0)
      reasons = kNegativeLength;
    else if (!p.rolling && len > p.capacity - p.new_len)  // len + new_len > capacity, without overflow
      reasons = kPastCapacity;
    const int64_t used = reasons != 0 ? 0 : len + p.new_len;
    // (clamped to the table's width: the host refuses a rolling paged cache, the one case where
    // a valid length could need more blocks than the table has)
    const int64_t blocks = p.block_table != nullptr ? (used + p.block_size - 1) / p.block_size : 0;
    shared[0] = blocks < p.blocks_per_seq ? blocks : p.blocks_per_seq;
    shared[1] = reasons;
    shared[2] = reasons != 0 ? -1 : (p.rolling && p.capacity > 0 ? len % p.capacity : len);
  }
  __syncthreads();
  const int64_t blocks_used = shared[0];
  bool bad_block = false;
  for (int64_t blk = threadIdx.x; blk < blocks_used; blk += kCheckThreads) {
    const int32_t e = p.block_table[b * p.blocks_per_seq + blk];
    bad_block = bad_block || e < 0 || e >= p.num_blocks;
  }
  bad_block = __syncthreads_or(bad_block) != 0;
  if (threadIdx.x == 0) {
    const uint32_t reasons = static_cast<uint32_t>(shared[1]) | (bad_block ? kBadBlock : 0u);
    p.starts[b] = reasons != 0 ? -1 : shared[2];
    if (p.lens_k != nullptr) p.lens_k[b] = reasons != 0 ? 0 : shared[2] + p.new_len;
    if (reasons != 0) {
      atomicOr(&p.errors->reasons, reasons);
      atomicAdd(&p.errors->skipped, 1u);  // may wrap after 2^32 skips; reasons, the flag, cannot clear
    }
  }
}

// Launch check_lengths_kernel with this much dynamic shared memory (3 int64 words).
constexpr unsigned kCheckSmemBytes = 3 * sizeof(int64_t);

// The outputs for the poison kernel, their elements as opaque words of their size: out
// (batch, heads, len, dim) strided, lse (batch, heads, len) contiguous.
template <typename Word, typename LseWord>
struct PoisonView {
  Word* out;
  int64_t stride_b, stride_h, stride_l;  // in elements; the last dimension is contiguous
  LseWord* lse;
  int64_t heads, len, dim;
  Word nan;         // out's quiet NaN
  LseWord lse_nan;  // lse's
};

// One block per sequence: a skipped sequence (start -1) gets NaN in every output element and
// every lse, so its result cannot be taken for attention over an empty cache. (Loops, not
// index arithmetic: no 64-bit divisions in a kernel that every device-checked call launches.)
template <typename Word, typename LseWord>
__global__ void __launch_bounds__(kCheckThreads)
    poison_skipped_kernel(PoisonView<Word, LseWord> v, const int64_t* starts) {
  const int64_t b = blockIdx.x;
  if (starts[b] >= 0) return;
  for (int64_t h = 0; h < v.heads; ++h)
    for (int64_t l = 0; l < v.len; ++l) {
      Word* row = v.out + b * v.stride_b + h * v.stride_h + l * v.stride_l;
      for (int64_t e = threadIdx.x; e < v.dim; e += kCheckThreads) row[e] = v.nan;
    }
  for (int64_t r = threadIdx.x; r < v.heads * v.len; r += kCheckThreads) v.lse[b * v.heads * v.len + r] = v.lse_nan;
}

}  // namespace flash_attn_ext::cuda
