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

- `flash_attn_with_kvcache` takes `rotary_cos` / `rotary_sin` / `rotary_interleaved`,
  `cache_batch_idx` and `cache_leftpad` as flash-attn does (see
  flash_attn_ext.attention_with_kvcache); `flash_attn_varlen_func(..., block_table=)` attends
  packed queries to a paged cache (k/v (num_blocks, block_size, Hkv, D), cu_seqlens_k the key
  lengths), forward-only as in flash-attn.
- errors: a bad argument raises an exception that is both what the rest of the package raises
  (ValueError / TypeError, naming the argument) and a RuntimeError, which is what flash-attn's
  users catch (`FlashAttnValueError`, `FlashAttnTypeError`).

`deterministic` is accepted: every kernel here is deterministic. `num_splits` is accepted and
ignored: the split count is chosen per call (FLASH_ATTN_EXT_NUM_SPLITS forces it).
"""

import functools
import math
from typing import Optional, Tuple

import torch

from . import _ops
from .attention import _contiguous_last_dim, attention, normalize_window
from .kv_cache import attention_with_kvcache

__all__ = [
    "FlashAttnTypeError",
    "FlashAttnValueError",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
]


class FlashAttnValueError(ValueError, RuntimeError):
    """A bad argument value: a ValueError, as everywhere in the package, and a RuntimeError,
    as flash-attn raises it (its users write `except RuntimeError`)."""


class FlashAttnTypeError(TypeError, RuntimeError):
    """A bad argument type (a tensor of the wrong dtype, a non-tensor): TypeError and RuntimeError."""


def _flash_attn_errors(fn):
    """Re-raise ValueError / TypeError from fn as the classes above (same message, same traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FlashAttnValueError, FlashAttnTypeError):
            raise
        except ValueError as e:
            raise FlashAttnValueError(*e.args).with_traceback(e.__traceback__) from None
        except TypeError as e:
            raise FlashAttnTypeError(*e.args).with_traceback(e.__traceback__) from None

    return wrapper


@_flash_attn_errors
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
    sinks: Optional[torch.Tensor] = None,
    *,
    s_aux: Optional[torch.Tensor] = None,
):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D) [, softmax_lse (B, Hq, Sq), None].
    sinks ((Hq,); s_aux is an alias): learned attention sinks (gpt-oss), differentiable."""
    sinks = _sinks_of(sinks, s_aux)
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
        sinks=sinks,
        return_lse=True,
    )
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


@_flash_attn_errors
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
    sinks: Optional[torch.Tensor] = None,
    *,
    s_aux: Optional[torch.Tensor] = None,
):
    """Packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence b is rows
    [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k/v
    (int32, (batch + 1,)). causal aligns each sequence's mask to its bottom right.
    -> out (total_q, Hq, D) [, softmax_lse (Hq, total_q), None]."""
    sinks = _sinks_of(sinks, s_aux)
    if block_table is not None:
        return _varlen_paged(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            block_table,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            return_attn_probs,
            sinks,
        )
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
        sinks,
    )
    return (out, lse, None) if return_attn_probs else out


def _sinks_of(sinks: Optional[torch.Tensor], s_aux: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """sinks, or its alias s_aux (vLLM's flash-attn and transformers' name, which transformers
    passes in the model's dtype): as the kernels take it, float32 (or float64)."""
    if sinks is not None and s_aux is not None:
        raise ValueError("pass sinks or s_aux (its alias), not both")
    sinks = s_aux if sinks is None else sinks
    if isinstance(sinks, torch.Tensor) and sinks.dtype in (torch.float16, torch.bfloat16):
        sinks = sinks.float()  # differentiable: the gradient reaches the half-precision parameter
    return sinks


def _host_lengths(name: str, cu: torch.Tensor, total: Optional[int]) -> torch.Tensor:
    """The lengths a cu_seqlens tensor gives (int64, on the host), after checking it."""
    fn = "flash_attn_varlen_func"
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise TypeError(f"{fn}: {name} must be a 1-D int32 tensor (batch + 1 offsets), got {cu!r:.80}")
    c = cu.to(torch.int64).cpu()
    lens = c[1:] - c[:-1]
    if int(c[0]) != 0 or (lens.numel() and int(lens.min()) < 0):
        raise ValueError(f"{fn}: {name} must start at 0 and never decrease, got {c.tolist()}")
    if total is not None and int(c[-1]) != total:
        raise ValueError(f"{fn}: {name} ends at {int(c[-1])} but q has {total} rows")
    return lens


class _PagedVarlenNoBackward(torch.autograd.Function):
    """Connects _varlen_paged's out and lse (computed without autograd) to the inputs that
    require grad, so that a backward through them raises instead of leaving those inputs
    without a gradient. forward(out, lse, *inputs) returns out and lse (the same storage; detached
    so that they are outputs of their own, which in-place operations may modify, not views)."""

    @staticmethod
    def forward(ctx, out, lse, *inputs):
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "flash_attn_varlen_func: no backward with block_table: the paged path is forward-only, as in "
            "flash-attn; for gradients pass packed k/v (total_k, Hkv, D) without block_table, or call it "
            "under torch.no_grad() / torch.inference_mode()"
        )


def _varlen_paged(
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    block_table,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    return_attn_probs,
    sinks=None,
):
    """flash_attn_varlen_func against a paged cache: sequence b's keys are positions
    [0, cu_seqlens_k[b + 1] - cu_seqlens_k[b]) of the blocks block_table[b] names. Served by the
    KV-cache op: the packed queries are scattered into a (batch, max_seqlen_q) buffer, each
    sequence's rows at the end so that bottom-right alignment holds per sequence, and gathered
    back; the padding rows are computed and dropped (work grows by batch * max_seqlen_q /
    total_q).

    Forward-only, as in flash-attn: the forward is always computed (under torch.no_grad(), on
    detached inputs). When grad mode is on and q, k_cache, v_cache, sinks or alibi_slopes
    require grad, out (and lse) are connected to them through a node whose backward raises
    NotImplementedError, so a backward fails loudly instead of leaving them without a gradient;
    otherwise out and lse carry no autograd history. dropout_p must be 0."""
    fn = "flash_attn_varlen_func"
    _ops.check_tensors(fn, q=q, k=k_cache, v=v_cache, block_table=block_table)
    if q.dim() != 3:
        raise ValueError(f"{fn}: q must be (total_tokens, heads, head_dim), got shape {tuple(q.shape)}")
    for name, t in (("k", k_cache), ("v", v_cache)):
        if t.dim() != 4:
            raise ValueError(
                f"{fn}: with block_table, {name} must be a paged cache (num_blocks, block_size, kv_heads, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
    if dropout_p != 0.0:
        raise ValueError(
            f"{fn}: dropout_p must be 0 with block_table (the paged path is forward-only), got {dropout_p!r}"
        )
    needs_grad = [
        t for t in (q, k_cache, v_cache, sinks, alibi_slopes) if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    needs_grad = needs_grad if torch.is_grad_enabled() else []
    q, k_cache, v_cache = q.detach(), k_cache.detach(), v_cache.detach()
    sinks = sinks.detach() if isinstance(sinks, torch.Tensor) else sinks
    alibi_slopes = alibi_slopes.detach() if isinstance(alibi_slopes, torch.Tensor) else alibi_slopes
    with torch.no_grad():
        lens_q = _host_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        lens_k = _host_lengths("cu_seqlens_k", cu_seqlens_k, None)
        if lens_k.numel() != lens_q.numel():
            raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1)")
        B, L = lens_q.numel(), int(max_seqlen_q)
        if B and int(lens_q.max()) > L:
            raise ValueError(
                f"{fn}: max_seqlen_q = {L} is shorter than the longest query sequence ({int(lens_q.max())})"
            )
        dev = q.device
        lens_q_d = lens_q.to(dev)
        starts = cu_seqlens_q.to(torch.int64)
        rows = torch.arange(q.shape[0], device=dev)
        seq = torch.searchsorted(starts[1:], rows, right=True)  # the sequence of each packed row
        dest = seq * L + (L - lens_q_d[seq]) + (rows - starts[seq])  # right-aligned in its sequence's slot
        padded = q.new_zeros(B * L, *q.shape[1:])
        padded[dest] = q
        out, lse = attention_with_kvcache(
            padded.view(B, L, *q.shape[1:]),
            k_cache,
            v_cache,
            cache_seqlens=lens_k.to(device=dev, dtype=torch.int32),
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=tuple(window_size),
            return_softmax_lse=True,
            block_table=block_table,
            softcap=float(softcap),
            alibi_slopes=alibi_slopes,
            sinks=sinks,
        )
        out = out.reshape(B * L, *out.shape[2:])[dest]
        lse = lse.permute(1, 0, 2).reshape(lse.shape[1], B * L)[:, dest]  # (Hq, total_q), as flash-attn
    if needs_grad:
        out, lse = _PagedVarlenNoBackward.apply(out, lse, *needs_grad)
    return (out, lse, None) if return_attn_probs else out


@_flash_attn_errors
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
    sinks: Optional[torch.Tensor] = None,
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
        sinks=sinks,
    )


@_flash_attn_errors
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
    sinks: Optional[torch.Tensor] = None,
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
        sinks=sinks,
    )


