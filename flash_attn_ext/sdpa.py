"""Drop-in for torch.nn.functional.scaled_dot_product_attention.

Same signature, results and errors; keyword-only window_size=(left, right) extends it
(top-left aligned, like is_causal). Calls the fused kernels can serve go to them; every other
call goes to PyTorch's SDPA, counted and logged (see _fallback.py), never to a wrong answer.
"""

import contextlib
import math
from typing import Optional

import torch

from . import _ops
from ._fallback import record_fallback, torch_sdpa
from .attention import _contiguous_last_dim, normalize_window

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_MAX_HEAD_DIM = 256  # csrc/cuda/cuda_rows.cuh: 32 lanes x 8 features


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> Optional[str]:
    """Why the fused kernels cannot serve this call (None if they can). Anything PyTorch
    would reject is 'unsupported' too, so PyTorch raises its own error."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.is_nested or t.layout != torch.strided:
            return f"{name} is nested or not strided"
    if not _ops.has_kernel(query.device.type):
        return _ops.no_kernel_reason(query.device.type)
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtypes"
    if key.device != query.device or value.device != query.device:
        return "devices differ"
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        return "ranks"
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-1] != value.shape[:-1]:
        return "batch dims differ (broadcasting)"
    if query.shape[-1] != key.shape[-1]:
        return "head dims differ"
    if query.device.type == "cuda" and max(query.shape[-1], value.shape[-1]) > _CUDA_MAX_HEAD_DIM:
        return f"head dim > {_CUDA_MAX_HEAD_DIM} on CUDA"
    if query.dim() >= 3:
        hq, hkv = query.shape[-3], key.shape[-3]
        if hq != hkv and not (enable_gqa and hkv > 0 and hq % hkv == 0):
            return "head counts differ"
    if not (0.0 <= dropout_p < 1.0):
        return "dropout_p outside [0, 1)"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask with is_causal"
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.is_nested:
            return "attn_mask is not a strided tensor"
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return "attn_mask dtype"
        if attn_mask.requires_grad and torch.is_grad_enabled() and query.device.type != "cpu":
            return "attn_mask requires grad (its gradient: CPU kernels only)"
        if attn_mask.device != query.device or not 2 <= attn_mask.dim() <= query.dim():
            return "attn_mask device or rank"
        scores_shape = query.shape[:-1] + key.shape[-2:-1]
        try:  # must broadcast to the scores' shape without enlarging it
            if torch.broadcast_shapes(attn_mask.shape, scores_shape) != scores_shape:
                return "attn_mask shape"
        except RuntimeError:
            return "attn_mask shape"
    return None


def _reject_unsafe(query, key, value) -> None:
    """Raise for calls that PyTorch's own SDPA cannot serve safely, so they never reach it: key
    and value of different lengths (its CPU flash kernel accepts them and reads past the end of
    value; its math path raises this error, which is the one raised here)."""
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (query, key, value)):
        return
    if any(t.is_nested or t.layout != torch.strided for t in (query, key, value)):
        return  # (nested lengths are symbolic: PyTorch's own SDPA judges those)
    if key.shape[-2] != value.shape[-2]:
        n = math.prod(query.shape[:-2])
        raise RuntimeError(
            f"Expected size for first two dimensions of batch2 tensor to be: [{n}, {key.shape[-2]}] but got: "
            f"[{n}, {value.shape[-2]}]. (flash_attn_ext.scaled_dot_product_attention: key has {key.shape[-2]} "
            f"positions, value {value.shape[-2]})"
        )


def _window_mask(len_q, len_k, left, right, device):
    i = torch.arange(len_q, device=device).unsqueeze(-1)
    j = torch.arange(len_k, device=device)
    visible = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def _diagnose(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> Optional[str]:
    """Which argument makes PyTorch refuse the call, in words (None when nothing here explains
    it): PyTorch's own messages for these are matmul or broadcast errors that name no argument.
    Only what PyTorch itself refuses is named (it broadcasts one K/V head, batch dims and float
    masks of another float dtype), the mask first, so the hint never blames an argument PyTorch
    accepted."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return None
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p <= 1.0):
        return f"dropout_p must be in [0, 1], got {dropout_p!r}"
    if not (query.dtype == key.dtype == value.dtype):
        return f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
    if not (query.device == key.device == value.device):
        return f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        return f"query, key and value must have the same rank (>= 2), got {query.dim()}, {key.dim()}, {value.dim()}"
    if attn_mask is not None and isinstance(attn_mask, torch.Tensor):
        if is_causal:
            return "pass attn_mask or is_causal=True, not both"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask must be bool or floating point, got {attn_mask.dtype}"
        scores = (*query.shape[:-1], key.shape[-2])
        try:
            torch.broadcast_shapes(attn_mask.shape, scores)
        except RuntimeError:
            return (
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention scores' shape "
                f"{scores} (query's (..., heads, L) and key's length S)"
            )
    if query.shape[-1] != key.shape[-1]:
        return f"query's head dim ({query.shape[-1]}) must equal key's ({key.shape[-1]})"
    if query.dim() >= 3:
        hq, hk = query.shape[-3], key.shape[-3]
        if hq != hk and hk != 1 and not enable_gqa:
            return f"query has {hq} heads and key/value {hk}: pass enable_gqa=True for grouped-query attention"
        if hq != hk and enable_gqa and (hk == 0 or hq % hk):
            return f"with enable_gqa, query's heads ({hq}) must be a multiple of key/value's heads ({hk})"
        try:
            torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        except RuntimeError:
            return (
                f"query, key and value's batch dims {tuple(query.shape[:-3])}, {tuple(key.shape[:-3])}, "
                f"{tuple(value.shape[:-3])} do not broadcast"
            )
    return None


