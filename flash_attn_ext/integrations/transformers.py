"""transformers integration: importing this module registers two attention implementations with
transformers' AttentionInterface and AttentionMaskInterface,

    import flash_attn_ext.integrations.transformers  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flash_attn_ext")

so every attention layer of the model runs on this package's kernels (CPU, and CUDA once
verified).

"flash_attn_ext": transformers' own flash-attention path (`flash_attention_forward`, the code
that serves "flash_attention_2") on this package's flash-attn compatible functions: padded
batches are unpadded into packed sequences and served by `flash_attn_varlen_func`, packed
(padding-free) batches from position_ids likewise, and unpadded batches by `flash_attn_func`.
transformers (5.x) loads the flash-attn functions of any implementation whose name contains
"flash" from a module-level cache in `transformers.modeling_flash_attention_utils`; this module
fills that cache with this package's functions (again before each call, in case another model
in the process loaded flash-attn in between). Registered only when that cache exists (the
transformers versions this was tested with); otherwise only "fa_ext" is.

"fa_ext": transformers' masks, served by `flash_attn_ext.attention` and the KV-cache op:
- its mask function (_compact_mask.py) returns a compact (B, S) mask where causality, the
  sliding window and left padding say it all: causal, bottom-right aligned, a `sliding_window`
  of W tokens (each token sees itself and the W - 1 before it, transformers' convention) as
  `window_size=(W - 1, 0)`, the window taken from the mask when the call passes none; left
  padding through `cache_leftpad` in inference (a dense mask built here when a gradient is
  needed);
- without a mask (the causal-only cases transformers' sdpa_mask skips), `is_causal` maps to
  causal attention, bottom-right aligned for one query or L == S, top-left otherwise (an empty
  static cache's prefill);
- with a dense mask (custom patterns, padding in the middle, packed sequences, static caches),
  transformers' 4-D boolean mask is passed as `attn_mask` and already holds causality and the
  window.
On a FlashAttnExtCache (transformers_cache.py) both implementations append the pending K/V and
attend in one KV-cache call where they can (see `pending_layer`), else take the paths above on
the K/V in order.

Both take K/V heads as the model gives them (GQA/MQA: not repeated), honour `scaling`,
`dropout`, `softcap` (Gemma-2's logit soft-capping, in the kernels), `s_aux` (gpt-oss's learned
attention sinks, in the kernels, with their gradient; `sinks` of shape (Hq,) likewise), and
return no attention weights. "fa_ext" also serves `position_bias` (T5's relative-position
bias: for T5 / mT5 computed in the kernels from its table (_t5_bias.py), otherwise added to the
scores as a float mask; trainable on CPU); "flash_attn_ext" refuses it (transformers' flash
path has no place for it).

Every other keyword a model passes is checked against NEUTRAL / REFUSED below: served, accepted
because it cannot change the result, or refused with an error naming it. A keyword on none of
those lists is refused too, so a model that passes something new fails loudly instead of
running without it.
"""

import functools
import importlib

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from ..attention import attention
from . import _compact_mask, _t5_bias, transformers_cache
from ..flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from ..kv_cache import attention_with_kvcache
from .transformers_cache import FlashAttnExtCache  # noqa: F401  (the generate() cache, exported here)

NAME = "fa_ext"
FLASH_NAME = "flash_attn_ext"

# What each keyword that transformers' models (5.x) pass to an attention implementation, beyond
# the ones named in its signature, does here. Collected from every modeling file's calls and
# from TransformersKwargs / FlashAttentionKwargs.
# - "neutral": cannot change the attention's result beyond what the model's masks say
#   (position_ids: transformers turns packing in them into the mask it builds, without a cache,
#   for "fa_ext" as for its own sdpa / eager, and its flash path reads them itself for
#   "flash_attn_ext"; the kernels are deterministic for a fixed thread count, so
#   `deterministic` asks for nothing more);
# - "served": read here (see the implementations);
# - any other keyword, and the ones in REFUSED, raise a TypeError naming them.
NEUTRAL = frozenset(
    {
        "position_ids",
        "seq_idx",
        "cache_position",
        "use_cache",
        "num_items_in_batch",
        "output_hidden_states",
        "output_router_logits",
        "deterministic",
        # model inputs the layer has already consumed (cross-attention K/V, the cache)
        "encoder_hidden_states",
        "encoder_attention_mask",
        "past_key_values",
        "past_key_value",
        "return_dict",
    }
)
# Served only when falsy / None: attention weights are never returned, and sparse attention
# (DeepSeek-V3.2's `indices`, MiniMax's `block_indices`) would silently run dense here.
REFUSED = {
    "output_attentions": "attention weights are not returned; use attn_implementation='eager'",
    "indices": "sparse attention (selected key indices) is not implemented; it would run dense",
    "block_indices": "block-sparse attention (selected key blocks) is not implemented; it would run dense",
    "head_mask": "a head mask multiplies the attention weights, which are never formed here",
}
# Read by transformers' flash path ("flash_attn_ext" hands them on): varlen and paged calls.
FLASH_PATH = frozenset(
    {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "block_table", "k_cache", "v_cache"}
)


