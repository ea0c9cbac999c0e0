"""flash-attn's cache addressing arguments on top of the attention_kvcache op: rotary embedding
of the new tokens, cache_batch_idx and cache_leftpad.

cache_batch_idx and cache_leftpad need no kernel of their own: both only change which cache row
holds position j of sequence b, which is what a block table says. So the cache is handed to the
op as a paged cache over the same storage (a view, never a copy, so the append still writes
into the caller's cache):
  - cache_batch_idx alone: each sequence's whole cache row is one block (block_size = max_len),
    block_table[b, 0] = cache_batch_idx[b];
  - cache_leftpad: blocks of one position (block_size = 1), block_table[b, j] = the row of
    position cache_leftpad[b] + j, and the op sees cache_seqlens - cache_leftpad keys before the
    append. The table costs 4 bytes per position per call (K/V cost 2 * heads * head_dim
    elements per position), built on the device without a host copy.
"""

from typing import Tuple

import torch

from . import config
from .rotary import _check_tables, rotate_at

_FN = "flash_attn_ext.attention_with_kvcache"


def _host_checks(device: torch.device) -> bool:
    """Whether values may be read on the host here: always on the CPU; on CUDA unless a graph is
    being captured or device checks are required (then the op's device checks report them)."""
    if device.type != "cuda":
        return True
    return not torch.cuda.is_current_stream_capturing() and config.get_kernel_config().cuda_device_checks != "require"


def rotate(qb, kb, cos, sin, seqlens, interleaved: bool, per_position: bool, capacity: int):
    """qb (B, Hq, L, D) and kb (B, Hkv, L_new, D) or None rotated at the cache positions: new key
    t of sequence b at seqlens[b] + t; query i at seqlens[b] + i when per_position (causal or a
    window), else at seqlens[b] (flash-attn's rule)."""
    if cos is None or sin is None:
        raise ValueError(f"{_FN}: pass both rotary_cos and rotary_sin, or neither")
    _check_tables(_FN + " (rotary_cos / rotary_sin)", qb, cos, sin)
    if cos.shape[0] < capacity:
        raise ValueError(
            f"{_FN}: rotary_cos / rotary_sin have {cos.shape[0]} rows, fewer than the cache's {capacity} positions "
            "per sequence"
        )
    last = cos.shape[0] - 1
    # Clamped so the table lookup never reads out of bounds: a length that does not fit the cache
    # is reported by the op before anything is written.
    base = seqlens.to(torch.int64).unsqueeze(1)
    L = qb.shape[2]
    q_pos = (base + torch.arange(L, device=qb.device) if per_position else base.expand(-1, L)).clamp(0, last)
    qb = rotate_at(qb.transpose(1, 2), cos, sin, q_pos, interleaved).transpose(1, 2)
    if kb is not None:
        k_pos = (base + torch.arange(kb.shape[2], device=kb.device)).clamp(0, last)
        kb = rotate_at(kb.transpose(1, 2), cos, sin, k_pos, interleaved).transpose(1, 2)
    return qb, kb


def _check_index(name: str, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_FN}: {name} must be int32 (or int64), got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{_FN}: {name} must have shape ({batch},) (one entry per sequence), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{_FN}: {name} is on {t.device}, the cache on {device}")
    return t.to(torch.int64)


def _position_view(cache: torch.Tensor, name: str) -> Tuple[torch.Tensor, int]:
    """cache (N, H, S, D) as (M, H, 1, D): row n * unit + s of the view is position s of block
    n (unit = stride(0) / stride(2)); a view of the same storage."""
    N, H, S, D = cache.shape
    sb, sh, ss, sd = cache.stride()
    if ss <= 0 or sb % ss != 0 or (N > 1 and sb < S * ss):
        raise ValueError(
            f"{_FN}: cache_leftpad addresses {name} by position, which needs its batch (or block) stride to be a "
            f"multiple of its position stride, got strides {cache.stride()}"
        )
    unit = sb // ss
    rows = (N - 1) * unit + S if N > 0 else 0
    if rows > 2**31 - 1:
        raise ValueError(f"{_FN}: cache_leftpad: {name} has more positions ({rows}) than an int32 block table holds")
    return cache.as_strided((rows, H, 1, D), (ss, sh, ss, sd), cache.storage_offset()), unit


