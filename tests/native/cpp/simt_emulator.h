// A small host emulation of the CUDA execution model, enough to run the tensor-core forward
// kernel (csrc/attention/attention_forward_mma_kernel.cuh) unchanged on the CPU: one
// std::thread per CUDA thread, one block at a time, __syncthreads as a block barrier, and the
// warp-collective instructions (shuffles, ldmatrix, mma.sync m16n8k16) as exchanges between
// the 32 lane threads of a warp, computed from the PTX ISA's fragment definitions. cp.async
// lands as late as the PTX rules allow (at the wait that retires its group), so a missing wait
// shows. Included by the kernel header when FAE_SIMT_EMULATION names this file.
//
// Built with a sanitizer, the emulator is what compute-sanitizer's tools are on a GPU
// (tests/native/test_host_programs.py builds each emulated test under each):
// - ThreadSanitizer (racecheck): __syncthreads and __syncwarp are the only things that order
//   memory between threads, as on the GPU. The warp collectives' exchanges are hidden from
//   TSan's happens-before (their slots are atomics), and atomicOr / atomicAdd are relaxed, so a
//   missing barrier between one thread's shared-memory write and another's read is a race
//   TSan reports. A cp.async writes its destination at issue (0xFF) and again when it lands, so
//   a buffer refilled while another thread may still read it is a race too.
// - AddressSanitizer (memcheck): dynamic shared memory is a heap block of exactly the bytes the
//   launch asks for, so one byte past it is reported. In every build a misaligned cp.async,
//   ldmatrix row or 16-byte copy aborts (a GPU faults).
// - MemorySanitizer (initcheck, clang): shared memory is undefined at launch, and a cp.async's
//   destination from issue until the wait that retires it; ldmatrix and 16-byte copies check
//   each byte they read, and other reads are reported where their value is used (the exchange
//   slots are plain memory there, so an undefined value crosses shuffles and mma.sync).
// Without a sanitizer, shared memory starts as 0xFF bytes (NaN as 16-bit floats) and a
// cp.async's destination is 0xFF in flight, so such reads show as NaN in the results.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define FAE_EMU_TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FAE_EMU_TSAN 1
#endif
#if __has_feature(memory_sanitizer)
#define FAE_EMU_MSAN 1
#include <sanitizer/msan_interface.h>
#endif
#endif
#ifdef FAE_EMU_TSAN
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void __tsan_read_range(void* addr, unsigned long size);
#endif

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define FAE_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(emu::smem())

namespace emu {

struct SmemFree {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{128}); }
};

// The meeting point of a warp's collectives: a counter and a phase, atomics only (std::barrier
// keeps plain fields that only its own synchronisation orders, which TSan is told to ignore
// here).
struct Meet {
  std::atomic<int> arrived{0};
  std::atomic<unsigned> phase{0};
  void arrive_and_wait(int n) {
    const unsigned ph = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(ph + 1, std::memory_order_release);
      phase.notify_all();
    } else {
      while (phase.load(std::memory_order_acquire) == ph) phase.wait(ph, std::memory_order_acquire);
    }
  }
};

struct Block {
  std::unique_ptr<unsigned char[], SmemFree> smem;  // exactly the launch's bytes
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;  // __syncwarp
  Meet meets[32];                                      // the warps' collectives
  uint64_t exchange[32][32][8];                        // [warp][lane][slot]
};

inline Block& block() {
  static Block b;
  return b;
}
inline unsigned char* smem() { return block().smem.get(); }
inline int lane() { return threadIdx.x % 32; }

// Marks bytes as undefined for MemorySanitizer (their values are 0xFF either way).
inline void undefine(void* p, size_t n) {
#ifdef FAE_EMU_MSAN
  __msan_poison(p, n);
#else
  (void)p, (void)n;
#endif
}
// MemorySanitizer's check that n bytes at p were written (a no-op without it).
inline void check_defined(const void* p, size_t n) {
#ifdef FAE_EMU_MSAN
  __msan_check_mem_is_initialized(p, n);
#else
  (void)p, (void)n;
#endif
}

