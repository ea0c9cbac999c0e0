"""flash-attn's API (flash_attn_ext.flash_attn_interface): the (B, S, H, D) layout, packed
inputs, bottom-right causal alignment, return values, and the arguments that are refused."""

import pytest
import torch

from flash_attn_ext.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_with_kvcache,
)
from reference import LOW_PRECISION, assert_matches, reference_attention


def _bshd(B, S, H, D, dtype, device, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, S, H, D, generator=g, dtype=torch.float64).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "Sq,Sk,Hq,Hkv,causal,window",
    [
        (33, 33, 4, 4, False, (-1, -1)),
        (17, 40, 4, 2, True, (-1, -1)),  # causal aligned bottom-right
        (40, 17, 2, 1, True, (-1, -1)),  # early queries see nothing: zeros, lse -inf
        (64, 64, 4, 4, False, (9, 3)),
    ],
)
def test_flash_attn_func_against_reference(device, dtype, Sq, Sk, Hq, Hkv, causal, window):
    q = _bshd(2, Sq, Hq, 16, dtype, device, 1)
    k, v = _bshd(2, Sk, Hkv, 16, dtype, device, 2), _bshd(2, Sk, Hkv, 16, dtype, device, 3)
    out, lse, probs = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, Hq, Sq) and lse.dtype == torch.float32 and probs is None
    w = (window[0], 0) if causal else window
    ref, ref_lse = reference_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window=w, bottom_right=True
    )
    low = (
        reference_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window=w, bottom_right=True, dtype=dtype
        )[0]
        if dtype in LOW_PRECISION
        else ref
    )
    assert_matches(out.transpose(1, 2), ref, low, dtype, "flash_attn_func")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.equal(flash_attn_func(q, k, v, causal=causal, window_size=window), out)


def test_packed_variants_equal_unpacked_with_gradients(device):
    qkv = _bshd(2, 24, 3 * 4, 16, torch.float64, device, 4).view(2, 24, 3, 4, 16).requires_grad_()
    out = flash_attn_qkvpacked_func(qkv, causal=True, softmax_scale=0.3)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    ref = flash_attn_func(q, k, v, causal=True, softmax_scale=0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2), rtol=1e-12, atol=1e-12)

    qq = _bshd(2, 10, 4, 16, torch.float64, device, 5, requires_grad=True)
    kv = _bshd(2, 30, 2 * 2, 16, torch.float64, device, 6).view(2, 30, 2, 2, 16).requires_grad_()
    out = flash_attn_kvpacked_func(qq, kv, causal=True)
    torch.testing.assert_close(out, flash_attn_func(qq, kv[:, :, 0], kv[:, :, 1], causal=True), rtol=0, atol=0)
    out.sum().backward()
    k_sep, v_sep = (kv.detach()[:, :, i].clone().requires_grad_() for i in (0, 1))
    flash_attn_func(qq.detach(), k_sep, v_sep, causal=True).sum().backward()
    torch.testing.assert_close(kv.grad, torch.stack([k_sep.grad, v_sep.grad], dim=2), rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(
        lambda a, b: flash_attn_kvpacked_func(a, b, causal=True),
        (qq[:1, :4].detach().requires_grad_(), kv[:1, :6].detach().requires_grad_()),
    )


def test_with_kvcache_appends_and_matches(device):
    B, S_max, Hq, Hkv, D = 2, 32, 4, 2, 16
    kc, vc = torch.zeros(B, S_max, Hkv, D, device=device), torch.zeros(B, S_max, Hkv, D, device=device)
    k_all, v_all = _bshd(B, 20, Hkv, D, torch.float32, device, 7), _bshd(B, 20, Hkv, D, torch.float32, device, 8)
    q = _bshd(B, 1, Hq, D, torch.float32, device, 9, requires_grad=True)  # forward-only, as in flash-attn
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, k_all[:, :, :], v_all, cache_seqlens=0, causal=True, return_softmax_lse=True
    )
    assert out.grad_fn is None
    assert torch.equal(kc[:, :20], k_all) and torch.all(kc[:, 20:] == 0)
    ref = flash_attn_func(q.detach(), k_all, v_all, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert lse.shape == (B, Hq, 1)


def test_packed_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="qkv must be"):
        flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 4, 16))
