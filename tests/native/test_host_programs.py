"""The native test programs (tests/native/cpp/*.cpp), built with the host compiler (no torch, no
GPU) and run on every CI run; each checks with tests/native/cpp/expect.h and prints "ok".

- test_semantics: the shared semantics headers (visibility, band ranges, Philox dropout) by
  brute force.
- test_attention_rows: the row programs behind the CUDA safety-net kernels
  (csrc/attention/attention_rows.h) on one lane, against brute-force float64 and finite differences.
- test_mma_layout: the lane -> element maps of the tensor-core forward (csrc/cuda/mma_layout.h),
  composed through host emulations of ldmatrix and mma.sync written from the PTX ISA's fragment
  definitions.
- test_mma_kernels_emulated, test_decode_kernel_emulated: the tensor-core forward/backward and the
  split-KV decode kernels, unchanged, one std::thread per CUDA thread (cpp/simt_emulator.h),
  against a float64 reference.
- test_kv_cache_device_checks_emulated: the KV-cache ops' device-side check and poison kernels under
  the same emulator, against the rules stated on the host.
- test_tile_math: the CPU tile and decode kernels against naive loops, in the portable baseline
  build and in the run-time-dispatched build (whichever clone this CPU selects).
- test_cute_layouts (nvcc, host code): csrc/cuda/mma_layout.h against NVIDIA's own definitions of
  the atoms, CuTe's thread-value layouts (the nvidia-cutlass package's headers): the SM80
  m16n8k16 f16 / bf16 MMA traits and the SM75 ldmatrix x4 / x4.trans copy traits.
"""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")

_STRICT = ["-std=c++17", "-O1", "-Werror"]
# std::barrier; the kernels' #pragma unroll
_EMULATED = ["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas"]
_TILES = ["-std=c++17", "-O2", "-Wno-psabi"]
_TILE_SOURCES = [os.path.join(CSRC, "cpu", f) for f in ("tile_math.cpp", "decode_math.cpp", "tile_math_bf16.cpp")]

# id: (program, compiler flags, extra sources)
PROGRAMS = {
    "semantics": ("test_semantics", _STRICT, []),
    "attention_rows": ("test_attention_rows", _STRICT, []),
    "mma_layout": ("test_mma_layout", _STRICT, []),
    "mma_kernels_emulated": ("test_mma_kernels_emulated", _EMULATED, []),
    "decode_kernel_emulated": ("test_decode_kernel_emulated", _EMULATED, []),
    "kv_cache_device_checks_emulated": ("test_kv_cache_device_checks_emulated", _EMULATED, []),
    "tile_math_baseline": ("test_tile_math", _TILES + ["-march=x86-64", "-DFAE_NO_MULTIVERSION"], _TILE_SOURCES),
    "tile_math_dispatched": ("test_tile_math", _TILES, _TILE_SOURCES),
}


@pytest.mark.parametrize("case", list(PROGRAMS))
def test_host_program(tmp_path, case):
    program, flags, sources = PROGRAMS[case]
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension itself is built with one)"
    exe = tmp_path / program
    subprocess.run(
        [
            cxx,
            *flags,
            "-Wall",
            "-I",
            CSRC,
            "-I",
            os.path.join(HERE, "cpp"),
            os.path.join(HERE, "cpp", program + ".cpp"),
            *sources,
            "-o",
            str(exe),
        ],
        check=True,
    )
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("ok"), result.stdout


def _cute_include():
    """CuTe's headers from the nvidia-cutlass package (a test dependency), or None."""
    try:
        import cutlass_library
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return include if os.path.isdir(os.path.join(include, "cute")) else None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on the PATH")
@pytest.mark.skipif(_cute_include() is None, reason="nvidia-cutlass (CuTe's headers) not installed")
def test_mma_layout_against_cute(tmp_path):
    exe = tmp_path / "test_cute_layouts"
    cpp = os.path.join(HERE, "cpp")
    subprocess.run(
        ["nvcc", "-std=c++17", "-x", "cu", "-I", _cute_include(), "-I", CSRC, "-I", cpp]
        + [os.path.join(cpp, "test_cute_layouts.cu"), "-o", str(exe)],
        check=True,
    )
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("ok"), result.stdout
