#!/usr/bin/env python3
"""Mutation check of the test suite: each mutant is one small, plausible kernel bug (a wrong
rounding, a lost key, a value written one slot late, ...). For each, a copy of the project gets
that one change, is rebuilt (CPU only, incrementally: only the touched file recompiles) and the
tests that must see the bug run against it. Every mutant must die (its tests fail); the script
exits 1 if one survives, or if the unmutated copy does not pass the same tests.

    python scripts/mutants.py            # all mutants (~1-2 min each on 2 cores)
    python scripts/mutants.py --list     # names only
    python scripts/mutants.py trunc_p    # some of them

The copy lives in build/mutants/ (kept between runs, so later runs rebuild little)."""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = os.path.join(ROOT, "build", "mutants", "tree")

# Round-to-nearest-even of the AVX512-BF16 float -> bf16 conversion replaced by truncation.
_RNE = "(__m256i)_mm512_cvtneps_pbh("
_TRUNC = "_mm512_cvtepi32_epi16(_mm512_srli_epi32((__m512i)"
_TRUNC_END = ", 16)));"

# (name, file, old text, new text, pytest arguments that must fail, why it is plausible)
MUTANTS = [
    (
        "trunc_p_and_ds",
        "csrc/cpu/tile_math_bf16.cpp",
        "(__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)));",
        _TRUNC + "_mm512_loadu_ps(s + c)" + _TRUNC_END,
        ["tests/ops/test_attention_forward.py", "-k", "cpu and bfloat16"],
        "P (and dS) rounded to bf16 by truncation instead of to nearest: forward tests alone must see it",
    ),
    (
        "trunc_ds_only",
        "csrc/attention/attention_backward_cpu.cpp",
        "floats_to_bf16(ds, kBlockK, rows, t.cols, cols2, ds_bf_.data(), kBlockK);",
        "for (int64_t r_ = 0; r_ < rows; ++r_) for (int64_t c_ = 0; c_ < cols2; ++c_) { uint32_t b_; "
        "std::memcpy(&b_, ds + r_ * kBlockK + c_, 4); "
        "ds_bf_[r_ * kBlockK + c_] = c_ < t.cols ? uint16_t(b_ >> 16) : 0; }",
        ["tests/ops/test_attention_backward.py", "-k", "cpu and bfloat16"],
        "dS truncated to bf16 in the backward (the P rounding left right)",
    ),
    (
        "missing_key0",
        "csrc/attention/attention_cpu_tiles.h",
        "first_visible_key(i, p.align_offset, p.window_left, p.len_k) - j0, 0, cols);",
        "std::max<int64_t>(1, first_visible_key(i, p.align_offset, p.window_left, p.len_k)) - j0, 0, cols);",
        ["tests/ops/test_attention_forward.py", "-k", "cpu and causal and bfloat16"],
        "key 0 dropped from the rows of tiles on the band's edge (exact attention missing one key)",
    ),
    (
        "lse_scale",
        "csrc/attention/attention_forward_cpu.cpp",
        "a_.lse[a_.p.row_index(t.b, h, i)] = row_lse(m_run_[r], l_run_[r], sink);",
        "a_.lse[a_.p.row_index(t.b, h, i)] = row_lse(m_run_[r], l_run_[r] * acc_t(1.0002), sink);",
        ["tests/ops/test_attention_forward.py", "-k", "cpu and bfloat16"],
        "lse off by 2e-4 (a 0.02% error in the row sum): bf16 tests must check the float32 lse tightly",
    ),
    (
        "sink_per_split",
        "csrc/attention/attention_cpu_tiles.h",
        "const acc_t denominator = softmax_denominator(m, l, sink);",
        "const acc_t denominator = softmax_denominator(m, l, sink) + (parts.n_splits - 1) * std::exp(sink - m);",
        ["tests/features/test_sinks.py", "-k", "cpu and cache_paths"],
        "the split-KV merge counting the sink once per split instead of once per row",
    ),
    (
        "sink_grad_without_grad_lse",
        "csrc/attention/attention_autograd.cpp",
        "if (grad_lse.has_value()) delta = delta - *grad_lse;",
        "",
        ["tests/features/test_sinks.py", "-k", "cpu and gradcheck"],
        "the sink gradient ignoring the gradient that flows into lse (which includes the sink)",
    ),
    (
        "rolling_v_late",
        "csrc/kv_cache/kv_cache_append_cpu.cpp",
        "const int64_t pos = lens[b] + t;",
        "const int64_t pos = lens[b] + t + (rolling && pair.first == &v_cache ? 1 : 0);",
        ["tests/ops/test_kv_cache_append.py", "-k", "cpu and rolling"],
        "V written one slot late in the rolling cache (K right)",
    ),
    (
        "merge_weight",
        "csrc/attention/merge_attention_states_cpu.cpp",
        "rows::merge_weights(qa[r], qb[r])",
        "rows::merge_weights(qa[r], qb[r] + lse_t(0.01))",
        ["tests/ops/test_merge_attention_states.py", "-k", "cpu and bfloat16"],
        "one side's weight 1% off in the merge: bf16 merge tests compare with the float64 reference",
    ),
    (
        "exp_tail_one_more",
        "csrc/cpu/tile_math.cpp",
        "lane < static_cast<int32_t>(n - j) ? load8(x + j) - shift : neg_inf;",
        "lane <= static_cast<int32_t>(n - j) ? load8(x + j) - shift : neg_inf;",
        ["tests/ops/test_attention_forward.py", "-k", "cpu and float32"],
        "the exp tail's mask admitting one padding lane of the score row into the row sum",
    ),
    (
        "transpose_u16_lane",
        "csrc/cpu/tile_math.cpp",
        "t[i + 1] = FAE_SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);",
        "t[i + 1] = FAE_SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 7, 14, 6, 15);",
        ["tests/ops/test_attention_backward.py", "-k", "cpu and bfloat16"],
        "two lanes swapped in the 8x8 transpose network (P^T / dS^T of the backward)",
    ),
    (
        "convert_random_first",
        "flash_attn_ext/convert.py",
        "pick = torch.randint(0, r, (num_kv_heads,), generator=generator)",
        "pick = torch.zeros(num_kv_heads, dtype=torch.long)",
        ["tests/tools/test_convert.py", "-k", "pool_heads"],
        "--method random always picking the group's first head",
    ),
    (
        "paged_last_block_unchecked",
        "csrc/kv_cache/kv_cache_device_checks_kernel.cuh",
        "(used + p.block_size - 1) / p.block_size",
        "used / p.block_size",
        ["tests/native/test_host_programs.py", "-k", "kv_cache_device_checks"],
        "the device-side check skips a sequence's last, partly used block (a bad entry there is read)",
    ),
    (
        "bwd_mask_one_key_late",
        "csrc/attention/attention_backward_mma_kernel.cuh",
        "end_visible_key(row[r], p.align_offset, p.window_right, p.len_k)}",
        "end_visible_key(row[r], p.align_offset, p.window_right, p.len_k) + 1}",
        ["tests/native/test_host_programs.py", "-k", "mma_kernels_emulated"],
        "grad_q's 32-bit mask lets each row see one key past its window's right edge",
    ),
    (
        "fwd_interior_one_tile_late",
        "csrc/attention/attention_forward_mma_kernel.cuh",
        "full_end = (common.end - n_begin) / kBlockN;",
        "full_end = (common.end - n_begin) / kBlockN + 1;",
        ["tests/native/test_host_programs.py", "-k", "mma_kernels_emulated"],
        "the forward's unmasked interior phase runs one key tile past the keys every row sees",
    ),
    (
        "fwd_edge_mask_one_key_late",
        "csrc/attention/attention_forward_mma_kernel.cuh",
        "hi[r] = static_cast<int>(e < 0 ? 0 : (e > kBlockN ? kBlockN : e));",
        "hi[r] = static_cast<int>(e < 0 ? 0 : (e >= kBlockN ? kBlockN : e + 1));",
        ["tests/native/test_host_programs.py", "-k", "mma_kernels_emulated"],
        "the forward's edge tiles let each row see one key past its band's right end",
    ),
    (
        "bias_grad_after_slope",
        "csrc/attention/attention_backward_cpu.cpp",
        "      if (a_.dmask != nullptr) add_mask_gradient(t, h, i0 + r, dr);\n"
        "      if (a_.dmask_out != nullptr) store_mask_gradient(t.b, h, i0 + r, t.j0, t.cols, dr);\n"
        "      if (a_.dslopes != nullptr) add_slope_gradient(t, h, i0 + r, dr);\n"
        "      if (a_.drelative != nullptr) add_relative_gradient(t, h, i0 + r, dr);\n"
        "      if (a_.c.cap > acc_t(0)) {\n"
        "        const acc_t* sl = slope_tile_.data() + r * kBlockK;\n"
        "        for (int64_t c = 0; c < cols; ++c) dr[c] *= sl[c];\n"
        "      }\n",
        "      if (a_.c.cap > acc_t(0)) {\n"
        "        const acc_t* sl = slope_tile_.data() + r * kBlockK;\n"
        "        for (int64_t c = 0; c < cols; ++c) dr[c] *= sl[c];\n"
        "      }\n"
        "      if (a_.dmask != nullptr) add_mask_gradient(t, h, i0 + r, dr);\n"
        "      if (a_.dmask_out != nullptr) store_mask_gradient(t.b, h, i0 + r, t.j0, t.cols, dr);\n"
        "      if (a_.dslopes != nullptr) add_slope_gradient(t, h, i0 + r, dr);\n"
        "      if (a_.drelative != nullptr) add_relative_gradient(t, h, i0 + r, dr);\n",
        ["tests/features/test_bias_gradients.py", "-k", "float32 and (matches_reference or alibi)"],
        "the bias gradients (mask, ALiBi, relative) taken after the softcap slope (the biases are added after the cap)",
    ),
    (
        "relative_bucket_of_i_minus_j",
        "flash_attn_ext/relative_bias.py",
        "distance = torch.arange(len_q + len_k - 1, device=self.table.device) - (len_q - 1) - offset",
        "distance = (len_q - 1) + offset - torch.arange(len_q + len_k - 1, device=self.table.device)",
        ["tests/features/test_bias_gradients.py", "-k", "float32 and relative_bias_matches"],
        "T5's bucket taken of i - j instead of j - i (encoder and decoder directions swapped)",
    ),
    (
        "relative_grad_one_distance_late",
        "csrc/attention/attention_backward_cpu.cpp",
        "for (int64_t c = 0; c < t.cols; ++c) g[c] += ds[c];\n  }\n\n  // dK += dS^T Q",
        "for (int64_t c = 0; c < t.cols; ++c) g[c + (c + 1 < t.cols)] += ds[c];\n  }\n\n  // dK += dS^T Q",
        ["tests/features/test_bias_gradients.py", "-k", "float32 and relative_bias_matches"],
        "the relative bias's gradient accumulated one distance off (an off-by-one in j - i + L - 1)",
    ),
    (
        "mask_rows_outside_band_unwritten",
        "csrc/attention/attention_backward_cpu.cpp",
        "for (int64_t h = h0; h < h0 + f_.heads_per_pass; ++h) zero_mask_gradient_outside(b, h, j0, cols, band);",
        "{}",
        ["tests/features/test_bias_gradients.py", "-k", "every_element"],
        "a full-shape mask's gradient left unwritten (uninitialised) where a key tile's band leaves rows out",
    ),
    (
        "mask_key_sum_overwritten",
        "csrc/attention/attention_backward_cpu.cpp",
        "      g[0] += sum;",
        "      g[0] = sum;",
        ["tests/features/test_bias_gradients.py", "-k", "float32 and matches_reference"],
        "a mask broadcast over the keys keeps only its last key tile's sum (a broadcast dim not summed)",
    ),
    (
        "mask_split_parts_not_summed",
        "csrc/attention/attention_backward_cpu.cpp",
        "bias->grad_mask = sum_parts(dmask).to(bias->mask.scalar_type());",
        "bias->grad_mask = dmask[0].to(bias->mask.scalar_type());",
        ["tests/features/test_bias_gradients.py", "-k", "float32 and matches_reference"],
        "the per-split copies of a key-broadcast mask's gradient not summed (only split 0's keys count)",
    ),
    (
        "slope_grad_no_offset",
        "csrc/attention/attention_backward_cpu.cpp",
        "const int64_t d0 = i + t.pb->align_offset - t.j0;",
        "const int64_t d0 = i - t.j0;",
        ["tests/features/test_bias_gradients.py", "-k", "float32 and alibi"],
        "the ALiBi slopes' gradient weighs dS by |i - j|, without the alignment offset the forward uses",
    ),
    (
        "t5_bias_dropped",
        "flash_attn_ext/integrations/transformers.py",
        "    relative = _t5_bias.lookup(position_bias)\n",
        "    relative, position_bias = None, None\n",
        ["tests/api/test_transformers_integration.py", "-k", "t5"],
        "the transformers integration swallows T5's position_bias again (issue 36's silent wrong answer)",
    ),
    (
        "t5_decode_offset_dropped",
        "flash_attn_ext/integrations/_t5_bias.py",
        "_REGISTERED[placeholder] = (bias, int(past_seen_tokens))",
        "_REGISTERED[placeholder] = (bias, 0)",
        ["tests/api/test_transformers_integration.py", "-k", "t5"],
        "T5's in-kernel bias puts a decoding step's query at position 0 instead of after the cached tokens",
    ),
    (
        "maskless_bottom_right",
        "flash_attn_ext/integrations/transformers.py",
        'alignment="bottom_right" if L == 1 or L == S else "top_left",',
        'alignment="bottom_right",',
        ["tests/api/test_transformers_integration.py", "-k", "static"],
        "fa_ext without a mask aligns bottom-right, so an empty static cache's free slots are seen",
    ),
    (
        "kv_scale_of_next_position",
        "csrc/attention/attention_decode_cpu.cpp",
        "const acc_t ks = *k_scales.row(b, hk, j0 + c);",
        "const acc_t ks = *k_scales.row(b, hk, j0 + (c + 1 < cols ? c + 1 : c));",
        ["tests/features/test_quantized_kv_cache.py", "-k", "attention_over_quantized_cache and float32"],
        "an 8-bit cache's K scale read one position late (an off-by-one in the scale tensor's index)",
    ),
    (
        "kv_quant_truncates",
        "csrc/kv_cache/kv_cache_quantize.h",
        "const float r = __builtin_roundevenf(y);",
        "const float r = __builtin_truncf(y);",
        ["tests/features/test_quantized_kv_cache.py", "-k", "append_quantizes and float32"],
        "int8 codes truncated toward zero instead of rounded to nearest even",
    ),
    (
        "kv_v_scale_twice",
        "csrc/attention/attention_decode_cpu.cpp",
        "for (int64_t r = 0; r < R; ++r) s[r * kDecodeTile] *= vs;",
        "for (int64_t r = 0; r < R; ++r) s[r * kDecodeTile] *= vs * vs;",
        ["tests/features/test_quantized_kv_cache.py", "-k", "attention_over_quantized_cache and float32"],
        "an 8-bit cache's V scale applied twice (folded into P and again on the row)",
    ),
    (
        "fp8_subnormal_step",
        "csrc/cpu/simd.h",
        "__builtin_convertvector((v8i)em, v8f) * (1.0f / 512.0f);",
        "__builtin_convertvector((v8i)em, v8f) * (1.0f / 256.0f);",
        ["tests/features/test_quantized_kv_cache.py", "-k", "every_code"],
        "fp8 e4m3 subnormal codes widened with the wrong step (2^-8 instead of 2^-9)",
    ),
    (
        "fp8_avx2_exponent_shift",
        "csrc/cpu/decode_math.cpp",
        "_mm_or_si128(_mm_or_si128(_mm_slli_epi16(em, 7), nan),",
        "_mm_or_si128(_mm_or_si128(_mm_slli_epi16(em, 6), nan),",
        ["tests/features/test_quantized_kv_cache.py", "-k", "every_code"],
        "the AVX2 fp8 widening's exponent / mantissa moved to the wrong fp16 bit position",
    ),
    (
        "kv_quant_ties_away",
        "csrc/kv_cache/kv_cache_quantize.h",
        "const float r = __builtin_roundevenf(y);",
        "const float r = __builtin_roundf(y);",
        ["tests/features/test_quantized_kv_cache.py", "-k", "ties"],
        "int8 codes rounded half away from zero (roundf) instead of half to even",
    ),
    (
        "generate_cache_ignores_leftpad",
        "flash_attn_ext/integrations/transformers_cache.py",
        "            cache_leftpad=pad,\n            **common,",
        "            cache_leftpad=None,\n            **common,",
        ["tests/api/test_transformers_generate_cache.py", "-k", "left_padded or beams"],
        "generate() on FlashAttnExtCache attends a left-padded row's pad tokens (cache_leftpad dropped)",
    ),
    (
        "generate_rolling_keeps_one_too_few",
        "flash_attn_ext/integrations/transformers_cache.py",
        "kept = min(start, W - 1)",
        "kept = min(start, W - 2)",
        ["tests/api/test_transformers_generate_cache.py", "-k", "chunked_prefill"],
        "a sliding-window layer's prompt / chunk call sees one cached position too few",
    ),
    (
        "generate_rolling_pad_in_window",
        "flash_attn_ext/integrations/transformers_cache.py",
        "(pad is None or pad_max <= start + 1 - W)",
        "True",
        ["tests/api/test_transformers_generate_cache.py", "-k", "left_padded"],
        "a decode step reads a rolling cache in place while pad tokens are still inside its window",
    ),
    (
        "generate_beams_not_reordered",
        "flash_attn_ext/integrations/transformers_cache.py",
        "    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:\n        self._rows(beam_idx)",
        "    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:\n        pass",
        ["tests/api/test_transformers_generate_cache.py", "-k", "beams"],
        "beam search's reorder leaves the cache rows where they were",
    ),
    (
        "generate_model_mask_trusted",
        "flash_attn_ext/integrations/transformers.py",
        "and not _compact_mask.made_here(attention_mask)",
        "and False",
        ["tests/api/test_transformers_generate_cache.py", "-k", "beyond"],
        "a mask the model built itself (Doge's, from the values update() returned) is trusted on the in-place cache",
    ),
    (
        "generate_mask_window_dropped",
        "flash_attn_ext/integrations/transformers.py",
        "    return window or masked",
        "    return window",
        ["tests/api/test_transformers_generate_cache.py", "-k", "window_given_by_the_mask"],
        "the sliding window a compact mask carries is dropped when the attention call passes none",
    ),
    (
        "mma_layout_b_matrices_swapped",
        "csrc/cuda/mma_layout.h",
        "  return {lane % 8 + 8 * (m >> 1), 8 * (m & 1)};",
        "  return {lane % 8 + 8 * (m & 1), 8 * (m >> 1)};",
        ["tests/native/test_host_programs.py", "-k", "cute"],
        "ldmatrix's B fragments from a [n][k] matrix: the n-tile and k-half of the four 8x8 matrices swapped "
        "(a misreading the PTX-text emulator would share; CuTe's layouts catch it)",
    ),
    (
        "emulator_mma_a_regs_1_2_swapped",
        "tests/native/cpp/simt_emulator.h",
        "      A[g + 8][2 * c + i] = half_of(s[1], i);\n      A[g][2 * c + 8 + i] = half_of(s[2], i);",
        "      A[g + 8][2 * c + i] = half_of(s[2], i);\n      A[g][2 * c + 8 + i] = half_of(s[1], i);",
        ["tests/native/test_host_programs.py", "-k", "emulator_against_cute"],
        "the emulator's mma.sync reading a1 / a2 as (row + 8, k) / (row, k + 8) the other way round "
        "(a PTX-text misreading; CuTe's A layout catches it in the emulator itself)",
    ),
    # Issue 40: the emulated kernels under the sanitizers (tests/native/cpp/simt_emulator.h).
    (
        "race_fwd_tile_barrier",
        "csrc/attention/attention_forward_mma_kernel.cuh",
        "    __syncthreads();  // tile `it` landed, and every warp is done with the other buffer",
        "",
        ["tests/native/test_host_programs.py", "-k", "race and mma_kernels"],
        "the forward's barrier after a K/V tile lands removed: warps read rows other threads' copies wrote, "
        "and refill the buffer another warp may still read",
    ),
    (
        "race_bwd_step_barrier",
        "csrc/attention/attention_backward_mma_kernel.cuh",
        "    __syncthreads();  // step s landed; every warp is done with the other buffer",
        "",
        ["tests/native/test_host_programs.py", "-k", "race and mma_kernels"],
        "the backward's barrier after a Q / dO step lands removed",
    ),
    (
        "race_decode_chunk_barrier",
        "csrc/kv_cache/attention_decode_cuda_kernel.cuh",
        "    __syncthreads();  // chunk c (every thread's copies) and, on the first chunk, sQ / sM / sLo",
        "",
        ["tests/native/test_host_programs.py", "-k", "race and decode"],
        "the decode kernel's barrier after a chunk lands removed",
    ),
    (
        "race_fwd_epilogue_syncwarp",
        "csrc/attention/attention_forward_mma_kernel.cuh",
        "  __syncwarp();  // every lane's last Q fragment read (D >= 192 reads Q from sO's rows) is done",
        "",
        ["tests/native/test_host_programs.py", "-k", "race and mma_kernels"],
        "the forward's __syncwarp before O is staged over the warp's Q rows removed: only the shuffles and "
        "mma.syncs in between separate one lane's ldmatrix of Q from another's store (no ordering on a GPU)",
    ),
    (
        "memcheck_decode_smem_byte_short",
        "csrc/kv_cache/attention_decode_cuda_kernel.cuh",
        "static constexpr size_t kBytes = kM + 5 * kMaxRows * 4;",
        "static constexpr size_t kBytes = kM + 5 * kMaxRows * 4 - 1;",
        ["tests/native/test_host_programs.py", "-k", "memcheck and decode"],
        "the decode kernel's shared memory one byte short of its layout (the last row's key end lies past it)",
    ),
    (
        "initcheck_decode_q_row_unstaged",
        "csrc/kv_cache/attention_decode_cuda_kernel.cuh",
        "for (int idx = tid; idx < R * kDim; idx += kThreads) {",
        "for (int idx = tid; idx < (R - 1) * kDim; idx += kThreads) {",
        ["tests/native/test_host_programs.py", "-k", "initcheck and decode"],
        "the last query row never staged in shared memory, and read by the score phase",
    ),
    (
        "initcheck_bwd_delta_unstaged",
        "csrc/attention/attention_backward_mma_kernel.cuh",
        "      row_data[kBlockM + r] = i < p.len_q ? bp.delta[at] : 0.f;\n",
        "",
        ["tests/native/test_host_programs.py", "-k", "initcheck and mma_kernels"],
        "the backward's delta row never staged: plain shared-memory loads whose undefined values reach the "
        "output only through mma.sync (MSan must carry them through the emulated exchange)",
    ),
    (
        "initcheck_fwd_tail_not_zeroed",
        "csrc/cuda/mma_primitives.cuh",
        "      cp_async_16(dst + i * kRowStep * kStride * 2, valid ? src : slice, valid);",
        "      if (valid) cp_async_16(dst + i * kRowStep * kStride * 2, src, true);",
        ["tests/native/test_host_programs.py", "-k", "initcheck and mma_kernels"],
        "a tile's rows past the sequence end left unwritten instead of zero-filled (ldmatrix reads them)",
    ),
]


