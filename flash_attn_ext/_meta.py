"""Fake (meta) kernels: output shapes, dtypes and strides of every op without computing,
so torch.compile, torch.export and FakeTensor tracing go through the ops without a graph
break. Strides match the real kernels (checked by torch.library.opcheck in the tests)."""

import torch


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rng_state_like(query: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The forward's rng_state: int64 [seed, offset] with dropout, empty without (no draw)."""
    return query.new_empty((2,) if dropout_p > 0 else (0,), dtype=torch.int64)


def _same_device(op: str, **tensors) -> None:
    """The kernels' device check, here too: a tensor on the meta device among real ones routes
    the call to these fake kernels, which must then raise as the kernel would."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"flash_attn_ext.{op}: {name} is on {t.device}, {first_name} on {first.device}; "
                f"all tensors must be on the same device"
            )


@torch.library.register_fake("flash_attn_ext::attention_forward")
def _attention_forward_fake(
    query,
    key,
    value,
    attn_mask,
    dropout_p,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
    relative_bias=None,
):
    _same_device(
        "attention_forward",
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        relative_bias=relative_bias,
    )
    torch._check(query.dim() == 4, lambda: f"query must be 4-D, got {query.dim()}-D")
    torch._check(key.dim() == 4 and value.dim() == 4, lambda: "key and value must be 4-D")
    torch._check(
        query.shape[1] % key.shape[1] == 0,
        lambda: "number of query heads must be a multiple of the number of key/value heads",
    )
    batch, heads, len_q, _ = query.shape
    # (B, L, H, Dv) memory viewed as (B, H, L, Dv), as the CPU/CUDA kernels allocate it.
    out = query.new_empty((batch, len_q, heads, value.shape[-1])).transpose(1, 2)
    lse = query.new_empty((batch, heads, len_q), dtype=_lse_dtype(query.dtype))
    rng_state = _rng_state_like(query, dropout_p)
    return out, lse, rng_state


@torch.library.register_fake("flash_attn_ext::attention_backward")
def _attention_backward_fake(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    rng_state,
    attn_mask,
    dropout_p,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap=0.0,
    alibi_slopes=None,
    grad_lse=None,
    grad_attn_mask=False,
    grad_alibi_slopes=False,
    relative_bias=None,
    grad_relative_bias=False,
):
    _same_device(
        "attention_backward",
        query=query,
        grad_out=grad_out,
        key=key,
        value=value,
        out=out,
        lse=lse,
        attn_mask=attn_mask,
        alibi_slopes=alibi_slopes,
        grad_lse=grad_lse,
        relative_bias=relative_bias,
    )
    torch._check(
        not grad_attn_mask or (attn_mask is not None and attn_mask.is_floating_point()),
        lambda: "grad_attn_mask=True needs a floating-point attn_mask",
    )
    torch._check(not grad_alibi_slopes or alibi_slopes is not None, lambda: "grad_alibi_slopes=True needs alibi_slopes")
    torch._check(
        not grad_relative_bias or relative_bias is not None, lambda: "grad_relative_bias=True needs relative_bias"
    )
    # The bias gradients: contiguous, in the shapes and dtypes of the mask and the slopes; empty
    # (0,) when not asked for.
    grad_mask = attn_mask.new_empty(attn_mask.shape) if grad_attn_mask else query.new_empty((0,))
    grad_slopes = alibi_slopes.new_empty(alibi_slopes.shape) if grad_alibi_slopes else query.new_empty((0,))
    grad_relative = relative_bias.new_empty(relative_bias.shape) if grad_relative_bias else query.new_empty((0,))
    return (
        torch.empty_like(query),
        torch.empty_like(key),
        torch.empty_like(value),
        grad_mask,
        grad_slopes,
        grad_relative,
    )


@torch.library.register_fake("flash_attn_ext::attention_varlen_forward")
def _attention_varlen_forward_fake(
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
):
    _same_device(
        "attention_varlen_forward",
        query=query,
        key=key,
        value=value,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
    )
    torch._check(query.dim() == 3, lambda: f"query must be 3-D (total_q, heads, head_dim), got {query.dim()}-D")
    torch._check(key.dim() == 3 and value.dim() == 3, lambda: "key and value must be 3-D")
    total_q, heads, _ = query.shape
    out = query.new_empty((total_q, heads, value.shape[-1]))
    lse = query.new_empty((heads, total_q), dtype=_lse_dtype(query.dtype))
    rng_state = _rng_state_like(query, dropout_p)
    return out, lse, rng_state


@torch.library.register_fake("flash_attn_ext::attention_varlen_backward")
def _attention_varlen_backward_fake(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    rng_state,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap=0.0,
    alibi_slopes=None,
    grad_lse=None,
):
    _same_device(
        "attention_varlen_backward",
        query=query,
        grad_out=grad_out,
        key=key,
        value=value,
        out=out,
        lse=lse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        alibi_slopes=alibi_slopes,
        grad_lse=grad_lse,
    )
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@torch.library.register_fake("flash_attn_ext::kv_cache_append")
def _kv_cache_append_fake(
    k_cache,
    v_cache,
    k_new,
    v_new,
    cache_seqlens,
    rolling=False,
    block_table=None,
    k_cache_scale=None,
    v_cache_scale=None,
):
    _same_device(
        "kv_cache_append",
        k_cache=k_cache,
        v_cache=v_cache,
        k_new=k_new,
        v_new=v_new,
        cache_seqlens=cache_seqlens,
        block_table=block_table,
        k_cache_scale=k_cache_scale,
        v_cache_scale=v_cache_scale,
    )
    torch._check(k_cache.dim() == 4 and k_new.dim() == 4, lambda: "caches and new K/V must be 4-D")
    return None


@torch.library.register_fake("flash_attn_ext::attention_kvcache")
def _attention_kvcache_fake(
    query,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new,
    v_new,
    scale,
    window_left,
    window_right,
    block_table=None,
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
    k_cache_scale=None,
    v_cache_scale=None,
):
    _same_device(
        "attention_kvcache",
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        cache_seqlens=cache_seqlens,
        k_new=k_new,
        v_new=v_new,
        block_table=block_table,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        k_cache_scale=k_cache_scale,
        v_cache_scale=v_cache_scale,
    )
    torch._check(query.dim() == 4 and k_cache.dim() == 4, lambda: "query and caches must be 4-D")
    batch, heads, len_q, _ = query.shape
    out = query.new_empty((batch, len_q, heads, v_cache.shape[-1])).transpose(1, 2)
    lse = query.new_empty((batch, heads, len_q), dtype=_lse_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("flash_attn_ext::merge_attention_states")
def _merge_attention_states_fake(out_a, lse_a, out_b, lse_b):
    _same_device("merge_attention_states", out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    torch._check(out_a.shape == out_b.shape, lambda: "out_a and out_b must have the same shape")
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


@torch.library.register_fake("flash_attn_ext::_raise_kvcache_device_errors")
def _raise_kvcache_device_errors_fake(on_device):
    return None


# The error check returns nothing and writes nothing, so graph dead-code elimination (Dynamo's,
# AOT's, Inductor's) would drop it from a compiled step: it is marked as having a side effect.
torch.fx.node.has_side_effect(torch.ops.flash_attn_ext._raise_kvcache_device_errors.default)
