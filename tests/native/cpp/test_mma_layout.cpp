// Host check of csrc/cuda/mma_layout.h, the lane -> element maps of the tensor-core forward.
// ldmatrix (.x4, with and without .trans) and mma.sync m16n8k16 are emulated for a whole warp
// from their PTX ISA fragment definitions, written out here independently of the header; the
// kernel's address and fragment arithmetic (through the header) must then produce exactly
// S = Q K^T and O = P V. Built and run by tests/native/test_host_programs.py; no GPU.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/mma_layout.h"
#include "expect.h"

using namespace flash_attn_ext::mma_layout;

constexpr int kDim = 48, kKeys = 32, kStride = kDim + 8;  // 3 k16 steps, 4 n8 key tiles

struct Pair {
  float x[2];
};
struct Regs4 {
  Pair r[4];
};

// ldmatrix.x4: lane 8m + r gives the address of row r of matrix m. Lane T receives, of each
// matrix, row T/4 columns 2(T%4), 2(T%4)+1 (with .trans: rows 2(T%4), 2(T%4)+1 of column T/4).
static void ldmatrix_x4(const std::vector<float>& smem, const int (&addr)[32], bool trans, Regs4 (&out)[32]) {
  for (int t = 0; t < 32; ++t)
    for (int m = 0; m < 4; ++m)
      for (int e = 0; e < 2; ++e) {
        const int row = trans ? 2 * (t % 4) + e : t / 4, col = trans ? t / 4 : 2 * (t % 4) + e;
        out[t].r[m].x[e] = smem[addr[8 * m + row] + col];
      }
}

// mma.m16n8k16, A row-major 16x16, B column-major 16x8: lane T (g = T/4, c = T%4) holds
// a0 = A[g][2c..], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..];
// b0 = B[2c..][g], b1 = B[2c+8..][g]; d0, d1 = D[g][2c..], d2, d3 = D[g+8][2c..].
static void mma(float (&d)[32][4], const Pair (&a)[32][4], const Pair (&b)[32][2]) {
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, c = t % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * c + e] = a[t][0].x[e];
      A[g + 8][2 * c + e] = a[t][1].x[e];
      A[g][2 * c + 8 + e] = a[t][2].x[e];
      A[g + 8][2 * c + 8 + e] = a[t][3].x[e];
      B[2 * c + e][g] = b[t][0].x[e];
      B[2 * c + 8 + e][g] = b[t][1].x[e];
    }
  }
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, c = t % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
      float acc = 0;
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[t][e] += acc;
    }
  }
}

int main() {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> small(-4, 4);  // small integers: every sum is exact
  std::vector<float> q(16 * kStride), k(kKeys * kStride), v(kKeys * kStride);
  for (auto* m : {&q, &k, &v})
    for (auto& x : *m) x = static_cast<float>(small(rng));

  // S = Q K^T, as the kernel's k16 / n16 loops do it.
  static float s[kKeys / 8][32][4] = {};
  for (int ks = 0; ks < kDim / 16; ++ks) {
    int addr[32];
    Regs4 a[32];
    for (int l = 0; l < 32; ++l) addr[l] = ldsm_a(l).row * kStride + ks * 16 + ldsm_a(l).col;
    ldmatrix_x4(q, addr, false, a);
    for (int np = 0; np < kKeys / 16; ++np) {
      Regs4 bf[32];
      for (int l = 0; l < 32; ++l)
        addr[l] = (np * 16 + ldsm_b_from_nk(l).row) * kStride + ks * 16 + ldsm_b_from_nk(l).col;
      ldmatrix_x4(k, addr, false, bf);
      Pair af[32][4], b0[32][2], b1[32][2];
      for (int l = 0; l < 32; ++l) {
        for (int r = 0; r < 4; ++r) af[l][r] = a[l].r[r];
        b0[l][0] = bf[l].r[0], b0[l][1] = bf[l].r[1], b1[l][0] = bf[l].r[2], b1[l][1] = bf[l].r[3];
      }
      mma(s[2 * np], af, b0);
      mma(s[2 * np + 1], af, b1);
    }
  }
  for (int nt = 0; nt < kKeys / 8; ++nt)
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const RowCol rc = acc_element(l, e);
        float want = 0;
        for (int d = 0; d < kDim; ++d) want += q[rc.row * kStride + d] * k[(nt * 8 + rc.col) * kStride + d];
        if (s[nt][l][e] != want && ++failures < 10)
          std::printf("S tile %d lane %d elem %d: %g != %g\n", nt, l, e, s[nt][l][e], want);
      }

  // O = S V with S's accumulators as the A fragments, V through ldmatrix.trans.
  static float o[kDim / 8][32][4] = {};
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    Pair af[32][4];
    for (int l = 0; l < 32; ++l)
      for (int reg = 0; reg < 4; ++reg) {
        const float* acc = s[2 * kk + a_reg_tile(reg)][l];
        af[l][reg] = {{acc[a_reg_first_element(reg)], acc[a_reg_first_element(reg) + 1]}};
      }
    for (int dp = 0; dp < kDim / 16; ++dp) {
      int addr[32];
      Regs4 bf[32];
      for (int l = 0; l < 32; ++l)
        addr[l] = (kk * 16 + ldsm_b_from_kn_trans(l).row) * kStride + dp * 16 + ldsm_b_from_kn_trans(l).col;
      ldmatrix_x4(v, addr, true, bf);
      Pair b0[32][2], b1[32][2];
      for (int l = 0; l < 32; ++l)
        b0[l][0] = bf[l].r[0], b0[l][1] = bf[l].r[1], b1[l][0] = bf[l].r[2], b1[l][1] = bf[l].r[3];
      mma(o[2 * dp], af, b0);
      mma(o[2 * dp + 1], af, b1);
    }
  }
  for (int dt = 0; dt < kDim / 8; ++dt)
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const RowCol rc = acc_element(l, e);
        float want = 0;
        for (int j = 0; j < kKeys; ++j) {
          float sij = 0;
          for (int d = 0; d < kDim; ++d) sij += q[rc.row * kStride + d] * k[j * kStride + d];
          want += sij * v[j * kStride + dt * 8 + rc.col];
        }
        if (o[dt][l][e] != want && ++failures < 20)
          std::printf("O tile %d lane %d elem %d: %g != %g\n", dt, l, e, o[dt][l][e], want);
      }
  return expect_summary("mma fragment layouts");
}