def _sync_tree():
    """Copies the project's tracked and untracked-but-not-ignored files into TREE (build outputs
    in TREE stay, so ninja rebuilds only what changed)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    # Sources the project no longer has (moved or deleted files) go, so the copy builds and
    # collects what the project does; build outputs stay.
    keep = set(files)
    for dirpath, dirnames, names in os.walk(TREE):
        dirnames[:] = [d for d in dirnames if d != "build" and not d.startswith(".")]
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), TREE)
            if rel not in keep and n.endswith((".py", ".cpp", ".cu", ".cuh", ".h", ".c")):
                os.remove(os.path.join(dirpath, n))
    for rel in files:
        src, dst = os.path.join(ROOT, rel), os.path.join(TREE, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as f:
            data = f.read()
        if not os.path.exists(dst) or open(dst, "rb").read() != data:
            with open(dst, "wb") as f:
                f.write(data)


def _build():
    env = dict(os.environ, FLASH_ATTN_EXT_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=TREE, env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        sys.stdout.write(r.stdout[-3000:] + r.stderr[-3000:])
    return r.returncode == 0


def _tests_pass(args):
    env = dict(os.environ, PYTHONPATH=TREE + os.pathsep + os.path.join(TREE, "tests"))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
    )
    last = [line for line in r.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    return r.returncode == 0, last[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = ap.parse_args()
    if a.list:
        for name, path, *_, why in MUTANTS:
            print(f"{name:22s} {path:48s} {why}")
        return 0
    chosen = [m for m in MUTANTS if not a.names or m[0] in a.names]
    os.makedirs(TREE, exist_ok=True)
    _sync_tree()
    # The copy must import its own build, not an installed flash_attn_ext.
    probe = subprocess.run(
        [sys.executable, "-c", "import flash_attn_ext, os; print(os.path.dirname(flash_attn_ext.__file__))"],
        cwd=TREE,
        env=dict(os.environ, PYTHONPATH=TREE),
        capture_output=True,
        text=True,
    )
    if not _build():
        print("the unmutated copy does not build")
        return 1
    if probe.stdout.strip() and os.path.realpath(probe.stdout.strip()) != os.path.realpath(
        os.path.join(TREE, "flash_attn_ext")
    ):
        print(f"the copy imports {probe.stdout.strip()}, not its own package")
        return 1
    survivors, clean = [], set()
    print(f"{'mutant':22s} {'result':8s} {'s':>5s}  tests")
    for name, path, old, new, args, _why in chosen:
        if tuple(args) not in clean:  # the same tests must pass without the mutation
            ok, last = _tests_pass(args)
            if not ok:
                print(f"{name:22s} the unmutated copy fails these tests: {last}")
                return 1
            clean.add(tuple(args))
        target = os.path.join(TREE, path)
        original = open(target).read()
        if original.count(old) < 1:
            print(f"{name:22s} STALE    its text is no longer in {path}: update the mutant")
            survivors.append(name)
            continue
        t0 = time.time()
        try:
            with open(target, "w") as f:
                f.write(original.replace(old, new))
            if not _build():
                print(f"{name:22s} NOBUILD  the mutant does not compile: fix the mutant")
                survivors.append(name)
                continue
            ok, last = _tests_pass(args)
        finally:  # restore and rebuild: the next tests must see the unmutated code
            with open(target, "w") as f:
                f.write(original)
            _build()
        print(f"{name:22s} {'SURVIVED' if ok else 'killed':8s} {time.time() - t0:5.0f}  {' '.join(args)}: {last}")
        if ok:
            survivors.append(name)
    print(
        f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed"
        + (f"; survivors: {', '.join(survivors)}" if survivors else "")
    )
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
