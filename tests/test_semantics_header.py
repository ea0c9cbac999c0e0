"""Builds and runs tests/cpp/test_semantics.cpp: the shared semantics headers (visibility,
band ranges, Philox dropout) checked by brute force with the host compiler, no torch."""
import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_semantics_header(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension itself is built with one)"
    exe = tmp_path / "test_semantics"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(HERE, "cpp", "test_semantics.cpp"), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
