"""KV cache operations (issue 5; so far the in-place append)."""
import torch

_LAYOUTS = ("bshd", "bhsd")


def _as_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
                    v_new: torch.Tensor, cache_seqlens: torch.Tensor, *, layout: str = "bshd",
                    rolling: bool = False) -> None:
    """Write each sequence's new keys/values into the caches, in place, at its current length.

    layout "bshd": caches (B, S_max, Hkv, D) and new K/V (B, L_new, Hkv, D), as flash-attn;
    "bhsd": (B, Hkv, S_max, D) and (B, Hkv, L_new, D), as transformers' caches. Sequence b's
    token t goes to position cache_seqlens[b] + t. rolling=True is Mistral's rolling buffer
    for sliding-window models: the cache keeps the last S_max positions, position p in slot
    p % S_max. cache_seqlens (int32/int64, shape (B,)) is read, not updated. A write past S_max
    (without rolling) or a bad length raises before anything is written. Not differentiable
    (inference): new K/V are stored as data.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    torch.ops.flash_attn_ext.kv_cache_append(
        _as_bhsd(k_cache, layout), _as_bhsd(v_cache, layout), _as_bhsd(k_new.detach(), layout),
        _as_bhsd(v_new.detach(), layout), cache_seqlens, rolling)
