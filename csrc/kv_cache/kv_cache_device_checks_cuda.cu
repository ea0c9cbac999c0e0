// The KV-cache ops' device-side checks: the choice, the launches of the check and poison
// kernels (kv_cache_device_checks_kernel.cuh) and the per-device error word; see
// kv_cache_device_checks.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <sstream>

#include "kv_cache_device_checks.h"
#include "kv_cache_device_checks_kernel.cuh"

namespace flash_attn_ext::cuda {
namespace {

// The error word: a module-scope device variable, one per device (a module is loaded per
// context), so it exists without an allocation, which a capture could not make outside its
// graph's pool. Written only by check_lengths_kernel, read and cleared by the host.
__device__ DeviceCheckErrors g_device_check_errors;

constexpr int kMaxDevices = 64;
struct DeviceSlot {
  std::atomic<bool> checked{false};               // a device-checked call ran on this device
  std::atomic<DeviceCheckErrors*> word{nullptr};  // the error word's device address
};
DeviceSlot g_slots[kMaxDevices];

// Devices past the table share its last slot: they only lose the no-sync shortcut.
DeviceSlot& slot_of(const at::Device& device) {
  const int index = device.index();
  return g_slots[index >= 0 && index < kMaxDevices ? index : kMaxDevices - 1];
}

DeviceCheckErrors* errors_on_device(const at::Device& device) {  // with device current
  DeviceSlot& s = slot_of(device);
  DeviceCheckErrors* word = s.word.load(std::memory_order_acquire);
  if (word == nullptr || device.index() >= kMaxDevices - 1) {
    void* address = nullptr;
    C10_CUDA_CHECK(cudaGetSymbolAddress(&address, g_device_check_errors));
    word = static_cast<DeviceCheckErrors*>(address);
    if (device.index() < kMaxDevices - 1) s.word.store(word, std::memory_order_release);
  }
  return word;
}

// Reads and clears the word in one atomic step per field, so a check kernel running on another
// stream meanwhile loses nothing (its bits land either in this read or in the next).
__global__ void take_errors_kernel(DeviceCheckErrors* word, DeviceCheckErrors* out) {
  out->reasons = atomicExch(&word->reasons, 0u);
  out->skipped = atomicExch(&word->skipped, 0u);
}

std::string describe(const DeviceCheckErrors& e) {
  std::ostringstream s;
  s << e.skipped << " sequence(s) skipped by device-checked KV-cache calls (kernel_config cuda_device_checks, "
    << "or a CUDA graph capture) since the last check, for:";
  if (e.reasons & kNegativeLength) s << " a negative cache_seqlens;";
  if (e.reasons & kPastCapacity) s << " cache_seqlens + the new positions past the cache's capacity;";
  if (e.reasons & kBadBlock) s << " a block_table entry that is not a block of the cache;";
  s << " nothing was written for those sequences and their outputs are NaN";
  return s.str();
}

}  // namespace

bool use_device_checks(const char* op, const KernelConfig& config, const at::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  const bool capturing = status != cudaStreamCaptureStatusNone;
  if (config.cuda_device_checks == PathMode::kRequire || (capturing && config.cuda_device_checks == PathMode::kAuto)) {
    slot_of(device).checked.store(true, std::memory_order_relaxed);
    return true;
  }
  TORCH_CHECK(!capturing, op,
              ": kernel_config(cuda_device_checks='off') checks cache_seqlens and block_table on the host, which a "
              "stream capturing a CUDA graph cannot do; capture with cuda_device_checks 'auto' or 'require'");
  raise_device_check_errors(op, device);
  return false;
}

void raise_device_check_errors(const char* op, const at::Device& device) {
  if (!slot_of(device).checked.load(std::memory_order_relaxed)) return;
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor taken = at::empty({2}, at::TensorOptions().dtype(at::kInt).device(device));
  take_errors_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      errors_on_device(device), reinterpret_cast<DeviceCheckErrors*>(taken.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = taken.cpu();  // syncs the current stream
  DeviceCheckErrors e{};
  std::memcpy(&e, host.data_ptr<int32_t>(), sizeof(e));
  TORCH_CHECK(e.reasons == 0, op, ": ", describe(e));
}

DeviceLengths check_lengths_on_device(const at::Tensor& cache_seqlens, int64_t new_len, int64_t capacity, bool rolling,
                                      const BlockTable& table, int64_t num_blocks, bool want_lens_k) {
  const int64_t B = cache_seqlens.size(0);
  const auto options = cache_seqlens.options().dtype(at::kLong);
  DeviceLengths d;
  d.starts = at::empty({B}, options);
  if (want_lens_k) d.lens_k = at::empty({B}, options);
  if (B == 0) return d;
  TORCH_CHECK(B <= 0x7fffffff, "flash_attn_ext: batch ", B, " too large for the device-side check");
  DeviceLengthsParams p{};
  p.seqlens = cache_seqlens.data_ptr();
  p.seqlens_int64 = cache_seqlens.scalar_type() == at::kLong;
  p.seqlens_stride = cache_seqlens.stride(0);
  p.new_len = new_len;
  p.capacity = capacity;
  p.rolling = rolling;
  p.block_table = table.defined() ? table.table.data_ptr<int32_t>() : nullptr;
  p.blocks_per_seq = table.blocks_per_seq;
  p.block_size = table.block_size;
  p.num_blocks = num_blocks;
  p.starts = d.starts.data_ptr<int64_t>();
  p.lens_k = want_lens_k ? d.lens_k.data_ptr<int64_t>() : nullptr;
  p.errors = errors_on_device(cache_seqlens.device());
  check_lengths_kernel<<<static_cast<unsigned>(B), kCheckThreads, kCheckSmemBytes, c10::cuda::getCurrentCUDAStream()>>>(
      p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

void poison_skipped(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& starts) {
  const int64_t B = out.size(0);
  if (B == 0 || lse.numel() == 0) return;  // (lse is empty exactly when there are no rows)
  TORCH_CHECK(lse.is_contiguous() && (out.size(3) <= 1 || out.stride(3) == 1),
              "flash_attn_ext: poison_skipped needs a contiguous lse and out rows");
  const auto launch = [&](auto word, auto lse_word) {
    using Word = decltype(word);
    using LseWord = decltype(lse_word);
    PoisonView<Word, LseWord> v{};
    v.out = static_cast<Word*>(out.data_ptr());
    v.stride_b = out.stride(0);
    v.stride_h = out.stride(1);
    v.stride_l = out.stride(2);
    v.lse = static_cast<LseWord*>(lse.data_ptr());
    v.heads = out.size(1);
    v.len = out.size(2);
    v.dim = out.size(3);
    switch (out.scalar_type()) {  // each dtype's quiet NaN, as its word
      case at::kHalf: v.nan = static_cast<Word>(0x7e00u); break;
      case at::kBFloat16: v.nan = static_cast<Word>(0x7fc0u); break;
      case at::kFloat: v.nan = static_cast<Word>(0x7fc00000u); break;
      default: v.nan = static_cast<Word>(0x7ff8000000000000ull); break;  // double
    }
    v.lse_nan = sizeof(LseWord) == 8 ? static_cast<LseWord>(0x7ff8000000000000ull) : static_cast<LseWord>(0x7fc00000u);
    poison_skipped_kernel<Word, LseWord>
        <<<static_cast<unsigned>(B), kCheckThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(v,
                                                                                            starts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (out.scalar_type()) {
    case at::kHalf:
    case at::kBFloat16: return launch(uint16_t{}, uint32_t{});
    case at::kFloat: return launch(uint32_t{}, uint32_t{});
    case at::kDouble: return launch(uint64_t{}, uint64_t{});  // float64 inputs have a float64 lse
    default: TORCH_CHECK_TYPE(false, "flash_attn_ext: poison_skipped: unsupported dtype ", out.scalar_type());
  }
}

namespace {

// _raise_kvcache_device_errors(Tensor on_device): the op behind check_kvcache_errors.
void raise_kvcache_device_errors_cuda(const at::Tensor& on_device) {
  const c10::cuda::CUDAGuard guard(on_device.device());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone,
              "flash_attn_ext.check_kvcache_errors: reads the device's error word (a sync), which a stream capturing "
              "a CUDA graph cannot do; call it after the capture, or after a replay");
  raise_device_check_errors("flash_attn_ext.check_kvcache_errors", on_device.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) {
  m.impl("_raise_kvcache_device_errors", &raise_kvcache_device_errors_cuda);
}

}  // namespace flash_attn_ext::cuda