def _check_keywords(impl: str, kwargs: dict, served: frozenset) -> None:
    """Raise for a keyword this implementation would otherwise drop (see NEUTRAL / REFUSED)."""
    for key, value in kwargs.items():
        if key in NEUTRAL or key in served:
            continue
        if key in REFUSED:
            if value is None or value is False:
                continue
            raise TypeError(f"attn_implementation={impl!r}: {key}={_describe(value)}: {REFUSED[key]}")
        raise TypeError(
            f"attn_implementation={impl!r} does not know the keyword {key!r} this model passes to its attention, "
            f"so it cannot serve the call without changing its meaning; use attn_implementation='sdpa' or 'eager'"
        )


def _describe(value) -> str:
    return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def _sinks(impl: str, s_aux, sinks):
    """gpt-oss's s_aux (or `sinks`, the same thing under another name) as the kernels' float32
    (Hq,) sinks; per-token sinks (a tensor of another shape) are refused."""
    if sinks is not None:
        if s_aux is not None:
            raise TypeError(f"attn_implementation={impl!r}: pass s_aux or sinks, not both")
        if sinks.dim() != 1:
            raise TypeError(
                f"attn_implementation={impl!r}: sinks={_describe(sinks)}: only one learned sink logit per query "
                f"head, shape (Hq,), is served (per-token sinks are not)"
            )
        s_aux = sinks
    return None if s_aux is None else s_aux.float()  # (differentiable: gpt-oss trains them)


def _bias_mask(impl: str, position_bias, mask, query, key, sliding_window=None):
    """T5's position_bias (broadcasting to (B, Hq, L, S)) and the model's 4-D mask (or None) as
    one additive float mask: the bias where the mask lets a key through, -inf where it does not.
    Kept in float32 for 16-bit queries (the kernels add a float32 mask as it is). The bias is
    differentiable: on CPU the kernels compute its gradient (T5's trainable relative-position
    table trains through it); elsewhere one that requires grad is refused."""
    if not isinstance(position_bias, torch.Tensor):
        raise TypeError(f"attn_implementation={impl!r}: position_bias must be a tensor, got {_describe(position_bias)}")
    if sliding_window:
        raise TypeError(f"attn_implementation={impl!r}: position_bias with a sliding_window is not served")
    if position_bias.requires_grad and torch.is_grad_enabled() and query.device.type != "cpu":
        raise NotImplementedError(
            f"attn_implementation={impl!r}: position_bias requires grad (a trainable relative-position bias, "
            f"as in T5), and only the CPU kernels compute its gradient; train with "
            f"attn_implementation='sdpa' or 'eager', or run under torch.no_grad()"
        )
    dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    bias = position_bias[..., : key.shape[-2]].to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.to(dtype)


def _within_sequences(mask, cu_q, cu_k, query, key):
    """mask (or None) restricted to the packed sequences cu_seq_lens_q / _k delimit in the
    flattened (B * L) queries and (B * S) keys: no attention across their boundaries."""
    B, _, L, _ = query.shape
    S = key.shape[-2]
    cu_q, cu_k = (torch.as_tensor(c, device=query.device).long() for c in (cu_q, cu_k))
    if int(cu_q[-1]) != B * L or int(cu_k[-1]) != B * S:
        raise ValueError(
            f"attn_implementation={NAME!r}: cu_seq_lens_q / cu_seq_lens_k must end at the batch's {B * L} queries "
            f"and {B * S} keys, got {int(cu_q[-1])} and {int(cu_k[-1])}"
        )
    seq_q = torch.bucketize(torch.arange(B * L, device=query.device), cu_q[1:], right=True).view(B, 1, L, 1)
    seq_k = torch.bucketize(torch.arange(B * S, device=query.device), cu_k[1:], right=True).view(B, 1, 1, S)
    same = seq_q == seq_k
    if mask is None:
        return same
    if mask.dtype == torch.bool:
        return mask & same
    return mask.masked_fill(~same, float("-inf"))


