"""flash_attn_ext.scaled_dot_product_attention is a drop-in for PyTorch's."""

import logging

import pytest
import torch
import torch.nn.functional as F

import flash_attn_ext
from flash_attn_ext import scaled_dot_product_attention as fae_sdpa
from reference import make_qkv


def _tol(dtype):
    return {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


CASES = [
    # (q shape, k shape, v shape, kwargs)
    ((2, 4, 33, 64), (2, 4, 47, 64), (2, 4, 47, 64), {}),
    ((2, 4, 33, 64), (2, 4, 47, 64), (2, 4, 47, 64), {"is_causal": True}),
    ((2, 4, 47, 64), (2, 4, 33, 64), (2, 4, 33, 64), {"is_causal": True}),
    ((2, 8, 40, 32), (2, 2, 40, 32), (2, 2, 40, 32), {"enable_gqa": True, "is_causal": True}),
    ((2, 8, 40, 32), (2, 1, 50, 32), (2, 1, 50, 24), {"enable_gqa": True}),
    ((1, 2, 17, 16), (1, 2, 17, 16), (1, 2, 17, 16), {"scale": 0.7}),
    ((3, 17, 16), (3, 21, 16), (3, 21, 16), {}),  # 3-D (N, L, E)
    ((17, 16), (21, 16), (21, 16), {"is_causal": True}),  # 2-D
    ((2, 3, 2, 9, 8), (2, 3, 2, 11, 8), (2, 3, 2, 11, 8), {"is_causal": True}),  # 5-D
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_torch_sdpa(device, dtype, case):
    qs, ks, vs, kw = CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = (torch.randn(s, generator=g).to(dtype).to(device) for s in (qs, ks, vs))
    ours = fae_sdpa(q, k, v, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, atol=_tol(dtype), rtol=_tol(dtype))
    assert flash_attn_ext.fallback_counts() == {}


@pytest.mark.parametrize("mask_shape", [(2, 4, 33, 47), (33, 47), (1, 1, 33, 47), (2, 1, 1, 47)])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_masks_match_torch_sdpa(device, mask_shape, mask_dtype):
    q, k, v = make_qkv(2, 4, 4, 33, 47, 32, torch.float32, device)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(mask_shape, generator=g) > 0.2) if mask_dtype == "bool" else torch.randn(mask_shape, generator=g)
    mask = mask.to(device)
    torch.testing.assert_close(
        fae_sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=2e-5, rtol=2e-5
    )
    assert flash_attn_ext.fallback_counts() == {}


def test_gradients_match_torch_sdpa(device):
    q, k, v = make_qkv(2, 8, 2, 45, 45, 32, torch.float32, device, requires_grad=True)
    dout = torch.randn(2, 8, 45, 32, device=device)
    ours = torch.autograd.grad(fae_sdpa(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), dout)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), dout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_window_size_keyword(device):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, torch.float32, device)
    i = torch.arange(64).unsqueeze(-1)
    j = torch.arange(64)
    mask = ((j <= i) & (j >= i - 9)).to(device)  # causal window of 10 tokens: (9, 0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fae_sdpa(q, k, v, is_causal=True, window_size=(9, 0)), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fae_sdpa(q, k, v, window_size=(9, 0)), ref, atol=2e-5, rtol=2e-5)


def _same_error(fn_ours, fn_torch):
    with pytest.raises(Exception) as theirs:
        fn_torch()
    with pytest.raises(type(theirs.value)):
        fn_ours()


def test_errors_as_pytorch(device):
    q, k, v = make_qkv(2, 4, 2, 8, 8, 16, torch.float32, device)
    for args, kw in [
        ((q, k, v), {}),  # head counts differ without enable_gqa
        ((q, k[..., :8], v), {}),  # head dims differ
        ((q, k.double(), v), {}),  # dtypes differ
        ((q.int(), k.int(), v.int()), {}),
        ((q, k, v), {"enable_gqa": True, "is_causal": True, "attn_mask": torch.ones(8, 8, dtype=torch.bool)}),
        ((q, k, v), {"enable_gqa": True, "attn_mask": torch.ones(3, 5, dtype=torch.bool)}),
        ((q, k, v), {"enable_gqa": True, "attn_mask": torch.ones(8, dtype=torch.bool)}),
        ((q, k, v), {"enable_gqa": True, "dropout_p": -0.5}),
    ]:
        _same_error(lambda: fae_sdpa(*args, **kw), lambda: F.scaled_dot_product_attention(*args, **kw))


