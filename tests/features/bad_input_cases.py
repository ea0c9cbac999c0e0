"""The bad-input catalogue (issue 9): malformed calls to every public function and op.

Each case is (id, pattern, code[, exceptions]): `code` runs in a namespace built by `setup()`
and must raise one of `exceptions` (default ValueError or TypeError) whose message matches
`pattern` (the argument it names), leaving every tensor of the namespace bitwise unchanged
(caches and outputs passed in included).

`python tests/features/bad_input_cases.py START` runs the cases from START in order and prints one JSON
line per case ("start" before it runs, the outcome after), so a parent process
(test_bad_input_catalogue.py) can tell which case killed the interpreter, if one does, and go on
from the next one in a fresh process.
"""

import json
import math
import os
import sys

VE_TE = ("ValueError", "TypeError")


def _cuda_available():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


TORCH = ("ValueError", "TypeError", "RuntimeError")  # PyTorch's own SDPA errors

CASES = [
    # --- flash_attn_ext.attention (query/key/value (B, H, L, D)) ---
    ("attention/query-rank", r"query must be 4-D", "fae.attention(q[0], k, v)"),
    ("attention/key-rank", r"key must be 4-D", "fae.attention(q, k[0], v)"),
    ("attention/value-rank", r"value must be 4-D", "fae.attention(q, k, v[0])"),
    ("attention/batch-mismatch", r"batch", "fae.attention(q, k[:1], v[:1])"),
    ("attention/kv-length-mismatch", r"key and value must have the same length", "fae.attention(q, k, v[:, :, :5])"),
    ("attention/head-dim-mismatch", r"head dims differ", "fae.attention(q, k[..., :8], v)"),
    (
        "attention/kv-heads-mismatch",
        r"key and value must have the same number of heads",
        "fae.attention(q, k, v[:, :1])",
    ),
    ("attention/hq-not-multiple", r"multiple of the number of key/value heads", "fae.attention(q[:, :3], k, v)"),
    ("attention/dtype-mix", r"same dtype", "fae.attention(q, k.double(), v)"),
    ("attention/integer-tensors", r"query must be", "fae.attention(q.int(), k.int(), v.int())"),
    ("attention/bool-tensors", r"query must be", "fae.attention(q > 0, k > 0, v > 0)"),
    (
        "attention/complex-tensors",
        r"query must be",
        "fae.attention(q.to(torch.complex64), k.to(torch.complex64), v.to(torch.complex64))",
    ),
    ("attention/device-mix", r"key.*device|device.*key|same device", "fae.attention(q, k.to('meta'), v)"),
    ("attention/window-left-negative", r"window", "fae.attention(q, k, v, window_size=(-2, 0))"),
    ("attention/window-right-absurd", r"window", "fae.attention(q, k, v, window_size=(0, -7))"),
    ("attention/window-not-pair", r"window_size", "fae.attention(q, k, v, window_size=3)"),
    ("attention/window-float", r"window_size", "fae.attention(q, k, v, window_size=(1.5, 0))"),
    ("attention/window-huge", r"window", "fae.attention(q, k, v, window_size=(2**70, 0))"),
    ("attention/scale-nan", r"scale", "fae.attention(q, k, v, scale=float('nan'))"),
    ("attention/scale-inf", r"scale", "fae.attention(q, k, v, scale=float('inf'))"),
    ("attention/dropout-one", r"dropout_p", "fae.attention(q, k, v, dropout_p=1.0)"),
    ("attention/dropout-negative", r"dropout_p", "fae.attention(q, k, v, dropout_p=-0.1)"),
    ("attention/dropout-nan", r"dropout_p", "fae.attention(q, k, v, dropout_p=float('nan'))"),
    (
        "attention/mask-int",
        r"attn_mask",
        "fae.attention(q, k, v, attn_mask=torch.ones(1, 1, 8, 10, dtype=torch.int32))",
    ),
    (
        "attention/mask-wrong-shape",
        r"attn_mask",
        "fae.attention(q, k, v, attn_mask=torch.ones(1, 3, 8, 10, dtype=torch.bool))",
    ),
    ("attention/mask-wrong-len", r"attn_mask", "fae.attention(q, k, v, attn_mask=torch.ones(8, 11, dtype=torch.bool))"),
    (
        "attention/mask-5d",
        r"attn_mask",
        "fae.attention(q, k, v, attn_mask=torch.ones(1, 1, 1, 8, 10, dtype=torch.bool))",
    ),
    (
        "attention/mask-device",
        r"attn_mask",
        "fae.attention(q, k, v, attn_mask=torch.ones(8, 10, dtype=torch.bool, device='meta'))",
    ),
    (
        "attention/last-dim-strided",
        r"contiguous last dimension|stride",
        "OPS.attention_forward(q[..., ::2], k[..., ::2], v, None, 0.0, 0.25, -1, -1, True)",
    ),
    ("attention/alignment", r"alignment", "fae.attention(q, k, v, alignment='left')"),
    ("attention/softcap-negative", r"softcap", "fae.attention(q, k, v, softcap=-1.0)"),
    ("attention/softcap-nan", r"softcap", "fae.attention(q, k, v, softcap=float('nan'))"),
    (
        "attention/alibi-dtype",
        r"alibi_slopes",
        "fae.attention(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.float64))",
    ),
    ("attention/alibi-shape", r"alibi_slopes", "fae.attention(q, k, v, alibi_slopes=torch.ones(3))"),
    ("attention/not-a-tensor", r"query", "fae.attention(q.tolist(), k, v)"),
    ("attention/key-not-a-tensor", r"key must be a torch.Tensor", "fae.attention(q, None, v)"),
    ("attention/mask-not-a-tensor", r"attn_mask must be a torch.Tensor", "fae.attention(q, k, v, attn_mask=[[True]])"),
    ("attention/window-string", r"window_size", "fae.attention(q, k, v, window_size=('a', 0))"),
    ("attention/alibi-device", r"alibi_slopes", "fae.attention(q, k, v, alibi_slopes=torch.ones(4, device='meta'))"),
    ("attention/value-device", r"value", "fae.attention(q, k, v.to('meta'))"),
    (
        "op-varlen/cu-device",
        r"cu_seqlens_q",
        "OPS.attention_varlen_forward(qp, kp, vp, cu.to('meta'), cuk, 7, 7, 0.0, 0.25, -1, -1, True)",
    ),
    (
        "op-kvcache/seqlens-device",
        r"cache_seqlens",
        "OPS.attention_kvcache(qd.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), seqlens.to('meta'), None, None, 0.25, -1, -1)",
    ),
    ("op-merge/device", r"lse_b", "OPS.merge_attention_states(o, lse, o, lse.to('meta'))"),
    (
        "kvcache/q-not-a-tensor",
        r"q must be a torch.Tensor",
        "fae.attention_with_kvcache(None, kc, vc, cache_seqlens=seqlens)",
    ),
    ("kvcache/cache-rank", r"k_cache", "fae.attention_with_kvcache(qd, kc[0], vc, cache_seqlens=seqlens)"),
    ("append/new-not-a-tensor", r"k_new must be a torch.Tensor", "fae.kv_cache_append(kc, vc, 3, vn, seqlens)"),
    ("merge/not-a-tensor", r"lse_a must be a torch.Tensor", "fae.merge_attention_states(o, 0.5, o, lse)"),
    # --- attention_forward / attention_backward ops ---
    ("op-forward/scale-nan", r"scale", "OPS.attention_forward(q, k, v, None, 0.0, float('nan'), -1, -1, True)"),
    ("op-forward/window-left", r"window_left", "OPS.attention_forward(q, k, v, None, 0.0, 0.25, -3, -1, True)"),
    (
        "op-backward/grad-out-shape",
        r"grad_out",
        "OPS.attention_backward(o[:, :, :3], q, k, v, o, lse, rng, None, 0.0, 0.25, -1, -1, True)",
    ),
    (
        "op-backward/lse-shape",
        r"lse",
        "OPS.attention_backward(o, q, k, v, o, lse[:, :2], rng, None, 0.0, 0.25, -1, -1, True)",
    ),
    (
        "op-backward/lse-dtype",
        r"lse",
        "OPS.attention_backward(o, q, k, v, o, lse.double(), rng, None, 0.0, 0.25, -1, -1, True)",
    ),
    (
        "op-backward/rng-state",
        r"rng_state",
        "OPS.attention_backward(o, q, k, v, o, lse, rng[:1], None, 0.1, 0.25, -1, -1, True)",
    ),
    (
        "op-backward/out-dtype",
        r"grad_out|out",
        "OPS.attention_backward(o.double(), q, k, v, o, lse, rng, None, 0.0, 0.25, -1, -1, True)",
    ),
    (
        "op-backward/grad-lse-shape",
        r"grad_lse",
        "OPS.attention_backward(o, q, k, v, o, lse, rng, None, 0.0, 0.25, -1, -1, True, 0.0, None, lse[:, :1])",
    ),
    (
        "op-backward/grad-lse-dtype",
        r"grad_lse",
        "OPS.attention_backward(o, q, k, v, o, lse, rng, None, 0.0, 0.25, -1, -1, True, 0.0, None, lse.double())",
    ),
    # --- scaled_dot_product_attention (PyTorch's signature) ---
    # The drop-in raises PyTorch's own errors (what it cannot serve goes to PyTorch's SDPA).
    ("sdpa/query-rank", r"query", "fae.scaled_dot_product_attention(q[0, 0, 0], k, v)", TORCH),
    ("sdpa/dropout", r"dropout", "fae.scaled_dot_product_attention(q, k, v, dropout_p=1.5, enable_gqa=True)", TORCH),
    ("sdpa/not-a-tensor", r"query", "fae.scaled_dot_product_attention(q.tolist(), k, v)", TORCH),
    (
        "sdpa/mask-and-causal",
        r"attn_mask|is_causal",
        "fae.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 10, dtype=torch.bool), is_causal=True, enable_gqa=True)",
        TORCH,
    ),
    ("sdpa/window", r"window_size", "fae.scaled_dot_product_attention(q, k, v, enable_gqa=True, window_size=(-5, 0))"),
    # --- flash-attn's API ((B, L, H, D)) ---
    ("fa/func-rank", r"q|query", "fai.flash_attn_func(qf[0], kf, vf)"),
    ("fa/func-heads", r"multiple of the number of key/value heads|heads", "fai.flash_attn_func(qf[:, :, :3], kf, vf)"),
    ("fa/func-window", r"window", "fai.flash_attn_func(qf, kf, vf, window_size=(-4, -1))"),
    ("fa/func-softcap", r"softcap", "fai.flash_attn_func(qf, kf, vf, softcap=-2.0)"),
    ("fa/qkvpacked-shape", r"qkv", "fai.flash_attn_qkvpacked_func(qf)"),
    ("fa/kvpacked-shape", r"kv", "fai.flash_attn_kvpacked_func(qf, kf)"),
    ("fa/varlen-cu-dtype", r"cu_seqlens_q", "fai.flash_attn_varlen_func(qp, kp, vp, cu.float(), cuk, 7, 7)"),
    (
        "fa/varlen-cu-decreasing",
        r"cu_seqlens_k",
        "fai.flash_attn_varlen_func(qp, kp, vp, cu, torch.tensor([0, 9, 7], dtype=torch.int32), 7, 9)",
    ),
    (
        "fa/varlen-cu-total",
        r"cu_seqlens_q|total",
        "fai.flash_attn_varlen_func(qp, kp, vp, torch.tensor([0, 5, 13], dtype=torch.int32), cuk, 8, 7)",
    ),
    (
        "fa/varlen-cu-first",
        r"cu_seqlens_q",
        "fai.flash_attn_varlen_func(qp, kp, vp, torch.tensor([1, 5, 12], dtype=torch.int32), cuk, 7, 7)",
    ),
    ("fa/varlen-max-seqlen", r"max_seqlen_q", "fai.flash_attn_varlen_func(qp, kp, vp, cu, cuk, 3, 7)"),
    ("fa/varlen-rank", r"q|query", "fai.flash_attn_varlen_func(qf, kp, vp, cu, cuk, 7, 7)"),
    (
        "fa/with-kvcache-seqlens-range",
        r"cache_seqlens",
        "fai.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=torch.tensor([5, 40], dtype=torch.int32))",
    ),
    # --- 8-bit KV caches (kq / vq int8 (B, S, H, D) with scales ksc / vsc (B, S, H)) ---
    ("q8/append-no-k-scale", r"k_cache_scale", "fae.kv_cache_append(kq, vq, kn, vn, seqlens, v_cache_scale=vsc)"),
    ("q8/append-no-scales", r"k_cache_scale", "fae.kv_cache_append(kq, vq, kn, vn, seqlens)"),
    (
        "q8/append-scale-dtype",
        r"k_cache_scale must be float32",
        "fae.kv_cache_append(kq, vq, kn, vn, seqlens, k_cache_scale=ksc.half(), v_cache_scale=vsc)",
    ),
    (
        "q8/append-scale-shape",
        r"v_cache_scale must have",
        "fae.kv_cache_append(kq, vq, kn, vn, seqlens, k_cache_scale=ksc, v_cache_scale=vsc[:, :5])",
    ),
    (
        "q8/append-scale-layout",
        r"k_cache_scale must have",
        "fae.kv_cache_append(kq, vq, kn, vn, seqlens, k_cache_scale=ksc.transpose(1, 2), v_cache_scale=vsc)",
    ),
    (
        "q8/append-scale-device",
        r"k_cache_scale is on",
        "fae.kv_cache_append(kq, vq, kn, vn, seqlens, k_cache_scale=ksc.to('meta'), v_cache_scale=vsc)",
    ),
    (
        "q8/append-nan",
        r"k_new has NaN or Inf",
        "fae.kv_cache_append(kq, vq, kn.masked_fill(kn > 1.5, math.nan), vn, seqlens, k_cache_scale=ksc, "
        "v_cache_scale=vsc)",
    ),
    (
        "q8/append-inf",
        r"v_new has NaN or Inf",
        "fae.kv_cache_append(kq, vq, kn, vn.masked_fill(vn > 1.5, math.inf), seqlens, k_cache_scale=ksc, "
        "v_cache_scale=vsc)",
    ),
    (
        "q8/append-int-rows",
        r"k_new",
        "fae.kv_cache_append(kq, vq, kn.to(torch.int8), vn.to(torch.int8), seqlens, k_cache_scale=ksc, "
        "v_cache_scale=vsc)",
    ),
    (
        "q8/scales-with-float-cache",
        r"k_cache_scale is for int8",
        "fae.kv_cache_append(kc, vc, kn, vn, seqlens, k_cache_scale=ksc, v_cache_scale=vsc)",
    ),
    (
        "q8/k-int8-v-float",
        r"same dtype",
        "fae.kv_cache_append(kq, vc, kn, vn, seqlens, k_cache_scale=ksc, v_cache_scale=vsc)",
    ),
    (
        "q8/scales-aliased",
        r"share memory",
        "fae.kv_cache_append(kq, vq, kn, vn, seqlens, k_cache_scale=ksc, v_cache_scale=ksc)",
    ),
    (
        "q8/scale-expanded",
        r"v_cache_scale has elements that share memory",
        "fae.kv_cache_append(kq, vq, kn, vn, seqlens, k_cache_scale=ksc, v_cache_scale=vsc[:, :1].expand(2, 32, 2))",
    ),
    ("q8/attend-no-scales", r"k_cache_scale", "fae.attention_with_kvcache(qd, kq, vq, cache_seqlens=seqlens)"),
    (
        "q8/attend-new-dtype",
        r"query's dtype",
        "fae.attention_with_kvcache(qd, kq, vq, kn.bfloat16(), vn.bfloat16(), cache_seqlens=seqlens, "
        "k_cache_scale=ksc, v_cache_scale=vsc)",
    ),
    (
        "q8/attend-nan",
        r"NaN or Inf",
        "fae.attention_with_kvcache(qd, kq, vq, kn * math.inf, vn, cache_seqlens=seqlens, k_cache_scale=ksc, "
        "v_cache_scale=vsc)",
    ),
    (
        "q8/flash-attn-descale",
        r"k_descale",
        "fai.flash_attn_with_kvcache(qd, kq, vq, kn, vn, cache_seqlens=seqlens, k_descale=torch.ones(2, 2))",
    ),
    (
        "q8/op-scales-float-cache",
        r"k_cache_scale",
        "OPS.kv_cache_append(kc.transpose(1, 2), vc.transpose(1, 2), kn.transpose(1, 2), vn.transpose(1, 2), "
        "seqlens, False, None, ksc.transpose(1, 2), vsc.transpose(1, 2))",
    ),
    (
        "q8/op-no-scales",
        r"k_cache_scale",
        "OPS.attention_kvcache(qd.transpose(1, 2), kq.transpose(1, 2), vq.transpose(1, 2), seqlens, None, None, 0.25, "
        "-1, -1)",
    ),
    ("q8/quantize-dtype", r"dtype must be torch.int8", "fae.quantize_kv_cache(kc, vc, torch.float16)"),
    (
        "q8/kvcache-k-dtype",
        r"k_new and v_new must have the query.s dtype",
        "qcache_obj.attend(qd, kn.bfloat16(), vn.bfloat16())",
    ),
    # --- KV cache: append ---
    (
        "append/past-capacity",
        r"cache_seqlens\[1\] = 30 overflows",
        "fae.kv_cache_append(kc, vc, kn, vn, torch.tensor([5, 30], dtype=torch.int32))",
    ),
    (
        "append/seqlens-negative",
        r"cache_seqlens",
        "fae.kv_cache_append(kc, vc, kn, vn, torch.tensor([-1, 3], dtype=torch.int32))",
    ),
    ("append/seqlens-float", r"cache_seqlens", "fae.kv_cache_append(kc, vc, kn, vn, seqlens.float())"),
    ("append/seqlens-shape", r"cache_seqlens", "fae.kv_cache_append(kc, vc, kn, vn, seqlens[:1])"),
    ("append/seqlens-device", r"cache_seqlens", "fae.kv_cache_append(kc, vc, kn, vn, seqlens.to('meta'))"),
    ("append/dtype-mix", r"k_new|dtype", "fae.kv_cache_append(kc, vc, kn.double(), vn, seqlens)"),
    ("append/heads-mismatch", r"k_new|heads", "fae.kv_cache_append(kc, vc, kn[:, :, :1], vn[:, :, :1], seqlens)"),
    ("append/k-v-new-len", r"v_new|k_new|length", "fae.kv_cache_append(kc, vc, kn, vn[:, :2], seqlens)"),
    ("append/head-dim", r"head_dim|head dim|k_new", "fae.kv_cache_append(kc, vc, kn[..., :8], vn, seqlens)"),
    ("append/layout", r"layout", "fae.kv_cache_append(kc, vc, kn, vn, seqlens, layout='sbhd')"),
    ("append/cache-rank", r"k_cache", "fae.kv_cache_append(kc[0], vc, kn, vn, seqlens)"),
    (
        "append/block-table-dtype",
        r"block_table",
        "fae.kv_cache_append(kc, vc, kn, vn, seqlens, block_table=torch.zeros(2, 1, dtype=torch.float32))",
    ),
    (
        "append/block-table-range",
        r"block_table",
        "fae.kv_cache_append(kc, vc, kn, vn, seqlens, block_table=torch.tensor([[0], [7]], dtype=torch.int32))",
    ),
    # --- KV cache: attention ---
    (
        "kvcache/seqlens-range",
        r"cache_seqlens",
        "fae.attention_with_kvcache(qd, kc, vc, cache_seqlens=torch.tensor([5, 33], dtype=torch.int32))",
    ),
    (
        "kvcache/seqlens-dtype",
        r"cache_seqlens",
        "fae.attention_with_kvcache(qd, kc, vc, cache_seqlens=seqlens.to(torch.int16))",
    ),
    (
        "kvcache/append-past-capacity",
        r"cache_seqlens",
        "fae.attention_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=torch.tensor([30, 3], dtype=torch.int32))",
    ),
    ("kvcache/k-without-v", r"k and v|both", "fae.attention_with_kvcache(qd, kc, vc, kn, None, cache_seqlens=seqlens)"),
    ("kvcache/query-rank", r"query|q\b", "fae.attention_with_kvcache(qd[0], kc, vc, cache_seqlens=seqlens)"),
    (
        "kvcache/scale-nan",
        r"scale",
        "fae.attention_with_kvcache(qd, kc, vc, cache_seqlens=seqlens, softmax_scale=float('nan'))",
    ),
    (
        "kvcache/softcap-inf-before-append",
        r"softcap",
        "fae.attention_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, softcap=float('inf'))",
    ),
    ("kvcache/window", r"window", "fae.attention_with_kvcache(qd, kc, vc, cache_seqlens=seqlens, window_size=(-9, 0))"),
    (
        "kvcache/cache-dtype-mix",
        r"dtype|value",
        "fae.attention_with_kvcache(qd, kc, vc.double(), cache_seqlens=seqlens)",
    ),
    (
        "kvcache-class/bad-size",
        r"max_seqlen|positive",
        "fae.KVCache(batch_size=2, max_seqlen=0, num_kv_heads=2, head_dim=16)",
    ),
    (
        "kvcache-class/append-past-capacity",
        r"overflows the cache",
        "cache_obj.append(torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16))",
    ),
    (
        "kvcache-class/attend-heads",
        r"q must be \(batch=2, length, a multiple of 2 heads, 16\)",
        "cache_obj.attend(torch.randn(2, 1, 3, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16))",
    ),
    (  # q in attention()'s (B, H, L, D) layout: the error names the layout a KVCache takes
        "kvcache-class/attend-in-bhsd-layout",
        r"a KVCache takes \(batch, length, heads, head_dim\)",
        "cache_obj.attend(torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16))",
    ),
    (
        "kvcache-class/append-in-bhsd-layout",
        r"k must be \(batch=2, length, 2 heads, 16\): a KVCache takes",
        "cache_obj.append(torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16))",
    ),
    (
        "kvcache/q-in-the-other-layout",
        r"layout='bshd'.*is q in this layout",
        "fae.attention_with_kvcache(qd.transpose(1, 2), kc, vc, cache_seqlens=seqlens)",
    ),
    (
        "kvcache-class/attend-new-head-dim",
        r"k must be \(batch=2, length, 2 heads, 16\)",
        "cache_obj.attend(torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))",
    ),
    ("kvcache-class/reset-index-range", r"batch_index", "cache_obj.reset(torch.tensor([0, 5]))"),
    ("kvcache-class/reset-index-float", r"batch_index", "cache_obj.reset(torch.tensor([0.0]))"),
    (
        "kvcache-class/rolling-window-bad",
        r"window",
        "fae.KVCache(batch_size=2, max_seqlen=None, num_kv_heads=2, head_dim=16, window=0)",
    ),
    (
        "fa/with-kvcache-k-without-v",
        r"both k and v",
        "fai.flash_attn_with_kvcache(qd, kc, vc, k=kn, cache_seqlens=seqlens)",
    ),
    (
        "sdpa/window-float",
        r"window_size",
        "fae.scaled_dot_product_attention(q, k, v, enable_gqa=True, window_size=(1.5, 0))",
    ),
    ("nn/window", r"window_size", "fae.nn.Attention(embed_dim=64, num_heads=4, window_size=(-3, 0))"),
    ("nn/dropout", r"dropout", "fae.nn.Attention(embed_dim=64, num_heads=4, dropout=1.0)"),
    (
        "convert/state-dict-kv-heads",
        r"num_kv_heads \(3\) must divide",
        "convert.convert_state_dict({'model.layers.0.self_attn.k_proj.weight': torch.zeros(64, 64)}, dict(model_type='llama', num_attention_heads=8, num_key_value_heads=8, hidden_size=64), 3)",
        ("ConversionError",),
    ),  # a ValueError
    # --- merge_attention_states ---
    ("merge/shape-mismatch", r"out_b|out_a|shape", "fae.merge_attention_states(o, lse, o[:1], lse[:1])"),
    ("merge/lse-shape", r"lse_a|lse", "fae.merge_attention_states(o, lse[..., :3], o, lse)"),
    ("merge/lse-dtype", r"lse_b|lse", "fae.merge_attention_states(o, lse, o, lse.double())"),
    # --- modules ---
    ("nn/heads-not-multiple", r"num_kv_heads|num_heads", "fae.nn.Attention(embed_dim=64, num_heads=4, num_kv_heads=3)"),
    ("nn/embed-not-divisible", r"embed_dim|head_dim", "fae.nn.Attention(embed_dim=63, num_heads=4)"),
    (
        "nn/input-width",
        r"embed_dim|x|input",
        "fae.nn.Attention(embed_dim=64, num_heads=4)(torch.randn(2, 5, 32))",
        VE_TE + ("RuntimeError",),
    ),
    # --- issue 20: attention sinks, flash-attn's cache arguments, the drop-in's K/V lengths ---
    ("sinks/shape", r"sinks must have shape \(4,\)", "fae.attention(q, k, v, sinks=torch.zeros(3))"),
    ("sinks/dtype", r"sinks must be float32", "fae.attention(q, k, v, sinks=torch.zeros(4, dtype=torch.int32))"),
    ("sinks/not-tensor", r"sinks must be a torch.Tensor", "fae.attention(q, k, v, sinks=[0.0] * 4)"),
    ("sinks/fa-func", r"sinks must have shape", "fai.flash_attn_func(qf, kf, vf, sinks=torch.zeros(3))"),
    (
        "sinks/fa-both-names",
        r"sinks or s_aux",
        "fai.flash_attn_func(qf, kf, vf, sinks=torch.zeros(4), s_aux=torch.zeros(4))",
    ),
    (
        "sinks/kvcache-device",
        r"sinks (must be|is) on",
        "fae.attention_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, sinks=torch.zeros(4, device='meta'))",
    ),
    (
        "sinks/varlen-shape",
        r"sinks must have shape",
        "fai.flash_attn_varlen_func(qp, kp, vp, cu, cuk, 7, 7, sinks=torch.zeros(2))",
    ),
    (
        "kvcache/leftpad-past-seqlens",
        r"cache_leftpad\[1\] = 9",
        "fai.flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, "
        "cache_leftpad=torch.tensor([0, 9], dtype=torch.int32))",
    ),
    (
        "kvcache/batch-idx-range",
        r"cache_batch_idx entries",
        "fai.flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, "
        "cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32))",
    ),
    (
        "kvcache/batch-idx-dtype",
        r"cache_batch_idx must be int32",
        "fai.flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, cache_batch_idx=torch.zeros(2))",
    ),
    (
        "kvcache/rotary-too-short",
        r"rotary_cos / rotary_sin have 8 rows",
        "fai.flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, rotary_cos=torch.ones(8, 4), "
        "rotary_sin=torch.ones(8, 4))",
    ),
    (
        "kvcache/rotary-alone",
        r"both rotary_cos and rotary_sin",
        "fai.flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, rotary_cos=torch.ones(32, 4))",
    ),
    (
        "kvcache/paged-past-block-table",
        r"block_table gives 1 blocks",
        "fai.flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=torch.tensor([5, 31], dtype=torch.int32), "
        "block_table=torch.tensor([[0], [1]], dtype=torch.int32))",
    ),
    (
        "fa/varlen-block-table-dropout",
        r"dropout_p must be 0 with block_table",
        "fai.flash_attn_varlen_func(qp, kc, vc, cu, cuk, 7, 7, dropout_p=0.1, "
        "block_table=torch.tensor([[0], [1]], dtype=torch.int32))",
    ),
    ("rotary/past-the-table", r"past cos/sin", "fae.rotary.apply_rotary_emb(qf, torch.ones(4, 8), torch.ones(4, 8))"),
    (
        "kvcache-class/sink-tokens-without-window",
        r"sink_tokens",
        "fae.KVCache(batch_size=2, max_seqlen=32, num_kv_heads=2, head_dim=16, sink_tokens=2)",
    ),
    (
        "sdpa/key-value-lengths",
        r"Expected size for first two dimensions of batch2 tensor",
        "fae.scaled_dot_product_attention(q, k, v[:, :, :5])",
        ("RuntimeError",),
    ),
]

