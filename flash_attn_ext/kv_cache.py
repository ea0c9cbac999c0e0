"""KV cache operations: the in-place append and attention against the cache."""

import math
from typing import Optional, Tuple, Union

import torch

from . import _kvcache_index, _ops, _sink_cache
from .attention import _contiguous_last_dim, normalize_window

_LAYOUTS = ("bshd", "bhsd")
_LAYOUT_SHAPES = {"bshd": "(batch, length, heads, head_dim), as flash-attn", "bhsd": "(batch, heads, length, head_dim)"}


def _as_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    layout: str = "bshd",
    rolling: bool = False,
    block_table: Optional[torch.Tensor] = None,
) -> None:
    """Write each sequence's new keys/values into the caches, in place, at its current length.

    layout "bshd": caches (B, S_max, Hkv, D) and new K/V (B, L_new, Hkv, D), as flash-attn;
    "bhsd": (B, Hkv, S_max, D) and (B, Hkv, L_new, D), as transformers' caches. Sequence b's
    token t goes to position cache_seqlens[b] + t. rolling=True is Mistral's rolling buffer
    for sliding-window models: the cache keeps the last S_max positions, position p in slot
    p % S_max. cache_seqlens (int32/int64, shape (B,)) is read, not updated. A write past S_max
    (without rolling) or a bad length raises before anything is written. Not differentiable
    (inference): new K/V are stored as data.

    block_table (int32, (B, blocks_per_seq)): a paged cache (vLLM / flash-attn): the caches are
    (num_blocks, block_size, Hkv, D) ("bshd") or (num_blocks, Hkv, block_size, D) ("bhsd"), and
    position p of sequence b lives in row p % block_size of block block_table[b, p // block_size].

    On CUDA under CUDA-graph capture (or with kernel_config(cuda_device_checks="require")) the
    values of cache_seqlens and block_table are checked on the device: a bad sequence is skipped
    and reported later (check_kvcache_errors), not raised at once.
    """
    _ops.check_tensors(
        "flash_attn_ext.kv_cache_append",
        k_cache=k_cache,
        v_cache=v_cache,
        k_new=k_new,
        v_new=v_new,
        cache_seqlens=cache_seqlens,
        block_table=block_table,
        optional=("block_table",),
    )
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    _ops.require_kernel(k_cache.device.type)
    torch.ops.flash_attn_ext.kv_cache_append(
        _as_bhsd(k_cache, layout),
        _as_bhsd(v_cache, layout),
        _as_bhsd(k_new.detach(), layout),
        _as_bhsd(v_new.detach(), layout),
        cache_seqlens,
        rolling,
        block_table,
    )


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[torch.Tensor, int]] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    return_softmax_lse: bool = False,
    *,
    layout: str = "bshd",
    block_table: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    rotary_interleaved: bool = True,
    sinks: Optional[torch.Tensor] = None,
):
    """Decode / chunked-prefill attention against a KV cache (flash-attn's argument names).

    layout "bshd": q (B, L, Hq, D), caches (B, S_max, Hkv, D), k/v (B, L_new, Hkv, D), out
    (B, L, Hq, D); "bhsd": the same with heads before positions. Sequence b attends to cache
    positions [0, cache_seqlens[b] + L_new) (cache_seqlens None: the whole cache), bottom-right
    aligned: the last query lines up with the last key. k/v, when given, are first written into
    the caches in place at cache_seqlens (not updated: advance it yourself). causal and
    window_size=(left, right) as in flash-attn; GQA/MQA when Hq is a multiple of Hkv.
    Returns out, or (out, lse) with return_softmax_lse (lse float32, (B, Hq, L)).
    block_table (int32, (B, blocks_per_seq)): a paged cache, as in kv_cache_append (caches
    (num_blocks, block_size, Hkv, D) for "bshd"); each sequence then holds up to
    blocks_per_seq * block_size positions. softcap > 0 soft-caps the scores (Gemma-2);
    alibi_slopes (float32, (Hq,) or (B, Hq)) adds ALiBi biases, as flash-attn.
    cache_batch_idx (int32, (B,)): sequence b lives in cache row cache_batch_idx[b] (of
    block_table's rows when paged) instead of row b. cache_leftpad (int32, (B,)): sequence b's
    cache starts at position cache_leftpad[b]: it attends to positions [cache_leftpad[b],
    cache_seqlens[b] + L_new), bottom-right aligned on that length. Both address the cache in
    place through a block table (no copy of K/V; with cache_leftpad one int32 entry per position).
    rotary_cos / rotary_sin ((seqlen_ro, rotary_dim / 2), seqlen_ro >= the cache's positions per
    sequence): the new keys are rotated at positions cache_seqlens[b] + t before the append, the
    queries at cache_seqlens[b] + i when causal or windowed, else all at cache_seqlens[b] (as
    flash-attn); rotary_interleaved as in flash_attn_ext.rotary.apply_rotary_emb.
    sinks (float32, (Hq,)): learned attention sinks, as in flash_attn_ext.attention (counted once
    per row, split-KV decoding included).
    Inference only: not differentiable. Capturable in a CUDA graph: the lengths are then checked
    on the device, a bad sequence's output is NaN and check_kvcache_errors reports it.
    """
    _ops.check_tensors(
        "flash_attn_ext.attention_with_kvcache",
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        k=k,
        v=v,
        block_table=block_table,
        alibi_slopes=alibi_slopes,
        cache_seqlens=None if isinstance(cache_seqlens, int) else cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        sinks=sinks,
        optional=(
            "sinks",
            "k",
            "v",
            "block_table",
            "alibi_slopes",
            "cache_seqlens",
            "cache_batch_idx",
            "cache_leftpad",
            "rotary_cos",
            "rotary_sin",
        ),
    )
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(
                f"flash_attn_ext.attention_with_kvcache: {name} must be 4-D ({layout}), got shape {tuple(t.shape)}"
            )
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    q_heads, cache_heads = q.shape[2 if layout == "bshd" else 1], k_cache.shape[2 if layout == "bshd" else 1]
    if cache_heads == 0 or q_heads % cache_heads:
        raise ValueError(
            f"flash_attn_ext.attention_with_kvcache: with layout={layout!r} q and the caches are "
            f"{_LAYOUT_SHAPES[layout]}: q {tuple(q.shape)} has {q_heads} heads, k_cache {tuple(k_cache.shape)} "
            f"{cache_heads}, and the query heads must be a multiple of the cache's (is q in this layout?)"
        )
    if torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(
            "attention_with_kvcache is inference-only (not differentiable); "
            "call it under torch.no_grad() or torch.inference_mode()"
        )
    qb, kc, vc = _as_bhsd(q, layout), _as_bhsd(k_cache, layout), _as_bhsd(v_cache, layout)
    kb = None if k is None else _as_bhsd(k.detach(), layout)
    vb = None if v is None else _as_bhsd(v.detach(), layout)
    batch, s_max = qb.shape[0], kc.shape[2]
    if block_table is not None and block_table.dim() == 2:
        s_max = kc.shape[2] * block_table.shape[1]  # positions per sequence of a paged cache
    if cache_seqlens is None:
        cache_seqlens = torch.full(
            (batch,), s_max - (0 if kb is None else kb.shape[2]), dtype=torch.int32, device=q.device
        )
    elif isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    left, right = normalize_window(window_size, causal)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    _ops.require_kernel(q.device.type)
    if rotary_cos is not None or rotary_sin is not None:
        # flash-attn: causal or local, a window bound at or past the cache's length being no bound
        per_position = causal or 0 <= left < s_max or 0 <= right < s_max
        qb, kb = _kvcache_index.rotate(
            qb, kb, rotary_cos, rotary_sin, cache_seqlens, rotary_interleaved, per_position, s_max
        )
    if cache_batch_idx is not None or cache_leftpad is not None:
        kc, vc, block_table, cache_seqlens = _kvcache_index.remap(
            kc, vc, block_table, cache_seqlens, cache_batch_idx, cache_leftpad, 0 if kb is None else kb.shape[2]
        )
    out, lse = torch.ops.flash_attn_ext.attention_kvcache(
        _contiguous_last_dim(qb),
        kc,
        vc,
        cache_seqlens,
        kb,
        vb,
        float(softmax_scale),
        left,
        right,
        block_table,
        float(softcap),
        alibi_slopes,
        sinks,
    )
    out = out.transpose(1, 2) if layout == "bshd" else out
    return (out, lse) if return_softmax_lse else out


