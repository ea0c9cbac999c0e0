"""Test parameters for the CPU tile back ends (flash_attn_ext.cpu_tiles)."""

import pytest

import flash_attn_ext

BACKENDS = ("float", "avx512_bf16", "brgemm")


def cpu_tile_cases(dtypes):
    """(dtype, back end) pytest params for every CPU tile back end and dtype, skipped, with the
    reason, where this CPU or torch build cannot run it: a test id names the back end that really
    runs (cpu_tiles_in_use), never one that silently falls back to another."""
    params = []
    for dtype in dtypes:
        for backend in BACKENDS:
            with flash_attn_ext.cpu_tiles(backend):
                ran, reason = flash_attn_ext.cpu_tiles_in_use(dtype)
            skip = pytest.mark.skipif(ran != backend, reason=f"{backend} does not run {dtype} here: {reason}")
            params.append(pytest.param(dtype, backend, id=f"{str(dtype).replace('torch.', '')}-{backend}", marks=skip))
    return params