def flash_attn_ext_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    sliding_window=None,
    softcap=None,
    s_aux=None,
    sinks=None,
    position_bias=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """The "fa_ext" implementation. query (B, Hq, L, D), key/value (B, Hkv, S, D) ->
    (attn_output (B, L, Hq, D), None). s_aux: gpt-oss's learned attention sinks, (Hq,).
    position_bias: T5's additive bias (its table in the kernels where _t5_bias registered it,
    else a float mask; trainable on CPU). cu_seq_lens_q / _k (packed sequences):
    without a mask or bias, the varlen kernel; with one, the mask is restricted to each
    sequence (transformers' masks do not always hold the packing: not with a cache)."""
    _check_keywords(NAME, kwargs, frozenset())
    if (cu_seq_lens_q is None) != (cu_seq_lens_k is None):
        raise TypeError(f"attn_implementation={NAME!r}: pass cu_seq_lens_q and cu_seq_lens_k together, or neither")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cap = float(softcap) if softcap else 0.0
    sink_logits = _sinks(NAME, s_aux, sinks)
    L = query.shape[-2]
    spec = _compact_mask.compact(attention_mask, sliding_window)
    layer = transformers_cache.pending_layer(key)
    if (
        layer is not None
        and attention_mask is not None
        and spec is None
        and not _compact_mask.made_here(attention_mask)
    ):
        # a mask the model made itself, maybe from the K/V update() returned (Doge's, from the values)
        layer.release("the model built its own attention mask (maybe from the keys/values update() returned)")
        layer = None
    if layer is not None and layer.claims(value):
        if (spec is not None or attention_mask is None) and _cache_serves(
            is_causal, dropout, position_bias, cu_seq_lens_q
        ):
            window = _window(NAME, spec, sliding_window)
            pad, pad_max = _absolute(layer, spec.pad, spec.pad_max) if spec is not None else (None, 0)
            out = layer.attend(
                query, scale=scaling, window=window, softcap=cap, sinks=sink_logits, pad=pad, pad_max=pad_max
            )
            return out, None
        # A dense mask (a custom pattern) or a call the in-place path does not take: the K/V the
        # mask covers, in order, for the general path below.
        key, value = layer.settle()
    if spec is not None:
        if position_bias is None and cu_seq_lens_q is None:
            out = _compact_call(
                query,
                key,
                value,
                spec,
                attention_mask.shape[-1],
                is_causal,
                sliding_window,
                scaling,
                dropout,
                cap,
                sink_logits,
            )
            return out, None
        # (the bias / packing paths take it dense)
        attention_mask = _compact_mask.dense_from(spec, L, key.shape[-2], query.device)
    S = key.shape[-2]
    if attention_mask is None and position_bias is None and cu_seq_lens_q is not None:
        out = _packed(
            query,
            key,
            value,
            is_causal,
            sliding_window,
            scaling,
            dropout,
            cap,
            sink_logits,
            cu_seq_lens_q,
            cu_seq_lens_k,
            max_length_q,
            max_length_k,
        )
        return out, None
    mask = None if attention_mask is None else attention_mask[:, :, :, :S]
    relative = _t5_bias.lookup(position_bias)
    if relative is not None:  # T5's table: the bias of distance j - (i + offset)
        table_bias, offset = relative
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        relative = table_bias.per_distance(L, S, offset, dtype)
        if query.device.type != "cpu":  # the CUDA kernels take it as a mask (forward only)
            position_bias, relative = _t5_bias.dense(relative, L, S), None
    if relative is None and position_bias is not None:
        mask = _bias_mask(NAME, position_bias, mask, query, key, sliding_window)
    if cu_seq_lens_q is not None:
        mask = _within_sequences(mask, cu_seq_lens_q, cu_seq_lens_k, query, key)
    if attention_mask is not None:  # transformers' mask holds causality and the window
        out = attention(
            query,
            key,
            value,
            attn_mask=mask,
            scale=scaling,
            dropout_p=dropout,
            softcap=cap,
            sinks=sink_logits,
            relative_bias=relative,
        )
    else:
        # transformers leaves the mask out only where SDPA's own flags serve the call: one query
        # (it sees every key), L == S (either alignment), or an empty static cache's prefill
        # (1 < L < S: SDPA's top-left is_causal, so the queries never see the free slots after them).
        left = sliding_window - 1 if sliding_window else -1
        out = attention(
            query,
            key,
            value,
            causal=bool(is_causal),
            window_size=(left, 0 if is_causal else -1),
            scale=scaling,
            attn_mask=mask,
            dropout_p=dropout,
            alignment="bottom_right" if L == 1 or L == S else "top_left",
            softcap=cap,
            sinks=sink_logits,
            relative_bias=relative,
        )
    return out.transpose(1, 2).contiguous(), None


