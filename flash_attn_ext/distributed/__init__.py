"""flash_attn_ext.distributed: context parallelism, attention over a sequence sharded over the
ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPUs).

    from flash_attn_ext.distributed import ring_attention, zigzag_shard, zigzag_unshard
    q, k, v = (zigzag_shard(t, dim=2) for t in (q_full, k_full, v_full))   # this rank's shards
    out = ring_attention(q, k, v, causal=True)                              # this rank's output
    out_full = zigzag_unshard(out, dim=2)

Shards are in the zigzag layout (zigzag_shard): of 2W equal chunks of the sequence, rank r holds
chunks r and 2W - 1 - r, which balances causal work. Both ops compute exactly attention() of the
full sequences (bottom-right aligned, as attention()'s default) and are differentiable in q, k, v
and in the returned lse. Shapes and options are compared across ranks first: a call wrong on
one rank raises the same ValueError on every rank.
"""

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..attention import attention, normalize_window
from . import _checks
from ._layout import zigzag_positions, zigzag_shard, zigzag_unshard
from ._ring import RingAttention
from ._ulysses import AllToAll, zigzag_order

__all__ = ["ring_attention", "ulysses_attention", "zigzag_shard", "zigzag_unshard", "zigzag_positions"]


def _options(q, causal, window_size, scale, softcap):
    left, right = normalize_window(window_size, causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] else 1.0
    return left, right, float(scale), float(softcap)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    scale: Optional[float] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    _communicate: bool = True,
):
    """Ring attention over `group`. q (B, Hq, L/W, D), k (B, Hkv, S/W, D), v (B, Hkv, S/W, Dv):
    this rank's zigzag shards (GQA / MQA K/V travel unexpanded). Returns this rank's output shard
    (B, Hq, L/W, Dv) and, with return_lse, its float32 lse (B, Hq, L/W).

    W - 1 K/V transfers (batch_isend_irecv, each posted before the block in hand is computed);
    blocks the causal / window band cannot see are skipped; partial outputs are merged in
    float32. The backward sends the dK/dV accumulators around the ring once more. No dropout,
    attn_mask or ALiBi (use attention() on one device for those)."""
    fn = "flash_attn_ext.distributed.ring_attention"
    _checks.rank_and_world(fn, group)
    left, right, scale, softcap = _options(q, causal, window_size, scale, softcap)
    error = None if math.isfinite(softcap) and softcap >= 0 else f"softcap must be finite and >= 0, got {softcap}"
    _checks.check_shards(fn, group, q, k, v, (left, right), scale, softcap, error)
    out, lse = RingAttention.apply(q, k, v, group, scale, left, right, softcap, _communicate)
    return (out, lse) if return_lse else out


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    scale: Optional[float] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Ulysses attention over `group`, the shapes and result of ring_attention: all-to-all from
    sequence to head sharding (each rank gets Hq / W query heads of the whole sequence), one
    fused attention() call, all-to-all back. Hq must divide by W; Hkv too, or W by Hkv, in which
    case each K/V head is repeated W / Hkv times, no more (MQA / GQA with few K/V heads).
    Moves 2 (Q, out) + 2 x Hkv'/Hq (K, V) of the activations once, where ring_attention moves
    K/V W - 1 times; needs heads to share, which ring_attention does not."""
    fn = "flash_attn_ext.distributed.ulysses_attention"
    _, world = _checks.rank_and_world(fn, group)
    left, right, scale, softcap = _options(q, causal, window_size, scale, softcap)
    error = None
    if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k)):
        hq, hkv = q.shape[1], k.shape[1]
        if hq % world or not (hkv and (hkv % world == 0 or world % hkv == 0)):
            error = (
                f"ulysses_attention shards heads: query heads ({hq}) must divide by the world size ({world}), "
                f"and key/value heads ({hkv}) too, or divide it"
            )
    _checks.check_shards(fn, group, q, k, v, (left, right), scale, softcap, error)
    if world == 1:
        out, lse = attention(
            q, k, v, window_size=(left, right), scale=scale, softcap=softcap, return_lse=True
        )  # fmt: skip
        return (out, lse) if return_lse else out
    if k.shape[1] < world:  # each rank needs one K/V head: repeat to W heads, no further
        k = k.repeat_interleave(world // k.shape[1], dim=1)
        v = v.repeat_interleave(world // v.shape[1], dim=1)
    order = zigzag_order(world, q.shape[2] // 2, q.device)
    order_k = order if k.shape[2] == q.shape[2] else zigzag_order(world, k.shape[2] // 2, q.device)
    qh, kh, vh = (AllToAll.apply(t, True, group, world) for t in (q, k, v))
    qh, kh, vh = qh.index_select(2, order), kh.index_select(2, order_k), vh.index_select(2, order_k)
    out, lse = attention(qh, kh, vh, window_size=(left, right), scale=scale, softcap=softcap, return_lse=True)
    back = torch.argsort(order)
    out = AllToAll.apply(out.index_select(2, back), False, group, world)
    lse = AllToAll.apply(lse.index_select(2, back), False, group, world)
    return (out, lse) if return_lse else out
