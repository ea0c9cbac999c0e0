"""The mask "fa_ext" registers with transformers' AttentionMaskInterface: a compact form in place
of the (B, 1, L, S) boolean mask wherever causality, the sliding window and left padding say
everything the mask would.

transformers builds a mask for every forward (create_causal_mask / create_sliding_window_causal_mask)
from a mask function (causal, or causal and a window of W tokens), the 2-D padding mask and the
cache's sizes. SDPA gets it as a dense (B, 1, L, S) tensor: 16 M entries for a 4k prompt, one
per key on every decoded token, and a mask sends the kernels to their general masked path. Here,
when the mask function is one of those two (recognised by its code, see `_window_of`), the
queries are the last L positions of the keys (every cache transformers or this package has,
except a static cache's fixed-size keys) and the padding is on the left only, the mask returned
is the (B, kv_length) padding mask itself, marked with a `CompactMask` that says what it stands
for: causal, bottom-right aligned, the window, and the leading pad count of each row. (A 2-D
mask reaches the "fa_ext" attention from nowhere else: transformers gives it 4-D masks or none.) Anything
else (a custom mask function, padding in the middle, packed sequences, a static cache) gets
transformers' own sdpa_mask, as before.
"""

import dataclasses
from typing import Optional

import torch
from transformers import masking_utils

_CAUSAL = masking_utils.causal_mask_function.__code__
_AND = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
_WINDOW = masking_utils.sliding_window_overlay(1).__code__

ATTRIBUTE = "_fa_ext_compact"
# Marks the dense masks made here (transformers' own): a model that builds its own mask from the
# K/V its cache returned (Doge) hands the attention call a mask without it.
MADE_HERE = "_fa_ext_mask"


@dataclasses.dataclass(frozen=True)
class CompactMask:
    """What a compact (B, S) mask stands for, in the frame of the S keys of the call: key j is
    visible to query i (the last L of the S positions) when j <= S - L + i (causal, bottom-right
    aligned), S - L + i - j < window (window > 0) and j >= pad[b]. pad: int32 (B,) leading pad
    keys per row, None when no row has any; pad_max its largest entry (read once, where the mask
    is made, so no attention call has to)."""

    window: int
    pad: Optional[torch.Tensor]
    pad_max: int


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _window_of(mask_function) -> Optional[int]:
    """0 for transformers' causal mask function, W for its sliding-window causal one
    (and_masks(sliding_window_overlay(W), causal_mask_function)), None for anything else."""
    code = getattr(mask_function, "__code__", None)
    if code is _CAUSAL:
        return 0
    if code is not _AND:
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    overlay, causal = parts
    if getattr(causal, "__code__", None) is not _CAUSAL or getattr(overlay, "__code__", None) is not _WINDOW:
        return None
    window = _closure(overlay).get("sliding_window")
    return int(window) if isinstance(window, int) and window > 0 else None


def left_padding(mask: torch.Tensor):
    """(pad, pad_max) of a (B, S) boolean padding mask whose rows are False then True (left
    padding; a row of padding only, as in the first chunk of a short prompt, counts too): pad
    int32 (B,) leading False count, None if 0 everywhere; None if a row is not of that form
    (padding on the right or in the middle)."""
    if mask.dim() != 2:
        return None
    mask = mask.to(torch.bool)
    if not bool(((mask.cumsum(-1) > 0) == mask).all()):
        return None
    pad = (~mask).sum(-1)
    pad_max = int(pad.max()) if pad.numel() else 0
    return (pad.to(torch.int32) if pad_max else None), pad_max


def compact(mask: Optional[torch.Tensor], sliding_window) -> Optional[CompactMask]:
    """The CompactMask of a 2-D mask (only `mask_function` makes them for "fa_ext"), or None
    for a dense mask or none. A mask that lost its CompactMask on the way (a detached copy under
    reentrant checkpointing) is read again, with the call's sliding window."""
    if mask is None or mask.dim() != 2:
        return None
    spec = getattr(mask, ATTRIBUTE, None)
    if spec is not None:
        return spec
    found = left_padding(mask)
    if found is None:
        raise ValueError(
            "attn_implementation='fa_ext': a 2-D attention mask reached the attention call with padding that is not "
            "on the left only; pass the model a 2-D padding mask (transformers builds the rest) or a 4-D mask"
        )
    return CompactMask(int(sliding_window) if sliding_window else 0, *found)


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=masking_utils.causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    allow_is_causal_skip: bool = True,
    device="cpu",
    **kwargs,
):
    """transformers' sdpa_mask, except where a compact mask says the same (see the module)."""
    _dense = lambda: masking_utils.sdpa_mask(  # noqa: E731
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=allow_is_causal_skip,
        device=device,
        **kwargs,
    )

    def dense():
        mask = _dense()
        if mask is not None:
            setattr(mask, MADE_HERE, True)
        return mask

    window = _window_of(mask_function)
    # allow_is_causal_skip is False where transformers needs the dense mask (packed sequences,
    # or/and overlays, a caller that concatenates masks); a tensor offset is a static cache's.
    if window is None or not allow_is_causal_skip or kwargs.get("use_vmap") or isinstance(q_offset, torch.Tensor):
        return dense()
    if q_offset + q_length != kv_offset + kv_length:  # queries not at the end of the keys
        return dense()
    if attention_mask is None:
        padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape[-1] < kv_offset + kv_length:
            return dense()
        # (only the keys' frame counts: what lies before kv_offset is outside a window layer's reach)
        padding = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        if padding.data_ptr() == attention_mask.data_ptr():
            padding = padding.clone()  # (the attribute goes on a tensor of our own)
    found = left_padding(padding)
    if found is None:
        return dense()
    setattr(padding, ATTRIBUTE, CompactMask(window, *found))
    return padding


def made_here(mask) -> bool:
    """Whether a dense mask is one `mask_function` made (not a model's own)."""
    return bool(getattr(mask, MADE_HERE, False))


def dense_from(spec: CompactMask, L: int, S: int, device) -> torch.Tensor:
    """The (B or 1, 1, L, S) boolean mask a compact mask stands for (for the calls that take a
    dense mask: training, a bias, packed sequences)."""
    diff = (S - L + torch.arange(L, device=device))[:, None] - torch.arange(S, device=device)[None, :]
    visible = diff >= 0
    if spec.window:
        visible &= diff < spec.window
    visible = visible[None, None]
    if spec.pad is not None:
        visible = visible & (torch.arange(S, device=device) >= spec.pad.to(device)[:, None, None, None])
    return visible
