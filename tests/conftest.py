"""Shared fixtures of the test suite, grouped by what a test is about (README, "Tests"):
ops/ (one file per op), features/ (what cuts across ops), api/ (the public Python APIs),
tools/ (converter, uptraining), native/ (C++ programs and source checks). The helpers beside
this file (reference.py: the float64 reference and the SPEC bounds; tile_backends.py) are
importable from every group."""

import dataclasses
import os
import sys

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import _ops
from flash_attn_ext.config import cpu_description

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture
def kernel_settings():
    """kernel_settings(name=value, ...) sets flash_attn_ext.kernel_config fields for the rest of
    the test, pinning the kernel path it checks; the previous setting is restored after it."""
    previous = flash_attn_ext.get_kernel_config()
    yield flash_attn_ext.set_kernel_config
    flash_attn_ext.set_kernel_config(**dataclasses.asdict(previous))


@pytest.fixture(autouse=True)
def _reset_fallbacks():
    flash_attn_ext.reset_fallback_counts()
    yield


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-tiles",
        default=None,
        choices=["auto", "float", "avx512_bf16", "brgemm"],
        help="run every test with the CPU kernels' tiles on this back end (flash_attn_ext.cpu_tiles)",
    )


def pytest_report_header(config):
    """The CPU and the tile back end each dtype runs on (the README's verified-on table cites it)."""
    if config.getoption("--cpu-tiles"):
        flash_attn_ext.set_cpu_tiles(config.getoption("--cpu-tiles"))
    lines = [f"cpu: {cpu_description()}"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        backend, reason = flash_attn_ext.cpu_tiles_in_use(dtype)
        lines.append(f"cpu tiles {str(dtype).replace('torch.', '')}: {backend} ({reason})")
    return lines


@pytest.fixture(autouse=True, scope="session")
def _cpu_tiles_option(request):
    """--cpu-tiles NAME: the whole run on that back end; a back end this machine cannot run for
    bf16 or float32 is an error, not a silent fallback."""
    backend = request.config.getoption("--cpu-tiles")
    if backend is None:
        yield
        return
    previous = flash_attn_ext.set_cpu_tiles(backend)
    if backend != "auto":
        served = [d for d in (torch.float32, torch.bfloat16) if flash_attn_ext.cpu_tiles_in_use(d)[0] == backend]
        if not served:
            flash_attn_ext.set_cpu_tiles(previous)
            pytest.exit(
                f"--cpu-tiles {backend}: no dtype runs it here ({flash_attn_ext.cpu_tiles_in_use(torch.bfloat16)[1]})",
                returncode=4,
            )
    yield
    flash_attn_ext.set_cpu_tiles(previous)
