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

"fa_ext": transformers' SDPA-style masks, served by `flash_attn_ext.attention`:
- without a mask (the causal-only case transformers skips the mask for), `is_causal` maps to
  bottom-right causal attention (a chunk of new queries at the end of the keys), and a
  `sliding_window` of W tokens (each token sees itself and the W - 1 before it, transformers'
  convention) to `window_size=(W - 1, 0)`;
- with a mask (padding, or a window the kernel cannot skip), transformers' 4-D boolean mask is
  passed as `attn_mask` and already holds causality and the window.

Both take K/V heads as the model gives them (GQA/MQA: not repeated), honour `scaling`,
`dropout`, `softcap` (Gemma-2's logit soft-capping, in the kernels) and `s_aux` (gpt-oss's
learned attention sinks, in the kernels, with their gradient), and return no attention weights
(`output_attentions` needs the eager implementation).
"""

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ..attention import attention
from ..flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

NAME = "fa_ext"
FLASH_NAME = "flash_attn_ext"


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
    **kwargs,
):
    """The "fa_ext" implementation. query (B, Hq, L, D), key/value (B, Hkv, S, D) ->
    (attn_output (B, L, Hq, D), None). s_aux: gpt-oss's learned attention sinks, (Hq,)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cap = float(softcap) if softcap else 0.0
    sinks = None if s_aux is None else s_aux.float()  # (differentiable: gpt-oss trains them)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        out = attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout, softcap=cap, sinks=sinks)
    else:
        left = sliding_window - 1 if sliding_window else -1
        out = attention(
            query,
            key,
            value,
            causal=bool(is_causal),
            window_size=(left, 0 if is_causal else -1),
            scale=scaling,
            dropout_p=dropout,
            alignment="bottom_right",
            softcap=cap,
            sinks=sinks,
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, flash_attn_ext_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


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

    def flash_attn_ext_flash_forward(module, query, key, value, attention_mask, **kwargs):
        """The "flash_attn_ext" implementation: transformers' flash-attention path on this package."""
        _load_into_transformers(_fa_utils)
        return _flash_attention_forward(module, query, key, value, attention_mask, **kwargs)

    _load_into_transformers(_fa_utils)
    AttentionInterface.register(FLASH_NAME, flash_attn_ext_flash_forward)
    AttentionMaskInterface.register(FLASH_NAME, _flash_attention_mask)

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
