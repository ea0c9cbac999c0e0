"""T5's relative-position bias computed in the kernels for attn_implementation="fa_ext".

T5 (and mT5, which shares its attention) builds its bias once per stack, in the first layer's
compute_bias: a (1, H, L, S) gather from the learned (num_buckets, H) table, which every later
layer reuses as `position_bias` (UMT5: every layer from its own table, the same way). For
"fa_ext" models, compute_bias is replaced by a stand-in that returns a zero-stride
(1, H, L, S) placeholder (no memory) registered with the table, its bucket parameters and the
queries' position offset; the attention implementation finds the
registration and hands the kernels a RelativeBias, so no L x S bias exists in the forward or
the backward, and the table's gradient comes from the kernels' per-distance gradient. Other
implementations, and models this module does not know, keep transformers' own compute_bias.
"""

import importlib
import weakref
from typing import Optional, Tuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..relative_bias import RelativeBias

# (module, attention class) whose compute_bias(query_length, key_length, device, past_seen_tokens)
# gathers T5's bucketed table with T5's bucket function (UMT5 writes it as a method reading its
# config, the same formula).
_T5_FAMILY = (
    ("transformers.models.t5.modeling_t5", "T5Attention"),
    ("transformers.models.mt5.modeling_mt5", "MT5Attention"),
    ("transformers.models.umt5.modeling_umt5", "UMT5Attention"),
)

# placeholder -> (RelativeBias, offset of query 0's position); and the live placeholders by the
# address of their one element, so that a copy sharing it (detach(): reentrant gradient
# checkpointing re-runs the layers on detached inputs) is recognised too.
_REGISTERED = WeakTensorKeyDictionary()
_BY_ADDRESS = weakref.WeakValueDictionary()


def is_placeholder_like(t) -> bool:
    """A zero-stride tensor of more than one element: what compute_bias returns here."""
    return isinstance(t, torch.Tensor) and t.numel() > 1 and all(s == 0 for s in t.stride())


def lookup(position_bias) -> Optional[Tuple[RelativeBias, int]]:
    """The RelativeBias and query offset behind a placeholder from install()'s compute_bias (or
    a view of one). None for any other position_bias. A zero-stride bias that is no registered
    placeholder raises: it would otherwise be taken for a bias of zeros."""
    if not isinstance(position_bias, torch.Tensor):
        return None
    found = _REGISTERED.get(position_bias)
    if found is None and is_placeholder_like(position_bias):
        original = _BY_ADDRESS.get(position_bias.data_ptr())
        if original is not None and original.shape == position_bias.shape:
            found = _REGISTERED.get(original)
        if found is None:
            raise RuntimeError(
                "flash_attn_ext: position_bias is a zero-stride tensor that is not T5's registered bias "
                "placeholder (a copy of it made outside its storage, e.g. by torch.compile or a "
                "transformation of the model's inputs); it would be read as a bias of zeros. Run this "
                "model with attn_implementation='sdpa', or report the case."
            )
    return found


def dense(per_distance: torch.Tensor, len_q: int, len_k: int) -> torch.Tensor:
    """The (1, H, L, S) bias a per-distance one stands for (for kernels that take it as a mask)."""
    idx = torch.arange(len_k, device=per_distance.device) - torch.arange(len_q, device=per_distance.device)[:, None]
    return per_distance[:, idx + len_q - 1].unsqueeze(0)


def install(impl: str) -> None:
    """Replace compute_bias of the T5 family's attention classes by one that, for models running
    `impl`, returns a registered placeholder instead of the (1, H, L, S) bias."""
    for module_name, class_name in _T5_FAMILY:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        original = cls.compute_bias
        if getattr(original, "_flash_attn_ext", False):
            continue
        cls.compute_bias = _lazy_compute_bias(original, impl)


def _lazy_compute_bias(original, impl):
    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        if getattr(self.config, "_attn_implementation", None) != impl:
            return original(self, query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
        table = self.relative_attention_bias.weight  # (num_buckets, H)
        bias = RelativeBias(
            table, self.relative_attention_num_buckets, self.relative_attention_max_distance, not self.is_decoder
        )
        device = table.device if device is None else device
        placeholder = torch.zeros((), device=device, dtype=table.dtype).expand(
            1, table.shape[1], query_length, key_length
        )
        _REGISTERED[placeholder] = (bias, int(past_seen_tokens))
        _BY_ADDRESS[placeholder.data_ptr()] = placeholder
        return placeholder

    compute_bias._flash_attn_ext = True
    compute_bias.__doc__ = original.__doc__
    return compute_bias