def check_kvcache_errors(device: Union[torch.device, str, int, None] = None) -> None:
    """Raise what device-checked KV-cache calls on a CUDA device skipped, and clear it.

    On CUDA, kv_cache_append and attention_with_kvcache check cache_seqlens and block_table on
    the host by default (a bad value raises before anything is written), which costs a
    device -> host copy per call and cannot happen inside a CUDA graph. While a stream captures
    a graph (or always, with kernel_config(cuda_device_checks="require")) they check them on the
    device instead: a sequence with a negative length, a length past the cache or a block_table
    entry outside the cache is skipped (nothing written, its outputs NaN) and recorded. This
    raises RuntimeError for what was recorded since the last check (a sync); the next
    host-checked KV-cache call on the device raises it too. It reads on the current stream: let
    the calls to check finish first (torch.cuda.synchronize() after replays on other streams).
    device: a CUDA device (default: the current one); a CPU device, or a machine without CUDA,
    has nothing to check.
    """
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"flash_attn_ext.check_kvcache_errors: device must be a CUDA or CPU device, got {device}")
    if device.type == "cuda" and _ops.has_kernel("cuda"):  # (without the CUDA kernels nothing ran there)
        torch.ops.flash_attn_ext._raise_kvcache_device_errors(torch.empty(0, device=device))


