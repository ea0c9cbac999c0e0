// The CUDA decode kernels (csrc/kv_cache/attention_decode_cuda_kernel.cuh: split kernel and
// combine kernel), unchanged, run on the CPU through tests/native/cpp/simt_emulator.h against a
// float64 reference: GQA rows sharing a pass, per-sequence lengths (0 included), chunked
// prefill rows (L > 1, bottom-right causal), sliding windows, paged caches with a shuffled
// block table, one split (the split kernel writes the output) and several (the combine kernel
// merges them; more splits than chunks leaves some empty). Built and run by
// tests/native/test_host_programs.py, plainly and under ThreadSanitizer, AddressSanitizer and
// MemorySanitizer (races, out-of-bounds and unwritten shared-memory reads). Timing and the real
// instructions are left to scripts/gpu_check.sh.
#define FAE_SIMT_EMULATION "simt_emulator.h"
#include "kv_cache/attention_decode_cuda_kernel.cuh"
#include "expect.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

using namespace flash_attn_ext;
using namespace flash_attn_ext::cuda;

struct Case {
  int64_t B, Hq, Hkv, L, S;   // S: cache capacity per sequence
  std::vector<int64_t> lens;  // keys per sequence (incl. the L new ones)
  int64_t left;               // window (right is 0: causal)
  int64_t block_size;         // 0: contiguous cache
  int n_splits;
  int64_t nan_key = -1;  // >= 0: feature 0 of this key of sequence 0, KV head 0, is NaN
};

template <typename T, int D>
void run(const Case& c, uint32_t seed) {
  using namespace decode_detail;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  if (c.block_size && c.S % c.block_size != 0) {  // a paged cache holds whole blocks
    std::printf("bad case: S=%ld is not a multiple of block_size=%ld\n", (long)c.S, (long)c.block_size);
    ++failures;
    return;
  }
  const int64_t blocks_per_seq = c.block_size ? c.S / c.block_size : 0;
  const int64_t n_blocks = c.B * blocks_per_seq;
  // q (B, L, Hq, D); cache (B, S, Hkv, D) or blocks (n_blocks, block_size, Hkv, D)
  std::vector<uint16_t> q(c.B * c.L * c.Hq * D), k(c.B * c.S * c.Hkv * D), v(k.size());
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = emu::from_float(n(rng), T{});
  std::vector<int32_t> table(n_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  // Positions past a sequence's length hold NaN, and the table entries of blocks a sequence
  // does not use name an extra block of NaN: a kernel that reads either (instead of
  // zero-filling those rows) turns the output NaN.
  if (c.block_size) {
    k.resize(k.size() + c.block_size * c.Hkv * D, 0xFFFF), v.resize(k.size(), 0xFFFF);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t blk = (c.lens[b] + c.block_size - 1) / c.block_size; blk < blocks_per_seq; ++blk)
        table[b * blocks_per_seq + blk] = static_cast<int32_t>(n_blocks);
  }
  const auto poison_past_end = [&](std::vector<uint16_t>& t) {
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t j = c.lens[b]; j < c.S; ++j) {
        const int64_t row =
            c.block_size ? table[b * blocks_per_seq + j / c.block_size] * c.block_size + j % c.block_size : b * c.S + j;
        std::fill_n(t.begin() + row * c.Hkv * D, c.Hkv * D, uint16_t{0xFFFF});
      }
  };
  poison_past_end(k), poison_past_end(v);
  if (c.nan_key >= 0) {
    const int64_t row =
        c.block_size ? table[c.nan_key / c.block_size] * c.block_size + c.nan_key % c.block_size : c.nan_key;
    k[row * c.Hkv * D] = 0xFFFF;
  }
  std::vector<uint16_t> out(c.B * c.L * c.Hq * D, 0xFFFF);  // NaN: every element must be written
  std::vector<float> lse(c.B * c.Hq * c.L, NAN);
  const int64_t rows_all = c.B * c.Hq * c.L;
  std::vector<float> part_acc(c.n_splits * rows_all * D, NAN), part_ml(c.n_splits * rows_all * 2, NAN);

  DecodeParams dp;
  const int64_t q_sb = c.L * c.Hq * D, q_sl = c.Hq * D;
  const int64_t k_sb = (c.block_size ? c.block_size : c.S) * c.Hkv * D, k_sl = c.Hkv * D;
  dp.q = {q.data(), q_sb, D, q_sl}, dp.out = {out.data(), q_sb, D, q_sl};
  dp.k = {k.data(), k_sb, D, k_sl}, dp.v = {v.data(), k_sb, D, k_sl};
  dp.lse = lse.data();
  AttentionParams& p = dp.p;
  p.batch = c.B, p.heads_q = c.Hq, p.heads_kv = c.Hkv, p.len_q = c.L, p.len_k = c.S;
  p.dim_qk = p.dim_v = D, p.window_left = c.left, p.window_right = 0, p.bottom_right = true;
  p.seqlens_k = c.lens.data();
  if (c.block_size) p.block_table = table.data(), p.block_size = c.block_size, p.blocks_per_seq = blocks_per_seq;
  p.scale = 1.0 / std::sqrt(static_cast<double>(D));
  dp.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  dp.n_splits = c.n_splits, dp.part_acc = part_acc.data(), dp.part_ml = part_ml.data();

  emu::launch(static_cast<unsigned>(c.B * c.Hkv * c.n_splits), kThreads, smem_bytes<D>(),
              attention_decode_split_kernel<T, D>, dp);
  if (c.n_splits > 1) emu::launch(static_cast<unsigned>(rows_all), kThreads, 0, decode_combine_kernel<T, D>, dp);

  const auto cache_at = [&](const std::vector<uint16_t>& t, int64_t b, int64_t j, int64_t hk, int64_t d) {
    const int64_t off =
        c.block_size ? (table[b * blocks_per_seq + j / c.block_size] * c.block_size + j % c.block_size) * c.Hkv * D
                     : (b * c.S + j) * c.Hkv * D;
    return double(emu::to_float(t[off + hk * D + d], T{}));
  };
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.L; ++i) {
        const int64_t hk = h / (c.Hq / c.Hkv), len = c.lens[b], pos = len - c.L + i;  // bottom-right
        std::vector<double> s;
        std::vector<int64_t> keys;
        for (int64_t j = 0; j < len; ++j) {
          if (j > pos || (c.left >= 0 && j < pos - c.left)) continue;
          double x = 0;
          for (int64_t d = 0; d < D; ++d)
            x += double(emu::to_float(q[((b * c.L + i) * c.Hq + h) * D + d], T{})) * cache_at(k, b, j, hk, d);
          s.push_back(x * p.scale);
          keys.push_back(j);
        }
        const int64_t row = (b * c.Hq + h) * c.L + i;
        double m = -INFINITY, l = 0;
        for (double x : s) m = std::max(m, x);
        for (double x : s) l += std::exp(x - m);
        const double ref_lse = s.empty() ? -INFINITY : m + std::log(l);
        // A NaN score makes its row's output and lse NaN (and only that row's).
        const bool lse_bad = s.empty() ? !std::isinf(lse[row])
                             : std::isnan(ref_lse)
                                 ? !std::isnan(lse[row])
                                 : !(std::fabs(lse[row] - ref_lse) <= 2e-3 * (1 + std::fabs(ref_lse)));
        if (lse_bad) {
          if (++failures <= 10)
            std::printf("FAIL lse b=%ld h=%ld i=%ld: %g vs %g\n", (long)b, (long)h, (long)i, lse[row], ref_lse);
        }
        for (int64_t d = 0; d < D; ++d) {
          double ref = 0;
          for (size_t t = 0; t < s.size(); ++t) ref += std::exp(s[t] - m) / l * cache_at(v, b, keys[t], hk, d);
          const double got = emu::to_float(out[((b * c.L + i) * c.Hq + h) * D + d], T{});
          const bool bad = std::isnan(ref) ? !std::isnan(got) : !(std::fabs(got - ref) <= 2e-2 * (1 + std::fabs(ref)));
          if (bad && ++failures <= 10)
            std::printf("FAIL out B=%ld Hq=%ld Hkv=%ld L=%ld splits=%d b=%ld h=%ld i=%ld d=%ld: %g vs %g\n", (long)c.B,
                        (long)c.Hq, (long)c.Hkv, (long)c.L, c.n_splits, (long)b, (long)h, (long)i, (long)d, got, ref);
        }
      }
}

