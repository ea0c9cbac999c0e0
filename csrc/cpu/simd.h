// What the CPU kernels' .cpp files share to vectorise: run-time dispatch over instruction sets
// and 8-float GCC vector types. Include only from .cpp files that are compiled as part of the
// kernels (the macros are not namespaced).
//
// FAE_MULTIVERSION compiles a function several times (x86-64-v4 = AVX-512, x86-64-v3 =
// AVX2+FMA, and a portable baseline) and the loader picks one for the running CPU (GCC
// target_clones, an ifunc), so one built library runs everywhere with the widest vectors it
// finds. Clang and other compilers get the portable build only. FAE_NO_MULTIVERSION builds
// one version for the compiler's -march (tests/native/cpp/ uses it to run the baseline on any CPU).
#pragma once

// The vector helpers are always inlined: no vector ABI crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FAE_NO_MULTIVERSION)
#define FAE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FAE_MULTIVERSION
#endif
#define FAE_INLINE inline __attribute__((always_inline))

namespace flash_attn_ext::cpu::simd {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
// 16 floats: one zmm in the AVX-512 clone, two ymm / four xmm in the others. For the loops whose
// arithmetic is the cost (the softmax's exp): the 8-float types keep AVX-512 at half width.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

FAE_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FAE_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
FAE_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FAE_INLINE void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

// 8 bfloat16 (raw bits) widened to float exactly: the bits go to the top half of each lane.
FAE_INLINE v8f load8(const uint16_t* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  return (v8f)(__builtin_convertvector(h, v8u) << 16);
}

// 8 int8 widened to float exactly (sign-extended, converted).
typedef int8_t v8i8 __attribute__((vector_size(8)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));
FAE_INLINE v8f load8(const int8_t* p) {
  v8i8 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
}

// 8 float8_e4m3fn bytes widened to float exactly, in integer lanes: a normal code's exponent
// and mantissa (bits 0-6) move to float's positions with the bias difference (127 - 7) added;
// a subnormal (exponent field 0) is its mantissa times 2^-9; the NaN codes (0x7f, 0xff; the
// append never writes them, it stores at most +-448) read as NaN, as torch reads them.
FAE_INLINE v8f load8_e4m3(const uint8_t* p) {
  v8u8 b;
  std::memcpy(&b, p, sizeof(b));
  const v8u u = __builtin_convertvector(b, v8u);
  const v8u em = u & 0x7fu;
  const v8u normal = (em << 20) + (120u << 23);
  const v8f sub = __builtin_convertvector((v8i)em, v8f) * (1.0f / 512.0f);
  const v8u is_sub = (v8u)(em < 8u);  // all ones where the exponent field is 0
  const v8u is_nan = (v8u)(em == 0x7fu);
  const v8u bits = (is_sub & (v8u)sub) | (~is_sub & normal);
  return (v8f)((bits & ~is_nan) | (is_nan & 0x7fc00000u) | ((u & 0x80u) << 24));
}

#if defined(__clang__) || __GNUC__ >= 12
#define FAE_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define FAE_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, v8i{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// Sums of four vectors at once, {sum a, sum b, sum c, sum d} in out[0..4): a transpose-and-add
// tree (three vector adds) instead of four serial chains of scalar adds through memory.
FAE_INLINE void hsum4(v8f a, v8f b, v8f c, v8f d, float* out) {
  const v8f ab = FAE_SHUFFLE8(a, b, 0, 8, 2, 10, 4, 12, 6, 14) + FAE_SHUFFLE8(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f cd = FAE_SHUFFLE8(c, d, 0, 8, 2, 10, 4, 12, 6, 14) + FAE_SHUFFLE8(c, d, 1, 9, 3, 11, 5, 13, 7, 15);
  // lanes: a, b, c, d (pairs 0-3 summed), then a, b, c, d (pairs 4-7 summed)
  const v8f abcd = FAE_SHUFFLE8(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) + FAE_SHUFFLE8(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
  for (int t = 0; t < 4; ++t) out[t] = abcd[t] + abcd[t + 4];
}

FAE_INLINE float hsum(v8f v) {
  float out[4];
  hsum4(v, v8f{}, v8f{}, v8f{}, out);
  return out[0];
}

}  // namespace flash_attn_ext::cpu::simd
