// Unit test of the torch-free semantics headers shared by the CPU and CUDA kernels
// (csrc/common/attention_semantics.h, dropout_philox.h). Built and run by
// tests/native/test_host_programs.py with the host compiler: no torch, no GPU.
//
// Brute force over small shapes: the band helpers must cover every visible (query, key) pair
// (superset: skipping a tile that holds a visible pair would be a wrong answer) and be tight
// (every key/row they return is visible to some row/key of the tile). Philox must reproduce
// the Random123 known-answer vectors, so the CUDA kernels can draw the same masks.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/attention_semantics.h"
#include "common/dropout_philox.h"
#include "expect.h"

using namespace flash_attn_ext;

static void check_bands(int64_t L, int64_t S, int64_t left, int64_t right, bool bottom_right) {
  const int64_t o = alignment_offset(L, S, bottom_right);
  // Per row: the visible keys form exactly [first_visible_key, end_visible_key).
  for (int64_t i = 0; i < L; ++i) {
    const int64_t f = first_visible_key(i, o, left, S), e = end_visible_key(i, o, right, S);
    for (int64_t j = 0; j < S; ++j) {
      const bool in = j >= f && j < e;
      EXPECT(in == key_visible(i, j, o, left, right), "row interval L=%ld S=%ld w=(%ld,%ld) br=%d i=%ld j=%ld", (long)L,
             (long)S, (long)left, (long)right, bottom_right, (long)i, (long)j);
    }
  }
  for (int64_t r0 = 0; r0 < L; r0 += 3) {
    for (int64_t r1 = r0 + 1; r1 <= L; r1 += 5) {
      const KeyRange kr = visible_key_range(r0, r1, o, left, right, S);
      for (int64_t j = 0; j < S; ++j) {
        bool any = false;
        for (int64_t i = r0; i < r1; ++i) any |= key_visible(i, j, o, left, right);
        const bool in = j >= kr.begin && j < kr.end;
        EXPECT(!any || in, "key range misses a visible key: rows [%ld,%ld) j=%ld", (long)r0, (long)r1, (long)j);
        EXPECT(!in || any, "key range not tight: rows [%ld,%ld) j=%ld", (long)r0, (long)r1, (long)j);
        bool all = true;
        for (int64_t i = r0; i < r1; ++i) all &= key_visible(i, j, o, left, right);
        const KeyRange cr = common_visible_key_range(r0, r1, o, left, right, S);
        EXPECT(all == (j >= cr.begin && j < cr.end), "common key range rows [%ld,%ld) j=%ld: [%ld,%ld)", (long)r0,
               (long)r1, (long)j, (long)cr.begin, (long)cr.end);
      }
    }
  }
  for (int64_t k0 = 0; k0 < S; k0 += 4) {
    for (int64_t k1 = k0 + 1; k1 <= S; k1 += 7) {
      const RowRange rr = visible_row_range(k0, k1, o, left, right, L);
      for (int64_t i = 0; i < L; ++i) {
        bool any = false;
        for (int64_t j = k0; j < k1; ++j) any |= key_visible(i, j, o, left, right);
        const bool in = i >= rr.begin && i < rr.end;
        EXPECT(!any || in, "row range misses a row: keys [%ld,%ld) i=%ld", (long)k0, (long)k1, (long)i);
        EXPECT(!in || any, "row range not tight: keys [%ld,%ld) i=%ld", (long)k0, (long)k1, (long)i);
      }
      for (int64_t r0 = 0; r0 < L; r0 += 5) {
        const int64_t r1 = r0 + 4 < L ? r0 + 4 : L;
        bool all = true;
        for (int64_t i = r0; i < r1; ++i)
          for (int64_t j = k0; j < k1; ++j) all &= key_visible(i, j, o, left, right);
        EXPECT(all == tile_fully_visible(r0, r1, k0, k1, o, left, right),
               "tile_fully_visible rows [%ld,%ld) keys [%ld,%ld)", (long)r0, (long)r1, (long)k0, (long)k1);
      }
    }
  }
}

