"""examples/cpp: a C++ program (LibTorch from the pip wheel, found with find_package(Torch))
calls the ops through the dispatcher, forward and backward, and checks them against ATen
autograd; configured, built and run as a CTest here."""

import os
import shutil
import subprocess

import pytest
import torch

import flash_attn_ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
def test_cpp_example_builds_and_passes_ctest(tmp_path):
    build = str(tmp_path / "build")
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True)  # noqa: E731
    r = run(
        "cmake",
        "-S",
        os.path.join(ROOT, "examples", "cpp"),
        "-B",
        build,
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DFLASH_ATTN_EXT_LIBRARY={flash_attn_ext._C.__file__}",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run("cmake", "--build", build, "-j2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run("ctest", "--test-dir", build, "--output-on-failure")
    assert r.returncode == 0 and "100% tests passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