def test_errors_name_the_argument(device):
    """PyTorch's exception class, with a message that says which argument is wrong (PyTorch's
    own, for these, is a matmul or broadcast error or a misleading one); a call that raises is
    not counted as a fallback."""
    q, k, v = make_qkv(2, 4, 2, 8, 8, 16, torch.float32, device)
    flash_attn_ext.reset_fallback_counts()
    for args, kw, words in [
        ((q, k, v), {"enable_gqa": True, "dropout_p": -0.1}, "dropout_p must be in [0, 1], got -0.1"),
        ((q, k, v), {"enable_gqa": True, "attn_mask": torch.ones(3, 5, dtype=torch.bool)}, "attn_mask of shape (3, 5)"),
        ((q, k, v), {}, "query has 4 heads and key/value 2: pass enable_gqa=True"),
        ((q, k[..., :8], v), {"enable_gqa": True}, "query's head dim (16) must equal key's (8)"),
        ((q[:, :3], k, v), {"enable_gqa": True}, "query's heads (3) must be a multiple of key/value's heads (2)"),
        ((q, k.double(), v), {}, "must have one dtype"),
    ]:
        with pytest.raises(Exception) as theirs:
            F.scaled_dot_product_attention(*args, **kw)
        with pytest.raises(type(theirs.value)) as ours:
            fae_sdpa(*args, **kw)
        assert words in str(ours.value), str(ours.value)
    assert flash_attn_ext.fallback_counts() == {}
    # what PyTorch accepts is never blamed: one K/V head without enable_gqa (it broadcasts) with
    # a mask of the wrong size is the mask's fault
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \(5, 5\)"):
        fae_sdpa(q, k[:, :1], v[:, :1], attn_mask=torch.ones(5, 5, dtype=torch.bool, device=device))


def test_fallback_is_counted_and_logged(device, caplog):
    q, _, _ = make_qkv(2, 2, 2, 8, 8, 16, torch.float32, device)
    _, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, device, requires_grad=True)
    mask = torch.randn(1, 2, 8, 8, device=device)
    with caplog.at_level(logging.DEBUG, logger="flash_attn_ext"):
        out = fae_sdpa(q, k, v, attn_mask=mask)  # K/V broadcast over the batch: not fused
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert flash_attn_ext.fallback_counts() == {"batch dims differ (broadcasting)": 1}
    assert any("falling back" in r.message for r in caplog.records)
    out.sum().backward()
    assert k.grad is not None


def test_fallback_honours_window(device):
    q, k, v = make_qkv(2, 2, 2, 30, 30, 16, torch.float32, device)
    mask = torch.randn(1, 2, 30, 30, device=device)
    ours = fae_sdpa(q, k[:1], v[:1], attn_mask=mask, window_size=(4, 0))
    expected = fae_sdpa(q, k[:1].expand_as(k), v[:1].expand_as(v), attn_mask=mask, window_size=(4, 0))
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=2e-5)
    assert flash_attn_ext.fallback_counts() == {"batch dims differ (broadcasting)": 1}


def test_mask_that_requires_grad(device):
    """Served by the fused kernels on CPU (they compute its gradient), a fallback elsewhere."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, device)
    mask = torch.randn(1, 2, 8, 8, device=device, requires_grad=True)
    out = fae_sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=2e-5, rtol=2e-5)
    expected = {} if device == "cpu" else {"attn_mask requires grad (its gradient: CPU kernels only)": 1}
    assert flash_attn_ext.fallback_counts() == expected
    out.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_layout_like_pytorch_flash(device):
    # (B, L, H, D) storage viewed as (B, H, L, D): no copy in, and the output has the same layout.
    q, k, v = make_qkv(2, 4, 4, 16, 16, 8, torch.float32, device, layout="blhd")
    out = fae_sdpa(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("mask_shape", [(1, 1, 1, 9, 11), (2, 1, 2, 9, 11), (9, 11), (3, 1, 1, 11)])
def test_five_dim_inputs_with_mask(device, mask_shape):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(s, generator=g).to(device) for s in ((2, 3, 2, 9, 8), (2, 3, 2, 11, 8), (2, 3, 2, 11, 8)))
    mask = (torch.rand(mask_shape, generator=g) > 0.3).to(device)
    torch.testing.assert_close(
        fae_sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=2e-5, rtol=2e-5
    )
    assert flash_attn_ext.fallback_counts() == {}
