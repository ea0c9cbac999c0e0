"""A transformers `Cache` on this package's KV cache, for `generate()`.

    import flash_attn_ext.integrations.transformers  # registers "fa_ext", "flash_attn_ext" and this cache
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fa_ext")
    model.generate(...)                        # runs on a FlashAttnExtCache
    model.generate(..., cache=FlashAttnExtCache(model.config, dtype=torch.int8))   # 8-bit K/V

transformers' DynamicCache concatenates each layer's whole K/V on every token (`torch.cat`) and
hands the concatenation to the attention call, with a mask. Here each layer holds a preallocated
(B, capacity, Hkv, D) cache (sized from generate's max_length; grown by doubling past it), and
the new K/V are appended in place by the call that attends (attention_with_kvcache with k / v:
one call per layer per step, no copy of the cache):

- `update()` does not write: it records the new K/V as pending and returns them as they are;
  the model's attention call ("fa_ext" or "flash_attn_ext") finds them pending (`pending_layer`)
  and calls `attend`, which appends and attends. With any other attention implementation the
  cache appends at once and returns the cached K/V in position order (the last W - 1 and the
  new ones for a sliding layer, as DynamicSlidingWindowLayer), so the model stays correct, only
  slower.
- A model that does more with what update() returned than attend it (DiffLlama changes its
  values, Doge builds its mask from them, others never hand them to the call) is noticed: at
  its first forward, where the new K/V are all of the sequence, the cache writes them and stops
  deferring (from then on as above); noticed later, it raises RuntimeError instead of a wrong
  continuation (`FlashAttnExtLayer.claims` / `release`, `pending_layer`). A model whose code
  reads the cache's `keys` / `values` itself (transformers' (B, Hkv, S, D)) is not served: the
  storage here is (B, capacity, Hkv, D).
- Full-attention layers: all positions. Sliding-window layers (Mistral, Gemma-2, gpt-oss):
  rolling caches of W slots (position p in slot p % W; the storage grows up to W as positions
  come); a decode step reads the slots in place, a prompt or a chunk (or a step while left
  padding is still inside the window) attends a copy of the last W - 1 positions in order.
- Left-padded batches: every row holds the same number of positions (transformers' padded
  frame, as its own caches); the leading pad tokens are skipped through cache_leftpad (no work
  for them), from the compact mask "fa_ext" builds or the 2-D mask of the flash path.
- dtype=torch.int8 / torch.float8_e4m3fn stores K/V in 8 bits with one float32 scale per
  (position, head), quantized as they are appended (see flash_attn_ext.kv_cache_append).
- Beam search (`reorder_cache`), `crop` (assisted decoding), `reset`, `batch_repeat_interleave`
  and `batch_select_indices` act on the stored tensors. A rolling layer cannot be cropped by
  more than one token once it has wrapped, and says so; generate() keeps transformers' cache
  for assisted / prompt-lookup decoding of models with sliding-window layers.

Only decoder-only models whose layers are all "full_attention" or "sliding_attention" (no
cross-attention) are served; others (chunked attention, linear attention, KV sharing, Mllama's
cross-attention) raise at construction, and generate() keeps transformers' own cache for them,
as for models whose attention is their own code (CPM-Ant, XLM).
"""

from typing import Optional

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..kv_cache import QUANTIZED_DTYPES, as_gatherable, attention_with_kvcache, kv_cache_append

IMPLEMENTATIONS = ("fa_ext", "flash_attn_ext")
_PENDING = "_fa_ext_pending"
_START = "_fa_ext_start"


def pending_layer(key: torch.Tensor) -> Optional["FlashAttnExtLayer"]:
    """The cache layer whose update() returned `key` and waits for the attention call, or None.
    Keys a call has already appended and attended are refused when they were not the whole
    sequence (a second attention call on them would see the new positions only)."""
    layer = getattr(key, _PENDING, None)
    if layer is None:
        return None
    if layer._pending is not None and layer._pending[0] is key:
        return layer
    if getattr(key, _START, 0):
        raise RuntimeError(
            "FlashAttnExtCache: the keys update() returned were attended a second time after the call that appended "
            "them; this model attends one layer's keys more than once, which the in-place cache cannot serve: use "
            "transformers' DynamicCache (cache_implementation='dynamic')"
        )
    return None


def _as_int(n) -> int:
    return int(n.item()) if isinstance(n, torch.Tensor) else int(n)


