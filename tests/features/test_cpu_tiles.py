"""flash_attn_ext.cpu_tiles: the typed setting of the CPU kernels' tile back end."""

import pytest
import torch

import flash_attn_ext
from reference import make_qkv


def test_context_manager_sets_and_restores():
    before = flash_attn_ext.cpu_tiles_in_use(torch.bfloat16)
    with flash_attn_ext.cpu_tiles("float"):
        assert flash_attn_ext.cpu_tiles_in_use(torch.bfloat16) == ("float", "set: float")
        with flash_attn_ext.cpu_tiles("avx512_bf16"):
            assert flash_attn_ext.cpu_tiles_in_use(torch.bfloat16)[1].startswith("set: avx512_bf16")
        assert flash_attn_ext.cpu_tiles_in_use(torch.bfloat16) == ("float", "set: float")
    assert flash_attn_ext.cpu_tiles_in_use(torch.bfloat16) == before
    with pytest.raises(RuntimeError), flash_attn_ext.cpu_tiles("float"):
        raise RuntimeError("inside")  # restored on an exception too
    assert flash_attn_ext.cpu_tiles_in_use(torch.bfloat16) == before


def test_float64_and_float16_never_leave_the_float_tiles():
    for backend in ("auto", "float", "avx512_bf16", "brgemm"):
        with flash_attn_ext.cpu_tiles(backend):
            assert flash_attn_ext.cpu_tiles_in_use(torch.float64)[0] == "float"
            assert flash_attn_ext.cpu_tiles_in_use(torch.float16)[0] == "float"
            # avx512_bf16 serves bf16 only: float32 falls back, and the reason says why
            if backend == "avx512_bf16":
                ran, why = flash_attn_ext.cpu_tiles_in_use(torch.float32)
                assert ran == "float" and "bfloat16 only" in why


@pytest.mark.parametrize(
    "bad,exc,match", [("amx", ValueError, "backend must be one of"), (3, ValueError, "backend must be one of")]
)
def test_bad_backend_raises_naming_it(bad, exc, match):
    before = flash_attn_ext.cpu_tiles_in_use(torch.float32)
    with pytest.raises(exc, match=match):
        with flash_attn_ext.cpu_tiles(bad):
            pass
    with pytest.raises(exc, match=match):
        flash_attn_ext.set_cpu_tiles(bad)
    with pytest.raises(ValueError, match="cpu_tiles must be"):  # the native check, for direct op callers
        torch.ops.flash_attn_ext._set_kernel_config("cpu_tiles", "amx")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        flash_attn_ext.cpu_tiles_in_use("bfloat16")
    assert flash_attn_ext.cpu_tiles_in_use(torch.float32) == before


def test_back_ends_agree_to_rounding():
    """Every back end that runs bf16 here gives the same attention to within bf16 rounding of
    each other (each is checked against float64 in the kernel tests; this checks that the
    setting reaches the kernels: the float tiles do not round P, the bf16 ones do)."""
    q, k, v = make_qkv(2, 4, 2, 130, 200, 64, torch.bfloat16)
    outs = {}
    for backend in ("float", "avx512_bf16", "brgemm"):
        with flash_attn_ext.cpu_tiles(backend):
            if flash_attn_ext.cpu_tiles_in_use(torch.bfloat16)[0] != backend:
                continue
            outs[backend] = flash_attn_ext.attention(q, k, v, causal=True).float()
    for name, o in outs.items():
        torch.testing.assert_close(o, outs["float"], atol=2e-2, rtol=2e-2, msg=name)
    if "avx512_bf16" in outs:  # P rounded to bf16 there, not on the float tiles: not bitwise equal
        assert not torch.equal(outs["avx512_bf16"], outs["float"])
