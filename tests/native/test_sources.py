"""Checks on the sources themselves: what is written once stays consistent where it is used."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _head_dims(macro: str):
    with open(os.path.join(ROOT, "csrc", "attention", "mma_head_dims.h")) as f:
        text = f.read()
    line = re.search(rf"#define {macro}\(X\) (.*)", text).group(1)
    return [int(d) for d in re.findall(r"X\((\d+)\)", line)]


def test_tensor_core_head_dims_are_written_once():
    """csrc/attention/mma_head_dims.h is the one list: each listed dim has its instantiation unit
    and nothing else does (a missing unit would also fail the CUDA build's import), and the
    README states the same lists."""
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
