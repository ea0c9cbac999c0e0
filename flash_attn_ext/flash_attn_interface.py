"""flash-attn's Python API (flash_attn.flash_attn_interface) on this package's kernels.

Same names, argument names, layouts and return values, so `from flash_attn_ext.flash_attn_interface
import flash_attn_func` can replace `from flash_attn import flash_attn_func`:

- tensors are (batch, seqlen, heads, head_dim); K/V may have fewer heads (GQA/MQA, not copied);
- `causal=True` aligns the mask to the bottom right, as flash-attn >= 2.1 does;
- `window_size=(left, right)`, -1 for unbounded;
- `return_attn_probs=True` returns `(out, softmax_lse, None)`: the log-sum-exp (batch, heads,
  seqlen) in float32; the attention probabilities themselves are never materialised here, so
  the third element is None (flash-attn returns them only for testing, with dropout).

Not yet (an argument that would change the result raises NotImplementedError naming it):
`softcap`, `alibi_slopes`, rotary embedding in `flash_attn_with_kvcache`, `cache_batch_idx`,
`cache_leftpad`, and the varlen functions (`flash_attn_varlen_func` and friends), which need
sequence offsets in the kernels. `deterministic` is accepted: every kernel here is
deterministic. `num_splits` is accepted and ignored: the split count is chosen per call
(FLASH_ATTN_EXT_NUM_SPLITS forces it).
"""
from typing import Optional, Tuple

import torch

from .attention import attention
from .kv_cache import attention_with_kvcache

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_with_kvcache"]


def _not_yet(**args) -> None:
    for name, value in args.items():
        if value is not None and value is not False and not (isinstance(value, float) and value == 0.0):
            raise NotImplementedError(f"flash_attn_ext: {name} is not supported yet (got {value!r})")


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D) [, softmax_lse (B, Hq, Sq), None]."""
    _not_yet(softcap=float(softcap), alibi_slopes=alibi_slopes)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attn_func: {name} must be (batch, seqlen, heads, head_dim), got shape "
                             f"{tuple(t.shape)}")
    out, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                         window_size=tuple(window_size), scale=softmax_scale, dropout_p=dropout_p,
                         alignment="bottom_right", return_lse=True)
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False):
    """qkv (B, S, 3, H, D): self-attention with Q, K and V packed (views, no copy)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attn_qkvpacked_func: qkv must be (batch, seqlen, 3, heads, head_dim), got shape "
                         f"{tuple(qkv.shape)}")
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D): K and V packed (views, no copy)."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"flash_attn_kvpacked_func: kv must be (batch, seqlen, 2, kv_heads, head_dim), got shape "
                         f"{tuple(kv.shape)}")
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                            rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                            cache_seqlens=None, cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[torch.Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """Decode / chunked prefill against a KV cache, appending k/v in place first (flash-attn's
    semantics: cache (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D) with
    block_table; cache_seqlens the lengths before the append)."""
    _not_yet(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
             cache_leftpad=cache_leftpad, softcap=float(softcap), alibi_slopes=alibi_slopes)
    with torch.no_grad():  # forward-only, as in flash-attn: the result has no autograd history
        return attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                      softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                                      return_softmax_lse=return_softmax_lse, block_table=block_table)
