// The KV-cache ops' device-side check and poison kernels
// (csrc/kv_cache/kv_cache_device_checks_kernel.cuh), unchanged, run on the CPU through
// tests/native/cpp/simt_emulator.h against a host statement of the rules: every length at
// and around each bound (negative, capacity - new_len, one past it, near INT64_MAX), int32
// and int64 lengths read through a stride, rolling caches (start = len mod capacity), paged
// caches whose bad entries sit inside, exactly past and far past the used blocks (a table
// longer than the block's threads), the error word accumulated over launches, and NaN written
// to exactly the skipped sequences' outputs. Built and run by tests/native/test_host_programs.py.
#define FAE_SIMT_EMULATION "simt_emulator.h"
#include "kv_cache/kv_cache_device_checks_kernel.cuh"
#include "expect.h"

#include <array>
#include <cstring>
#include <limits>
#include <vector>

using namespace flash_attn_ext::cuda;

namespace {

struct Expected {
  int64_t start, len_k;
  uint32_t reasons;
};

// The rules, stated plainly.
Expected expect(int64_t len, int64_t new_len, int64_t capacity, bool rolling, const std::vector<int32_t>& table,
                int64_t b, int64_t blocks_per_seq, int64_t block_size, int64_t num_blocks) {
  if (len < 0) return {-1, 0, kNegativeLength};
  if (!rolling && len > capacity - new_len) return {-1, 0, kPastCapacity};  // len + new_len > capacity
  if (!table.empty()) {
    for (int64_t blk = 0; blk * block_size < len + new_len; ++blk) {
      const int32_t e = table[b * blocks_per_seq + blk];
      if (e < 0 || e >= num_blocks) return {-1, 0, kBadBlock};
    }
  }
  const int64_t start = rolling ? len % capacity : len;
  return {start, start + new_len, 0};
}

struct Case {
  const char* name;
  std::vector<int64_t> lens;
  int64_t new_len, capacity;
  bool rolling;
  std::vector<int32_t> table;  // empty: contiguous cache
  int64_t blocks_per_seq = 0, block_size = 0, num_blocks = 0;
};

template <typename Len>
void run(const Case& c, int64_t stride, DeviceCheckErrors& errors, bool want_lens_k) {
  const int64_t B = static_cast<int64_t>(c.lens.size());
  std::vector<Len> seqlens(B * stride, Len{77});  // the gaps hold a valid-looking length
  for (int64_t b = 0; b < B; ++b) {
    // An int32 case keeps lengths that fit; the int64 near-max case runs as int64 only.
    seqlens[b * stride] = static_cast<Len>(c.lens[b]);
  }
  std::vector<int64_t> starts(B, 12345), lens_k(B, 12345);
  DeviceLengthsParams p{};
  p.seqlens = seqlens.data();
  p.seqlens_int64 = sizeof(Len) == 8;
  p.seqlens_stride = stride;
  p.new_len = c.new_len;
  p.capacity = c.capacity;
  p.rolling = c.rolling;
  p.block_table = c.table.empty() ? nullptr : c.table.data();
  p.blocks_per_seq = c.blocks_per_seq;
  p.block_size = c.block_size;
  p.num_blocks = c.num_blocks;
  p.starts = starts.data();
  p.lens_k = want_lens_k ? lens_k.data() : nullptr;
  p.errors = &errors;
  emu::launch(static_cast<unsigned>(B), kCheckThreads, kCheckSmemBytes, check_lengths_kernel, p);
  for (int64_t b = 0; b < B; ++b) {
    const Expected e = expect(static_cast<int64_t>(seqlens[b * stride]), c.new_len, c.capacity, c.rolling, c.table, b,
                              c.blocks_per_seq, c.block_size, c.num_blocks);
    EXPECT(starts[b] == e.start, "%s (int%d, stride %ld) b=%ld: start %ld, expected %ld", c.name, int(8 * sizeof(Len)),
           long(stride), long(b), long(starts[b]), long(e.start));
    if (want_lens_k)
      EXPECT(lens_k[b] == e.len_k, "%s (int%d) b=%ld: len_k %ld, expected %ld", c.name, int(8 * sizeof(Len)), long(b),
             long(lens_k[b]), long(e.len_k));
    else
      EXPECT(lens_k[b] == 12345, "%s: lens_k written although not asked for", c.name);
  }
}

uint32_t expected_reasons(const Case& c) {
  uint32_t r = 0;
  for (int64_t b = 0; b < static_cast<int64_t>(c.lens.size()); ++b)
    r |= expect(c.lens[b], c.new_len, c.capacity, c.rolling, c.table, b, c.blocks_per_seq, c.block_size, c.num_blocks)
             .reasons;
  return r;
}
uint32_t expected_skips(const Case& c) {
  uint32_t n = 0;
  for (int64_t b = 0; b < static_cast<int64_t>(c.lens.size()); ++b)
    n += expect(c.lens[b], c.new_len, c.capacity, c.rolling, c.table, b, c.blocks_per_seq, c.block_size, c.num_blocks)
             .reasons != 0;
  return n;
}

void check_case(const Case& c, bool int64_only) {
  for (int64_t stride : {int64_t{1}, int64_t{3}}) {
    for (bool want_lens_k : {true, false}) {
      DeviceCheckErrors errors{0, 0};
      run<int64_t>(c, stride, errors, want_lens_k);
      EXPECT(errors.reasons == expected_reasons(c) && errors.skipped == expected_skips(c),
             "%s (int64): error word %u / %u, expected %u / %u", c.name, errors.reasons, errors.skipped,
             expected_reasons(c), expected_skips(c));
      if (int64_only) continue;
      errors = {0, 0};
      run<int32_t>(c, stride, errors, want_lens_k);
      EXPECT(errors.reasons == expected_reasons(c) && errors.skipped == expected_skips(c),
             "%s (int32): error word %u / %u, expected %u / %u", c.name, errors.reasons, errors.skipped,
             expected_reasons(c), expected_skips(c));
    }
  }
}

// A paged table for B sequences: entries b * blocks_per_seq + blk (all valid), then `bad`
// (b, blk, value) overrides.
std::vector<int32_t> table_of(int64_t B, int64_t blocks_per_seq, std::vector<std::array<int64_t, 3>> bad) {
  std::vector<int32_t> t(B * blocks_per_seq);
  for (int64_t i = 0; i < B * blocks_per_seq; ++i) t[i] = static_cast<int32_t>((i * 7) % (B * blocks_per_seq));
  for (const auto& [b, blk, value] : bad) t[b * blocks_per_seq + blk] = static_cast<int32_t>(value);
  return t;
}

template <typename Word, typename LseWord>
void check_poison(Word nan, LseWord lse_nan, const char* name) {
  const int64_t B = 4, H = 3, L = 2, D = 5, row = D + 3;  // padded rows: the gap must stay untouched
  std::vector<Word> out(B * H * L * row);
  std::vector<LseWord> lse(B * H * L);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<Word>(i + 1);
  for (size_t i = 0; i < lse.size(); ++i) lse[i] = static_cast<LseWord>(i + 1);
  const std::vector<Word> out0 = out;
  const std::vector<LseWord> lse0 = lse;
  const std::vector<int64_t> starts = {5, -1, 0, -1};
  PoisonView<Word, LseWord> v{};
  v.out = out.data();
  v.stride_b = H * L * row;
  v.stride_h = L * row;
  v.stride_l = row;
  v.lse = lse.data();
  v.heads = H;
  v.len = L;
  v.dim = D;
  v.nan = nan;
  v.lse_nan = lse_nan;
  emu::launch(static_cast<unsigned>(B), kCheckThreads, 0, poison_skipped_kernel<Word, LseWord>, v, starts.data());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < H * L; ++r) {
      for (int64_t e = 0; e < row; ++e) {
        const size_t i = b * H * L * row + r * row + e;
        const Word want = starts[b] < 0 && e < D ? nan : out0[i];
        EXPECT(out[i] == want, "poison %s: out[b=%ld, row %ld, %ld] wrong", name, long(b), long(r), long(e));
      }
      const size_t i = b * H * L + r;
      EXPECT(lse[i] == (starts[b] < 0 ? lse_nan : lse0[i]), "poison %s: lse[b=%ld, row %ld] wrong", name, long(b),
             long(r));
    }
}

}  // namespace