int main() {
  // GQA decode, lengths across chunk edges and 0, one split and several.
  for (int splits : {1, 3}) run<emu::BFloat16, 64>({2, 8, 2, 1, 384, {300, 0}, -1, 0, splits}, 1 + splits);
  run<emu::Half, 64>({2, 4, 4, 1, 256, {129, 256}, -1, 0, 2}, 5);
  // chunked prefill rows (L = 3, bottom-right causal), sliding window, MQA with 16 rows
  run<emu::Half, 64>({1, 4, 1, 3, 320, {260}, -1, 0, 2}, 6);
  run<emu::BFloat16, 64>({1, 8, 2, 2, 512, {500}, 100, 0, 4}, 7);
  run<emu::BFloat16, 64>({1, 16, 1, 1, 256, {200}, -1, 0, 1}, 8);
  // paged cache (block size 32, shuffled table), more splits than chunks
  run<emu::BFloat16, 64>({2, 4, 2, 1, 256, {250, 33}, -1, 32, 5}, 9);
  // block sizes that are not a multiple of the 32-key chunk (rows resolved one by one), a window
  // whose band starts inside a chunk, a chunk straddling two blocks
  run<emu::Half, 64>({2, 4, 2, 1, 240, {233, 48}, -1, 24, 3}, 12);
  run<emu::BFloat16, 128>({1, 4, 1, 2, 256, {250}, 70, 16, 2}, 13);
  // a NaN key: the rows of KV head 0 that see it (all; in the window, only the first position) get NaN
  // output and lse, with one split and through the combine kernel; the other head stays finite
  run<emu::BFloat16, 64>({1, 4, 2, 1, 200, {200}, -1, 0, 1, 37}, 14);
  run<emu::Half, 128>({1, 4, 2, 2, 320, {290}, 60, 32, 3, 228}, 15);
  // head dims 128 and 256 (two output features per thread)
  run<emu::Half, 128>({1, 4, 2, 1, 200, {200}, -1, 0, 2}, 10);
  run<emu::BFloat16, 256>({1, 2, 1, 1, 160, {150}, 40, 0, 1}, 11);
  return expect_summary("decode kernels, emulated");
}