class FlashAttnExtLayer(CacheLayerMixin):
    """One full-attention layer: `keys` / `values` are the storage, (B, capacity, Hkv, D)
    ("bshd", flash-attn's layout, not DynamicLayer's (B, Hkv, S, D)), the first `length`
    positions of every row in use; `k_scale` / `v_scale` (B, capacity, Hkv) for 8-bit storage."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: "FlashAttnExtCache", max_cache_len: Optional[int], dtype: Optional[torch.dtype]):
        super().__init__()
        self._cache = cache
        self.max_cache_len = max_cache_len
        self.storage_dtype = dtype
        self.length = 0
        self.k_scale = self.v_scale = None
        self._pending = None  # (key_states, value_states, start) between update() and attend()

    # -- storage -------------------------------------------------------------------------------
    def _slots(self, needed: int) -> int:
        return max(needed, self.max_cache_len or 0, 16)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, L, D = key_states.shape
        self.device = key_states.device
        self.model_dtype = key_states.dtype
        dtype = self.storage_dtype or key_states.dtype
        if dtype not in QUANTIZED_DTYPES and dtype != key_states.dtype:
            raise TypeError(
                f"FlashAttnExtCache: a float cache stores the model's dtype ({key_states.dtype}), got dtype={dtype}; "
                f"pass dtype=None, torch.int8 or torch.float8_e4m3fn"
            )
        slots = self._slots(L)
        self.keys = torch.zeros(B, slots, H, D, dtype=dtype, device=self.device)
        self.values = torch.zeros(B, slots, H, value_states.shape[-1], dtype=dtype, device=self.device)
        if dtype in QUANTIZED_DTYPES:
            self.k_scale = torch.zeros(B, slots, H, dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros_like(self.k_scale)
        self._lens = torch.zeros(B, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def _initialize(self, key_states, value_states) -> None:
        """Storage on first use, and again for an empty layer given another batch or head shape
        (after reset())."""
        B, H, _, D = key_states.shape
        if not self.is_initialized or (
            self.length == 0 and (B, H, D) != (self.keys.shape[0], self.keys.shape[2], self.keys.shape[3])
        ):
            self.lazy_initialization(key_states, value_states)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def _scales(self, k_scale=None, v_scale=None) -> dict:
        if not self.quantized:
            return {}
        return {
            "k_cache_scale": self.k_scale if k_scale is None else k_scale,
            "v_cache_scale": self.v_scale if v_scale is None else v_scale,
        }

    def _seqlens(self, n: int) -> torch.Tensor:
        return self._lens.fill_(n)

    def _grow(self, needed: int, limit: Optional[int] = None) -> None:
        """Room for `needed` positions: the storage doubled (a copy, at most log2 times), up to
        `limit` slots."""
        slots = self.keys.shape[1]
        if needed <= slots:
            return
        new = max(needed, 2 * slots) if limit is None else min(max(needed, 2 * slots), limit)

        def bigger(t):
            out = t.new_zeros((t.shape[0], new, *t.shape[2:]))
            as_gatherable(out)[:, :slots] = as_gatherable(t)
            return out

        self.keys, self.values = bigger(self.keys), bigger(self.values)
        if self.quantized:
            self.k_scale, self.v_scale = bigger(self.k_scale), bigger(self.v_scale)

    def _write(self, key_states, value_states, start: int, rolling: bool = False) -> None:
        """New K/V (B, Hkv, L, D) stored at positions start.. (quantized if the cache is 8-bit)."""
        kv_cache_append(
            self.keys,
            self.values,
            key_states.transpose(1, 2),
            value_states.transpose(1, 2),
            self._seqlens(start),
            rolling=rolling,
            **self._scales(),
        )

    def _for_model(self, k, v, k_scale=None, v_scale=None):
        """Stored rows (B, n, Hkv, D) (and an 8-bit cache's scales (B, n, Hkv)) as the model's
        (B, Hkv, n, D) K/V in its dtype."""
        if self.quantized:
            k, v = k.float() * k_scale[..., None], v.float() * v_scale[..., None]
        return k.to(self.model_dtype).transpose(1, 2), v.to(self.model_dtype).transpose(1, 2)

    def _positions(self, first: int, count: int):
        """K/V of positions [first, first + count) as (B, Hkv, count, D) in the model's dtype."""
        rows = slice(first, first + count)
        scales = (self.k_scale[:, rows], self.v_scale[:, rows]) if self.quantized else ()
        return self._for_model(self.keys[:, rows], self.values[:, rows], *scales)

    # -- transformers' layer contract ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._pending is not None:
            key, value, start = self._pending
            if start:
                raise RuntimeError(
                    "FlashAttnExtCache: the keys/values of the previous forward never reached the attention call as "
                    "update() returned them (the model changed them, or its attention implementation, or a call failed "
                    "half-way); the cache is missing them: use transformers' DynamicCache "
                    "(cache_implementation='dynamic'), or call cache.reset() and start again"
                )
            # The first forward (nothing cached before it) attended what update() returned, all of
            # its K/V, through some other call: right, but this model cannot be served in place.
            self.release()
        self._initialize(key_states, value_states)
        B, H, L, D = key_states.shape
        if (B, H, D) != (self.keys.shape[0], self.keys.shape[2], self.keys.shape[3]):
            raise ValueError(
                f"FlashAttnExtCache: new keys {tuple(key_states.shape)} (batch, heads, length, head_dim) do not match "
                f"the cache's batch {self.keys.shape[0]}, {self.keys.shape[2]} heads and head_dim {self.keys.shape[3]}"
            )
        start = self.length
        self._make_room(start + L)
        self.length += L
        if self._cache.defers():
            self._pending = (key_states, value_states, start)
            setattr(key_states, _PENDING, self)
            setattr(key_states, _START, start)
            return key_states, value_states
        return self._update_now(key_states, value_states, start)

    def _make_room(self, needed: int) -> None:
        self._grow(needed)

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor, first_position: Optional[int] = None):
        """Append K/V (B, Hkv, L, D) at once, attending nothing (see FlashAttnExtCache.store)."""
        if self._pending is not None:
            raise RuntimeError("FlashAttnExtCache.store: a forward's keys/values are still waiting for its attention")
        if first_position is not None and first_position != self.length:
            L = key_states.shape[2]
            window = getattr(self, "window", None)
            # (positions before first_position are then absent: only a sliding layer whose next
            # query needs none of them can start there)
            if self.length or window is None or L < min(first_position + L, window - 1):
                raise ValueError(
                    f"FlashAttnExtCache.store: first_position={first_position} would leave positions out that the "
                    f"next query attends (layer holds {self.length}, {L} given"
                    + (f", window {window})" if window else ", a full-attention layer)")
                )
            self.length = first_position
        self._initialize(key_states, value_states)
        self._make_room(self.length + key_states.shape[2])
        self._write(key_states, value_states, self.length)
        self.length += key_states.shape[2]

    def _update_now(self, key_states, value_states, start):
        self._write(key_states, value_states, start)
        return self._positions(0, start + key_states.shape[2])

    def get_mask_sizes(self, query_length: int):
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self._pending = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # (transformers' legacy form: the length to keep)
            tokens_to_remove = max(self.length - tokens_to_remove, 0)
        self._crop(min(abs(tokens_to_remove), self.length))

    def _crop(self, n: int) -> None:
        self.length -= n

    def _rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        used = min(self.length, self.keys.shape[1])  # (the slots past it hold nothing read)
        tensors = ("keys", "values", "k_scale", "v_scale") if self.quantized else ("keys", "values")
        for name in tensors:
            t = getattr(self, name)
            out = t.new_empty((index.shape[0], *t.shape[1:]))
            as_gatherable(out)[:, :used] = as_gatherable(t)[:, :used].index_select(0, index)
            setattr(self, name, out)
        self._lens = self._lens.new_zeros(index.shape[0])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rows(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            index = torch.arange(self.keys.shape[0], device=self.device)[indices]
            self._rows(index)

    def offload(self):
        raise NotImplementedError("FlashAttnExtCache does not offload layers")

    # -- the attention call --------------------------------------------------------------------
    def kv_offset(self) -> int:
        """The absolute position of the first key transformers' mask covers for the pending call."""
        return 0

    def claims(self, value: torch.Tensor) -> bool:
        """Whether the attention call may append and attend the pending K/V in place: it passes
        the values update() returned. A model that changes its values between update() and the
        attention (DiffLlama splits them) cannot be served in place: see `release` (after it,
        update() returns the cached K/V in order, as DynamicCache does)."""
        if value is self._pending[1]:
            return True
        self.release("the model changed the values update() returned before its attention call")
        return False

    def release(self, why: Optional[str] = None) -> None:
        """At the first forward (nothing cached before it, so what update() returned is every
        position): write the pending K/V now and stop deferring, the call going on with what it
        was given. Later: raise RuntimeError (the model has seen the new positions only)."""
        key, value, start = self._pending
        if start:
            raise RuntimeError(
                f"FlashAttnExtCache: {why}, which the in-place cache cannot follow once positions are cached; use "
                f"transformers' DynamicCache (cache_implementation='dynamic')"
            )
        self._pending = None
        self._write(key, value, start)
        self._cache.stop_deferring()

    def settle(self):
        """Append the pending K/V now and return the cached K/V in position order, (B, Hkv, S, D)
        each (what a non-deferring update returns): for a call with a dense mask."""
        key, value, start = self._pending
        self._pending = None
        return self._update_now(key, value, start)

    def attend(self, query, *, scale, window: int, softcap: float, sinks, pad, pad_max: int) -> torch.Tensor:
        """Append the pending K/V and attend: query (B, Hq, L, D) -> (B, L, Hq, Dv). window: the
        model's sliding window W (each query sees itself and W - 1 before it), 0 for none. pad:
        int32 (B,) leading pad positions per row (None: none); pad_max its largest entry."""
        key, value, start = self._pending
        self._pending = None
        return self._attend(query, key, value, start, scale, window, softcap, sinks, pad, pad_max)

    def _common(self, scale, window, softcap, sinks) -> dict:
        return dict(
            softmax_scale=scale,
            causal=True,
            window_size=(window - 1 if window else -1, 0),
            softcap=softcap,
            sinks=sinks,
        )

    def _attend(self, query, key, value, start, scale, window, softcap, sinks, pad, pad_max):
        q = query.transpose(1, 2)
        common = dict(**self._common(scale, window, softcap, sinks), **self._scales())
        if pad is not None and pad_max > start:
            # Pad tokens among the new ones (a left-padded prompt): cache_leftpad counts positions
            # already in the cache, so the K/V go in first and the call attends what is cached.
            self._write(key, value, start)
            lens = self._seqlens(start + key.shape[2])
            return attention_with_kvcache(q, self.keys, self.values, cache_seqlens=lens, cache_leftpad=pad, **common)
        return attention_with_kvcache(
            q,
            self.keys,
            self.values,
            key.transpose(1, 2),
            value.transpose(1, 2),
            cache_seqlens=self._seqlens(start),
            cache_leftpad=pad,
            **common,
        )


class FlashAttnExtRollingLayer(FlashAttnExtLayer):
    """A sliding-window layer of W slots: position p in slot p % W (Mistral's rolling buffer),
    `length` counting every position seen. transformers' window: each token sees itself and the
    W - 1 before it."""

    is_sliding = True

    def __init__(self, cache, max_cache_len, dtype, sliding_window: int):
        super().__init__(cache, max_cache_len, dtype)
        self.window = int(sliding_window)

    def _slots(self, needed: int) -> int:
        # (grown up to W as positions come: before the ring wraps, position p is in slot p)
        return min(self.window, super()._slots(needed))

    def _make_room(self, needed: int) -> None:
        self._grow(min(needed, self.window), limit=self.window)

    @property
    def is_croppable(self) -> bool:
        return self.length <= self.window

    def _write(self, key_states, value_states, start: int, rolling: bool = True) -> None:
        L = key_states.shape[2]
        if L > self.window:  # only the last W positions stay
            key_states, value_states = key_states[:, :, -self.window :], value_states[:, :, -self.window :]
            start += L - self.window
        super()._write(key_states, value_states, start, rolling=True)

    def _ordered(self, first: int, count: int):
        """Slots of positions [first, first + count), in position order, as (B, count, Hkv, D)
        copies (and their scales)."""
        slots = torch.arange(first, first + count, device=self.device) % self.window
        gathered = [as_gatherable(t).index_select(1, slots).view(t.dtype) for t in (self.keys, self.values)]
        if self.quantized:
            gathered += [t.index_select(1, slots) for t in (self.k_scale, self.v_scale)]
        return gathered

    def _update_now(self, key_states, value_states, start):
        kept = min(start, self.window - 1)
        old = self._ordered(start - kept, kept)
        self._write(key_states, value_states, start)
        k, v = self._for_model(*old)
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)

    def get_mask_sizes(self, query_length: int):
        kept = min(self.length, self.window - 1)
        return kept + query_length, self.length - kept

    def get_max_length(self) -> int:
        return self.window

    def kv_offset(self) -> int:
        start = self._pending[2]
        return start - min(start, self.window - 1)

    def _crop(self, n: int) -> None:
        # Positions before length - W have been overwritten; the next query needs those from
        # length - n - W + 1 on, so only one token can go once the ring has wrapped.
        if n > 1 and self.length > self.window:
            raise NotImplementedError(
                f"FlashAttnExtCache: a sliding-window layer (W = {self.window}) holding {self.length} positions has "
                f"overwritten the slots of the ones before the last {self.window}, so it cannot be cropped; use "
                f"transformers' DynamicCache for assisted decoding past the window"
            )
        self.length -= n

    def _attend(self, query, key, value, start, scale, window, softcap, sinks, pad, pad_max):
        W = self.window
        # A call without a window on a sliding layer (Moshi's config names a window its attention
        # does not pass) sees the last W positions, as on transformers' DynamicSlidingWindowLayer.
        window = window or W
        if window != W:
            raise ValueError(
                f"FlashAttnExtCache: this layer is a rolling cache for a sliding window of {W} tokens, the attention "
                f"call asks for {window}"
            )
        q = query.transpose(1, 2)
        L = key.shape[2]
        common = self._common(scale, window, softcap, sinks)
        if L == 1 and q.shape[1] == 1 and (pad is None or pad_max <= start + 1 - W):
            # A decode step whose window holds no pad token: after the append the slots hold
            # exactly the positions it sees, and softmax does not care about their order.
            self._write(key, value, start)
            common.update(causal=False, window_size=(-1, -1))
            return attention_with_kvcache(
                q, self.keys, self.values, cache_seqlens=min(start + 1, W), **common, **self._scales()
            )
        # The last W - 1 positions in order, then the new ones: exact for any chunk length.
        kept = min(start, W - 1)
        old = self._ordered(start - kept, kept)
        B, _, H, D = old[0].shape
        keys = self.keys.new_empty(B, kept + L, H, D)
        values = self.values.new_empty(B, kept + L, H, old[1].shape[-1])
        as_gatherable(keys)[:, :kept] = as_gatherable(old[0])
        as_gatherable(values)[:, :kept] = as_gatherable(old[1])
        scales = {}
        if self.quantized:
            for name, t in (("k_cache_scale", old[2]), ("v_cache_scale", old[3])):
                s = t.new_empty(B, kept + L, H)
                s[:, :kept] = t
                scales[name] = s
        lens = self._lens.fill_(kept)
        kv_cache_append(keys, values, key.transpose(1, 2), value.transpose(1, 2), lens, **scales)
        leftpad = None
        if pad is not None and pad_max > start - kept:  # pad positions inside the copy
            leftpad = (pad - (start - kept)).clamp(0, kept + L).to(torch.int32)
        out = attention_with_kvcache(
            q, keys, values, cache_seqlens=lens.fill_(kept + L), cache_leftpad=leftpad, **common, **scales
        )
        self._write(key, value, start)
        return out