def check_step(cache, q, k, v, sinks) -> None:
    """What the op would refuse in a KVCache.attend call, checked before a decode step writes its
    token into the slots (the other paths write only after the op has run): a refused call
    leaves the cache as it was."""
    fn = "flash_attn_ext.KVCache.attend"
    _ops.check_tensors(fn, q=q, k=k, v=v, sinks=sinks, optional=("k", "v", "sinks"))
    # (shapes: KVCache.attend, the only way here, checked them with check_layout first)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and (t.dtype != cache.k.dtype or t.device != cache.k.device):
            raise TypeError(f"{fn}: {name} is {t.dtype} on {t.device}, the cache {cache.k.dtype} on {cache.k.device}")
    if sinks is not None and (
        sinks.shape != (q.shape[2],)
        or sinks.dtype not in (torch.float32, torch.float64)
        or sinks.device != q.device
        or (sinks.numel() > 1 and sinks.stride(0) != 1)
    ):
        raise ValueError(
            f"{fn}: sinks must be a contiguous float32 (or float64) tensor of shape ({q.shape[2]},) on {q.device}, "
            f"got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}"
        )


def check_layout(cache, fn, **tensors) -> None:
    """q / k / v of a KVCache call in its layout, (B, L, H, D) (attention() takes (B, H, L, D):
    the error says so, since a tensor in that layout is the likely mistake)."""
    B, _, Hkv, D = cache.k.shape
    for name, t in tensors.items():
        if t is None:
            continue
        d = cache.v.shape[-1] if name == "v" else D
        heads_ok = t.shape[2] % Hkv == 0 if name == "q" and t.dim() == 4 else t.dim() == 4 and t.shape[2] == Hkv
        if t.dim() != 4 or t.shape[0] != B or t.shape[3] != d or not heads_ok:
            raise ValueError(
                f"{fn}: {name} must be (batch={B}, length, {'a multiple of ' if name == 'q' else ''}{Hkv} heads, {d}): "
                f"a KVCache takes (batch, length, heads, head_dim), as flash-attn (flash_attn_ext.attention takes "
                f"(batch, heads, length, head_dim)); got {tuple(t.shape)}"
            )


