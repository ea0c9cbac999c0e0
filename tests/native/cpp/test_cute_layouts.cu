// Ground truth from NVIDIA for csrc/cuda/mma_layout.h: the thread-value layouts of the atoms the
// tensor-core kernels use, as CuTe (the nvidia-cutlass package's headers) defines them, evaluated
// on the host and compared element by element with the header's lane -> element maps. The
// header and the SIMT emulator were both written by us from the PTX ISA text; a misreading made
// in both would pass every emulated test, but not this one. Atoms:
//   - MMA_Traits<SM80_16x8x16_F32F16F16F32_TN> (and the bf16 one): ALayout (thread, value) ->
//     (m, k) of the 16x16 A tile, BLayout -> (n, k) of the 8x16 B tile, CLayout -> (m, n);
//   - Copy_Traits<SM75_U32x4_LDSM_N> (ldmatrix.x4) and Copy_Traits<SM75_U16x8_LDSM_T>
//     (ldmatrix.x4.trans): which row-address lane and which element of that row each
//     destination (thread, value) receives.
// Composed with the header's address maps (ldsm_a, ldsm_b_from_nk, ldsm_b_from_kn_trans), each
// register element a lane loads must be the element CuTe's MMA layout says that register holds.
// Built with nvcc as host code by tests/native/test_host_programs.py; no GPU.
//
// With --dump it prints the same layouts as tables instead, one line per (atom, thread,
// value), for test_emulator_against_cute.cpp: the SIMT emulator cannot be compiled by nvcc, so
// its ldmatrix and mma.sync are checked against CuTe by a host-compiler program that reads them.
#include <cstdio>
#include <cstring>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/tensor.hpp>

#include "cuda/mma_layout.h"
#include "expect.h"

using namespace cute;
namespace ml = flash_attn_ext::mma_layout;

// What ldmatrix.x4 delivers, from CuTe's copy traits (16-bit elements): destination element
// `elem` (0-7, two per 32-bit register) of thread t comes from row `row` of the 8x8 matrices
// addressed by lane `src_lane`, at 16-bit column `col` of that row.
struct Source {
  int src_lane, col;
};

// Both copy atoms' layouts count bits: (thread, bit) -> bit index of the rows the lanes
// address; SrcLayout is (32 lanes, 128 bits), so the lane supplying a row and the bit within it
// are read off by searching it for the index the destination bit stands for.
template <class Traits>
Source ldsm_source(int t, int elem) {
  using SrcLayout = typename Traits::SrcLayout;
  using DstLayout = typename Traits::DstLayout;
  const int dst_bit = 16 * elem;
  EXPECT(dst_bit < size<1>(DstLayout{}), "element %d past thread %d's bits", elem, t);
  const int index = DstLayout{}(t, dst_bit);
  for (int lane = 0; lane < size<0>(SrcLayout{}); ++lane)
    for (int bit = 0; bit < size<1>(SrcLayout{}); bit += 16)
      if (SrcLayout{}(lane, bit) == index) return {lane, bit / 16};
  EXPECT(false, "no source for thread %d element %d", t, elem);
  return {0, 0};
}

// The MMA atom's layouts as coordinates: (thread, value) -> (m, k) of A, (n, k) of B, (m, n)
// of C (CuTe's flat indices are m + 16 k, n + 8 k and m + 16 n).
struct AtomCoord {
  int i, j;
};
template <class MMA>
struct Mma {
  using T = MMA_Traits<MMA>;
  static_assert(size<0>(typename T::ALayout{}) == 32 && size<1>(typename T::ALayout{}) == 8 &&
                size<1>(typename T::BLayout{}) == 4 && size<1>(typename T::CLayout{}) == 4);
  static AtomCoord a(int t, int v) {
    const int x = typename T::ALayout{}(t, v);
    return {x % 16, x / 16};
  }
  static AtomCoord b(int t, int v) {
    const int x = typename T::BLayout{}(t, v);
    return {x % 8, x / 8};
  }
  static AtomCoord c(int t, int v) {
    const int x = typename T::CLayout{}(t, v);
    return {x % 16, x / 16};
  }
};

// B fragments of two n8 tiles loaded through the copy atom Traits, lane l addressing row
// addr_of(l) of its 8x8 matrix: register 2 j + r element i must be B[n = 8 j + BLayout n, k]
// of n-tile j. The matrix's rows are n ([n][k], K) or, with k_rows, k ([k][n], V).
template <class M, class Traits>
void check_b_loads(const char* name, const char* what, int t, ml::RowCol (*addr_of)(int), bool k_rows) {
  for (int reg = 0; reg < 4; ++reg)
    for (int i = 0; i < 2; ++i) {
      const Source s = ldsm_source<Traits>(t, 2 * reg + i);
      const ml::RowCol addr = addr_of(s.src_lane);
      const int row = addr.row, col = addr.col + s.col;
      const int got_n = k_rows ? col : row, got_k = k_rows ? row : col;
      const int j = reg >> 1;
      const AtomCoord b = M::b(t, 2 * (reg & 1) + i);
      EXPECT(got_n == 8 * j + b.i && got_k == b.j,
             "%s %s: lane %d reg %d.%d loads (n %d, k %d), CuTe holds (n %d, k %d)", name, what, t, reg, i, got_n,
             got_k, 8 * j + b.i, b.j);
    }
}

