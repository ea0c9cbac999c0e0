// The tensor-core kernels (csrc/attention/attention_{forward,backward}_mma_kernel.cuh), unchanged,
// run on the CPU through tests/native/cpp/simt_emulator.h (one std::thread per CUDA thread, ldmatrix
// and mma.sync emulated from their PTX fragment definitions), against a float64 reference:
// tile iteration over the visible band, masking at tile and sequence edges, the online
// softmax, GQA indexing, strides and the epilogue are checked without a GPU. Built and run by
// tests/native/test_host_programs.py, plainly and under ThreadSanitizer, AddressSanitizer and
// MemorySanitizer (races, out-of-bounds and unwritten shared-memory reads). What the emulation
// cannot check (timing, the real instructions' encodings) is left to scripts/gpu_check.sh.
//
// Also here: the safety-net row programs (csrc/attention/attention_rows.h) with 32 lanes per
// row and the warp-shuffle sum, as the CUDA safety-net kernels run them, against the same
// programs on one lane (which tests/native/cpp/test_attention_rows.cpp checks against float64).
#define FAE_SIMT_EMULATION "simt_emulator.h"
#include "attention/attention_backward_mma_kernel.cuh"
#include "attention/attention_forward_mma_kernel.cuh"
#include "attention/attention_rows.h"
#include "expect.h"

#include <cstdio>
#include <random>

using namespace flash_attn_ext;
using namespace flash_attn_ext::cuda;

struct Case {
  int64_t B, Hq, Hkv, L, S, left, right;
  bool bottom_right;
};

template <typename T, int D>
void run(const Case& c, uint32_t seed, double tol) {
  using TL = mma_detail::Tiles<D>;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  // q/k/v stored (B, N, H, D), as flash-attn callers pass them; out the kernel's (B, L, H, D).
  const auto make = [&](int64_t H, int64_t N) {
    std::vector<uint16_t> t(c.B * N * H * D);
    for (auto& x : t) x = emu::from_float(n(rng), T{});
    return t;
  };
  std::vector<uint16_t> q = make(c.Hq, c.L), k = make(c.Hkv, c.S), v = make(c.Hkv, c.S);
  std::vector<uint16_t> out(c.B * c.L * c.Hq * D, 0xFFFF);  // NaN: every element must be written
  std::vector<float> lse(c.B * c.Hq * c.L, NAN);
  MmaParams mp;
  // (B, L, H, D) layouts, as flash-attn passes them
  const int64_t q_sb = c.L * c.Hq * D, q_sl = c.Hq * D, k_sb = c.S * c.Hkv * D, k_sl = c.Hkv * D;
  mp.q = {q.data(), q_sb, D, q_sl}, mp.k = {k.data(), k_sb, D, k_sl}, mp.v = {v.data(), k_sb, D, k_sl};
  mp.out = {out.data(), q_sb, D, q_sl};
  mp.lse = lse.data();
  AttentionParams& p = mp.p;
  p.batch = c.B, p.heads_q = c.Hq, p.heads_kv = c.Hkv, p.len_q = c.L, p.len_k = c.S;
  p.dim_qk = p.dim_v = D, p.window_left = c.left, p.window_right = c.right;
  p.bottom_right = c.bottom_right;
  p.align_offset = alignment_offset(c.L, c.S, c.bottom_right);
  p.scale = 1.0 / std::sqrt(static_cast<double>(D));
  mp.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const unsigned blocks = static_cast<unsigned>((c.L + TL::kBlockM - 1) / TL::kBlockM * c.Hq * c.B);
  emu::launch(blocks, TL::kThreads, TL::kSmemBytes, mma_detail::attention_forward_mma_kernel<T, D>, mp);

  const auto at = [&](const std::vector<uint16_t>& t, int64_t H, int64_t N, int64_t b, int64_t h, int64_t i,
                      int64_t d) { return double(emu::to_float(t[((b * N + i) * H + h) * D + d], T{})); };
  double worst = 0, worst_lse = 0, mag = 1;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.L; ++i) {
        const int64_t hk = h / (c.Hq / c.Hkv), o = p.align_offset;
        std::vector<double> s(c.S, -INFINITY);
        double mx = -INFINITY;
        for (int64_t j = 0; j < c.S; ++j) {
          if ((c.left >= 0 && j < i + o - c.left) || (c.right >= 0 && j > i + o + c.right)) continue;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += at(q, c.Hq, c.L, b, h, i, d) * at(k, c.Hkv, c.S, b, hk, j, d);
          s[j] = dot * p.scale;
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        for (int64_t j = 0; j < c.S; ++j) l += mx == -INFINITY ? 0.0 : std::exp(s[j] - mx);
        const double ref_lse = l > 0 ? mx + std::log(l) : -INFINITY;
        const float got_lse = lse[(b * c.Hq + h) * c.L + i];
        if (std::isinf(ref_lse)) {
          if (got_lse != -INFINITY && ++failures < 10) std::printf("lse of an empty row: %g\n", got_lse);
        } else {
          const double e = std::fabs(got_lse - ref_lse);
          worst_lse = e > worst_lse || e != e ? e : worst_lse;
        }
        for (int d = 0; d < D; ++d) {
          double ref = 0;
          if (l > 0)
            for (int64_t j = 0; j < c.S; ++j) ref += std::exp(s[j] - mx) / l * at(v, c.Hkv, c.S, b, hk, j, d);
          mag = std::max(mag, std::fabs(ref));
          const double e = std::fabs(at(out, c.Hq, c.L, b, h, i, d) - ref);
          worst = e > worst || e != e ? e : worst;
        }
      }
  const bool ok = worst <= tol * mag && worst_lse <= 1e-4 * std::max(1.0, mag);
  if (!ok) ++failures;
  std::printf("%s D=%3d B=%ld Hq=%ld Hkv=%ld L=%ld S=%ld w=(%ld,%ld) br=%d: out err %.2e (tol %.1e), lse err %.2e %s\n",
              std::is_same_v<T, emu::Half> ? "fp16" : "bf16", D, (long)c.B, (long)c.Hq, (long)c.Hkv, (long)c.L,
              (long)c.S, (long)c.left, (long)c.right, c.bottom_right, worst, tol * mag, worst_lse, ok ? "" : "FAIL");
}

