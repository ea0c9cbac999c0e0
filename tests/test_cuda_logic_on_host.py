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


def _head_dims(macro: str):
    import re
    with open(os.path.join(ROOT, "csrc", "attention", "mma_head_dims.h")) as f:
        text = f.read()
    line = re.search(rf"#define {macro}\(X\) (.*)", text).group(1)
    return [int(d) for d in re.findall(r"X\((\d+)\)", line)]


def test_tensor_core_head_dims_are_written_once():
    """csrc/attention/mma_head_dims.h is the one list: each listed dim has its instantiation unit
    and nothing else does (a missing unit would also fail the CUDA build's import), and the
    README states the same lists."""
    import glob
    import re
    forward, backward = _head_dims("FAE_MMA_FORWARD_HEAD_DIMS"), _head_dims("FAE_MMA_BACKWARD_HEAD_DIMS")
    assert forward and set(backward) <= set(forward)
    for kind, dims in (("forward", forward), ("backward", backward)):
        units = glob.glob(os.path.join(ROOT, "csrc", "attention", f"attention_{kind}_mma_hdim*.cu"))
        assert sorted(int(re.search(r"hdim(\d+)\.cu$", u).group(1)) for u in units) == sorted(dims), kind
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = " ".join(f.read().split())
    assert f"attention_forward_mma_hdim{{{','.join(map(str, forward))}}}.cu" in readme
    said = ", ".join(map(str, forward[:-1])) + f" or {forward[-1]}"
    assert f"equal Q/K and V head dims of {said}" in readme
    said = ", ".join(map(str, backward[:-1])) + f" and {backward[-1]}"
    assert f"head dims {said}" in readme
