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


QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)


def check_cache_scales(fn: str, k_cache, v_cache, k_cache_scale, v_cache_scale) -> None:
    """A quantized cache (int8, float8_e4m3fn) needs both scales: float32, the cache's shape
    without head_dim, on its device; a float cache takes none. ValueError / TypeError naming the
    argument, before anything is written."""
    quantized = k_cache.dtype in QUANTIZED_DTYPES or v_cache.dtype in QUANTIZED_DTYPES
    given = {"k_cache_scale": k_cache_scale, "v_cache_scale": v_cache_scale}
    if not quantized:
        for name, t in given.items():
            if t is not None:
                raise ValueError(
                    f"{fn}: {name} is for int8 / float8_e4m3fn caches; k_cache is {k_cache.dtype} (drop the scales, "
                    f"or make the cache with quantize_kv_cache / KVCache(dtype=torch.int8))"
                )
        return
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"{fn}: k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must have the same dtype")
    for (name, t), cache in zip(given.items(), (k_cache, v_cache)):
        if t is None:
            raise ValueError(
                f"{fn}: the cache is {cache.dtype}, so {name} (float32, shape {tuple(cache.shape[:-1])}: one scale "
                f"per position and head) is required"
            )
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{fn}: {name} must be float32, got {t.dtype}")
        if t.device != cache.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, the cache on {cache.device}")
        if tuple(t.shape) != tuple(cache.shape[:-1]):
            raise ValueError(
                f"{fn}: {name} must have the cache's shape without head_dim, {tuple(cache.shape[:-1])}, got "
                f"{tuple(t.shape)}"
            )


