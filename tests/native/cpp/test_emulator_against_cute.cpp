// The SIMT emulator's own warp instructions (simt_emulator.h: ldmatrix.x4, ldmatrix.x4.trans,
// mma.sync m16n8k16 f16 / bf16 -> f32) against NVIDIA's definitions of them: CuTe's
// thread-value layouts, which test_cute_layouts.cu --dump prints as tables (nvcc compiles CuTe,
// the host compiler the emulator; the tables cross between them on stdin). The emulator and
// csrc/cuda/mma_layout.h were both written by us from the PTX ISA text; test_cute_layouts.cu
// checks the header, this program the emulator, so the emulated kernel tests stand on NVIDIA's
// layouts at both ends. Run by tests/native/test_host_programs.py.
//
//   ldmatrix: every lane addresses its own 16-byte row, whose eight elements hold (lane, column)
//     as their bits; each destination element a lane receives must name the lane and column
//     CuTe's copy traits give.
//   mma.sync: random A (16x16), B (16x8) and C of small integers (exact in f16, bf16 and the f32
//     sums) are placed in the lanes' registers as CuTe's A / B / C layouts say; each lane's D
//     elements must be (A B + C) at the (m, n) CuTe's C layout gives.
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "expect.h"
#include "simt_emulator.h"

namespace mma = flash_attn_ext::cuda::mma_detail;

struct Tables {
  int a[2][32][8][2], b[2][32][4][2], c[2][32][4][2];  // [f16, bf16][thread][value] -> (i, j)
  int ldsm[2][32][8][2];                               // [N, T][thread][element] -> (src lane, col)
  bool seen_a[2][32][8], seen_b[2][32][4], seen_c[2][32][4], seen_ldsm[2][32][8];
};

// Every cell exactly once, every index in range, nothing else: a short or garbled dump fails.
static Tables read_tables(std::FILE* in) {
  Tables t{};
  char name[8], which[8];
  int th, v, i, j;
  char line[128];
  const auto in_range = [](int x, int n) { return x >= 0 && x < n; };
  const auto fill = [&](bool& seen, int (&cell)[2], const char* what) {
    EXPECT(!seen, "%s thread %d value %d given twice", what, th, v);
    seen = true;
    cell[0] = i, cell[1] = j;
  };
  while (std::fgets(line, sizeof line, in)) {
    if (std::sscanf(line, "mma %7s %7s %d %d %d %d", name, which, &th, &v, &i, &j) == 6) {
      const bool f16 = std::strcmp(name, "f16") == 0, bf16 = std::strcmp(name, "bf16") == 0;
      const char w = std::strlen(which) == 1 ? which[0] : '?';
      const int d = bf16, values = w == 'A' ? 8 : 4;
      const int rows = w == 'B' ? 8 : 16, cols = w == 'C' ? 8 : 16;
      if (!(f16 || bf16) || !(w == 'A' || w == 'B' || w == 'C') || !in_range(th, 32) || !in_range(v, values) ||
          !in_range(i, rows) || !in_range(j, cols)) {
        EXPECT(false, "bad table line: %s", line);
        continue;
      }
      if (w == 'A') fill(t.seen_a[d][th][v], t.a[d][th][v], "mma A");
      if (w == 'B') fill(t.seen_b[d][th][v], t.b[d][th][v], "mma B");
      if (w == 'C') fill(t.seen_c[d][th][v], t.c[d][th][v], "mma C");
    } else if (std::sscanf(line, "ldsm %7s %d %d %d %d", which, &th, &v, &i, &j) == 5) {
      const bool n = std::strcmp(which, "N") == 0, tr = std::strcmp(which, "T") == 0;
      if (!(n || tr) || !in_range(th, 32) || !in_range(v, 8) || !in_range(i, 32) || !in_range(j, 8)) {
        EXPECT(false, "bad table line: %s", line);
        continue;
      }
      fill(t.seen_ldsm[tr][th][v], t.ldsm[tr][th][v], "ldsm");
    } else {
      EXPECT(false, "unknown table line: %s", line);
    }
  }
  for (int d = 0; d < 2; ++d)
    for (th = 0; th < 32; ++th) {
      for (v = 0; v < 8; ++v) {
        EXPECT(t.seen_a[d][th][v], "no mma A entry for dtype %d thread %d value %d", d, th, v);
        EXPECT(t.seen_ldsm[d][th][v], "no ldsm entry for kind %d thread %d element %d", d, th, v);
      }
      for (v = 0; v < 4; ++v)
        EXPECT(t.seen_b[d][th][v] && t.seen_c[d][th][v], "no mma B / C entry for dtype %d thread %d value %d", d, th,
               v);
    }
  return t;
}

