// Every op of the flash_attn_ext library, declared once. Kernels register against these
// schemas per dispatch key: CPU in csrc/*/..._cpu.cpp, CUDA in ..._cuda.cu, autograd in
// csrc/attention/attention_autograd.cpp, fake (meta) kernels in flash_attn_ext/_meta.py.
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/kernel_config_names.h"
#include "cpu/tile_backend.h"

namespace {

std::vector<std::string> kernel_config() {
  const auto config = flash_attn_ext::current_kernel_config();
  std::vector<std::string> fields;
  for (const std::string& name : flash_attn_ext::kernel_config_fields())
    fields.push_back(name + "=" + flash_attn_ext::get_config_field(config, name));
  return fields;
}

std::string set_kernel_config(const std::string& name, const std::string& value) {
  return flash_attn_ext::set_kernel_config_field(name, value);
}

std::tuple<std::string, std::string> cpu_tiles(c10::ScalarType dtype) {
  const auto choice = flash_attn_ext::cpu::choose_tiles(dtype, flash_attn_ext::current_kernel_config().cpu_tiles);
  return {flash_attn_ext::cpu::tile_backend_name(choice.backend), choice.reason};
}

}  // namespace

TORCH_LIBRARY(flash_attn_ext, m) {
  // Fused attention forward, (B, H, L, D) layout read through strides. window_left/right:
  // -1 = unbounded; bottom_right aligns query L-1 with key S-1 (flash-attn's causal),
  // otherwise query 0 with key 0 (SDPA's is_causal). softcap > 0: scores become
  // softcap * tanh(score / softcap) before the mask (Gemma-2). alibi_slopes (float32, (Hq,) or
  // (B, Hq)): score (b, h, i, j) gains -slope * |i + o - j| (o the alignment offset), as
  // flash-attn's alibi_slopes. sinks (float32 or float64, (Hq,)): learned attention sinks
  // (gpt-oss), a logit per query head that joins every row's softmax denominator and adds
  // nothing to the output; lse includes it (the backward needs nothing more: its gradient,
  // -sum_i exp(sink - lse_i) * (delta_i - grad_lse_i), is formed by the autograd kernel).
  // relative_bias ((Hq, L + S - 1), float32 or float64): a bias that depends on j - i only (T5's
  // bucketed relative-position table gathered per distance): score (b, h, i, j) gains
  // relative_bias[h, j - i + L - 1]; nothing of size L x S is formed (CPU kernels; the CUDA
  // kernels refuse it). Returns out (B, Hq, L, Dv), lse
  // (B, Hq, L; float32, float64 for float64 inputs) and rng_state (int64 [seed, offset]
  // of the dropout mask, for the backward; empty, shape (0,), when dropout_p == 0).
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "float dropout_p, float scale, int window_left, int window_right, bool bottom_right, "
      "float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sinks=None, Tensor? relative_bias=None) "
      "-> (Tensor out, Tensor lse, Tensor rng_state)");
  // Its gradient with respect to query, key and value. grad_lse (lse's shape and dtype): a
  // gradient flowing into lse as well, which adds P * grad_lse to dS (lse is differentiable, so
  // that partial attentions merged by their lse compose under autograd). grad_attn_mask: also
  // the gradient of a float attn_mask, dS (the score gradient before the softcap slope: the
  // mask is added after the cap) summed over the dims the mask broadcasts along (its size-1
  // dims), in the mask's shape and dtype. grad_alibi_slopes: also that of the slopes,
  // -sum_ij dS_ij |i + o - j| per (b, h), summed over the batch for (Hq,) slopes, float32.
  // grad_relative_bias: also that of relative_bias, dS summed over the batch and over the (i, j)
  // of each distance, in relative_bias's shape and dtype.
  // Each gradient element has one writer (no atomics): bitwise repeatable for a fixed thread
  // count. Not asked for, they are returned empty, shape (0,).
  m.def(
      "attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor rng_state, Tensor? attn_mask, float dropout_p, float scale, "
      "int window_left, int window_right, bool bottom_right, float softcap=0.0, "
      "Tensor? alibi_slopes=None, Tensor? grad_lse=None, bool grad_attn_mask=False, "
      "bool grad_alibi_slopes=False, Tensor? relative_bias=None, bool grad_relative_bias=False) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask, "
      "Tensor grad_alibi_slopes, Tensor grad_relative_bias)");
  // Packed variable-length sequences (flash-attn's varlen layout): query (total_q, Hq, D), key
  // (total_k, Hkv, D), value (total_k, Hkv, Dv); sequence b is rows [cu_seqlens_q[b],
  // cu_seqlens_q[b + 1]) of query and [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of key/value
  // (int32, (B + 1,), starting at 0, ending at total). max_seqlen_q/k bound the sequence
  // lengths (checked). Each sequence is attended on its own, with the semantics above.
  // Returns out (total_q, Hq, Dv), lse (Hq, total_q) and rng_state.
  m.def(
      "attention_varlen_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float dropout_p, float scale, "
      "int window_left, int window_right, bool bottom_right, float softcap=0.0, "
      "Tensor? alibi_slopes=None, Tensor? sinks=None) -> (Tensor out, Tensor lse, Tensor rng_state)");
  m.def(
      "attention_varlen_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor out, Tensor lse, Tensor rng_state, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float dropout_p, float scale, int window_left, "
      "int window_right, bool bottom_right, float softcap=0.0, Tensor? alibi_slopes=None, "
      "Tensor? grad_lse=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // KV cache: writes k_new/v_new (B, Hkv, L_new, D) into k_cache/v_cache (B, Hkv, S_max, D)
  // in place at positions cache_seqlens[b] + t, read through strides (a flash-attn
  // (B, S_max, Hkv, D) cache is passed as its transpose(1, 2) view). rolling: the cache holds
  // the last S_max positions, position p in slot p % S_max. cache_seqlens is not updated.
  // block_table (B, blocks_per_seq) int32: a paged cache (vLLM / flash-attn), the caches being
  // (num_blocks, Hkv, block_size, D) and position p of sequence b row p % block_size of block
  // block_table[b, p / block_size]. The same for attention_kvcache below.
  // Quantized caches (int8, float8_e4m3fn) come with k_cache_scale / v_cache_scale: float32,
  // the cache's shape without head_dim ((B, Hkv, S_max), or (num_blocks, Hkv, block_size)), one
  // scale per (position, head); element d of a row reads cache[..., d] * scale[...]. The append
  // quantizes each new row with scale = amax / 127 (int8) or amax / 448 (fp8), round to nearest
  // even, writing the row's scale; new K/V are then float32 / bf16 / fp16 and must be finite.
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, "
      "Tensor cache_seqlens, bool rolling=False, Tensor? block_table=None, Tensor(c!)? k_cache_scale=None, "
      "Tensor(d!)? v_cache_scale=None) -> ()");
  // Attention of query (B, Hq, L, D) against a KV cache (B, Hkv, S_max, D): sequence b sees
  // keys [0, cache_seqlens[b] + L_new), bottom-right aligned (the last query with the last
  // key). With k_new/v_new (B, Hkv, L_new, D) they are first appended in place
  // (kv_cache_append). Returns out (B, Hq, L, Dv) and lse (B, Hq, L). Inference only.
  m.def(
      "attention_kvcache(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? k_new, Tensor? v_new, float scale, int window_left, int window_right, "
      "Tensor? block_table=None, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sinks=None, "
      "Tensor(c!)? k_cache_scale=None, Tensor(d!)? v_cache_scale=None) -> (Tensor out, Tensor lse)");
  // Raises (RuntimeError) and clears what device-checked KV-cache calls on on_device's device
  // skipped (csrc/kv_cache/kv_cache_device_checks.h); nothing on CPU, whose calls always raise
  // at once. Python: flash_attn_ext.check_kvcache_errors.
  m.def("_raise_kvcache_device_errors(Tensor on_device) -> ()");
  // Exact merge of two attention results over disjoint key sets (split-KV decoding, ring /
  // context-parallel attention): out_a, out_b (..., D) with their log-sum-exps (...).
  // Returns the attention over the union and its lse. Differentiable.
  m.def(
      "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
      "-> (Tensor out, Tensor lse)");
  // The kernel configuration (csrc/common/kernel_config.h; Python: flash_attn_ext.kernel_config):
  // _kernel_config lists the process-wide setting as "name=value" strings; _set_kernel_config
  // sets one field (ValueError naming it for a bad value) and returns its previous value;
  // _cpu_tiles says which CPU tile back end inputs of `dtype` get now, and why. No tensors:
  // the kernels are registered here, for every dispatch key.
  m.def("_kernel_config() -> str[]", &kernel_config);
  m.def("_set_kernel_config(str name, str value) -> str", &set_kernel_config);
  m.def("_cpu_tiles(ScalarType dtype) -> (str backend, str reason)", &cpu_tiles);
}
