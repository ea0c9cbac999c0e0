// CPU kernel of flash_attn_ext::attention_forward: FlashAttention-2's forward on the CPU.
//
// One task = one (batch, head, 64-row query tile). The task streams the key/value tiles of
// its visible band (tiles outside the causal/window band are never touched) and keeps an
// online softmax per row: running max m, running sum l, and an accumulator rescaled by
// exp(m_old - m_new) whenever the max grows. Nothing of size L x S is allocated.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "../cpu/tile_math.h"
#include "attention_cpu_tiles.h"
#include "attention_forward_cpu.h"
#include "attention_host.h"

namespace flash_attn_ext::cpu {
namespace {

// Query tiles of at most this many rows (decode, short chunks) compute S = Q K^T as row dot
// products: the scattered writes of a K^T tile cost more than the product itself there.
constexpr int64_t kFewRows = 4;

template <typename scalar_t>
void forward_kernel(const AttentionParams& p, const MaskView& mask, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t L = p.len_q, Dk = p.dim_qk, Dv = p.dim_v;
  const int64_t block_q = std::min<int64_t>(kBlockQ, L);
  const int64_t n_qblocks = (L + block_q - 1) / block_q;
  const auto q_rows = rows_of<const scalar_t>(q);
  const auto k_rows = rows_of<const scalar_t>(k);
  const auto v_rows = rows_of<const scalar_t>(v);
  const auto o_rows = rows_of<scalar_t>(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(p.scale);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  // Dropout zeroes probabilities after the row sum; the 1/(1-p) of the kept ones is applied
  // once, at the end, with 1/l.
  const acc_t keep_scale = dropout ? acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p)) : acc_t(1);

  at::parallel_for(0, p.batch * p.heads_q * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(block_q * Dk), kt_tile(Dk * kBlockK), v_tile(kBlockK * Dv);
    std::vector<acc_t> s_tile(block_q * kBlockK), o_acc(block_q * Dv);
    std::vector<acc_t> m_run(block_q), l_run(block_q);
    std::vector<uint8_t> keep(dropout ? block_q * kBlockK : 0);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks;
      const int64_t bh = task / n_qblocks;
      const int64_t h = bh % p.heads_q, b = bh / p.heads_q, hk = p.kv_head(h);
      const int64_t i0 = qb * block_q;
      const int64_t rows = std::min(block_q, L - i0);

      // Q is pre-multiplied by the softmax scale: one multiply per element of Q instead of S.
      load_rows(q_rows.at(b, h, i0), q_rows.stride_l, rows, Dk, scale, q_tile.data(), Dk);
      std::fill(m_run.begin(), m_run.end(), kNegInf);
      std::fill(l_run.begin(), l_run.end(), acc_t(0));
      std::fill(o_acc.begin(), o_acc.end(), acc_t(0));

      const AttentionParams pb = p.for_batch(b);  // per-sequence key length (KV cache)
      const KeyRange band = visible_key_range(i0, i0 + rows, pb.align_offset, pb.window_left,
                                              pb.window_right, pb.len_k);
      for (int64_t j0 = band.begin; j0 < band.end; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, band.end - j0);
        acc_t* s = s_tile.data();
        if (rows <= kFewRows) {  // decode: row dot products on K as stored, no transpose
          load_rows(k_rows.at(b, hk, j0), k_rows.stride_l, cols, Dk, acc_t(1), kt_tile.data(), Dk);
          tile_gemm_nt(rows, cols, Dk, q_tile.data(), Dk, kt_tile.data(), Dk, s, kBlockK);
        } else {
          load_rows_transposed(k_rows.at(b, hk, j0), k_rows.stride_l, cols, Dk, kt_tile.data(), kBlockK);
          tile_gemm(false, rows, cols, Dk, acc_t(1), q_tile.data(), Dk, kt_tile.data(), kBlockK, s,
                    kBlockK, /*accumulate=*/false);
        }
        load_rows(v_rows.at(b, hk, j0), v_rows.stride_l, cols, Dv, acc_t(1), v_tile.data(), Dv);
        mask_tile(s, kBlockK, rows, cols, i0, j0, b, h, pb, mask);
        if (dropout) dropout_keep_tile(keep.data(), kBlockK, rows, cols, i0, j0, bh, p, threshold);

        for (int64_t r = 0; r < rows; ++r) {
          acc_t* sr = s + r * kBlockK;
          const acc_t m_tile = row_max(sr, cols);
          const acc_t m_old = m_run[r];
          const acc_t m_new = (m_tile > m_old || m_tile != m_tile) ? m_tile : m_old;
          if (m_new == kNegInf) {  // nothing visible in this row yet
            std::fill(sr, sr + cols, acc_t(0));
            continue;
          }
          const acc_t alpha = std::exp(m_old - m_new);  // 0 on the first visible tile
          const acc_t sum = exp_shift_sum(sr, cols, m_new);
          l_run[r] = l_run[r] * alpha + sum;
          m_run[r] = m_new;
          if (alpha != acc_t(1)) scale_row(o_acc.data() + r * Dv, Dv, alpha);
          if (dropout) {
            const uint8_t* kr = keep.data() + r * kBlockK;
            for (int64_t c = 0; c < cols; ++c) sr[c] = kr[c] ? sr[c] : acc_t(0);
          }
        }
        tile_gemm(false, rows, Dv, cols, acc_t(1), s, kBlockK, v_tile.data(), Dv, o_acc.data(), Dv,
                  /*accumulate=*/true);
      }