def _window(impl, spec, sliding_window) -> int:
    """The sliding window of a call (0: none): the model's `sliding_window`, else the one its
    mask was built with (Phi-3.5-MoE and Qwen2-MoE build a windowed mask and pass no window);
    both given and different is refused."""
    window = int(sliding_window) if sliding_window else 0
    masked = spec.window if spec is not None else 0
    if window and masked and window != masked:
        raise ValueError(
            f"attn_implementation={impl!r}: the model's mask was built for a sliding window of {masked}, the "
            f"attention call asks for sliding_window={sliding_window}"
        )
    return window or masked


def _absolute(layer, pad, pad_max):
    """Leading pad counts in the frame of the keys transformers' mask covers -> absolute cache
    positions (a sliding layer's keys start at its kv_offset; a row whose padding all lies before
    it keeps 0: those positions are outside the window anyway)."""
    offset = layer.kv_offset()
    if pad is None or not offset:
        return pad, pad_max
    return torch.where(pad > 0, pad + offset, pad), pad_max + offset


def _cache_serves(is_causal, dropout, position_bias, cu_seq_lens_q) -> bool:
    """Whether a call on a FlashAttnExtCache can append and attend in one KV-cache call: causal,
    no dropout, no bias, no packed sequences (otherwise the cache hands over its K/V in order and
    the general path serves the call)."""
    return bool(is_causal) and not dropout and position_bias is None and cu_seq_lens_q is None


def _compact_call(query, key, value, spec, width, is_causal, sliding_window, scaling, dropout, cap, sinks):
    """A call whose mask is compact (causal, bottom-right, a window, left padding): no dense
    mask. Left padding goes through cache_leftpad on the K/V as a cache when no gradient is
    needed (inference: DynamicCache, or a forward without a cache); with one, the dense mask."""
    if not is_causal:
        raise ValueError(f"attn_implementation={NAME!r}: a causal mask reached a non-causal attention layer")
    window = _window(NAME, spec, sliding_window)
    L, S = query.shape[-2], key.shape[-2]
    if width != S:
        raise ValueError(f"attn_implementation={NAME!r}: the attention mask covers {width} keys, the call has {S}")
    left = window - 1 if window else -1
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, sinks))
    if spec.pad is None or grad or dropout:
        mask = None if spec.pad is None else _compact_mask.dense_from(spec, L, S, query.device)
        out = attention(
            query,
            key,
            value,
            attn_mask=mask,
            causal=mask is None,
            window_size=(left, 0) if mask is None else (-1, -1),
            scale=scaling,
            dropout_p=dropout,
            alignment="bottom_right",
            softcap=cap,
            sinks=sinks,
        )
        return out.transpose(1, 2).contiguous()
    if key.stride(0) * value.stride(2) != value.stride(0) * key.stride(2):
        # (cache_leftpad addresses K and V by position alike: a model that made its values
        # another way, e.g. DiffLlama's split, gets both in one layout)
        key, value = key.contiguous(), value.contiguous()
    out = attention_with_kvcache(
        query,
        key,
        value,
        cache_seqlens=S,
        softmax_scale=scaling,
        causal=True,
        window_size=(left, 0),
        layout="bhsd",
        softcap=cap,
        sinks=sinks,
        cache_leftpad=spec.pad,
    )
    return out.transpose(1, 2).contiguous()