# Device mixes with a real second device, straight to the ops (the Python layer gates CUDA
# until its kernels are verified); where CUDA is available: scripts/gpu_check.sh.
if _cuda_available():
    CASES += [
        (
            "cuda/key-on-cpu",
            r"key|device",
            "OPS.attention_forward(q.cuda(), k, v.cuda(), None, 0.0, 0.25, -1, -1, True)",
        ),
        (
            "cuda/mask-on-cpu",
            r"attn_mask",
            "OPS.attention_forward(q.cuda(), k.cuda(), v.cuda(), torch.ones(1, 1, 8, 10, dtype=torch.bool), 0.0, 0.25, -1, -1, True)",
        ),
        (
            "cuda/seqlens-on-cpu",
            r"cache_seqlens",
            "OPS.kv_cache_append(kc_cuda.transpose(1, 2), vc_cuda.transpose(1, 2), kn.cuda().transpose(1, 2), vn.cuda().transpose(1, 2), seqlens)",
        ),
        (
            "cuda/append-past-capacity",
            r"overflows",
            "OPS.kv_cache_append(kc_cuda.transpose(1, 2), vc_cuda.transpose(1, 2), kn.cuda().transpose(1, 2), vn.cuda().transpose(1, 2), torch.tensor([5, 30], dtype=torch.int32, device='cuda'))",
        ),
        (
            "cuda/head-dim-over-256",
            r"head dims up to 256",
            "OPS.attention_forward(*(torch.randn(1, 2, 4, 300, device='cuda') for _ in range(3)), None, 0.0, 0.05, -1, -1, True)",
        ),
        (
            "cuda/alibi-on-cpu",
            r"alibi_slopes",
            "OPS.attention_forward(q.cuda(), k.cuda(), v.cuda(), None, 0.0, 0.25, -1, -1, True, 0.0, torch.ones(4))",
        ),
    ]