def _cross_attention(config) -> bool:
    """Whether a decoder config has cross-attention layers that cache their K/V (Mllama's
    cross_attention_layers, BERT-style decoders' add_cross_attention)."""
    return bool(getattr(config, "cross_attention_layers", None)) or bool(getattr(config, "add_cross_attention", False))


class FlashAttnExtCache(Cache):
    """transformers Cache on this package's KV cache (see the module). config: the model's
    config (its text decoder's is read: layer types, sliding window); max_cache_len: positions
    to preallocate per full-attention layer (generate passes its max_length; more are made room
    for by doubling); dtype: storage dtype, the model's by default, or torch.int8 /
    torch.float8_e4m3fn."""

    def __init__(self, config, max_cache_len: Optional[int] = None, *, dtype: Optional[torch.dtype] = None):
        decoder = config.get_text_config(decoder=True)
        if getattr(decoder, "is_encoder_decoder", False):
            raise ValueError("FlashAttnExtCache serves decoder-only models; this config is an encoder-decoder's")
        if dtype is not None and not (dtype.is_floating_point or dtype in QUANTIZED_DTYPES):
            raise ValueError(
                f"FlashAttnExtCache: dtype must be a float dtype, torch.int8 or float8_e4m3fn, got {dtype}"
            )
        if max_cache_len is not None and max_cache_len <= 0:
            raise ValueError(f"FlashAttnExtCache: max_cache_len must be positive, got {max_cache_len}")
        if _cross_attention(decoder):
            raise ValueError(
                "FlashAttnExtCache serves self-attention layers; this model caches cross-attention K/V too (its code "
                "reads them back from the cache in transformers' layout)"
            )
        layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder)
        unserved = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if unserved:
            raise ValueError(
                f"FlashAttnExtCache serves full and sliding-window attention layers; this model also has {unserved}"
            )
        layers = [
            FlashAttnExtRollingLayer(self, max_cache_len, dtype, kw["sliding_window"])
            if t == "sliding_attention"
            else FlashAttnExtLayer(self, max_cache_len, dtype)
            for t, kw in zip(layer_types, layer_kwargs)
        ]
        super().__init__(layers=layers)
        self._no_deferring = False
        self.config = decoder
        self.dtype = dtype

    def store(
        self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, first_position: Optional[int] = None
    ) -> None:
        """Append K/V (B, Hkv, L, D), computed elsewhere, to layer layer_idx without attending
        (another cache's contents, a benchmark's filler); quantized if the cache is 8-bit.
        first_position: the position of their first row, for an empty sliding-window layer given
        only the last positions (transformers' DynamicSlidingWindowLayer keeps W - 1: pass its
        cumulative_length minus that); by default they follow what the layer holds."""
        self.layers[layer_idx].store(key_states, value_states, first_position)

    def defers(self) -> bool:
        """Whether update() leaves the append to the attention call: only when the model's
        attention runs on this package (it knows to look for the pending K/V) and the model
        passes its attention the K/V update() returned (see FlashAttnExtLayer.claims)."""
        return not self._no_deferring and getattr(self.config, "_attn_implementation", None) in IMPLEMENTATIONS

    def stop_deferring(self) -> None:
        self._no_deferring = True

    @staticmethod
    def serves(config) -> bool:
        """Whether a FlashAttnExtCache can hold this model's K/V."""
        decoder = config.get_text_config(decoder=True)
        if getattr(config, "is_encoder_decoder", False):
            return False
        if _cross_attention(decoder):
            return False
        layer_types, _ = get_layer_types_and_kwargs(decoder)
        return all(t in ("full_attention", "sliding_attention") for t in layer_types)