def _packed(query, key, value, is_causal, sliding_window, scaling, dropout, cap, sinks, cu_q, cu_k, max_q, max_k):
    """Sequences packed along the length (B rows flattened, cu_seq_lens over them) by the
    varlen kernel: no attention across sequence boundaries."""
    B, Hq, L, _ = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1])
    longest = lambda cu, given: int(given) if given is not None else int((cu[1:] - cu[:-1]).max())
    left = sliding_window - 1 if sliding_window else -1
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    out = flash_attn_varlen_func(
        flat(query),
        flat(key),
        flat(value),
        cu_q,
        cu_k,
        longest(cu_q, max_q),
        longest(cu_k, max_k),
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=bool(is_causal),
        window_size=(left, 0 if is_causal else -1),
        softcap=cap,
        sinks=sinks,
    )
    return out.reshape(B, L, Hq, value.shape[-1])


AttentionInterface.register(NAME, flash_attn_ext_attention_forward)
_t5_bias.install(NAME)


def _dispatching_mask(impl: str, make_mask):
    """The mask function registered for impl: make_mask, once the model is known to compute its
    attention through transformers' attention interface. A model that computes attention in its
    own code (BLOOM, for one: transformers keeps it on "eager") would add this mask, meant for
    the kernels, to its scores itself: a wrong answer without a word, so it is refused here."""

    def mask(*args, config=None, **kwargs):
        if config is not None:
            _check_model_dispatches(impl, type(config))
        return make_mask(*args, config=config, **kwargs)

    return mask