def as_gatherable(t: torch.Tensor) -> torch.Tensor:
    """An fp8 cache viewed as its bytes (torch.gather has no float8 kernel); others as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _scale_bhsd(t: Optional[torch.Tensor], layout: str) -> Optional[torch.Tensor]:
    return None if t is None else _as_bhsd(t, layout)


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
    k_cache_scale: Optional[torch.Tensor] = None,
    v_cache_scale: Optional[torch.Tensor] = None,
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

    int8 / float8_e4m3fn caches: k_cache_scale / v_cache_scale (float32, the cache's shape
    without head_dim) are required, and each new row (float32 / bf16 / fp16, finite) is quantized
    in the kernel with its own scale: amax / 127 (int8, round to nearest even) or amax / 448
    (fp8 e4m3), written into the scales; element d reads back as cache[..., d] * scale[...].

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
    check_cache_scales("flash_attn_ext.kv_cache_append", k_cache, v_cache, k_cache_scale, v_cache_scale)
    _ops.require_kernel(k_cache.device.type)
    torch.ops.flash_attn_ext.kv_cache_append(
        _as_bhsd(k_cache, layout),
        _as_bhsd(v_cache, layout),
        _as_bhsd(k_new.detach(), layout),
        _as_bhsd(v_new.detach(), layout),
        cache_seqlens,
        rolling,
        block_table,
        _scale_bhsd(k_cache_scale, layout),
        _scale_bhsd(v_cache_scale, layout),
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
    k_cache_scale: Optional[torch.Tensor] = None,
    v_cache_scale: Optional[torch.Tensor] = None,
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
    k_cache_scale / v_cache_scale (float32, the cache's shape without head_dim): an int8 /
    float8_e4m3fn cache's per-(position, head) scales (see kv_cache_append; k/v are then in q's
    dtype and are quantized as they are appended). The CPU decode kernel reads the codes in
    place (K scales on the scores, V scales on the probabilities); chunked prefill and CUDA
    attend a copy of the rows read, dequantized into q's dtype.
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
    check_cache_scales("flash_attn_ext.attention_with_kvcache", k_cache, v_cache, k_cache_scale, v_cache_scale)
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
    ks, vs = _scale_bhsd(k_cache_scale, layout), _scale_bhsd(v_cache_scale, layout)
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
        kc, vc, block_table, cache_seqlens, ks, vs = _kvcache_index.remap(
            kc, vc, block_table, cache_seqlens, cache_batch_idx, cache_leftpad, 0 if kb is None else kb.shape[2], ks, vs
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
        ks,
        vs,
    )
    out = out.transpose(1, 2) if layout == "bshd" else out
    return (out, lse) if return_softmax_lse else out


def quantize_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    dtype: torch.dtype = torch.int8,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float cache quantized into a new one: (k_q, v_q, k_scale, v_scale), the caches in
    `dtype` (torch.int8 or torch.float8_e4m3fn) and their float32 scales with the cache's shape
    without head_dim, for attention_with_kvcache / flash_attn_with_kvcache / kv_cache_append's
    k_cache_scale and v_cache_scale. Any 4-D cache layout ((B, S, H, D), (B, H, S, D), paged
    blocks): every row is quantized on its own, by kv_cache_append's kernel. The input must be
    finite (a cache's unused slots included: zero them, or quantize only the used part)."""
    fn = "flash_attn_ext.quantize_kv_cache"
    _ops.check_tensors(fn, k_cache=k_cache, v_cache=v_cache)
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"{fn}: dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {tuple(t.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ before head_dim"
        )
    k_q = torch.empty(k_cache.shape, dtype=dtype, device=k_cache.device)
    v_q = torch.empty(v_cache.shape, dtype=dtype, device=v_cache.device)
    k_s = torch.empty(k_cache.shape[:3], dtype=torch.float32, device=k_cache.device)
    v_s = torch.empty_like(k_s)
    # The whole cache as the new rows of an empty one: its (B, S) positions are (batch, new_len).
    kv_cache_append(
        k_q,
        v_q,
        k_cache,
        v_cache,
        torch.zeros(k_cache.shape[0], dtype=torch.int32, device=k_cache.device),
        k_cache_scale=k_s,
        v_cache_scale=v_s,
    )
    return k_q, v_q, k_s, v_s


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
    if cache.quantized:  # q in a float dtype, k / v in q's (quantized as they are written)
        if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or q.device != cache.k.device:
            raise TypeError(
                f"{fn}: q must be float32, bfloat16 or float16 on {cache.k.device} for a {cache.k.dtype} cache, got "
                f"{q.dtype} on {q.device}"
            )
        for name, t in (("k", k), ("v", v)):
            if t is not None and (t.dtype != q.dtype or t.device != q.device):
                raise TypeError(f"{fn}: {name} is {t.dtype} on {t.device}, q {q.dtype} on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if cache.quantized:
            break
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


def gather_scales(cache, order: torch.Tensor, L_new: int) -> dict:
    """A quantized rolling cache's scales in the slot order `order` (B, W), with L_new more rows
    for the chunk the op appends (the scales of the keys gathered with them); {} for a float cache."""
    if not cache.quantized:
        return {}
    B, W, H = cache.k_scale.shape
    out = {}
    for name, t in (("k_cache_scale", cache.k_scale), ("v_cache_scale", cache.v_scale)):
        g = t.new_empty(B, W + L_new, H)
        g[:, :W] = torch.gather(t, 1, order[:, :, None].expand(B, W, H))
        out[name] = g
    return out


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

    dtype=torch.int8 or torch.float8_e4m3fn stores K and V in 8 bits, with one float32 scale per
    (position, head) in `k_scale` / `v_scale` ((B, S, H)); q, k and v are then float32 / bf16 /
    fp16, quantized as they are appended (see kv_cache_append). Every mode above takes it.
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
        self.k_scale = self.v_scale = None
        if dtype in QUANTIZED_DTYPES:
            self.k_scale = torch.zeros(batch_size, max_seqlen, num_kv_heads, dtype=torch.float32, device=device)
            self.v_scale = torch.zeros_like(self.k_scale)

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        """Whether K/V are stored in 8 bits (int8 / float8_e4m3fn) with per-(position, head) scales."""
        return self.k_scale is not None

    def _scales(self) -> dict:
        return {"k_cache_scale": self.k_scale, "v_cache_scale": self.v_scale}

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
            kv_cache_append(self.k, self.v, k, v, self.seqlens, rolling=self.window is not None, **self._scales())
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
            **self._scales(),
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
                **self._scales(),
            )
        B, _, H, D = self.k.shape
        # The cached positions in order: sequence b keeps its last min(seqlens[b], W) positions.
        seen = self.seqlens.to(torch.int64)
        kept = torch.clamp(seen, max=W)
        order = (seen.unsqueeze(1) - kept.unsqueeze(1) + torch.arange(W, device=seen.device)) % W
        L_new = 0 if k is None else k.shape[1]
        keys = self.k.new_empty(B, W + L_new, H, D)
        values = self.v.new_empty(B, W + L_new, H, self.v.shape[-1])
        as_gatherable(keys)[:, :W] = torch.gather(as_gatherable(self.k), 1, order[:, :, None, None].expand(B, W, H, D))
        as_gatherable(values)[:, :W] = torch.gather(
            as_gatherable(self.v), 1, order[:, :, None, None].expand(B, W, H, self.v.shape[-1])
        )
        scales = gather_scales(self, order, L_new)
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
            **scales,
        )
        if k is not None:
            self.append(k, v)
        return result