static void check_philox() {
  // Random123 known-answer vectors for Philox4x32-10: counter, key -> output.
  struct Kat {
    uint32_t c[4], k[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& t : kats) {
    const Philox4 r = philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int w = 0; w < 4; ++w) EXPECT(r.x[w] == t.out[w], "philox KAT word %d: %08x != %08x", w, r.x[w], t.out[w]);
  }
  // dropout_keep is the per-element view of dropout_keep_bits4; thresholds 0 and 2^24.
  const uint32_t half = dropout_threshold(0.5);
  int kept = 0;
  for (int64_t j = 0; j < 4000; ++j) {
    const bool k = dropout_keep(12345, 7, 3, 11, j, half);
    EXPECT(k == (((dropout_keep_bits4(12345, 7, 3, 11, j >> 2, half) >> (j & 3)) & 1u) != 0), "keep bits j=%ld",
           (long)j);
    EXPECT(dropout_keep(1, 2, 3, 4, j, dropout_threshold(0.0)), "p=0 must keep everything");
    kept += k;
  }
  EXPECT(kept > 1800 && kept < 2200, "p=0.5 kept %d of 4000", kept);
}

// The row end with a sink (softmax_denominator, row_lse) against the definition: the sink as
// one more term of the sum, in double; the edge cases (no key, no sink, NaN) by value.
static void check_sinks() {
  const double inf = INFINITY;
  std::mt19937 rng(7);
  std::normal_distribution<double> n(0.0, 3.0);
  for (int t = 0; t < 200; ++t) {
    const int keys = 1 + t % 5;
    std::vector<double> s(keys);
    double m = -inf;
    for (auto& x : s) m = std::max(m, x = n(rng));
    double l = 0;
    for (double x : s) l += std::exp(x - m);
    const double sink = n(rng);
    double total = std::exp(sink);
    for (double x : s) total += std::exp(x);
    EXPECT(std::fabs(softmax_denominator(m, l, sink) * std::exp(m) - total) <= 1e-12 * total, "denominator t=%d", t);
    EXPECT(std::fabs(row_lse(m, l, sink) - std::log(total)) <= 1e-12, "lse t=%d: %g vs %g", t, row_lse(m, l, sink),
           std::log(total));
    EXPECT(softmax_denominator(m, l, -inf) == l && row_lse(m, l, -inf) == m + std::log(l), "no sink t=%d", t);
    // a float32 row far from the sink (overflow / underflow of e^(sink - m)) stays finite
    const float big = row_lse(-80.0f, 1.0f, 80.0f), small = row_lse(80.0f, 1.0f, -80.0f);
    EXPECT(std::fabs(big - 80.0f) < 1e-5f && std::fabs(small - 80.0f) < 1e-5f, "float extremes %g %g", big, small);
  }
  EXPECT(softmax_denominator(-inf, 0.0, 1.5) == inf && row_lse(-inf, 0.0, 1.5) == 1.5, "no key: all mass on the sink");
  EXPECT(softmax_denominator(-inf, 0.0, -inf) == 0.0 && row_lse(-inf, 0.0, -inf) == -inf, "no key, no sink");
  const double nan = std::nan("");
  EXPECT(std::isnan(row_lse(0.5, nan, 1.0)) && std::isnan(softmax_denominator(0.5, nan, 1.0)), "NaN row stays NaN");
  EXPECT(std::isnan(row_lse(0.5, 2.0, nan)) && std::isnan(softmax_denominator(0.5, 2.0, nan)), "NaN sink is NaN");
  EXPECT(std::isnan(output_factor(softmax_denominator(0.5, 2.0, nan), 1.0)), "NaN sink: NaN output, not zeros");
  EXPECT(output_factor(inf, 1.0) == 0.0 && output_factor(0.0, 1.0) == 0.0 && output_factor(4.0, 2.0) == 0.5,
         "output_factor");
}

int main() {
  std::mt19937 rng(1234);
  const int64_t windows[] = {-1, 0, 1, 2, 3, 7, 16, 40};
  int cases = 0;
  for (int64_t L : {1, 2, 7, 19, 33}) {
    for (int64_t S : {1, 3, 8, 21, 40}) {
      for (int64_t left : windows) {
        for (int64_t right : windows) {
          for (bool br : {false, true}) {
            if (rng() % 3 != 0 && L > 7) continue;  // a random third of the bigger cases
            check_bands(L, S, left, right, br);
            ++cases;
          }
        }
      }
    }
  }
  check_philox();
  check_sinks();
  std::printf("%d band cases\n", cases);
  return expect_summary("semantics headers");
}
