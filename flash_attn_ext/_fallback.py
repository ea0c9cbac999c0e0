"""Observable fallback to PyTorch's own SDPA for calls the fused kernels cannot serve.

Every fallback increments a counter keyed by its reason and logs one debug line on the
"flash_attn_ext" logger, so a user can see why a call did not take the fused path:

    flash_attn_ext.fallback_counts()   # {'device mps has no fused kernel': 3}
    logging.getLogger("flash_attn_ext").setLevel(logging.DEBUG)
"""

import collections
import logging

import torch

logger = logging.getLogger("flash_attn_ext")

# PyTorch's SDPA as imported, before anything (patch_sdpa) can replace it.
torch_sdpa = torch.nn.functional.scaled_dot_product_attention

_counts: "collections.Counter[str]" = collections.Counter()


def record_fallback(reason: str) -> None:
    _counts[reason] += 1
    logger.debug("flash_attn_ext: falling back to torch SDPA: %s", reason)


def fallback_counts() -> dict:
    """Number of calls served by PyTorch's SDPA since the last reset, by reason."""
    return dict(_counts)


def reset_fallback_counts() -> None:
    _counts.clear()
