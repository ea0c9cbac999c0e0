"""flash_attn_ext.attention: the package's own entry point to the fused kernels."""

import math
import operator
from typing import Optional, Tuple, Union

import torch

from . import _ops
from .relative_bias import RelativeBias

Window = Tuple[int, int]
_MAX_WINDOW = 2**63 - 1


def _contiguous_last_dim(t: torch.Tensor) -> torch.Tensor:
    # The kernels read every other dimension through its stride.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def normalize_window(window_size, causal: bool) -> Window:
    """(left, right) with -1 = unbounded; causal forces right = 0."""
    if window_size is None:
        window_size = (-1, -1)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    try:  # ints (Python, NumPy or 0-d integer tensors), never a silently truncated float
        left, right = (operator.index(w) for w in window_size)
    except TypeError:
        raise TypeError(f"window_size entries must be integers, got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    if max(left, right) > _MAX_WINDOW:  # any window past the sequence is unbounded anyway
        raise ValueError(f"window_size entries must be at most {_MAX_WINDOW} (int64), got {window_size!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool = False,
    window_size: Window = (-1, -1),
    scale: Optional[float] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    alignment: str = "bottom_right",
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    relative_bias: Union[RelativeBias, torch.Tensor, None] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused exact attention, layout (batch, heads, len, head_dim) like SDPA.

    query (B, Hq, L, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv), Hq a multiple of Hkv
    (MHA, GQA, MQA; K/V heads are shared, never copied). Key j is visible to query i iff
    i + o - left <= j <= i + o + right, with o = S - L for alignment="bottom_right"
    (flash-attn's causal: the last query sees the last key) or o = 0 for "top_left" (SDPA's
    is_causal). causal=True is right = 0. attn_mask (bool: True = attend; float: added to the
    scores) broadcasts to (B, Hq, L, S). Rows that see no key return zeros (lse = -inf).
    Dropout (dropout_p > 0) uses PyTorch's generator. softcap > 0 soft-caps the scaled scores,
    s -> softcap * tanh(s / softcap), before the mask (Gemma-2, flash-attn's softcap).
    alibi_slopes (float32, (Hq,) or (B, Hq)) adds -slope * |i + o - j| to score (i, j) (ALiBi,
    as flash-attn's alibi_slopes). sinks (float32, (Hq,)):
    learned attention sinks (gpt-oss): one logit per query head joins every row's softmax
    denominator and adds nothing to the output, out_i = sum_j e^(s_ij) v_j / (e^(sink) +
    sum_j e^(s_ij)); the lse includes it, and sinks gets a gradient. relative_bias: a bias that
    depends on the distance j - i only, computed in the kernels (nothing of size L x S, forward
    or backward; CPU kernels): a RelativeBias (T5's bucketed table, score (h, i, j) gains
    table[bucket(j - (i + o)), h], the table trainable), or a (Hq, L + S - 1) float tensor whose
    column j - i + L - 1 holds each head's bias. Returns out (B, Hq, L, Dv)
    and, with return_lse, the float32 log-sum-exp (B, Hq, L). Differentiable in query, key,
    value and sinks, and on CPU in a float attn_mask (its gradient summed over the dims it
    broadcasts along) and alibi_slopes (trainable biases: T5-style tables, pair biases, learned
    ALiBi); on other devices a mask or slopes that require grad raise NotImplementedError.
    """
    _ops.check_tensors(
        "flash_attn_ext.attention",
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        optional=("attn_mask", "alibi_slopes", "sinks"),
    )
    if alignment not in ("bottom_right", "top_left"):
        raise ValueError(f"alignment must be 'bottom_right' or 'top_left', got {alignment!r}")
    if isinstance(relative_bias, RelativeBias):
        L, S = query.shape[-2], key.shape[-2]
        offset = S - L if alignment == "bottom_right" else 0
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        relative_bias = relative_bias.per_distance(L, S, offset, dtype)
    elif relative_bias is not None and not isinstance(relative_bias, torch.Tensor):
        raise TypeError(
            f"flash_attn_ext.attention: relative_bias must be a RelativeBias or a torch.Tensor, got "
            f"{type(relative_bias).__name__}"
        )
    if relative_bias is not None:
        relative_bias = _contiguous_last_dim(relative_bias)
    left, right = normalize_window(window_size, causal)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    if attn_mask is not None:
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must have at most 4 dims, got shape {tuple(attn_mask.shape)}")
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
    out, lse, _ = _ops.attention_forward(
        _contiguous_last_dim(query),
        _contiguous_last_dim(key),
        _contiguous_last_dim(value),
        attn_mask,
        float(dropout_p),
        float(scale),
        left,
        right,
        alignment == "bottom_right",
        float(softcap),
        alibi_slopes,
        sinks,
        relative_bias,
    )
    return (out, lse) if return_lse else out


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine two attention results over disjoint key sets (split-KV decoding, ring /
    context-parallel attention). out_x (..., D) with its log-sum-exp lse_x (...), as returned
    by attention(..., return_lse=True). Returns (out, lse) of the attention over the union;
    a side with lse = -inf (no visible key) contributes nothing. Differentiable."""
    _ops.check_tensors("flash_attn_ext.merge_attention_states", out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    _ops.require_kernel(out_a.device.type)
    return torch.ops.flash_attn_ext.merge_attention_states(out_a, lse_a, out_b, lse_b)
