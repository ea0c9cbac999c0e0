"""Builds and runs tests/cpp/test_tile_math.cpp: the CPU tile and decode kernels against naive loops, in
the portable baseline build and in the run-time-dispatched build (whichever clone this CPU
selects). The AVX-512 clone runs only where the CPU has AVX-512."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.mark.parametrize("flags", [["-march=x86-64", "-DFAE_NO_MULTIVERSION"], []], ids=["baseline", "dispatched"])
def test_tile_math(tmp_path, flags):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension itself is built with one)"
    exe = tmp_path / "test_tile_math"
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wno-psabi", *flags, "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(HERE, "cpp", "test_tile_math.cpp"), os.path.join(ROOT, "csrc", "cpu", "tile_math.cpp"),
                    os.path.join(ROOT, "csrc", "cpu", "decode_math.cpp"),
                    os.path.join(ROOT, "csrc", "cpu", "tile_math_bf16.cpp"),
                    "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
