"""flash_attn_ext.kernel_config: the one typed setting of which kernel paths calls take
(csrc/common/kernel_config.h), its environment defaults, and that the kernels obey it."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import KernelConfig

_ENV_NAMES = (
    "FLASH_ATTN_EXT_CUDA_FAST",
    "FLASH_ATTN_EXT_CUDA_DEVICE_CHECKS",
    "FLASH_ATTN_EXT_CPU_DECODE",
    "FLASH_ATTN_EXT_CPU_BF16_DOT",
    "FLASH_ATTN_EXT_CPU_Q8_AVX2",
    "FLASH_ATTN_EXT_CPU_KT_CACHE",
    "FLASH_ATTN_EXT_CPU_BWD_HEAD_PASSES",
    "FLASH_ATTN_EXT_CPU_TILES",
    "FLASH_ATTN_EXT_CPU_BF16_GEMM",
    "FLASH_ATTN_EXT_NUM_SPLITS",
)


def _config_in_fresh_process(**env):
    """The setting a new process starts with under `env` (the variables above cleared first)."""
    clean = {k: v for k, v in os.environ.items() if k not in _ENV_NAMES}
    code = "import dataclasses, flash_attn_ext as f; print(dataclasses.asdict(f.get_kernel_config()))"
    run = subprocess.run(
        [sys.executable, "-c", code], env=dict(clean, **env), capture_output=True, text=True, timeout=300
    )
    return run.returncode, run.stdout.strip(), run.stderr


def test_defaults_and_environment_defaults():
    rc, out, err = _config_in_fresh_process()
    assert rc == 0, err
    assert out == str(dataclasses.asdict(KernelConfig())), out
    rc, out, err = _config_in_fresh_process(
        FLASH_ATTN_EXT_CUDA_FAST="require",
        FLASH_ATTN_EXT_CUDA_DEVICE_CHECKS="require",
        FLASH_ATTN_EXT_CPU_DECODE="0",
        FLASH_ATTN_EXT_CPU_BF16_DOT="0",
        FLASH_ATTN_EXT_CPU_Q8_AVX2="0",
        FLASH_ATTN_EXT_CPU_KT_CACHE="0",
        FLASH_ATTN_EXT_CPU_BWD_HEAD_PASSES="1",
        FLASH_ATTN_EXT_NUM_SPLITS="3",
        FLASH_ATTN_EXT_CPU_TILES="float",
    )
    assert rc == 0, err
    assert out == str(
        dataclasses.asdict(
            KernelConfig(
                cuda_fast="require",
                cuda_device_checks="require",
                cpu_decode="off",
                cpu_bf16_dot="off",
                cpu_q8_avx2="off",
                cpu_kt_cache="off",
                cpu_bwd_head_passes="require",
                num_splits=3,
                cpu_tiles="float",
            )
        )
    ), out
    rc, out, err = _config_in_fresh_process(FLASH_ATTN_EXT_CPU_BF16_GEMM="0")  # the older spelling
    assert rc == 0 and "'cpu_tiles': 'float'" in out, (out, err)
    # "auto", and "1" (the older "on") where it does not mean require, are auto; "off" is "0"
    rc, out, err = _config_in_fresh_process(
        FLASH_ATTN_EXT_CPU_BF16_DOT="auto",
        FLASH_ATTN_EXT_CPU_KT_CACHE="1",
        FLASH_ATTN_EXT_CPU_DECODE="1",
        FLASH_ATTN_EXT_CUDA_FAST="off",
        FLASH_ATTN_EXT_CUDA_DEVICE_CHECKS="0",
    )
    assert rc == 0, err
    assert out == str(dataclasses.asdict(KernelConfig(cuda_fast="off", cuda_device_checks="off"))), out


def test_malformed_environment_raises_naming_the_variable():
    rc, out, err = _config_in_fresh_process(FLASH_ATTN_EXT_CUDA_FAST="yes")
    assert rc != 0 and "FLASH_ATTN_EXT_CUDA_FAST must be" in err, (out, err)
    rc, out, err = _config_in_fresh_process(FLASH_ATTN_EXT_CPU_KT_CACHE="require")  # auto | off only
    assert rc != 0 and "FLASH_ATTN_EXT_CPU_KT_CACHE must be '0', 'off', 'auto', got" in err, (out, err)
    rc, out, err = _config_in_fresh_process(FLASH_ATTN_EXT_NUM_SPLITS="three")
    assert rc != 0 and "num_splits must be an integer" in err, (out, err)


def test_context_manager_sets_restores_and_nests():
    before = flash_attn_ext.get_kernel_config()
    with flash_attn_ext.kernel_config(cpu_decode="off", num_splits=5) as inside:
        assert inside == dataclasses.replace(before, cpu_decode="off", num_splits=5)
        with flash_attn_ext.kernel_config(num_splits=2, cpu_tiles="float"):
            now = flash_attn_ext.get_kernel_config()
            assert (now.cpu_decode, now.num_splits, now.cpu_tiles) == ("off", 2, "float")
            assert flash_attn_ext.cpu_tiles_in_use(torch.float32) == ("float", "set: float")
        assert flash_attn_ext.get_kernel_config() == inside
    assert flash_attn_ext.get_kernel_config() == before
    with pytest.raises(RuntimeError, match="inside"), flash_attn_ext.kernel_config(cuda_fast="off"):
        raise RuntimeError("inside")
    assert flash_attn_ext.get_kernel_config() == before


@pytest.mark.parametrize(
    "settings,exc,match",
    [
        (dict(cuda_fast="on"), ValueError, "cuda_fast must be 'auto', 'off' or 'require'"),
        (dict(cpu_kt_cache="require"), ValueError, "cpu_kt_cache must be 'auto' or 'off'"),
        (dict(cpu_tiles="amx"), ValueError, "cpu_tiles must be"),
        (dict(num_splits=-1), ValueError, r"num_splits must be an integer in \[0, 1024\]"),
        (dict(num_splits=True), TypeError, "num_splits must be an int"),
        (dict(cpu_decode=0), TypeError, "cpu_decode must be a str"),
        (dict(split_count=2), TypeError, "unknown setting 'split_count'"),
    ],
)
def test_bad_settings_raise_naming_them_and_change_nothing(settings, exc, match):
    before = flash_attn_ext.get_kernel_config()
    with pytest.raises(exc, match=match):
        flash_attn_ext.set_kernel_config(cpu_bwd_head_passes="off", **settings)  # a good field first: all or none
    with pytest.raises(exc, match=match), flash_attn_ext.kernel_config(**settings):
        pass
    assert flash_attn_ext.get_kernel_config() == before


def test_require_pins_the_cpu_decode_path():
    """cpu_decode='require' serves a decode call and raises, naming why, where the decode kernel
    cannot serve one; 'off' and 'auto' give the same answer to rounding."""
    q = torch.randn(2, 4, 1, 32)
    kc, vc = torch.randn(2, 2, 50, 32), torch.randn(2, 2, 50, 32)
    lens = torch.tensor([50, 17], dtype=torch.int32)
    outs = {}
    for mode in ("require", "off", "auto"):
        with flash_attn_ext.kernel_config(cpu_decode=mode):
            outs[mode] = flash_attn_ext.attention_with_kvcache(
                q, kc, vc, cache_seqlens=lens, causal=True, layout="bhsd"
            )
    torch.testing.assert_close(outs["require"], outs["off"], atol=1e-6, rtol=1e-5)
    assert torch.equal(outs["require"], outs["auto"])
    long_q = torch.randn(2, 4, 40, 32)  # 80 query rows per KV head: past the decode kernel
    with flash_attn_ext.kernel_config(cpu_decode="require"):
        with pytest.raises(ValueError, match="CPU decode kernel cannot serve this call: too many query rows"):
            flash_attn_ext.attention(long_q, kc, vc)
        with pytest.raises(ValueError, match="cannot serve this call: attn_mask"):
            flash_attn_ext.attention(q, kc, vc, attn_mask=torch.ones(1, 1, 1, 50, dtype=torch.bool))


def test_forced_split_count_reaches_the_kernel():
    """A forced split count changes how the CPU forward sums (split states merged), so the output
    differs in its last bits from the unsplit one, and both match float64 attention."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 3000, 64), torch.randn(1, 2, 3000, 64)
    with flash_attn_ext.kernel_config(num_splits=1):
        one = flash_attn_ext.attention(q, k, v)
    with flash_attn_ext.kernel_config(num_splits=7):
        seven = flash_attn_ext.attention(q, k, v)
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 8.0, -1) @ v.double()
    assert not torch.equal(one, seven)
    for out in (one, seven):
        assert (out.double() - ref).abs().max().item() < 1e-5


def test_built_with_openmp_and_a_serial_build_warns():
    """This build (Linux, a torch with OpenMP) runs the CPU kernels on OpenMP threads; a build
    without it would be serial, which the package says on import."""
    import warnings

    from flash_attn_ext import _C
    from flash_attn_ext.config import warn_if_serial

    assert _C.built_with_openmp == int(torch._C.has_openmp and sys.platform.startswith("linux"))  # (setup.py)
    with pytest.warns(RuntimeWarning, match="built without OpenMP: every CPU kernel runs on one thread"):
        warn_if_serial(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_serial(True)