def _explained(error: Exception, hint: str) -> Exception:
    """error's class (so callers' except clauses still match) with the hint in front."""
    try:
        return type(error)(f"flash_attn_ext.scaled_dot_product_attention: {hint} (PyTorch: {error})")
    except Exception:  # a class that does not take one message
        return error


def _fallback(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window):
    try:
        out = _run_torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window)
    except Exception as e:  # (PyTorch refused the call: not a fallback, and not counted as one)
        hint = _diagnose(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        if hint is None:
            raise
        raise _explained(e, hint) from e
    record_fallback(reason)
    return out


def _run_torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window):
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    if (
        window is not None
        and window != (-1, -1)
        and isinstance(query, torch.Tensor)
        and not (is_causal and attn_mask is not None)
    ):  # that combination: PyTorch's error
        # PyTorch has no window: the equivalent explicit mask (L x S, on the fallback only).
        left, right = normalize_window(window, is_causal)
        visible = _window_mask(query.shape[-2], key.shape[-2], left, right, query.device)
        if attn_mask is None:
            attn_mask = visible
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & visible
        else:
            attn_mask = attn_mask.masked_fill(~visible, float("-inf"))
        is_causal = False
    return torch_sdpa(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
    )


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, window_size=None
):
    """torch.nn.functional.scaled_dot_product_attention, served by flash_attn_ext's fused
    kernels. Layout (..., H, L, D). window_size=(left, right), keyword-only: key j visible to
    query i iff i - left <= j <= i + right (-1 = unbounded); is_causal sets right = 0.
    Rows with no visible key give zeros (PyTorch's math path gives NaN there)."""
    _reject_unsafe(query, key, value)
    reason = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        return _fallback(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size)
    left, right = normalize_window(window_size, is_causal)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0

    # Collapse (..., H, L, D) to the kernels' (B, H, L, D); views for up to 4 dims.
    def as4d(t):
        if t.dim() == 2:
            return t.unsqueeze(0).unsqueeze(0)
        if t.dim() == 3:
            return t.unsqueeze(0)
        return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t

    q4, k4, v4 = as4d(query), as4d(key), as4d(value)
    mask4 = None
    if attn_mask is not None:
        mask4 = attn_mask
        while mask4.dim() < query.dim():
            mask4 = mask4.unsqueeze(0)
        if query.dim() > 4:
            expanded = mask4.expand(*query.shape[:-1], key.shape[-2])
            mask4 = expanded.reshape(-1, *expanded.shape[-3:])
        else:
            mask4 = as4d(mask4)
    out, _, _ = _ops.attention_forward(
        _contiguous_last_dim(q4),
        _contiguous_last_dim(k4),
        _contiguous_last_dim(v4),
        mask4,
        float(dropout_p),
        float(scale),
        left,
        right,
        False,
    )
    return out.reshape(*query.shape[:-1], value.shape[-1])


def patch_sdpa() -> None:
    """Makes torch.nn.functional.scaled_dot_product_attention this package's drop-in, so code
    that calls it (stock nn.MultiheadAttention / TransformerEncoderLayer paths, most model
    code) runs on these kernels; what they do not serve still falls back to PyTorch's own
    (counted, see fallback_counts). Undo with unpatch_sdpa()."""
    torch.nn.functional.scaled_dot_product_attention = scaled_dot_product_attention


def unpatch_sdpa() -> None:
    """Restores PyTorch's scaled_dot_product_attention."""
    torch.nn.functional.scaled_dot_product_attention = torch_sdpa


@contextlib.contextmanager
def sdpa_patched():
    """`with flash_attn_ext.sdpa_patched():` patch_sdpa() for the block, then whatever was
    installed before (nesting and an outer patch are kept)."""
    previous = torch.nn.functional.scaled_dot_product_attention
    patch_sdpa()
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = previous