@functools.lru_cache(maxsize=None)
def _own_attention_module(config_cls: type):
    """The modeling module of a transformers model that computes attention in its own code
    instead of calling transformers' attention interface (directly or through another model's
    modules), or None (it dispatches, or its code is unknown here)."""
    module = config_cls.__module__
    if ".configuration_" not in module:
        return None  # (a config defined outside transformers' model folders: its code is unknown here)
    try:
        modeling = importlib.import_module(module.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    if hasattr(modeling, "ALL_ATTENTION_FUNCTIONS") or _reuses_dispatching_model(modeling):
        return None
    return modeling


def _check_model_dispatches(impl: str, config_cls: type) -> None:
    modeling = _own_attention_module(config_cls)
    if modeling is not None:
        raise ValueError(
            f"attn_implementation={impl!r}: {modeling.__name__} computes attention in its own code instead of "
            f"calling transformers' attention interface, so these kernels would never run and the mask made for "
            f"them would be added to its scores; use attn_implementation='eager'"
        )


def _reuses_dispatching_model(modeling) -> bool:
    """Whether a modeling module builds on another model's modules that call the attention
    interface (DPR runs BertModel, a remote-code model may reuse Llama's layers)."""
    for obj in vars(modeling).values():
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ != modeling.__name__:
            source = importlib.import_module(obj.__module__)
            if ".models." in obj.__module__ and hasattr(source, "ALL_ATTENTION_FUNCTIONS"):
                return True
    return False


AttentionMaskInterface.register(NAME, _dispatching_mask(NAME, _compact_mask.mask_function))


def _flash_cache():
    """transformers' cache of the loaded flash-attn functions, or None where it has none."""
    try:
        from transformers import modeling_flash_attention_utils as fa_utils
        from transformers.integrations.flash_attention import flash_attention_forward
        from transformers.masking_utils import flash_attention_mask
    except ImportError:
        return None
    needed = (
        "_loaded_implementation",
        "_flash_fn",
        "_flash_varlen_fn",
        "_flash_with_kvcache_fn",
        "_pad_fn",
        "_unpad_fn",
        "_process_flash_kwargs_fn",
        "_process_with_kvcache_kwargs_fn",
        "_pad_input",
        "_unpad_input",
        "_lazy_define_process_function",
    )
    if not all(hasattr(fa_utils, n) for n in needed):
        return None
    return fa_utils, flash_attention_forward, flash_attention_mask


def _load_into_transformers(fa_utils) -> None:
    """Make this package's functions transformers' loaded flash-attn implementation."""
    if fa_utils._loaded_implementation == FLASH_NAME:
        return
    fa_utils._flash_fn = flash_attn_func
    fa_utils._flash_varlen_fn = flash_attn_varlen_func
    fa_utils._flash_with_kvcache_fn = torch.compiler.disable(flash_attn_with_kvcache)
    fa_utils._pad_fn, fa_utils._unpad_fn = fa_utils._pad_input, fa_utils._unpad_input
    fa_utils._process_flash_kwargs_fn = fa_utils._lazy_define_process_function(flash_attn_varlen_func)
    fa_utils._process_with_kvcache_kwargs_fn = fa_utils._lazy_define_process_function(flash_attn_with_kvcache)
    fa_utils._loaded_implementation = FLASH_NAME


_cache = _flash_cache()
if _cache is not None:
    _fa_utils, _flash_attention_forward, _flash_attention_mask = _cache

    _FLASH_SERVED = FLASH_PATH | {"dropout", "scaling", "sliding_window", "softcap", "is_causal", "s_aux"}

    def flash_attn_ext_flash_forward(
        module, query, key, value, attention_mask, *, sinks=None, position_bias=None, s_aux=None, **kwargs
    ):
        """The "flash_attn_ext" implementation: transformers' flash-attention path on this package.
        That path has no place for an additive bias (transformers keeps T5 off flash attention),
        so position_bias is refused here: "fa_ext" serves it."""
        _check_keywords(FLASH_NAME, kwargs, _FLASH_SERVED)
        if position_bias is not None:
            raise TypeError(
                f"attn_implementation={FLASH_NAME!r}: position_bias={_describe(position_bias)} (a relative-position "
                f"bias, as in T5) has no place in transformers' flash-attention path; use attn_implementation='fa_ext'"
            )
        s_aux = _sinks(FLASH_NAME, s_aux, sinks)
        layer = transformers_cache.pending_layer(key)
        if layer is not None and layer.claims(value):
            out = _flash_through_cache(layer, module, query, attention_mask, s_aux, kwargs)
            if out is not None:
                return out, None
            key, value = layer.settle()  # (transformers' flash path on the K/V in order)
        _load_into_transformers(_fa_utils)
        return _flash_attention_forward(module, query, key, value, attention_mask, s_aux=s_aux, **kwargs)

    def _flash_through_cache(layer, module, query, attention_mask, s_aux, kwargs):
        """A "flash_attn_ext" call on a FlashAttnExtCache: the 2-D padding mask transformers'
        flash path gets (its last kv_length columns, or None) gives the left padding. None for a
        call the in-place path does not take (not causal, dropout, packed, padding that is not on
        the left only): transformers' flash path serves those."""
        is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
        if not _cache_serves(is_causal, kwargs.get("dropout", 0.0), None, kwargs.get("cu_seq_lens_q")):
            return None
        pad, pad_max = None, 0
        if attention_mask is not None:
            found = _compact_mask.left_padding(attention_mask)
            if found is None:
                return None
            pad, pad_max = _absolute(layer, *found)
        softcap = kwargs.get("softcap")
        return layer.attend(
            query,
            scale=kwargs.get("scaling"),
            window=_window(FLASH_NAME, None, kwargs.get("sliding_window")),
            softcap=float(softcap) if softcap else 0.0,
            sinks=s_aux,
            pad=pad,
            pad_max=pad_max,
        )

    _load_into_transformers(_fa_utils)
    AttentionInterface.register(FLASH_NAME, flash_attn_ext_flash_forward)
    AttentionMaskInterface.register(FLASH_NAME, _dispatching_mask(FLASH_NAME, _flash_attention_mask))

    def _declare_sink_support() -> None:
        """gpt-oss accepts only the flash implementations that serve its attention sinks (its
        `_compatible_flash_implementations`; any other "flash" name is replaced by the first of
        them). "flash_attn_ext" serves them (s_aux reaches the kernels), so it joins that list."""
        try:
            from transformers.models.gpt_oss import modeling_gpt_oss
        except ImportError:
            return
        cls = modeling_gpt_oss.GptOssPreTrainedModel
        impls = getattr(cls, "_compatible_flash_implementations", None)
        if impls is not None and FLASH_NAME not in impls:
            cls._compatible_flash_implementations = [*impls, FLASH_NAME]

    _declare_sink_support()


# generate()'s default cache for models whose attention calls go through the interface (a model
# with its own attention code would never attend the pending K/V).
transformers_cache.install(lambda config: _own_attention_module(type(config)) is None)