class KVCache:
    """A KV cache for a batch of sequences with their own lengths.

        cache = KVCache(batch_size=2, max_seqlen=4096, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
        out = cache.attend(q, k, v)   # appends k, v (B, L_new, Hkv, D), attends causally, advances
        cache.reset()

    Layout (B, S, H, D) for the cache, queries and new keys/values, as flash-attn. `seqlens`
    (int32, (B,)) counts the positions each sequence has seen. Inference only.

    window=W makes it Mistral's rolling buffer for sliding-window models: W slots, position p
    in slot p % W, attention limited to the model's window (each query sees its W most recent
    keys, itself included). It stays exact for prefill chunks longer than W: a chunk attends to
    the cached keys and to its own new keys before it overwrites the slots. Decoding one token
    with the full window reads the slots in place; other calls gather the W cached rows into
    position order first (an O(W * D) copy).

    sink_tokens=n (with window=W, 0 < n < W) makes it StreamingLLM's cache: the first n
    positions stay in slots [0, n) for good and the last W - n roll through the rest; each query
    sees the sink tokens and its W - n most recent positions, itself included, exactly (for
    prefill chunks longer than W too; see flash_attn_ext._sink_cache).
    """

    def __init__(
        self,
        batch_size: int,
        max_seqlen: Optional[int],
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        head_dim_v: Optional[int] = None,
        window: Optional[int] = None,
        sink_tokens: int = 0,
    ):
        if window is not None:
            if window <= 0:
                raise ValueError(f"window must be positive, got {window}")
            max_seqlen = window
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        if sink_tokens and (window is None or sink_tokens >= window):
            raise ValueError(
                f"sink_tokens={sink_tokens} needs a rolling cache with more slots (window=W, W > sink_tokens), "
                f"got window={window}"
            )
        self.sink_tokens = sink_tokens
        if max_seqlen is None or min(batch_size, max_seqlen, num_kv_heads, head_dim) <= 0:
            raise ValueError("batch_size, max_seqlen (or window), num_kv_heads and head_dim must be positive")
        dv = head_dim if head_dim_v is None else head_dim_v
        self.window = window
        self.k = torch.zeros(batch_size, max_seqlen, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, max_seqlen, num_kv_heads, dv, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def reset(self, batch_index: Optional[torch.Tensor] = None) -> None:
        """Forget every sequence (or those in batch_index); the memory is reused."""
        if batch_index is None:
            self.seqlens.zero_()
            return
        # Checked first: an out-of-range index part-way through would leave some sequences reset.
        idx = torch.as_tensor(batch_index, device=self.seqlens.device)
        B = self.seqlens.shape[0]
        if idx.dtype == torch.bool:
            if idx.shape != (B,):
                raise ValueError(f"batch_index: a bool mask must have shape ({B},), got {tuple(idx.shape)}")
        elif idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"batch_index must hold integers or bools, got {idx.dtype}")
        elif idx.numel() and not (-B <= int(idx.min()) and int(idx.max()) < B):
            raise ValueError(f"batch_index entries must be in [-{B}, {B}), got {batch_index!r}")
        self.seqlens[idx] = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (B, L_new, Hkv, D) after each sequence's current length and advance it."""
        _ops.check_tensors("flash_attn_ext.KVCache.append", k=k, v=v)
        check_layout(self, "flash_attn_ext.KVCache.append", k=k, v=v)
        if self.sink_tokens:
            _sink_cache.write(self, k, v)
        else:
            kv_cache_append(self.k, self.v, k, v, self.seqlens, rolling=self.window is not None)
        self.seqlens += k.shape[1]

    def attend(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor] = None,
        v: Optional[torch.Tensor] = None,
        *,
        causal: bool = True,
        window_size: Tuple[int, int] = (-1, -1),
        softmax_scale: Optional[float] = None,
        return_lse: bool = False,
        sinks: Optional[torch.Tensor] = None,
    ):
        """Attention of q (B, L, Hq, D) against the cache after appending k, v (if given);
        advances the lengths by k's length. Bottom-right aligned, so a chunk of L queries
        attends to everything before it and causally within itself. sinks: learned attention
        sinks (Hq,), as in attention_with_kvcache."""
        _ops.check_tensors("flash_attn_ext.KVCache.attend", q=q, k=k, v=v, optional=("k", "v"))
        check_layout(self, "flash_attn_ext.KVCache.attend", q=q, k=k, v=v)
        if self.sink_tokens:
            return _sink_cache.attend(self, q, k, v, causal, window_size, softmax_scale, return_lse, sinks)
        if self.window is not None:
            return self._attend_rolling(q, k, v, causal, window_size, softmax_scale, return_lse, sinks)
        result = attention_with_kvcache(
            q,
            self.k,
            self.v,
            k,
            v,
            cache_seqlens=self.seqlens,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            return_softmax_lse=return_lse,
            sinks=sinks,
        )
        if k is not None:
            self.seqlens += k.shape[1]
        return result

    def _attend_rolling(self, q, k, v, causal, window_size, softmax_scale, return_lse, sinks):
        W = self.window
        left, right = normalize_window(window_size, causal)
        if right != 0 or not (0 <= left <= W - 1 or left == -1):
            raise ValueError(
                f"a rolling cache of {W} slots serves causal attention with a window of at most "
                f"{W} tokens (window_size=(left <= {W - 1}, 0)), got causal={causal}, "
                f"window_size={window_size}"
            )
        left = W - 1 if left == -1 else left
        if (k is None) != (v is None):
            raise ValueError("pass both k and v, or neither")
        if q.shape[1] == 1 and left == W - 1 and (k is None or k.shape[1] == 1):
            # Decode with the buffer's full window: the query sees exactly the positions the slots
            # hold (after this token's append), and softmax does not care about their order, so
            # the kernel reads the slots in place: no gather, no copy.
            if k is not None:
                check_step(self, q, k, v, sinks)  # (before the append: a refused call changes nothing)
                self.append(k, v)
            valid = torch.clamp(self.seqlens, max=W).to(torch.int32)  # slots [0, valid) hold data
            return attention_with_kvcache(
                q,
                self.k,
                self.v,
                cache_seqlens=valid,
                softmax_scale=softmax_scale,
                causal=False,
                return_softmax_lse=return_lse,
                sinks=sinks,
            )
        B, _, H, D = self.k.shape
        # The cached positions in order: sequence b keeps its last min(seqlens[b], W) positions.
        seen = self.seqlens.to(torch.int64)
        kept = torch.clamp(seen, max=W)
        order = (seen.unsqueeze(1) - kept.unsqueeze(1) + torch.arange(W, device=seen.device)) % W
        L_new = 0 if k is None else k.shape[1]
        keys = self.k.new_empty(B, W + L_new, H, D)
        values = self.v.new_empty(B, W + L_new, H, self.v.shape[-1])
        keys[:, :W] = torch.gather(self.k, 1, order[:, :, None, None].expand(B, W, H, D))
        values[:, :W] = torch.gather(self.v, 1, order[:, :, None, None].expand(B, W, H, self.v.shape[-1]))
        # Old keys then the chunk's own keys, bottom-right aligned: exact for any chunk length.
        result = attention_with_kvcache(
            q,
            keys,
            values,
            k,
            v,
            cache_seqlens=kept.to(torch.int32),
            softmax_scale=softmax_scale,
            causal=True,
            window_size=(left, 0),
            return_softmax_lse=return_lse,
            sinks=sinks,
        )
        if k is not None:
            self.append(k, v)
        return result