      // Rows that saw no key (l == 0) return zeros and lse = -inf.
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t l = l_run[r];
        scale_row(o_acc.data() + r * Dv, Dv, l > acc_t(0) ? keep_scale / l : acc_t(0));
        lse_data[bh * L + i0 + r] = l > acc_t(0) ? m_run[r] + std::log(l) : kNegInf;
        // NaN inputs: keep the NaN instead of the zero row.
        if (l != l) lse_data[bh * L + i0 + r] = l;
      }
      store_rows(o_acc.data(), Dv, rows, Dv, o_rows.at(b, h, i0), o_rows.stride_l);
    }
  });
}

// Draws the dropout seed from PyTorch's default CPU generator (so torch.manual_seed
// reproduces it) and returns it as the op's rng_state (seed, offset) for the backward.
at::Tensor draw_rng_state(double dropout_p, const at::TensorOptions& options) {
  uint64_t seed = 0;
  if (dropout_p > 0.0) {
    auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        std::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  at::Tensor state = at::empty({2}, options.dtype(at::kLong));
  state.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  state.data_ptr<int64_t>()[1] = 0;
  return state;
}

}  // namespace

void run_attention_forward_cpu(const AttentionParams& p, const MaskView& mask, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse) {
  if (out.numel() == 0 && lse.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(p, mask, q, k, v, out, lse);
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right) {
  check_attention_inputs("flash_attn_ext.attention_forward", q, k, v, attn_mask, dropout_p, scale,
                         window_left, window_right);
  AttentionParams p =
      make_attention_params(q, k, v, dropout_p, scale, window_left, window_right, bottom_right);
  const MaskView mask = make_mask_view(attn_mask);
  at::Tensor out = empty_attention_output(q, p.dim_v);
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.len_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  at::Tensor rng_state = draw_rng_state(dropout_p, q.options());
  p.dropout_seed = static_cast<uint64_t>(rng_state.data_ptr<int64_t>()[0]);
  p.dropout_offset = static_cast<uint64_t>(rng_state.data_ptr<int64_t>()[1]);
  run_attention_forward_cpu(p, mask, q, k, v, out, lse);
  return {out, lse, rng_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
}

}  // namespace flash_attn_ext::cpu