// A warp collective's exchange: lane l puts values in its slots, the lanes meet, each reads
// the slots it needs, the lanes meet again. The meetings order nothing else: on the GPU a
// shuffle or an mma.sync is no memory barrier between lanes (__syncwarp is), so TSan is told
// to ignore their synchronisation, and there the slots are relaxed atomics. Elsewhere they
// are plain memory (ordered by the meetings), so MSan carries an undefined value through a
// shuffle or an mma.sync (it would count what an atomic stores as defined).
inline void put(int slot, uint64_t v) {
  uint64_t& s = block().exchange[threadIdx.x / 32][lane()][slot];
#ifdef FAE_EMU_TSAN
  std::atomic_ref<uint64_t>(s).store(v, std::memory_order_relaxed);
#else
  s = v;
#endif
}
inline uint64_t get(int l, int slot) {
  uint64_t& s = block().exchange[threadIdx.x / 32][l][slot];
#ifdef FAE_EMU_TSAN
  return std::atomic_ref<uint64_t>(s).load(std::memory_order_relaxed);
#else
  return s;
#endif
}
// Warp-level operations need whole warps (a short warp would wait forever for its lanes).
inline void require_whole_warps() {
  if (blockDim.x % 32 != 0) {
    std::fprintf(stderr, "simt_emulator: a warp operation in a block of %u threads (not whole warps)\n", blockDim.x);
    std::abort();
  }
}
// A misaligned address faults on the GPU (compute-sanitizer memcheck reports it); here it aborts.
inline void require_aligned(const void* p, size_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) {
    std::fprintf(stderr, "simt_emulator: %s at %p, not %zu-byte aligned\n", what, p, alignment);
    std::abort();
  }
}
// Tells TSan that this thread reads n bytes at p (a read the emulator does on its behalf).
inline void note_read(const void* p, size_t n) {
#ifdef FAE_EMU_TSAN
  __tsan_read_range(const_cast<void*>(p), n);
#else
  (void)p, (void)n;
#endif
}
inline void warp_sync() {
  require_whole_warps();
  block().warps[threadIdx.x / 32]->arrive_and_wait();
}
inline void exchange_meet() {
  require_whole_warps();
#ifdef FAE_EMU_TSAN
  AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#endif
  block().meets[threadIdx.x / 32].arrive_and_wait(32);
#ifdef FAE_EMU_TSAN
  AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
#endif
}

// Runs kernel(args...) over grid blocks of `threads` threads with `smem_bytes` of dynamic
// shared memory (a fresh heap block of exactly that size per block), poisoned with 0xFF bytes
// (NaN as 16-bit floats; undefined under MemorySanitizer) so reads of unwritten shared memory
// show.
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned threads, size_t smem_bytes, Kernel kernel, const Args&... args) {
  gridDim.x = grid;
  blockDim.x = threads;
  Block& b = block();
  for (unsigned blk = 0; blk < grid; ++blk) {
    b.smem.reset(static_cast<unsigned char*>(::operator new[](smem_bytes, std::align_val_t{128})));
    std::memset(b.smem.get(), 0xFF, smem_bytes);
    undefine(b.smem.get(), smem_bytes);
    b.all = std::make_unique<std::barrier<>>(threads);
    b.warps.clear();
    for (unsigned w = 0; w < threads / 32; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t, blk] {
        threadIdx.x = t;
        blockIdx.x = blk;
        kernel(args...);
      });
    for (auto& th : pool) th.join();
  }
}

// 16-bit float formats as the tensor cores read them. IEEE half is _Float16 under GCC; clang 14
// has it only as the storage type __fp16 (same rounding; its conversions come from
// compiler-rt's builtins, which the MemorySanitizer build links).
#ifdef __clang__
using F16 = __fp16;
#else
using F16 = _Float16;
#endif
struct Half {};
struct BFloat16 {};

