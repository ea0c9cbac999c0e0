"""flash_attn_ext: fused, memory-efficient exact attention as PyTorch custom ops.

    import flash_attn_ext
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v, is_causal=True)   # drop-in
    out, lse = flash_attn_ext.attention(q, k, v, causal=True, window_size=(255, 0), return_lse=True)
    layer = flash_attn_ext.nn.Attention(embed_dim=1024, num_heads=16, num_kv_heads=4)   # module
    from flash_attn_ext import flash_attn_func, flash_attn_with_kvcache        # flash-attn's API
    with flash_attn_ext.sdpa_patched(): model(x)     # F.scaled_dot_product_attention -> ours
    with flash_attn_ext.kernel_config(cuda_fast="off"): ...   # which kernel paths calls take
    with flash_attn_ext.cpu_tiles("brgemm"): ...      # CPU tile products on oneDNN brgemm

Ops: torch.ops.flash_attn_ext.attention_forward / attention_backward / kv_cache_append /
attention_kvcache / merge_attention_states (schemas in csrc/ops.cpp).
"""

import torch  # noqa: F401  (loads libtorch first: _C links against it)

from . import _C  # noqa: F401  (loads the native library: registers the ops)
from . import _meta  # noqa: F401  (fake kernels for torch.compile)
from . import nn  # noqa: F401  (attention modules)
from ._fallback import fallback_counts, reset_fallback_counts
from .config import (
    KernelConfig,
    cpu_tiles,
    cpu_tiles_in_use,
    get_kernel_config,
    kernel_config,
    set_cpu_tiles,
    set_kernel_config,
    warn_if_serial,
)
from .attention import attention, merge_attention_states
from .relative_bias import RelativeBias, t5_relative_position_bucket
from . import flash_attn_interface  # noqa: F401  (flash-attn's API)
from . import rotary  # noqa: F401  (apply_rotary_emb, as flash-attn's layers.rotary)
from .flash_attn_interface import (  # flash-attn exports these at its top level too
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .kv_cache import KVCache, attention_with_kvcache, check_kvcache_errors, kv_cache_append, quantize_kv_cache
from .sdpa import patch_sdpa, scaled_dot_product_attention, sdpa_patched, unpatch_sdpa

warn_if_serial(bool(getattr(_C, "built_with_openmp", True)))  # (an older build lacks the flag)

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "RelativeBias",
    "t5_relative_position_bucket",
    "attention",
    "attention_with_kvcache",
    "check_kvcache_errors",
    "kv_cache_append",
    "quantize_kv_cache",
    "merge_attention_states",
    "patch_sdpa",
    "unpatch_sdpa",
    "sdpa_patched",
    "flash_attn_interface",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "rotary",
    "nn",
    "scaled_dot_product_attention",
    "fallback_counts",
    "reset_fallback_counts",
    "KernelConfig",
    "kernel_config",
    "get_kernel_config",
    "set_kernel_config",
    "cpu_tiles",
    "cpu_tiles_in_use",
    "set_cpu_tiles",
]