// The tensor-core backward (both kernels) against float64 gradients. lse and delta are given
// from the float64 reference, so only the backward is under test.
template <typename T, int D>
void run_backward(const Case& c, uint32_t seed, double tol) {
  using TL = mma_detail::BackwardTiles<D>;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  const auto make = [&](int64_t H, int64_t N) {  // (B, N, H, D) storage
    std::vector<uint16_t> t(c.B * N * H * D);
    for (auto& x : t) x = emu::from_float(n(rng), T{});
    return t;
  };
  std::vector<uint16_t> q = make(c.Hq, c.L), k = make(c.Hkv, c.S), v = make(c.Hkv, c.S), go = make(c.Hq, c.L);
  std::vector<uint16_t> dq(q.size(), 0xFFFF), dk(k.size(), 0xFFFF), dv(v.size(), 0xFFFF);  // NaN poison
  const auto at = [&](const std::vector<uint16_t>& t, int64_t H, int64_t N, int64_t b, int64_t h, int64_t i,
                      int64_t d) { return double(emu::to_float(t[((b * N + i) * H + h) * D + d], T{})); };
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t o = alignment_offset(c.L, c.S, c.bottom_right);
  std::vector<float> lse(c.B * c.Hq * c.L), delta(lse.size());
  std::vector<double> rq(q.size(), 0.0), rk(k.size(), 0.0), rv(v.size(), 0.0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.L; ++i) {
        const int64_t hk = h / (c.Hq / c.Hkv), row = (b * c.Hq + h) * c.L + i;
        std::vector<double> pr(c.S, 0.0);
        double mx = -INFINITY;
        for (int64_t j = 0; j < c.S; ++j) {
          if ((c.left >= 0 && j < i + o - c.left) || (c.right >= 0 && j > i + o + c.right)) {
            pr[j] = -INFINITY;
            continue;
          }
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += at(q, c.Hq, c.L, b, h, i, d) * at(k, c.Hkv, c.S, b, hk, j, d);
          pr[j] = dot * scale;
          mx = std::max(mx, pr[j]);
        }
        double l = 0;
        for (int64_t j = 0; j < c.S; ++j) l += (pr[j] = mx == -INFINITY ? 0.0 : std::exp(pr[j] - mx));
        lse[row] = l > 0 ? static_cast<float>(mx + std::log(l)) : -INFINITY;
        for (auto& x : pr) x = l > 0 ? x / l : 0.0;
        double dlt = 0;
        for (int d = 0; d < D; ++d) {
          double od = 0;
          for (int64_t j = 0; j < c.S; ++j) od += pr[j] * at(v, c.Hkv, c.S, b, hk, j, d);
          dlt += od * at(go, c.Hq, c.L, b, h, i, d);
        }
        delta[row] = static_cast<float>(dlt);
        for (int64_t j = 0; j < c.S; ++j) {
          if (pr[j] == 0.0) continue;
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += at(go, c.Hq, c.L, b, h, i, d) * at(v, c.Hkv, c.S, b, hk, j, d);
          const double ds = pr[j] * (dp - dlt);
          for (int d = 0; d < D; ++d) {
            rq[((b * c.L + i) * c.Hq + h) * D + d] += scale * ds * at(k, c.Hkv, c.S, b, hk, j, d);
            rk[((b * c.S + j) * c.Hkv + hk) * D + d] += scale * ds * at(q, c.Hq, c.L, b, h, i, d);
            rv[((b * c.S + j) * c.Hkv + hk) * D + d] += pr[j] * at(go, c.Hq, c.L, b, h, i, d);
          }
        }
      }
  MmaBackwardParams bp;
  const int64_t q_sb = c.L * c.Hq * D, q_sl = c.Hq * D, k_sb = c.S * c.Hkv * D, k_sl = c.Hkv * D;
  bp.q = {q.data(), q_sb, D, q_sl}, bp.grad_out = {go.data(), q_sb, D, q_sl}, bp.grad_q = {dq.data(), q_sb, D, q_sl};
  bp.k = {k.data(), k_sb, D, k_sl}, bp.v = {v.data(), k_sb, D, k_sl};
  bp.grad_k = {dk.data(), k_sb, D, k_sl}, bp.grad_v = {dv.data(), k_sb, D, k_sl};
  bp.lse = lse.data(), bp.delta = delta.data();
  AttentionParams& p = bp.p;
  p.batch = c.B, p.heads_q = c.Hq, p.heads_kv = c.Hkv, p.len_q = c.L, p.len_k = c.S;
  p.dim_qk = p.dim_v = D, p.window_left = c.left, p.window_right = c.right;
  p.bottom_right = c.bottom_right, p.align_offset = o, p.scale = scale;
  bp.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  emu::launch(static_cast<unsigned>((c.S + TL::kBlockN - 1) / TL::kBlockN * c.Hkv * c.B), TL::kThreads, TL::kSmemKV,
              mma_detail::attention_grad_kv_mma_kernel<T, D>, bp);
  emu::launch(static_cast<unsigned>((c.L + TL::kBlockM - 1) / TL::kBlockM * c.Hq * c.B), TL::kThreads, TL::kSmemQ,
              mma_detail::attention_grad_q_mma_kernel<T, D>, bp);
  bool ok = true;
  const char* names[] = {"dq", "dk", "dv"};
  const std::vector<uint16_t>* got[] = {&dq, &dk, &dv};
  const std::vector<double>* want[] = {&rq, &rk, &rv};
  std::printf("backward %s D=%3d B=%ld Hq=%ld Hkv=%ld L=%ld S=%ld w=(%ld,%ld) br=%d:",
              std::is_same_v<T, emu::Half> ? "fp16" : "bf16", D, (long)c.B, (long)c.Hq, (long)c.Hkv, (long)c.L,
              (long)c.S, (long)c.left, (long)c.right, c.bottom_right);
  for (int t = 0; t < 3; ++t) {
    double worst = 0, mag = 1;
    for (size_t e = 0; e < got[t]->size(); ++e) {
      mag = std::max(mag, std::fabs((*want[t])[e]));
      const double d = std::fabs(double(emu::to_float((*got[t])[e], T{})) - (*want[t])[e]);
      worst = d > worst || d != d ? d : worst;
    }
    const bool good = worst <= tol * mag;
    ok = ok && good;
    std::printf(" %s err %.2e (tol %.1e)%s", names[t], worst, tol * mag, good ? "" : " FAIL");
  }
  std::printf("\n");
  if (!ok) ++failures;
}

