"""The logic of the CUDA kernels that can be checked without a GPU, checked on every CI run:
standalone C++ programs built with the host compiler (no torch, no GPU).

- tests/cpp/test_attention_rows.cpp: the row programs behind the CUDA safety-net kernels
  (csrc/attention/attention_rows.h), run with one lane against a brute-force float64
  reference and finite differences.
- tests/cpp/test_mma_layout.cpp: the lane -> element maps of the tensor-core forward
  (csrc/cuda/mma_layout.h), composed through host emulations of ldmatrix and mma.sync written
  from the PTX ISA's fragment definitions.
- tests/cpp/test_mma_kernels_emulated.cpp: the tensor-core forward and backward kernels, unchanged,
  run one std::thread per CUDA thread by tests/cpp/simt_emulator.h against a float64
  reference (float16 and bfloat16, causal, window, GQA, partial tiles, empty rows).
"""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.mark.parametrize("program", ["test_attention_rows", "test_mma_layout", "test_mma_kernels_emulated",
                                     "test_decode_kernel_emulated"])
def test_host_program(tmp_path, program):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension itself is built with one)"
    exe = tmp_path / program
    flags = ["-std=c++17", "-Werror"]
    if program.endswith("_emulated"):  # std::barrier; the kernels' #pragma unroll
        flags = ["-std=c++20", "-pthread", "-Wno-unknown-pragmas", "-I", os.path.join(HERE, "cpp")]
    subprocess.run([cxx, *flags, "-O1", "-Wall", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(HERE, "cpp", program + ".cpp"), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