@_flash_attn_errors
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
    sinks: Optional[torch.Tensor] = None,
):
    """qkv (B, S, 3, H, D): self-attention with Q, K and V packed (views, no copy)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"flash_attn_qkvpacked_func: qkv must be (batch, seqlen, 3, heads, head_dim), got shape {tuple(qkv.shape)}"
        )
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        sinks=sinks,
    )


@_flash_attn_errors
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
    sinks: Optional[torch.Tensor] = None,
):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D): K and V packed (views, no copy)."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(
            f"flash_attn_kvpacked_func: kv must be (batch, seqlen, 2, kv_heads, head_dim), got shape {tuple(kv.shape)}"
        )
    k, v = kv.unbind(dim=2)
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        sinks=sinks,
    )


@_flash_attn_errors
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
    sinks: Optional[torch.Tensor] = None,
    *,
    s_aux: Optional[torch.Tensor] = None,
    k_cache_scale: Optional[torch.Tensor] = None,
    v_cache_scale: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
):
    """Decode / chunked prefill against a KV cache, appending k/v in place first (flash-attn's
    semantics: cache (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D) with
    block_table; cache_seqlens the lengths before the append). An int8 / float8_e4m3fn cache
    takes its per-(position, head) scales as k_cache_scale / v_cache_scale (this package's
    arguments, see attention_with_kvcache). flash-attn 3's q_descale / k_descale / v_descale
    (one scale per batch and head for fp8 Q, K and V tensors) mean something else and raise."""
    for name, t in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if t is not None:
            raise ValueError(
                f"flash_attn_with_kvcache: {name} (flash-attn 3's descale of fp8 Q/K/V, one scale per batch and "
                f"head) is not supported; an int8 / fp8 KV cache here has one scale per position and head, passed "
                f"as k_cache_scale / v_cache_scale (see flash_attn_ext.quantize_kv_cache)"
            )
    sinks = _sinks_of(sinks, s_aux)
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
            cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad,
            rotary_cos=rotary_cos,
            rotary_sin=rotary_sin,
            rotary_interleaved=rotary_interleaved,
            sinks=sinks,
            k_cache_scale=k_cache_scale,
            v_cache_scale=v_cache_scale,
        )