int main() {
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  // Contiguous caches of capacity 100, appending 3: valid starts are [0, 97].
  check_case({"bounds", {0, 96, 97, 98, 100, -1, -100, 5}, 3, 100, false, {}}, false);
  check_case({"no new positions", {0, 100, 101, -1}, 0, 100, false, {}}, false);
  check_case({"near INT64_MAX", {kMax, kMax - 2, 50, std::numeric_limits<int64_t>::min()}, 3, 100, false, {}}, true);
  // Rolling: any length >= 0, start len mod capacity (lengths past 2^32 and 2^40 included).
  check_case({"rolling", {0, 99, 100, 101, -1, (int64_t{1} << 40) + 5, (int64_t{1} << 32) - 2}, 7, 100, true, {}},
             true);
  check_case({"rolling int32", {0, 99, 100, 2147483000, -5}, 7, 100, true, {}}, false);
  // Paged, block size 16, 4 blocks per sequence (capacity 64), 20 blocks, appending 1:
  // sequence 0 uses blocks 0-1 (32 positions), its bad entry in block 2 unread: fine; 1 uses
  // blocks 0-2 (33), bad entry (20 = num_blocks) in block 2: skipped; 2 uses block 0, a
  // negative entry: skipped; 3 needs 65 > 64 positions: skipped; 4 uses block 0, entry 20:
  // skipped. Appending nothing, 1 (32), 2 and 4 (0) use no bad block and 3 (64) fits: all fine.
  {
    const int64_t B = 5, per = 4;
    Case c{"paged", {31, 32, 0, 64, 0},
           1,       64,
           false,   table_of(B, per, {{0, 2, 99}, {1, 2, 20}, {2, 0, -3}, {4, 0, 20}}),
           per,     16,
           20};
    check_case(c, false);
    Case none = c;
    none.name = "paged, nothing appended";
    none.new_len = 0;
    check_case(none, false);
  }
  // A table longer than the block's 128 threads: the bad entry at block 200 of 300 is found
  // exactly when the sequence reaches it.
  {
    const int64_t per = 300, bs = 2;
    Case c{"long table", {399, 400, 401, 599}, 1, per * bs, false, table_of(4, per, {}), per, bs, 4 * per};
    for (int64_t b = 0; b < 4; ++b) c.table[b * per + 200] = -1;
    check_case(c, false);
  }
  // The error word accumulates over launches (or of the reasons, sum of the skips).
  {
    DeviceCheckErrors errors{0, 0};
    run<int64_t>({"first", {-1, 3}, 1, 10, false, {}}, 1, errors, true);
    run<int64_t>({"second", {20, 3, 30}, 1, 10, false, {}}, 1, errors, true);
    EXPECT(errors.reasons == (kNegativeLength | kPastCapacity) && errors.skipped == 3,
           "accumulated error word %u / %u, expected 3 / 3", errors.reasons, errors.skipped);
  }
  check_poison<uint16_t, uint32_t>(0x7e00, 0x7fc00000u, "fp16");
  check_poison<uint32_t, uint32_t>(0x7fc00000u, 0x7fc00000u, "fp32");
  check_poison<uint64_t, uint64_t>(0x7ff8000000000000ull, 0x7ff8000000000000ull, "fp64");
  return expect_summary("KV-cache device checks (check_lengths_kernel, poison_skipped_kernel) under the SIMT emulator");
}
