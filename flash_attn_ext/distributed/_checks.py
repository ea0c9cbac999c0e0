"""Agreement across ranks before any transfer: a call that is wrong on one rank raises the same
ValueError on every rank instead of leaving the others waiting in a send that never matches."""

import struct
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def rank_and_world(fn: str, group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: torch.distributed is not initialised (call torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group, like: torch.Tensor) -> torch.device:
    """Where this group's small control tensors live: NCCL moves device tensors only, gloo's
    collectives are complete on CPU ones."""
    return like.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def float_bits(x: float) -> int:
    """A float as the int64 of its bits: compared exactly across ranks."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def agree(fn: str, group, device: torch.device, fields: Dict[str, int], local_error: Optional[str]) -> None:
    """One all_gather of (this rank's error flag, fields); a second one, of the messages, only
    when some rank has an error or the ranks' fields differ. Every rank then raises the same
    ValueError, naming the rank and what is wrong. `fields` must have the same keys everywhere
    (the values of a malformed input are -1)."""
    _, world = rank_and_world(fn, group)
    if world == 1 and local_error is None:
        return
    mine = torch.tensor([0 if local_error is None else 1, *fields.values()], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).cpu()
    bad = rows[:, 0].nonzero().flatten().tolist()
    differ = [n for c, n in enumerate(fields, start=1) if not bool((rows[:, c] == rows[0, c]).all())]
    if not bad and not differ:
        return
    messages = [None] * world
    dist.all_gather_object(messages, local_error, group=group)
    if bad:
        more = f" (ranks with errors: {bad})" if len(bad) > 1 else ""
        raise ValueError(f"{fn}: on rank {bad[0]}: {messages[bad[0]]}{more}")
    c = list(fields).index(differ[0]) + 1
    raise ValueError(
        f"{fn}: the ranks disagree on {', '.join(differ)}: {differ[0]} is {rows[:, c].tolist()} on ranks "
        f"0..{world - 1}; every rank must pass shards of one call"
    )


def check_shards(fn, group, q, k, v, window, scale, softcap, extra_error: Optional[str] = None) -> None:
    """The shared checks of ring_attention and ulysses_attention: on this rank, q (B, Hq, L, D),
    k (B, Hkv, S, D), v (B, Hkv, S, Dv) of one dtype and device, Hq a multiple of Hkv, L and S
    even (two zigzag chunks each); across ranks, the same shapes and options."""
    error = extra_error
    tensors = {"query": q, "key": k, "value": v}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            error = error or f"{name} must be a tensor, got {type(t).__name__}"
        elif t.dim() != 4:
            error = error or f"{name} must be 4-D (batch, heads, len, head_dim), got shape {tuple(t.shape)}"
    ok = error is None
    if ok:
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
            error = f"query, key and value must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        elif not (q.device == k.device == v.device):
            error = f"query, key and value must be on one device, got {q.device}, {k.device}, {v.device}"
        elif q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
            error = f"batch / kv heads differ: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
        elif k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            error = f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        elif k.shape[2] != v.shape[2] or q.shape[3] != k.shape[3]:
            error = f"key {tuple(k.shape)} and value {tuple(v.shape)} do not fit query {tuple(q.shape)}"
        elif q.shape[2] % 2 or k.shape[2] % 2:
            error = (
                f"a zigzag shard holds two equal chunks: query's length ({q.shape[2]}) and key's "
                f"({k.shape[2]}) must be even (see zigzag_shard)"
            )
    shape = lambda t, i: t.shape[i] if ok else -1  # noqa: E731
    fields = {
        "batch": shape(q, 0),
        "query heads": shape(q, 1),
        "kv heads": shape(k, 1),
        "query length": shape(q, 2),
        "key length": shape(k, 2),
        "head dim": shape(q, 3),
        "value head dim": shape(v, 3),
        "dtype": dtype_code(q.dtype) if ok else -1,
        "window_size": window[0] * 2**31 + window[1],
        "scale": float_bits(scale),
        "softcap": float_bits(softcap),
    }
    device = comm_device(group, q if ok else torch.empty(0))
    agree(fn, group, device, fields, error)