template <class MMA>
void check_mma_atom(const char* name) {
  using M = Mma<MMA>;

  for (int t = 0; t < 32; ++t) {
    // Accumulators: element e of lane t is D[acc_element(t, e)].
    for (int e = 0; e < 4; ++e) {
      const AtomCoord c = M::c(t, e);
      const ml::RowCol rc = ml::acc_element(t, e);
      EXPECT(rc.row == c.i && rc.col == c.j, "%s C: lane %d element %d is (%d, %d), CuTe (%d, %d)", name, t, e, rc.row,
             rc.col, c.i, c.j);
    }

    // A from ldmatrix.x4 of a row-major 16x16 tile, lane l addressing ldsm_a(l): register v
    // element i must be A[ALayout(t, 2 v + i)].
    for (int v = 0; v < 4; ++v)
      for (int i = 0; i < 2; ++i) {
        const Source s = ldsm_source<Copy_Traits<SM75_U32x4_LDSM_N>>(t, 2 * v + i);
        const ml::RowCol addr = ml::ldsm_a(s.src_lane);
        const int got_m = addr.row, got_k = addr.col + s.col;
        const AtomCoord a = M::a(t, 2 * v + i);
        EXPECT(got_m == a.i && got_k == a.j, "%s A: lane %d reg %d.%d loads (%d, %d), CuTe holds (%d, %d)", name, t, v,
               i, got_m, got_k, a.i, a.j);
      }

    // B of two n8 tiles from a [n][k] matrix (K rows) with ldmatrix, and the same fragments
    // from a [k][n] matrix (V rows) with ldmatrix.trans.
    check_b_loads<M, Copy_Traits<SM75_U32x4_LDSM_N>>(name, "B[n][k]", t, ml::ldsm_b_from_nk, false);
    check_b_loads<M, Copy_Traits<SM75_U16x8_LDSM_T>>(name, "B[k][n] trans", t, ml::ldsm_b_from_kn_trans, true);

    // P V: A register `reg` of a k16 step packs accumulator elements a_reg_first_element(reg)
    // and + 1 of n8 tile a_reg_tile(reg); those must be the (m, k) the A layout puts there.
    for (int reg = 0; reg < 4; ++reg)
      for (int i = 0; i < 2; ++i) {
        const ml::RowCol rc = ml::acc_element(t, ml::a_reg_first_element(reg) + i);
        const int got_m = rc.row, got_k = 8 * ml::a_reg_tile(reg) + rc.col;
        const AtomCoord a = M::a(t, 2 * reg + i);
        EXPECT(got_m == a.i && got_k == a.j, "%s P as A: lane %d reg %d.%d is (%d, %d), CuTe holds (%d, %d)", name, t,
               reg, i, got_m, got_k, a.i, a.j);
      }
  }
}

// Lines "mma NAME A|B|C thread value i j": A (m, k), B (n, k), C (m, n); then
// "ldsm N|T thread element src_lane col" for ldmatrix.x4 and .x4.trans.
template <class MMA>
void dump_mma_atom(const char* name) {
  using M = Mma<MMA>;
  for (int t = 0; t < 32; ++t) {
    for (int v = 0; v < 8; ++v) std::printf("mma %s A %d %d %d %d\n", name, t, v, M::a(t, v).i, M::a(t, v).j);
    for (int v = 0; v < 4; ++v) {
      std::printf("mma %s B %d %d %d %d\n", name, t, v, M::b(t, v).i, M::b(t, v).j);
      std::printf("mma %s C %d %d %d %d\n", name, t, v, M::c(t, v).i, M::c(t, v).j);
    }
  }
}
void dump_ldsm() {
  for (int t = 0; t < 32; ++t)
    for (int e = 0; e < 8; ++e) {
      const Source n = ldsm_source<Copy_Traits<SM75_U32x4_LDSM_N>>(t, e);
      const Source tr = ldsm_source<Copy_Traits<SM75_U16x8_LDSM_T>>(t, e);
      std::printf("ldsm N %d %d %d %d\nldsm T %d %d %d %d\n", t, e, n.src_lane, n.col, t, e, tr.src_lane, tr.col);
    }
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--dump") == 0) {
    dump_mma_atom<SM80_16x8x16_F32F16F16F32_TN>("f16");
    dump_mma_atom<SM80_16x8x16_F32BF16BF16F32_TN>("bf16");
    dump_ldsm();
    return failures == 0 ? 0 : 1;
  }
  check_mma_atom<SM80_16x8x16_F32F16F16F32_TN>("f16");
  check_mma_atom<SM80_16x8x16_F32BF16BF16F32_TN>("bf16");
  return expect_summary("mma_layout.h against CuTe's SM80 m16n8k16 and SM75 ldmatrix atoms");
}
