"""The kernel configuration: which of the kernels' interchangeable paths calls may take, one typed
setting in the spirit of torch.nn.attention.sdpa_kernel (csrc/common/kernel_config.h holds it;
each op reads it once per call and hands it to its kernels):

    with flash_attn_ext.kernel_config(cuda_fast="off", num_splits=3):   # the block only
        out = flash_attn_ext.attention(q, k, v)
    flash_attn_ext.get_kernel_config()          # KernelConfig(cuda_fast='auto', ...)
    with flash_attn_ext.cpu_tiles("brgemm"): ...    # shorthand for kernel_config(cpu_tiles=...)
    flash_attn_ext.cpu_tiles_in_use(torch.bfloat16)  # ('brgemm', 'auto: brgemm')

The fields, their values and the environment variables that set their defaults (read once, when
the library first needs the setting) are in KernelConfig below and in the README's "Kernel
configuration" table. The setting is process-wide, like PyTorch's backend flags: change it
outside of threads that are running attention. A path that declines a call says why: with
"require" the call raises with that reason; cpu_tiles_in_use gives the tile back end's."""

import contextlib
import dataclasses

import torch

MODES = ("auto", "off", "require")
CPU_TILES = ("auto", "float", "avx512_bf16", "brgemm")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One value per path. "auto": taken where eligible; "off": never (to compare with the general
    kernel); "require": raise, with the reason, where the path cannot serve a call."""

    cuda_fast: str = "auto"  # CUDA tensor-core forward/backward and decode kernel (FLASH_ATTN_EXT_CUDA_FAST)
    # where CUDA KV-cache calls check cache_seqlens / block_table: auto = host, device while capturing a
    # CUDA graph; require = device always (no sync); off = host always (FLASH_ATTN_EXT_CUDA_DEVICE_CHECKS)
    cuda_device_checks: str = "auto"
    cpu_decode: str = "auto"  # CPU decode kernel, few query rows per KV head (FLASH_ATTN_EXT_CPU_DECODE)
    cpu_bf16_dot: str = "auto"  # vdpbf16ps scores in the CPU decode; auto | off (FLASH_ATTN_EXT_CPU_BF16_DOT)
    # AVX2 widening of int8 / fp8 caches in the CPU decode; auto | off = the portable loops (FLASH_ATTN_EXT_CPU_Q8_AVX2)
    cpu_q8_avx2: str = "auto"
    cpu_kt_cache: str = "auto"  # the CPU forward's per-thread K^T cache; auto | off (FLASH_ATTN_EXT_CPU_KT_CACHE)
    # CPU backward with GQA: auto by working set, require = one pass per query head, off = one
    # sweep of the group (FLASH_ATTN_EXT_CPU_BWD_HEAD_PASSES=1 / 0)
    cpu_bwd_head_passes: str = "auto"
    cpu_tiles: str = "auto"  # CPU tile products: one of CPU_TILES (FLASH_ATTN_EXT_CPU_TILES)
    num_splits: int = 0  # split-KV key ranges per task, 0 = automatic (FLASH_ATTN_EXT_NUM_SPLITS)


_FIELDS = tuple(f.name for f in dataclasses.fields(KernelConfig))


def get_kernel_config() -> KernelConfig:
    """The process-wide setting now."""
    values = dict(item.split("=", 1) for item in torch.ops.flash_attn_ext._kernel_config())
    assert tuple(values) == _FIELDS, f"native and Python kernel configurations differ: {tuple(values)}"
    values["num_splits"] = int(values["num_splits"])
    return KernelConfig(**values)


def _set_field(name: str, value) -> str:
    if name not in _FIELDS:
        raise TypeError(f"flash_attn_ext.kernel_config: unknown setting {name!r}; the settings are {_FIELDS}")
    if name == "num_splits":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"flash_attn_ext.kernel_config: num_splits must be an int, got {type(value).__name__}")
        value = str(value)
    elif not isinstance(value, str):
        raise TypeError(f"flash_attn_ext.kernel_config: {name} must be a str, got {type(value).__name__}")
    return torch.ops.flash_attn_ext._set_kernel_config(name, value)  # ValueError naming it


def set_kernel_config(**settings) -> KernelConfig:
    """Sets the named fields for the rest of the process (all or none: a bad value raises and
    changes nothing); returns the previous setting."""
    previous = get_kernel_config()
    try:
        for name, value in settings.items():
            _set_field(name, value)
    except Exception:
        _restore(previous)
        raise
    return previous


def _restore(config: KernelConfig) -> None:
    for name in _FIELDS:
        _set_field(name, getattr(config, name))


@contextlib.contextmanager
def kernel_config(**settings):
    """Runs the block with the named fields set (the others as they were), then restores the
    previous setting."""
    previous = set_kernel_config(**settings)
    try:
        yield get_kernel_config()
    finally:
        _restore(previous)


def cpu_tiles(backend: str):
    """Context manager: the CPU kernels' tile products on `backend` (one of CPU_TILES) for the block.
    "float" (our float tiles; every CPU and dtype, bf16/fp16 widened), "avx512_bf16" (our
    vdpbf16ps tiles; bf16 on AVX512-BF16 CPUs), "brgemm" (oneDNN's brgemm through ATen; bf16 and
    float32 where oneDNN has a kernel for the CPU), "auto" (the default: brgemm wherever oneDNN
    runs it, else avx512_bf16 for bf16 where the CPU has it, else float; float16 runs the float
    tiles). A back end that cannot serve a dtype here leaves it on the float tiles, and
    cpu_tiles_in_use says so: ask it (tests do) rather than assume."""
    _check_backend(backend)
    return kernel_config(cpu_tiles=backend)


def set_cpu_tiles(backend: str) -> str:
    """Sets the CPU tile back end for the rest of the process; returns the previous one's name."""
    _check_backend(backend)
    return set_kernel_config(cpu_tiles=backend).cpu_tiles


def _check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in CPU_TILES:
        raise ValueError(f"flash_attn_ext.cpu_tiles: backend must be one of {CPU_TILES}, got {backend!r}")


def cpu_tiles_in_use(dtype: torch.dtype):
    """(back end, reason): what the CPU attention kernels use now for inputs of `dtype`."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"flash_attn_ext.cpu_tiles_in_use: dtype must be a torch.dtype, got {type(dtype).__name__}")
    return tuple(torch.ops.flash_attn_ext._cpu_tiles(dtype))


def warn_if_serial(built_with_openmp: bool) -> None:
    """A build without OpenMP (macOS, Windows, a torch without it) works, on one thread: the
    package says so loudly on import (flash_attn_ext._C.built_with_openmp is the flag)."""
    if not built_with_openmp:
        import warnings

        warnings.warn(
            "flash_attn_ext was built without OpenMP: every CPU kernel runs on one thread. Rebuild on Linux "
            "with a PyTorch that has OpenMP (torch._C.has_openmp) and a compiler that takes -fopenmp.",
            RuntimeWarning,
            stacklevel=2,
        )


def cpu_description() -> str:
    """'model (ISA flags)' of this machine's CPU from /proc/cpuinfo, the flags being those that
    decide the tile back ends (avx2, avx512f, avx512_bf16, avx512_fp16, amx_bf16, amx_fp16):
    what a speed figure or a test run names as its CPU."""
    model, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if f in flags]
    return f"{model} ({' '.join(isa) or 'no AVX2'})"
