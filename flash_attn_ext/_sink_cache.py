"""StreamingLLM's cache (KVCache(window=W, sink_tokens=n)): the first n positions of every
sequence stay in slots [0, n) for good, the last R = W - n positions roll through slots
[n, W) (position p >= n in slot n + (p - n) % R). A query at position i sees the sink tokens and
its R most recent positions, itself included:

    key j visible to query i  iff  j <= i and (j < n or j > i - R)

which is exactly what a windowed model with sink tokens sees, for a prefill chunk longer than W
too (the chunk attends to the cached keys and its own before it overwrites slots). Served as two
attentions merged exactly by their lse: the window part (a causal window of R over the cached
keys in position order followed by the chunk's) and the sink part (the n sink keys the window
does not already cover, by a boolean mask of n columns).
"""

import torch

from .attention import attention, merge_attention_states, normalize_window


def _slot(pos: torch.Tensor, n: int, ring: int) -> torch.Tensor:
    return torch.where(pos < n, pos, n + (pos - n) % ring)


def _write_quantized(cache, k, v, pos) -> None:
    """write() into an int8 / fp8 cache: kv_cache_append quantizes in its kernel, through a
    block table of one-position blocks that names each new position's slot (slot rows of the
    cache viewed as (B * W, H, 1, D)). Two calls: every new position, then (a chunk longer than
    the ring) its last R positions again, which rewrite every ring slot the first call wrote
    more than once, so the result does not depend on the first call's write order."""
    from ._kvcache_index import _position_view
    from .kv_cache import kv_cache_append

    B, W, H, D = cache.k.shape
    n, ring = cache.sink_tokens, W - cache.sink_tokens
    L_new = k.shape[1]
    rows = (torch.arange(B, device=pos.device).unsqueeze(1) * W + _slot(pos, n, ring)).to(torch.int32)
    views = [_position_view(t.transpose(1, 2), name)[0] for name, t in (("k", cache.k), ("v", cache.v))]
    scales = [
        _position_view(t.transpose(1, 2).unsqueeze(-1), name)[0].squeeze(-1)
        for name, t in (("k_scale", cache.k_scale), ("v_scale", cache.v_scale))
    ]
    for t0 in (0, L_new - ring) if L_new > ring else (0,):
        kv_cache_append(
            views[0],
            views[1],
            k[:, t0:].transpose(1, 2),
            v[:, t0:].transpose(1, 2),
            torch.zeros(B, dtype=torch.int32, device=pos.device),
            layout="bhsd",
            block_table=rows[:, t0:].contiguous(),
            k_cache_scale=scales[0],
            v_cache_scale=scales[1],
        )


def write(cache, k: torch.Tensor, v: torch.Tensor) -> None:
    """Append k, v (B, L_new, Hkv, D) at each sequence's positions; of a chunk longer than the
    ring only what survives is written (each slot once: no write order to depend on)."""
    B, W, H, D = cache.k.shape
    n, ring = cache.sink_tokens, W - cache.sink_tokens
    L_new = k.shape[1]
    if L_new == 0:
        return
    seen = cache.seqlens.to(torch.int64).unsqueeze(1)
    pos = seen + torch.arange(L_new, device=seen.device)  # (B, L_new)
    if cache.quantized:
        _write_quantized(cache, k.detach(), v.detach(), pos)
        return
    survives = (pos < n) | (pos >= seen + L_new - ring)
    rows = (torch.arange(B, device=seen.device).unsqueeze(1) * W + _slot(pos, n, ring))[survives]
    cache.k.view(B * W, H, D).index_copy_(0, rows, k.detach().reshape(B * L_new, H, D)[survives.flatten()])
    cache.v.view(B * W, H, -1).index_copy_(0, rows, v.detach().reshape(B * L_new, H, -1)[survives.flatten()])


