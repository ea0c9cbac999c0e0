"""transformers integration: importing this module registers "fa_ext" with transformers'
AttentionInterface and AttentionMaskInterface, so

    import flash_attn_ext.integrations.transformers  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fa_ext")

runs every attention layer of the model on this package's kernels.

Why not the name "flash_attn_ext": transformers (5.x) treats every attn_implementation whose
name contains "flash" as a flash-attn kernel package and imports `flash_attn_varlen_func` from
it (padding-free varlen batches) before it looks at AttentionInterface. This package has no
varlen functions yet, so such a name fails at model construction; "fa_ext" takes the
AttentionInterface path with transformers' SDPA-style masks.

- K/V heads are taken as the model gives them (GQA/MQA: not repeated).
- Without a mask (the causal-only case transformers skips the mask for), `is_causal` maps to
  bottom-right causal attention (a chunk of new queries at the end of the keys), and a
  `sliding_window` of W tokens (each token sees itself and the W - 1 before it, transformers'
  convention) to `window_size=(W - 1, 0)`.
- With a mask (padding, or a window the kernel cannot skip), transformers' 4-D boolean SDPA-style
  mask is passed as `attn_mask` and already holds causality and the window.
- `scaling` and `dropout` are honoured; `softcap` (Gemma-2) is not supported yet and raises.
- Returns no attention weights (`output_attentions` needs the eager implementation).
"""
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ..attention import attention

NAME = "fa_ext"


def flash_attn_ext_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, attention_mask, dropout: float = 0.0, scaling=None,
                                     is_causal=None, sliding_window=None, softcap=None, **kwargs):
    """query (B, Hq, L, D), key/value (B, Hkv, S, D) -> (attn_output (B, L, Hq, D), None)."""
    if softcap is not None:
        raise NotImplementedError("flash_attn_ext: softcap (attention logit soft-capping) is not supported yet")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        out = attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout)
    else:
        left = sliding_window - 1 if sliding_window else -1
        out = attention(query, key, value, causal=bool(is_causal), window_size=(left, 0 if is_causal else -1),
                        scale=scaling, dropout_p=dropout, alignment="bottom_right")
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, flash_attn_ext_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