inline float to_float(uint16_t bits, Half) {
  F16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
inline float to_float(uint16_t bits, BFloat16) {
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline uint16_t from_float(float x, Half) {
  const F16 h = static_cast<F16>(x);  // round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
inline uint16_t from_float(float x, BFloat16) {
  uint32_t w;
  std::memcpy(&w, &x, 4);
  if ((w & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((w >> 16) | 0x40);  // NaN
  w += 0x7fffu + ((w >> 16) & 1u);                                                      // round to nearest even
  return static_cast<uint16_t>(w >> 16);
}

}  // namespace emu

inline void __syncthreads() { emu::block().all->arrive_and_wait(); }
// __syncthreads_or: a barrier that also ors a predicate over the block (the accumulator is
// reset behind a third barrier, so back-to-back calls cannot mix).
inline int __syncthreads_or(int predicate) {
  static std::atomic<int> any{0};
  __syncthreads();
  if (predicate) any.store(1);
  __syncthreads();
  const int r = any.load();
  __syncthreads();
  if (threadIdx.x == 0) any.store(0);
  __syncthreads();
  return r;
}
// CUDA's atomics are relaxed: they order no other memory (a barrier does).
inline unsigned atomicOr(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_or(value, std::memory_order_relaxed);
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "one exchange slot");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  emu::put(0, bits);
  emu::exchange_meet();
  bits = emu::get(emu::lane() ^ lane_mask, 0);
  emu::exchange_meet();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

namespace flash_attn_ext::cuda::mma_detail {

// "Shared addresses" are byte offsets into the block's shared memory, as on the GPU.
inline uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(ptr) - emu::smem());
}

// cp.async, in flight from issue to the wait that retires its group (wait_group N retires all
// but the N newest): at issue the destination becomes 0xFF (NaN; undefined under MSan; a write
// by the issuing thread under TSan), and the data lands at the wait, so a read before the
// matching wait sees the poison instead of the data, as a GPU may. A thread that exits with
// copies never waited for aborts the test. Other threads see the data only through a barrier
// after the wait (TSan checks that).
struct PendingCopy {
  uint32_t dst;
  const void* src;  // read when the copy lands; nullptr: zero-fill
};
struct CopyQueue {
  std::vector<PendingCopy> open;                 // issued, not yet committed
  std::vector<std::vector<PendingCopy>> groups;  // committed, oldest first
  void retire_all_but(size_t newest) {
    while (groups.size() > newest) {
      for (const PendingCopy& c : groups.front()) {
        unsigned char* d = emu::smem() + c.dst;
        if (c.src != nullptr)
          std::memcpy(d, c.src, 16);
        else
          std::memset(d, 0, 16);
      }
      groups.erase(groups.begin());
    }
  }
  ~CopyQueue() {
    if (!open.empty() || !groups.empty()) {
      std::fprintf(stderr, "simt_emulator: a thread exited with cp.async copies it never waited for\n");
      std::abort();
    }
  }
};
inline thread_local CopyQueue copy_queue;  // one per emulated CUDA thread (each is a std::thread)

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  emu::require_aligned(emu::smem() + dst, 16, "cp.async destination");
  emu::require_aligned(src, 16, "cp.async source");
  std::memset(emu::smem() + dst, 0xFF, 16);
  emu::undefine(emu::smem() + dst, 16);
  copy_queue.open.push_back({dst, valid ? src : nullptr});
}
inline void cp_async_commit() {
  copy_queue.groups.push_back(std::move(copy_queue.open));
  copy_queue.open.clear();
}
inline void cp_async_wait_all() { copy_queue.retire_all_but(0); }
inline void cp_async_wait_one() { copy_queue.retire_all_but(1); }

inline void copy_16(void* dst, const void* src) {
  emu::require_aligned(dst, 16, "16-byte store");
  emu::require_aligned(src, 16, "16-byte load");
  emu::check_defined(src, 16);
  std::memcpy(dst, src, 16);
}

// ex2.approx.ftz as exact exp2 with subnormal inputs and results flushed to 0 (the emulator
// checks the flush, not the GPU's 2-ulp approximation).
inline float exp2_fast(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// ldmatrix.x4: lane 8m + r supplies the address of row r of matrix m; lane T receives, of
// matrix m, row T/4 columns 2(T%4), 2(T%4)+1 (.trans: rows 2(T%4), 2(T%4)+1 of column T/4).
// Each lane reads the 16-byte row it addresses and the rows' elements are handed out through
// the exchange; each lane is also charged with reading the elements it receives. A race or an
// unwritten byte is thus seen from both the lane that named the row and the lanes that got it.
inline void ldmatrix_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  emu::require_aligned(emu::smem() + addr, 16, "ldmatrix row");
  emu::check_defined(emu::smem() + addr, 16);
  uint64_t row_bits[2];
  std::memcpy(row_bits, emu::smem() + addr, 16);
  emu::put(0, row_bits[0]);
  emu::put(1, row_bits[1]);
  emu::put(2, addr);
  emu::exchange_meet();
  const int t = emu::lane();
  for (int m = 0; m < 4; ++m) {
    uint16_t e[2];
    for (int i = 0; i < 2; ++i) {
      const int row = trans ? 2 * (t % 4) + i : t / 4, col = trans ? t / 4 : 2 * (t % 4) + i;
      const int src = 8 * m + row;
      e[i] = static_cast<uint16_t>(emu::get(src, col / 4) >> (16 * (col % 4)));
      emu::note_read(emu::smem() + static_cast<uint32_t>(emu::get(src, 2)) + 2 * col, 2);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  emu::exchange_meet();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, true); }

// mma.m16n8k16 (A row-major, B column-major, float32 accumulators): lane T (g = T/4, c = T%4)
// holds a0 = A[g][2c..], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..],
// b0 = B[2c..][g], b1 = B[2c+8..][g], d0, d1 = D[g][2c..], d2, d3 = D[g+8][2c..].
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  for (int i = 0; i < 4; ++i) emu::put(i, a[i]);
  emu::put(4, b0);
  emu::put(5, b1);
  emu::exchange_meet();
  const auto half_of = [](uint64_t reg, int i) { return emu::to_float(static_cast<uint16_t>(reg >> (16 * i)), T{}); };
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    uint64_t s[6];
    for (int i = 0; i < 6; ++i) s[i] = emu::get(t, i);
    const int g = t / 4, c = t % 4;
    for (int i = 0; i < 2; ++i) {
      A[g][2 * c + i] = half_of(s[0], i);
      A[g + 8][2 * c + i] = half_of(s[1], i);
      A[g][2 * c + 8 + i] = half_of(s[2], i);
      A[g + 8][2 * c + 8 + i] = half_of(s[3], i);
      B[2 * c + i][g] = half_of(s[4], i);
      B[2 * c + 8 + i][g] = half_of(s[5], i);
    }
  }
  emu::exchange_meet();
  const int g = emu::lane() / 4, c = emu::lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[e] += acc;
  }
}

template <typename T>
uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(emu::from_float(lo, T{})) | (static_cast<uint32_t>(emu::from_float(hi, T{})) << 16);
}

}  // namespace flash_attn_ext::cuda::mma_detail
