"""Thin typed wrappers over torch.ops.flash_attn_ext.* (the schemas live in csrc/ops.cpp), and
which devices the Python layer sends to the native kernels."""

import os
from typing import Optional, Tuple

import torch

_lib = torch.ops.flash_attn_ext

# The CUDA kernels compile on every CI run (which has no GPU) and the row programs they run
# are checked on the host (tests/native/cpp/test_attention_rows.cpp), but they have not yet run on a
# GPU (README, "Verified on"). Until scripts/gpu_check.sh passes on one and this flag is set,
# the Python layer uses them only for callers who opt in with FLASH_ATTN_EXT_CUDA_KERNELS=1:
# scaled_dot_product_attention falls back to PyTorch's SDPA on CUDA (counted), and the other
# functions raise. torch.ops.flash_attn_ext.* reach the kernels directly either way.
CUDA_KERNELS_VERIFIED = False
_OPT_IN_ENV = "FLASH_ATTN_EXT_CUDA_KERNELS"


def _registered(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("flash_attn_ext::attention_forward", key)


def _kernel_device_types() -> frozenset:
    devices = {"cpu"} if _registered("CPU") else set()
    if _registered("CUDA") and (CUDA_KERNELS_VERIFIED or os.environ.get(_OPT_IN_ENV) == "1"):
        devices.add("cuda")
    return frozenset(devices)


# Fixed once the library is loaded; a plain set so torch.compile traces the check for free.
_KERNEL_DEVICES = _kernel_device_types()


def has_kernel(device_type: str) -> bool:
    """Whether the Python layer serves this device type ('cpu', 'cuda') with the native kernels."""
    return device_type in _KERNEL_DEVICES


def why_no_kernel(device_type: str) -> str:
    if device_type == "cuda" and _registered("CUDA"):
        return (
            f"flash_attn_ext's CUDA kernels have not been verified on a GPU yet; set "
            f"{_OPT_IN_ENV}=1 to use them (see the README, 'Verified on')"
        )
    return f"flash_attn_ext has no kernel for device type {device_type!r} in this build"


def no_kernel_reason(device_type: str) -> str:
    """The short fallback reason (a key of flash_attn_ext.fallback_counts())."""
    if device_type == "cuda" and _registered("CUDA"):
        return f"CUDA kernels not yet verified on a GPU (set {_OPT_IN_ENV}=1 to use them)"
    return f"device {device_type} has no fused kernel"


def check_tensors(fn: str, optional=(), **named) -> None:
    """TypeError naming the argument for anything that is not a tensor (None is allowed for the
    names in optional)."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) and not (t is None and name in optional):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def require_kernel(device_type: str) -> None:
    """Raise a clear error where the Python layer has no native kernel for the device."""
    if device_type not in _KERNEL_DEVICES:
        raise RuntimeError(why_no_kernel(device_type))


def attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    relative_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_kernel(query.device.type)
    return _lib.attention_forward(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        scale,
        window_left,
        window_right,
        bottom_right,
        softcap,
        alibi_slopes,
        sinks,
        relative_bias,
    )


def attention_varlen_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_kernel(query.device.type)
    return _lib.attention_varlen_forward(
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
        softcap,
        alibi_slopes,
        sinks,
    )