static void check_ldmatrix(const Tables& t, bool trans) {
  std::vector<uint32_t> got(32 * 4);
  emu::launch(1, 32, 32 * 16, [&] {
    const int lane = static_cast<int>(threadIdx.x);
    unsigned char* row = emu::smem() + 16 * lane;
    for (int col = 0; col < 8; ++col) {
      const uint16_t id = static_cast<uint16_t>(lane * 8 + col);
      std::memcpy(row + 2 * col, &id, 2);
    }
    __syncwarp();
    uint32_t r[4];
    if (trans)
      mma::ldmatrix_x4_trans(r, mma::smem_u32(row));
    else
      mma::ldmatrix_x4(r, mma::smem_u32(row));
    for (int i = 0; i < 4; ++i) got[4 * lane + i] = r[i];
  });
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 8; ++e) {
      const int id = (got[4 * lane + e / 2] >> (16 * (e % 2))) & 0xffff;
      const int* want = t.ldsm[trans][lane][e];
      EXPECT(id / 8 == want[0] && id % 8 == want[1],
             "ldmatrix%s: lane %d element %d came from lane %d column %d, CuTe: lane %d column %d",
             trans ? ".trans" : "", lane, e, id / 8, id % 8, want[0], want[1]);
    }
}

template <typename T>
static void check_mma(const Tables& t, int d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-4, 4);
  float A[16][16], B[16][8], C[16][8];  // B[k][n]
  for (auto& r : A)
    for (float& x : r) x = static_cast<float>(small(rng));
  for (auto& r : B)
    for (float& x : r) x = static_cast<float>(small(rng));
  for (auto& r : C)
    for (float& x : r) x = static_cast<float>(small(rng)) * 8.f;
  std::vector<float> out(32 * 4);
  emu::launch(1, 32, 0, [&] {
    const int lane = static_cast<int>(threadIdx.x);
    uint32_t a[4], b[2];
    for (int v = 0; v < 4; ++v) {
      const int* lo = t.a[d][lane][2 * v];
      const int* hi = t.a[d][lane][2 * v + 1];
      a[v] = mma::pack2<T>(A[lo[0]][lo[1]], A[hi[0]][hi[1]]);
    }
    for (int v = 0; v < 2; ++v) {
      const int* lo = t.b[d][lane][2 * v];  // (n, k)
      const int* hi = t.b[d][lane][2 * v + 1];
      b[v] = mma::pack2<T>(B[lo[1]][lo[0]], B[hi[1]][hi[0]]);
    }
    float acc[4];
    for (int e = 0; e < 4; ++e) acc[e] = C[t.c[d][lane][e][0]][t.c[d][lane][e][1]];
    mma::mma_16816<T>(acc, a, b[0], b[1]);
    for (int e = 0; e < 4; ++e) out[4 * lane + e] = acc[e];
  });
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      const int m = t.c[d][lane][e][0], n = t.c[d][lane][e][1];
      float want = C[m][n];
      for (int k = 0; k < 16; ++k) want += A[m][k] * B[k][n];
      EXPECT(out[4 * lane + e] == want, "mma.sync %s: lane %d element %d (m %d, n %d) is %g, A B + C is %g",
             d ? "bf16" : "f16", lane, e, m, n, out[4 * lane + e], want);
    }
}

int main() {
  const Tables t = read_tables(stdin);  // test_cute_layouts --dump
  if (failures) return expect_summary("the emulator's warp instructions against CuTe");
  check_ldmatrix(t, false);
  check_ldmatrix(t, true);
  for (uint32_t seed = 1; seed <= 4; ++seed) {
    check_mma<emu::Half>(t, 0, seed);
    check_mma<emu::BFloat16>(t, 1, seed);
  }
  return expect_summary("the emulator's warp instructions against CuTe");
}
