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
- The three emulated programs once more under each sanitizer, as compute-sanitizer's tools would
  run the kernels on a GPU (test_emulated_under_sanitizer; what each sees: cpp/simt_emulator.h):
  race (ThreadSanitizer: a missing __syncthreads / __syncwarp), memcheck (AddressSanitizer +
  UBSan: shared memory allocated at exactly the launch's bytes, tensors at their sizes) and initcheck
  (MemorySanitizer, clang: a read of shared memory nothing wrote in that block, or of a cp.async
  destination before its wait).
- test_cute_layouts (nvcc, host code): csrc/cuda/mma_layout.h against NVIDIA's own definitions of
  the atoms, CuTe's thread-value layouts (the nvidia-cutlass package's headers): the SM80
  m16n8k16 f16 / bf16 MMA traits and the SM75 ldmatrix x4 / x4.trans copy traits.
- test_emulator_against_cute: the emulator's own ldmatrix / mma.sync against the same layouts,
  which test_cute_layouts --dump prints for it (the emulator is host-compiler code, CuTe nvcc's).
"""

import functools
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


# A program that hangs (a warp operation waiting for a lane that never comes) fails instead.
_RUN_TIMEOUT = 900


def _host_cxx():
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension itself is built with one)"
    return cxx


def _build_and_run(cxx, flags, program, exe, sources=(), libs=(), env=None, stdin=None):
    """Compiles tests/native/cpp/PROGRAM.cpp (plus sources) into exe, runs it, and checks that it
    exits 0 and prints "ok" last."""
    cpp = os.path.join(HERE, "cpp")
    subprocess.run(
        [cxx, *flags, "-Wall", "-I", CSRC, "-I", cpp, os.path.join(cpp, program + ".cpp"), *sources]
        + ["-o", str(exe), *libs],
        check=True,
    )
    result = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, env=env, timeout=_RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-20000:]
    assert result.stdout.rstrip().endswith("ok"), result.stdout[-3000:]
    return result


@pytest.mark.parametrize("case", list(PROGRAMS))
def test_host_program(tmp_path, case):
    program, flags, sources = PROGRAMS[case]
    _build_and_run(_host_cxx(), flags, program, tmp_path / program, sources)


_EMULATED_PROGRAMS = [
    "test_mma_kernels_emulated",
    "test_decode_kernel_emulated",
    "test_kv_cache_device_checks_emulated",
]


@functools.lru_cache(maxsize=None)
def _clang_builtins():
    """clang's compiler-rt builtins archive (its IEEE-half conversions), or None."""
    clang = shutil.which("clang++")
    if clang is None:
        return None
    path = subprocess.run(
        [clang, "-rtlib=compiler-rt", "--print-libgcc-file-name"], capture_output=True, text=True
    ).stdout.strip()
    return path if os.path.isfile(path) else None


# tool: (compiler, flags, runtime options)
SANITIZERS = {
    # halt at the first report (a race's two stacks name the accesses)
    "race": ("g++", ["-fsanitize=thread"], {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66"}),
    # + UBSan (overflowing index arithmetic, bad shifts); the emulator itself aborts on a
    # misaligned cp.async, ldmatrix or vector access
    "memcheck": (
        "g++",
        ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
        {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"},
    ),
    # the origin of an undefined value: the launch's allocation or the cp.async that was issued
    "initcheck": (
        "clang++",
        ["-fsanitize=memory", "-fsanitize-memory-track-origins", "-fno-omit-frame-pointer", "-Wno-pass-failed"],
        {"MSAN_OPTIONS": "halt_on_error=1"},
    ),
}


@pytest.mark.parametrize("program", _EMULATED_PROGRAMS)
@pytest.mark.parametrize("tool", list(SANITIZERS))
def test_emulated_under_sanitizer(tmp_path, tool, program):
    compiler, flags, options = SANITIZERS[tool]
    cxx = shutil.which(compiler)
    if tool == "initcheck" and (cxx is None or _clang_builtins() is None):
        # CI's image has clang: there a missing one is a failure, not a skip
        if os.environ.get("CI"):
            pytest.fail("clang++ with compiler-rt (MemorySanitizer) is needed for the initcheck run")
        pytest.skip("clang++ with compiler-rt (MemorySanitizer) not installed")
    assert cxx, f"{compiler} is needed for the {tool} run"
    libs = [_clang_builtins()] if tool == "initcheck" else []
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # no other sanitizer's runtime
    env.update(options)
    result = _build_and_run(cxx, [*_EMULATED, "-g", *flags], program, tmp_path / program, libs=libs, env=env)
    assert "Sanitizer" not in result.stderr, result.stderr[-20000:]


def _cute_include():
    """CuTe's headers from the nvidia-cutlass package (a test dependency), or None."""
    try:
        import cutlass_library
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return include if os.path.isdir(os.path.join(include, "cute")) else None


needs_cute = pytest.mark.skipif(
    shutil.which("nvcc") is None or _cute_include() is None,
    reason="nvcc and nvidia-cutlass (CuTe's headers) are needed",
)


@pytest.fixture(scope="module")
def cute_program(tmp_path_factory):
    """test_cute_layouts.cu, built once by nvcc as host code."""
    exe = tmp_path_factory.mktemp("cute") / "test_cute_layouts"
    cpp = os.path.join(HERE, "cpp")
    subprocess.run(
        ["nvcc", "-std=c++17", "-x", "cu", "-I", _cute_include(), "-I", CSRC, "-I", cpp]
        + [os.path.join(cpp, "test_cute_layouts.cu"), "-o", str(exe)],
        check=True,
    )
    return exe


@needs_cute
def test_mma_layout_against_cute(cute_program):
    result = subprocess.run([str(cute_program)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("ok"), result.stdout


@needs_cute
def test_emulator_against_cute(tmp_path, cute_program):
    tables = subprocess.run([str(cute_program), "--dump"], capture_output=True, text=True, check=True).stdout
    program = "test_emulator_against_cute"
    _build_and_run(_host_cxx(), _EMULATED, program, tmp_path / program, stdin=tables)
