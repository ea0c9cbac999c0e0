"""flash-attn's Python API (flash_attn.flash_attn_interface) on this package's kernels.

Same names, argument names, layouts and return values, so `from flash_attn_ext.flash_attn_interface
import flash_attn_func` can replace `from flash_attn import flash_attn_func`:

- tensors are (batch, seqlen, heads, head_dim); K/V may have fewer heads (GQA/MQA, not copied);
- `causal=True` aligns the mask to the bottom right, as flash-attn >= 2.1 does;
- `window_size=(left, right)`, -1 for unbounded;
- `softcap > 0` soft-caps the scaled scores, `softcap * tanh(s / softcap)`, in the kernels
  (forward, backward and KV-cache decode), as flash-attn does for Gemma-2;
- `alibi_slopes` (float32, `(heads,)` or `(batch, heads)`) adds `-slope * |i + Sk - Sq - j|`
  to the scores, in the kernels, as flash-attn documents it (the log-sum-exp includes it);
- the varlen functions take packed sequences, (total, heads, head_dim) with int32 `cu_seqlens`
  offsets, and attend each sequence on its own, in the kernels (no padding, no Python loop);
  their log-sum-exp is (heads, total_q), as flash-attn's;
- `return_attn_probs=True` returns `(out, softmax_lse, None)`: the log-sum-exp (batch, heads,
  seqlen) in float32; the attention probabilities themselves are never materialised here, so
  the third element is None (flash-attn returns them only for testing, with dropout).

Not yet (an argument that would change the result raises NotImplementedError naming it):
rotary embedding in `flash_attn_with_kvcache`, `cache_batch_idx`,
`cache_leftpad`, and `block_table` in `flash_attn_varlen_func`. `deterministic` is accepted:
every kernel here is deterministic. `num_splits` is accepted and ignored: the split count is
chosen per call (FLASH_ATTN_EXT_NUM_SPLITS forces it).
"""

import math
from typing import Optional, Tuple

import torch

from . import _ops
from .attention import _contiguous_last_dim, attention, normalize_window
from .kv_cache import attention_with_kvcache

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
]


def _not_yet(**args) -> None:
    for name, value in args.items():
        if value is not None and value is not False and not (isinstance(value, float) and value == 0.0):
            raise NotImplementedError(f"flash_attn_ext: {name} is not supported yet (got {value!r})")


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D) [, softmax_lse (B, Hq, Sq), None]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"flash_attn_func: {name} must be (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}"
            )
    out, lse = attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        causal=causal,
        window_size=tuple(window_size),
        scale=softmax_scale,
        dropout_p=dropout_p,
        alignment="bottom_right",
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        return_lse=True,
    )
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
):
    """Packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence b is rows
    [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k/v
    (int32, (batch + 1,)). causal aligns each sequence's mask to its bottom right.
    -> out (total_q, Hq, D) [, softmax_lse (Hq, total_q), None]."""
    _not_yet(block_table=block_table)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(
                f"flash_attn_varlen_func: {name} must be (total_tokens, heads, head_dim), got shape {tuple(t.shape)}"
            )
    left, right = normalize_window(tuple(window_size), causal)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    _ops.require_kernel(q.device.type)
    out, lse, _ = _ops.attention_varlen_forward(
        _contiguous_last_dim(q),
        _contiguous_last_dim(k),
        _contiguous_last_dim(v),
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        float(dropout_p),
        float(softmax_scale),
        left,
        right,
        True,
        float(softcap),
        alibi_slopes,
    )
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv (total, 3, H, D): packed self-attention with Q, K and V packed (views, no copy)."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(
            f"flash_attn_varlen_qkvpacked_func: qkv must be (total_tokens, 3, heads, head_dim), got "
            f"shape {tuple(qkv.shape)}"
        )
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q (total_q, Hq, D), kv (total_k, 2, Hkv, D): K and V packed (views, no copy)."""
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(
            f"flash_attn_varlen_kvpacked_func: kv must be (total_tokens, 2, kv_heads, head_dim), got "
            f"shape {tuple(kv.shape)}"
        )
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv (B, S, 3, H, D): self-attention with Q, K and V packed (views, no copy)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"flash_attn_qkvpacked_func: qkv must be (batch, seqlen, 3, heads, head_dim), got shape {tuple(qkv.shape)}"
        )
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D): K and V packed (views, no copy)."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(
            f"flash_attn_kvpacked_func: kv must be (batch, seqlen, 2, kv_heads, head_dim), got shape {tuple(kv.shape)}"
        )
    k, v = kv.unbind(dim=2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens=None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Decode / chunked prefill against a KV cache, appending k/v in place first (flash-attn's
    semantics: cache (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D) with
    block_table; cache_seqlens the lengths before the append)."""
    _not_yet(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
    with torch.no_grad():  # forward-only, as in flash-attn: the result has no autograd history
        return attention_with_kvcache(
            q,
            k_cache,
            v_cache,
            k,
            v,
            cache_seqlens=cache_seqlens,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=tuple(window_size),
            return_softmax_lse=return_softmax_lse,
            block_table=block_table,
            softcap=float(softcap),
            alibi_slopes=alibi_slopes,
        )