# The runner's own check (test_bad_input_catalogue.py): a first case that kills the interpreter.
if os.environ.get("FLASH_ATTN_EXT_CATALOGUE_SELFTEST") == "1":
    CASES = [("selftest/abort", r"", "os.abort()")] + CASES


def setup():
    import torch

    import flash_attn_ext as fae
    from flash_attn_ext import flash_attn_interface as fai

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    from flash_attn_ext import convert

    ns = dict(torch=torch, fae=fae, fai=fai, OPS=torch.ops.flash_attn_ext, math=math, os=os, convert=convert)
    ns.update(q=rnd(2, 4, 8, 16), k=rnd(2, 2, 10, 16), v=rnd(2, 2, 10, 16))  # (B, H, L, D)
    ns.update(qf=rnd(2, 8, 4, 16), kf=rnd(2, 10, 2, 16), vf=rnd(2, 10, 2, 16))  # (B, L, H, D)
    ns.update(qp=rnd(12, 4, 16), kp=rnd(14, 2, 16), vp=rnd(14, 2, 16))  # packed (varlen)
    ns["cu"] = torch.tensor([0, 5, 12], dtype=torch.int32)  # query lengths 5, 7
    ns["cuk"] = torch.tensor([0, 7, 14], dtype=torch.int32)  # key lengths 7, 7
    ns.update(qd=rnd(2, 1, 4, 16), kc=rnd(2, 32, 2, 16), vc=rnd(2, 32, 2, 16))  # decode (B, S, H, D)
    ns.update(kn=rnd(2, 3, 2, 16), vn=rnd(2, 3, 2, 16), seqlens=torch.tensor([5, 7], dtype=torch.int32))
    o, lse, rng = ns["OPS"].attention_forward(ns["q"], ns["k"], ns["v"], None, 0.0, 0.25, -1, -1, True)
    ns.update(o=o, lse=lse, rng=rng)
    cache_obj = fae.KVCache(batch_size=2, max_seqlen=32, num_kv_heads=2, head_dim=16)
    cache_obj.append(rnd(2, 4, 2, 16), rnd(2, 4, 2, 16))
    ns["cache_obj"] = cache_obj
    ns["cache_k"], ns["cache_v"], ns["cache_seqlens"] = cache_obj.k, cache_obj.v, cache_obj.seqlens
    ns.update(kq=torch.zeros(2, 32, 2, 16, dtype=torch.int8), vq=torch.zeros(2, 32, 2, 16, dtype=torch.int8))
    ns.update(ksc=torch.zeros(2, 32, 2), vsc=torch.zeros(2, 32, 2))
    qcache_obj = fae.KVCache(batch_size=2, max_seqlen=32, num_kv_heads=2, head_dim=16, dtype=torch.int8)
    qcache_obj.append(rnd(2, 4, 2, 16), rnd(2, 4, 2, 16))
    ns["qcache_obj"] = qcache_obj
    ns["qcache_k"], ns["qcache_ks"], ns["qcache_seqlens"] = qcache_obj.k, qcache_obj.k_scale, qcache_obj.seqlens
    if _cuda_available():
        ns["kc_cuda"], ns["vc_cuda"] = ns["kc"].cuda(), ns["vc"].cuda()
    return ns


def _snapshot(ns):
    import torch

    return {
        name: t.detach().clone() for name, t in ns.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"
    }


def _unchanged(before, ns):
    import torch

    changed = []
    for name, old in before.items():
        new = ns[name]
        same = (
            new.shape == old.shape
            and new.dtype == old.dtype
            and torch.equal(new.detach().reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8))
        )
        if not same:
            changed.append(name)
    return changed


def main(start):
    ns = setup()
    for index in range(start, len(CASES)):
        case_id, code = CASES[index][0], CASES[index][2]
        print(json.dumps({"start": index}), flush=True)
        before = _snapshot(ns)
        result = {"index": index, "id": case_id}
        try:
            exec(code, dict(ns))
            result.update(raised=None)
        except BaseException as e:  # noqa: B902  (KeyboardInterrupt, SystemExit too: report, do not die)
            # the class and its bases (FlashAttnValueError is a ValueError and a RuntimeError)
            result.update(raised=[c.__name__ for c in type(e).__mro__], message=str(e)[:2000])
        result["changed"] = _unchanged(before, ns)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
