"""Rotary position embedding (RoPE), as flash-attn's `flash_attn.layers.rotary.apply_rotary_emb`.

Used by `flash_attn_with_kvcache(rotary_cos=, rotary_sin=)` to rotate the queries and the new
keys at each sequence's own positions before the keys are appended; exported because a caller
that rotates outside the cache wants the same function.
"""

from typing import Union

import torch

__all__ = ["apply_rotary_emb"]


def _check_tables(fn: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a floating (seqlen_ro, rotary_dim / 2) tensor, got {t!r:.80}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, the input on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"{fn}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    rotary_dim = 2 * cos.shape[1]
    if not 0 < rotary_dim <= x.shape[-1]:
        raise ValueError(
            f"{fn}: cos/sin give rotary_dim {rotary_dim} (2 x their last dim), which must be in "
            f"(0, head_dim = {x.shape[-1]}]"
        )
    return rotary_dim


def rotate_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool):
    """x (B, S, H, D) rotated at positions (B, S) (int64, each < cos.shape[0]); the first
    rotary_dim = 2 * cos.shape[1] features rotate, the rest pass through. Computed in float32
    (float64 for float64 inputs) and rounded once to x's dtype, as flash-attn's kernel does."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rd = 2 * cos.shape[1]
    c = cos.to(acc)[positions].unsqueeze(2)  # (B, S, 1, rd / 2)
    s = sin.to(acc)[positions].unsqueeze(2)
    xr = x[..., :rd].to(acc)
    if interleaved:  # GPT-J: features (0, 1), (2, 3), ... rotate as pairs
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:  # GPT-NeoX: the first half rotates with the second
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rd:]), dim=-1)


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
) -> torch.Tensor:
    """x (batch, seqlen, heads, head_dim); cos, sin (seqlen_ro, rotary_dim / 2). Token t of
    sequence b is rotated at position seqlen_offsets (+ its own offset when a (batch,) tensor)
    + t. interleaved=False rotates feature i with i + rotary_dim / 2 (GPT-NeoX),
    interleaved=True features 2i with 2i + 1 (GPT-J); features past rotary_dim are unchanged.
    Differentiable (it is composed of torch ops); returns a new tensor."""
    fn = "flash_attn_ext.rotary.apply_rotary_emb"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{fn}: x must be a (batch, seqlen, heads, head_dim) tensor")
    _check_tables(fn, x, cos, sin)
    B, S = x.shape[:2]
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.shape != (B,) or seqlen_offsets.is_floating_point():
            raise ValueError(f"{fn}: seqlen_offsets must be an int or an integer ({B},) tensor")
        offsets = seqlen_offsets.to(device=x.device, dtype=torch.int64)
    else:
        offsets = torch.full((B,), int(seqlen_offsets), dtype=torch.int64, device=x.device)
    positions = offsets.unsqueeze(1) + torch.arange(S, device=x.device)
    if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < cos.shape[0]):
        raise ValueError(f"{fn}: positions reach {int(positions.max())}, past cos/sin's {cos.shape[0]} rows")
    return rotate_at(x, cos, sin, positions, interleaved)
