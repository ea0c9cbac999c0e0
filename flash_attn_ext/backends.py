"""Which back end multiplies the CPU kernels' tiles (csrc/cpu/tile_backend.h), as a typed setting
in the spirit of torch.nn.attention.sdpa_kernel:

    with flash_attn_ext.cpu_tiles("brgemm"):      # oneDNN brgemm (AMX where the CPU has it)
        out = flash_attn_ext.attention(q, k, v)
    flash_attn_ext.cpu_tiles_in_use(torch.bfloat16)  # ('avx512_bf16', 'auto: avx512_bf16 (no AMX: ...)')

Back ends: "float" (our float tiles; every CPU and dtype, bf16/fp16 widened), "avx512_bf16" (our
vdpbf16ps tiles; bf16 on AVX512-BF16 CPUs), "brgemm" (oneDNN's brgemm through ATen; bf16 and
float32 where oneDNN has a kernel for the CPU) and "auto" (the default: brgemm wherever oneDNN
runs it, else avx512_bf16 for bf16 where the CPU has it, else float; float16 runs the float
tiles). A back end that cannot
serve a dtype on this machine leaves that dtype on the float tiles, and cpu_tiles_in_use says
so: ask it (tests do) rather than assume. The setting is process-wide, like PyTorch's backend
flags: set it outside of threads that are running attention."""
import contextlib

import torch

BACKENDS = ("auto", "float", "avx512_bf16", "brgemm")


def _set(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"flash_attn_ext.cpu_tiles: backend must be one of {BACKENDS}, got {backend!r}")
    return torch.ops.flash_attn_ext._set_cpu_tiles(backend)


@contextlib.contextmanager
def cpu_tiles(backend: str):
    """Runs the block with the CPU kernels' tile products on `backend` (one of BACKENDS), then
    restores the previous setting."""
    previous = _set(backend)
    try:
        yield
    finally:
        _set(previous)


def set_cpu_tiles(backend: str) -> str:
    """Sets the back end for the rest of the process; returns the previous setting."""
    return _set(backend)


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


def cpu_tiles_in_use(dtype: torch.dtype):
    """(back end, reason): what the CPU attention kernels use now for inputs of `dtype`."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"flash_attn_ext.cpu_tiles_in_use: dtype must be a torch.dtype, got {type(dtype).__name__}")
    return tuple(torch.ops.flash_attn_ext._cpu_tiles(dtype))