def remap(kc, vc, block_table, seqlens, batch_idx, leftpad, L_new: int, k_scale=None, v_scale=None):
    """(k_cache, v_cache, block_table, cache_seqlens, k_scale, v_scale) for the op that address
    what cache_batch_idx / cache_leftpad say; the caches (and a quantized cache's scales, (N, H,
    S)) are views of the caller's."""
    B, device = seqlens.shape[0], kc.device
    paged = block_table is not None
    rows = block_table.shape[0] if paged else kc.shape[0]
    capacity = kc.shape[2] * (block_table.shape[1] if paged else 1)
    idx = None if batch_idx is None else _check_index("cache_batch_idx", batch_idx, B, device)
    pad = None if leftpad is None else _check_index("cache_leftpad", leftpad, B, device)
    if _host_checks(device):  # (on CUDA one device -> host copy, as the op's own host checks)
        if idx is not None and B and not (0 <= int(idx.min()) and int(idx.max()) < rows):
            raise ValueError(
                f"{_FN}: cache_batch_idx entries must be in [0, {rows}) (the {'block_table' if paged else 'cache'}'s "
                f"rows), got {batch_idx.tolist()}"
            )
        if pad is not None and B:
            lens = seqlens.to(torch.int64).cpu()
            p = pad.cpu()
            for b in range(B):
                if not 0 <= p[b] <= lens[b]:
                    raise ValueError(
                        f"{_FN}: cache_leftpad[{b}] = {int(p[b])} must be in [0, cache_seqlens[{b}] = {int(lens[b])}]"
                    )
                if lens[b] + L_new > capacity:
                    raise ValueError(
                        f"{_FN}: cache_seqlens[{b}] = {int(lens[b])} with {L_new} new positions does not fit the "
                        f"cache ({capacity} positions per sequence); nothing was written"
                    )
    if paged and idx is not None:
        block_table = block_table.index_select(0, idx.to(block_table.device))
    if pad is None:
        if not paged:  # whole cache rows as blocks: block_size = max_len
            block_table = idx.to(torch.int32).unsqueeze(1)
        return kc, vc, block_table, seqlens, k_scale, v_scale
    kv, unit = _position_view(kc, "k_cache")
    vv, unit_v = _position_view(vc, "v_cache")
    if unit != unit_v:
        raise ValueError(
            f"{_FN}: cache_leftpad needs k_cache and v_cache laid out alike (strides {kc.stride()} and {vc.stride()})"
        )
    if k_scale is not None:  # the scales viewed by position as their cache is
        scale_views = []
        for name, t in (("k_cache_scale", k_scale), ("v_cache_scale", v_scale)):
            view, unit_s = _position_view(t.unsqueeze(-1), name)
            if unit_s != unit:
                raise ValueError(
                    f"{_FN}: cache_leftpad needs {name} laid out like its cache (batch stride / position stride "
                    f"{unit_s}, the cache's {unit})"
                )
            scale_views.append(view.squeeze(-1))
        k_scale, v_scale = scale_views
    pos = pad.unsqueeze(1) + torch.arange(capacity, device=device)  # (B, capacity): cache position of key j
    # (-1 also where a pad is out of range and the host checks are skipped: the op's device
    # checks then report the sequence instead of reading another one's rows)
    inside = (pos >= 0) & (pos < capacity)
    pos = pos.clamp(0, max(capacity - 1, 0))
    if paged:
        bs = kc.shape[2]
        table = block_table.to(torch.int64).gather(1, pos // bs) * unit + pos % bs
    else:
        base = torch.arange(B, device=device) if idx is None else idx
        table = base.unsqueeze(1) * unit + pos
    table = torch.where(inside, table, torch.full_like(table, -1)).to(torch.int32)  # -1: no position
    return kv, vv, table, (seqlens.to(torch.int64) - pad).to(seqlens.dtype), k_scale, v_scale
