"""Build of flash_attn_ext's native library (flash_attn_ext/_C.abi3.so).

Environment switches:
  FLASH_ATTN_EXT_CUDA        auto (default: CUDA sources when nvcc is found), 1 (require), 0 (CPU only)
  FLASH_ATTN_EXT_CUDA_ARCHS  compute capabilities to build, ";"-separated (default "80;90";
                             CI builds "90" only to keep the build short)
  FLASH_ATTN_EXT_SANITIZE    1: a CPU-only build with AddressSanitizer and UndefinedBehaviorSanitizer
                             (-O1, for scripts/sanitize_cpu.sh; load it with libasan preloaded)
  MAX_JOBS                   parallel compile jobs (ninja), as in torch.utils.cpp_extension
"""

import glob
import os
import sys
import tempfile

import torch

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90"


def _want_cuda() -> bool:
    mode = os.environ.get("FLASH_ATTN_EXT_CUDA", "auto").lower()
    if mode in ("0", "false", "off", "no"):
        return False
    found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if mode in ("1", "true", "on", "yes"):
        if not found:
            raise RuntimeError("FLASH_ATTN_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return found


def _gencode_flags() -> list:
    archs = os.environ.get("FLASH_ATTN_EXT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in archs.split(";") if a.strip()]
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest arch too, so GPUs newer than every listed one (Blackwell) JIT-compile
    # the kernels instead of failing with "no kernel image is available".
    newest = max(archs, key=int)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def _sources(pattern: str) -> list:
    return sorted(
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "**", pattern), recursive=True)
    )


def _sanitize() -> bool:
    return os.environ.get("FLASH_ATTN_EXT_SANITIZE", "0").lower() in ("1", "true", "on", "yes")


def extensions():
    sanitize = _sanitize()
    use_cuda = _want_cuda() and not sanitize
    # Stable Python ABI (no pybind11): one _C.abi3.so for every CPython >= 3.10.
    cxx = ["-O3", "-DPy_LIMITED_API=0x030A0000", "-Wall", "-Wno-unknown-pragmas"]
    link = []
    if sanitize:  # every UB report is fatal, so a test run fails on the first one
        flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cxx = ["-O1", "-g"] + flags + cxx[1:]
        link = flags
    # at::parallel_for is a header template: without -fopenmp, _OPENMP is undefined and every
    # CPU kernel runs on one thread (the ATen headers fall back to a serial loop, silently).
    # Compile-only: the GOMP symbols resolve at load time from the libgomp that libtorch_cpu
    # already loaded, so the process keeps a single OpenMP runtime and thread pool.
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
    else:  # (macOS, Windows, a torch without OpenMP): it builds and works, on one thread
        print(
            "\n" + "!" * 78 + "\nflash_attn_ext: WARNING: building WITHOUT OpenMP (torch has OpenMP: "
            f"{torch._C.has_openmp}, platform {sys.platform}): every CPU kernel will run on ONE thread.\n" + "!" * 78,
            file=sys.stderr,
        )
    kwargs = dict(
        name="flash_attn_ext._C",
        sources=_sources("*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        py_limited_api=True,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    if not use_cuda:
        print("flash_attn_ext: building CPU-only" + (" with ASan + UBSan" if sanitize else ""))
        return [CppExtension(**kwargs)]
    kwargs["sources"] += _sources("*.cu")
    kwargs["extra_compile_args"]["nvcc"] = [
        "-O3",
        "-DPy_LIMITED_API=0x030A0000",
        "--expt-relaxed-constexpr",
        "-lineinfo",
    ] + _gencode_flags()
    kwargs["define_macros"] = [("FLASH_ATTN_EXT_WITH_CUDA", "1")]
    print("flash_attn_ext: building with CUDA for", os.environ.get("FLASH_ATTN_EXT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    return [CUDAExtension(**kwargs)]


EXTENSIONS = extensions()


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """pip's editable install (and a plain `pip install .`) compiles in a fresh temporary directory
    each time, so every reinstall rebuilt all 31 translation units (13 min on 2 cores). Keep the
    objects in build/ instead, one directory per kind of build: ninja then recompiles only the
    sources whose command line or included files changed (its depfiles track the headers). An
    explicit --build-temp (scripts/sanitize_cpu.sh) is left as given."""

    def finalize_options(self):
        super().finalize_options()
        temp_root = os.path.realpath(tempfile.gettempdir())
        if os.path.realpath(self.build_temp).startswith(temp_root + os.sep):
            cuda = any(s.endswith(".cu") for e in EXTENSIONS for s in e.sources)
            kind = ("cuda" if cuda else "cpu") + ("-sanitize" if _sanitize() else "")
            self.build_temp = os.path.join(HERE, "build", f"pip-temp-{kind}")


setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