struct ShuffleSum {  // the CUDA kernels' WarpSum, on the emulated warp
  template <typename Acc>
  static Acc sum(Acc x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
  }
};

// Forward, dQ and dK/dV of every row and column with 32 lanes (8 features per lane: head dims
// up to 256), against one lane.
static void check_row_programs_on_32_lanes(int64_t D) {
  using rows::Strided;
  const int64_t B = 1, Hq = 4, Hkv = 2, L = 9, S = 13;
  std::mt19937 rng(static_cast<uint32_t>(D));
  std::normal_distribution<float> n(0.f, 1.f);
  const auto make = [&](int64_t count) {
    std::vector<float> t(count);
    for (auto& x : t) x = n(rng);
    return t;
  };
  std::vector<float> q = make(B * Hq * L * D), k = make(B * Hkv * S * D), v = make(B * Hkv * S * D);
  std::vector<float> go = make(B * Hq * L * D);
  AttentionParams p;
  p.batch = B, p.heads_q = Hq, p.heads_kv = Hkv, p.len_q = L, p.len_k = S, p.dim_qk = p.dim_v = D;
  p.window_left = 6, p.window_right = 0, p.bottom_right = true, p.align_offset = S - L;
  p.scale = 0.3, p.dropout_p = 0.25, p.dropout_seed = 42, p.dropout_offset = 4;
  const auto view = [&](std::vector<float>& t, int64_t H, int64_t N) {
    return Strided<float>{t.data(), H * N * D, N * D, D};
  };
  const auto cview = [&](std::vector<float>& t, int64_t H, int64_t N) {
    return Strided<const float>{t.data(), H * N * D, N * D, D};
  };
  struct Result {
    std::vector<float> out, lse, delta, dq, dk, dv;
  };
  const auto run_all = [&](auto lanes_tag) {
    constexpr int kLanes = decltype(lanes_tag)::value;
    constexpr int kPer = kLanes == 1 ? 256 : 8;
    using Reduce = std::conditional_t<kLanes == 1, rows::SingleLane, ShuffleSum>;
    Result r{std::vector<float>(B * Hq * L * D, NAN),  std::vector<float>(B * Hq * L, NAN),
             std::vector<float>(B * Hq * L, NAN),      std::vector<float>(B * Hq * L * D, NAN),
             std::vector<float>(B * Hkv * S * D, NAN), std::vector<float>(B * Hkv * S * D, NAN)};
    const auto body = [&] {
      const int lane = kLanes == 1 ? 0 : static_cast<int>(threadIdx.x % 32);
      const int64_t item = blockIdx.x;  // one warp per row / column
      if (item < Hq * L) {
        const int64_t h = item / L, i = item % L;
        rows::forward_row<float, float, kLanes, kPer, Reduce>(p, MaskView{}, cview(q, Hq, L), cview(k, Hkv, S),
                                                              cview(v, Hkv, S), view(r.out, Hq, L), r.lse.data(), 0, h,
                                                              i, lane);
      }
    };
    const auto body2 = [&] {
      const int lane = kLanes == 1 ? 0 : static_cast<int>(threadIdx.x % 32);
      const int64_t item = blockIdx.x;
      if (item < Hq * L) {
        const int64_t h = item / L, i = item % L;
        rows::delta_row<float, float, kLanes, kPer, Reduce>(p, cview(go, Hq, L), cview(r.out, Hq, L), r.delta.data(), 0,
                                                            h, i, lane);
      }
    };
    const auto body3 = [&] {
      const int lane = kLanes == 1 ? 0 : static_cast<int>(threadIdx.x % 32);
      const int64_t item = blockIdx.x;
      if (item < Hq * L) {
        const int64_t h = item / L, i = item % L;
        rows::grad_query_row<float, float, kLanes, kPer, Reduce>(p, MaskView{}, cview(go, Hq, L), cview(q, Hq, L),
                                                                 cview(k, Hkv, S), cview(v, Hkv, S), r.lse.data(),
                                                                 r.delta.data(), view(r.dq, Hq, L), 0, h, i, lane);
      }
      if (item < Hkv * S) {
        const int64_t hk = item / S, j = item % S;
        rows::grad_key_value_column<float, float, kLanes, kPer, Reduce>(
            p, MaskView{}, cview(go, Hq, L), cview(q, Hq, L), cview(k, Hkv, S), cview(v, Hkv, S), r.lse.data(),
            r.delta.data(), view(r.dk, Hkv, S), view(r.dv, Hkv, S), 0, hk, j, lane);
      }
    };
    const unsigned items = static_cast<unsigned>(std::max(Hq * L, Hkv * S));
    emu::launch(items, kLanes == 1 ? 1 : 32, 0, body);
    emu::launch(items, kLanes == 1 ? 1 : 32, 0, body2);
    emu::launch(items, kLanes == 1 ? 1 : 32, 0, body3);
    return r;
  };
  const Result one = run_all(std::integral_constant<int, 1>{});
  const Result warp = run_all(std::integral_constant<int, 32>{});
  const char* names[] = {"out", "lse", "delta", "dq", "dk", "dv"};
  const std::vector<float>* a[] = {&one.out, &one.lse, &one.delta, &one.dq, &one.dk, &one.dv};
  const std::vector<float>* b[] = {&warp.out, &warp.lse, &warp.delta, &warp.dq, &warp.dk, &warp.dv};
  for (int t = 0; t < 6; ++t) {
    double worst = 0;
    for (size_t e = 0; e < a[t]->size(); ++e) {
      const double d = std::fabs(double((*a[t])[e]) - double((*b[t])[e]));
      worst = d > worst || d != d ? d : worst;
    }
    const bool ok = worst <= 1e-4;
    if (!ok) ++failures;
    std::printf("row programs, 32 lanes vs 1, D=%ld: %s max diff %.2e %s\n", (long)D, names[t], worst,
                ok ? "" : "FAIL");
  }
}