def attend(cache, q, k, v, causal, window_size, softmax_scale, return_lse, sinks):
    """KVCache.attend for a cache with sink tokens (the module docstring says what it computes)."""
    B, W, H, D = cache.k.shape
    n, ring = cache.sink_tokens, W - cache.sink_tokens
    left, right = normalize_window(window_size, causal)
    if right != 0 or left not in (-1, ring - 1):
        raise ValueError(
            f"a cache of {W} slots with {n} sink tokens serves causal attention over the sink tokens and the "
            f"last {ring} positions (window_size=({ring - 1}, 0) or (-1, 0)), got causal={causal}, "
            f"window_size={window_size}"
        )
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    L_new = 0 if k is None else k.shape[1]
    if q.shape[1] == 1 and L_new <= 1:
        # Decode: the query sees exactly what the slots hold (after this token's write), and
        # softmax does not care about their order: the slots are read in place.
        if k is not None:
            from .kv_cache import check_step

            check_step(cache, q, k, v, sinks)  # (before the write: a refused call changes nothing)
            write(cache, k, v)
            cache.seqlens += 1
        from .kv_cache import attention_with_kvcache

        return attention_with_kvcache(
            q,
            cache.k,
            cache.v,
            cache_seqlens=torch.clamp(cache.seqlens, max=W).to(torch.int32),
            softmax_scale=softmax_scale,
            causal=False,
            return_softmax_lse=return_lse,
            sinks=sinks,
            **cache._scales(),
        )
    if q.shape[1] > L_new:
        # Queries for cached positions: in the keys' index order the sink tokens sit right
        # before the rolling ones, so an index window would take them for recent positions.
        raise ValueError(
            f"a cache with sink tokens serves one query or queries for the new tokens (L <= L_new), got "
            f"L = {q.shape[1]} queries for {L_new} new tokens"
        )
    seen = cache.seqlens.to(torch.int64)
    kept = torch.clamp(seen, max=W)
    # The cached positions in order, index i < kept: i itself below n, else seen - kept + i.
    idx = torch.arange(W, device=seen.device).unsqueeze(0)
    pos = torch.where(idx < n, idx, seen.unsqueeze(1) - kept.unsqueeze(1) + idx)
    order = _slot(pos, n, ring).clamp(max=W - 1)  # (indices >= kept are past the length: never read)
    keys = cache.k.new_empty(B, W + L_new, H, D)
    values = cache.v.new_empty(B, W + L_new, H, cache.v.shape[-1])
    from .kv_cache import as_gatherable, attention_with_kvcache, gather_scales  # (kv_cache imports this module)

    as_gatherable(keys)[:, :W] = torch.gather(as_gatherable(cache.k), 1, order[:, :, None, None].expand(B, W, H, D))
    as_gatherable(values)[:, :W] = torch.gather(
        as_gatherable(cache.v), 1, order[:, :, None, None].expand(B, W, H, cache.v.shape[-1])
    )

    scales = gather_scales(cache, order, L_new)

    # The window part: in index space the last R keys of a query are contiguous positions.
    out, lse = attention_with_kvcache(
        q,
        keys,
        values,
        k,
        v,
        cache_seqlens=kept.to(torch.int32),
        softmax_scale=softmax_scale,
        causal=True,
        window_size=(ring - 1, 0),
        return_softmax_lse=True,
        sinks=sinks,
        **scales,
    )
    # The sink part: sink position j sits at index j (cached, or in the chunk while seen < n);
    # query t (position seen + t) sees it where the window does not: j <= seen + t - R.
    L = q.shape[1]
    query_pos = seen.unsqueeze(1) + torch.arange(L, device=seen.device) + (L_new - L)  # bottom-right
    visible = torch.arange(n, device=seen.device) <= (query_pos - ring).unsqueeze(-1)  # (B, L, n)
    visible &= torch.arange(n, device=seen.device) < (seen + L_new).unsqueeze(1).unsqueeze(2)
    if bool(visible.any()):
        sink_k, sink_v = keys[:, :n], values[:, :n]
        if scales:  # the n sink rows of a quantized cache, dequantized for the masked op
            sink_k = (sink_k.float() * scales["k_cache_scale"][:, :n, :, None]).to(q.dtype)
            sink_v = (sink_v.float() * scales["v_cache_scale"][:, :n, :, None]).to(q.dtype)
        out_s, lse_s = attention(
            q.transpose(1, 2),
            sink_k.transpose(1, 2),
            sink_v.transpose(1, 2),
            attn_mask=visible.unsqueeze(1),
            scale=softmax_scale,
            return_lse=True,
        )
        merged, lse = merge_attention_states(out.transpose(1, 2), lse, out_s, lse_s)
        out = merged.transpose(1, 2)
    if k is not None:
        write(cache, k, v)
        cache.seqlens += L_new
    return (out, lse) if return_lse else out