_prepare_cache_for_generation = GenerationMixin._prepare_cache_for_generation
_dispatches = None  # (install's predicate: whether a model's attention calls go through the interface)


def _prepare_cache(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *a, **kw):
    """generate()'s cache: a FlashAttnExtCache when the model's attention runs on this package
    (through transformers' attention interface: a model with its own attention code would never
    attend the pending K/V) and nothing else was asked for (no cache passed, no
    cache_implementation); otherwise transformers' own choice."""
    if (
        model_kwargs.get("cache") is None
        and model_kwargs.get("past_key_values") is None
        and generation_config.use_cache is not False
        and generation_config.cache_implementation is None
        and getattr(self.config, "_attn_implementation", None) in IMPLEMENTATIONS
        and self._supports_default_dynamic_cache()
        and FlashAttnExtCache.serves(self.config)
        and _dispatches(self.config)
        and not (_assisted(generation_mode, generation_config) and _has_sliding_layers(self.config))
    ):
        model_kwargs["cache"] = FlashAttnExtCache(self.config, max_cache_len=_as_int(max_cache_length))
        if generation_config.is_assistant:
            model_kwargs["cache"].activate_past_recording()
        return None
    return _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *a, **kw
    )


def _assisted(generation_mode, generation_config) -> bool:
    """Assisted / prompt-lookup decoding (on the main model or its assistant): the cache is
    cropped by several tokens, which a rolling layer past its window cannot undo."""
    return getattr(generation_mode, "value", generation_mode) == "assisted_generation" or bool(
        getattr(generation_config, "is_assistant", False)
    )


def _has_sliding_layers(config) -> bool:
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return "sliding_attention" in layer_types


def install(dispatches) -> None:
    """Make FlashAttnExtCache generate()'s default cache for "fa_ext" / "flash_attn_ext" models
    whose config `dispatches(config)` says call transformers' attention interface."""
    global _dispatches
    _dispatches = dispatches
    GenerationMixin._prepare_cache_for_generation = _prepare_cache
