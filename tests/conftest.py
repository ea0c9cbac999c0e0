import pytest
import torch

import flash_attn_ext
from flash_attn_ext import _ops


def _device_params():
    params = [pytest.param("cpu", id="cpu")]
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif not _ops.has_kernel("cuda"):
        reason = _ops.why_no_kernel("cuda")
    params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return params


@pytest.fixture(params=_device_params())
def device(request):
    """Every kernel test runs on each device that has a kernel (CUDA skips cleanly)."""
    return request.param


@pytest.fixture(autouse=True)
def _reset_fallbacks():
    flash_attn_ext.reset_fallback_counts()
    yield