int main() {
  for (int64_t D : {7, 40, 256}) check_row_programs_on_32_lanes(D);
  const Case full{1, 2, 2, 77, 100, -1, -1, true};
  const Case causal_tl{1, 1, 1, 70, 70, -1, 0, false};
  const Case causal_br_empty_rows{1, 1, 1, 80, 40, -1, 0, true};  // rows 0..39 see nothing
  const Case window{1, 1, 1, 130, 130, 37, 5, true};
  const Case gqa{2, 4, 2, 20, 70, -1, 0, true};
  // A window wider than a tile: interior tiles (every pair visible) between the band's edges,
  // and (rows 200..255 of the last query tile past L) interior tiles with phantom rows.
  const Case wide_window{1, 2, 1, 200, 260, 130, 70, true};
  uint32_t seed = 1;
  for (const Case& c : {full, causal_tl, causal_br_empty_rows, window, gqa}) run<emu::Half, 32>(c, seed++, 1.5e-3);
  run<emu::BFloat16, 32>(full, seed++, 1.2e-2);
  run<emu::BFloat16, 64>(window, seed++, 1.2e-2);
  run<emu::Half, 96>(gqa, seed++, 1.5e-3);
  run<emu::Half, 192>(causal_tl, seed++, 1.5e-3);  // 32-key tiles
  for (const Case& c : {full, causal_tl, causal_br_empty_rows, window, gqa})
    run_backward<emu::Half, 32>(c, seed++, 3e-3);
  run_backward<emu::BFloat16, 64>(gqa, seed++, 2.5e-2);
  run_backward<emu::Half, 96>(window, seed++, 3e-3);
  run<emu::Half, 32>(wide_window, seed++, 1.5e-3);
  // The forward's two loop phases with Q in registers (D = 128) and from shared memory
  // (D = 64): causal with S - L = 70, so the second and third query tiles run interior tiles
  // before the diagonal and the sequence end's partial tile; the wide window adds masked tiles
  // before the interior ones.
  const Case causal_long{1, 1, 1, 130, 200, -1, 0, true};
  run<emu::BFloat16, 128>(causal_long, seed++, 1.2e-2);
  run<emu::Half, 64>(wide_window, seed++, 1.5e-3);
  run<emu::Half, 96>(causal_long, seed++, 1.5e-3);  // interior tiles through load_tile's generic copy
  run_backward<emu::Half, 32>(wide_window, seed++, 3e-3);
  run_backward<emu::BFloat16, 64>(wide_window, seed++, 2.5e-2);
  return expect_summary("tensor-core kernels, emulated");
}
