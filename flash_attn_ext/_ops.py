"""Thin typed wrappers over torch.ops.flash_attn_ext.* (the schemas live in csrc/ops.cpp)."""
from typing import Optional, Tuple

import torch

_lib = torch.ops.flash_attn_ext


def _kernel_device_types() -> frozenset:
    return frozenset(
        device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("flash_attn_ext::attention_forward", key))


# Fixed once the library is loaded; a plain set so torch.compile traces the check for free.
_KERNEL_DEVICES = _kernel_device_types()


def has_kernel(device_type: str) -> bool:
    """Whether the fused attention op has a kernel for this device type ('cpu', 'cuda')."""
    return device_type in _KERNEL_DEVICES


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: Optional[torch.Tensor], dropout_p: float, scale: float,
                      window_left: int, window_right: int,
                      bottom_right: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lib.attention_forward(query, key, value, attn_mask, dropout_p, scale, window_left,
                                  window_right, bottom_right)
