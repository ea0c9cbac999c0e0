"""Soft-capping (softcap > 0: scores become softcap * tanh(score / softcap) before the mask, as
in Gemma-2 and flash-attn) in the forward, backward and KV-cache kernels, against the float64
reference of SPEC.md section 6."""

import pytest
import torch

import flash_attn_ext
from flash_attn_ext.flash_attn_interface import flash_attn_func, flash_attn_with_kvcache
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, make_qkv, reference_attention

OPS = torch.ops.flash_attn_ext
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (Hq, Hkv, L, S, causal, window, softcap): caps below and above the score range, GQA / MQA,
# L != S, windows, a cap of the size Gemma-2 uses (50) against scaled-up scores.
CASES = [
    (2, 2, 37, 37, False, (-1, -1), 0.5),
    (4, 2, 113, 203, True, (-1, -1), 1.0),
    (4, 1, 203, 113, True, (16, 0), 5.0),
    (3, 3, 64, 130, False, (8, 8), 30.0),
    (2, 1, 1, 97, True, (-1, -1), 2.0),
]


def _inputs(device, dtype, Hq, Hkv, L, S, seed=0, requires_grad=False, amplify=4.0):
    # Scores of several units, so the cap bends them (tanh far from linear).
    q, k, v = make_qkv(2, Hq, Hkv, L, S, 32, dtype, device, seed=seed)
    q = (q.double() * amplify).to(dtype)
    if requires_grad:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    return q, k, v


def _window(causal, window):
    return (window[0], 0 if causal else window[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_softcap_forward(device, dtype, case):
    Hq, Hkv, L, S, causal, window, cap = case
    q, k, v = _inputs(device, dtype, Hq, Hkv, L, S)
    out, lse = flash_attn_ext.attention(q, k, v, causal=causal, window_size=window, softcap=cap, return_lse=True)
    w = _window(causal, window)
    ref, ref_lse = reference_attention(q, k, v, window=w, softcap=cap)
    low = reference_attention(q, k, v, window=w, softcap=cap, dtype=dtype)[0] if dtype in LOW_PRECISION else ref
    assert_matches(out, ref, low, dtype, f"softcap out {case}")
    assert_lse_matches(lse, ref_lse, dtype, f"softcap lse {case}")
    # The cap changes the result (the test would catch a kernel that ignores it).
    plain = reference_attention(q, k, v, window=w)[0]
    assert (plain - ref).abs().max().item() > 10 * max(1e-3, (out.double() - ref).abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_softcap_backward(device, dtype, case):
    Hq, Hkv, L, S, causal, window, cap = case
    q, k, v = _inputs(device, dtype, Hq, Hkv, L, S, requires_grad=True)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(2, Hq, L, 32, generator=g, dtype=torch.float64).to(dtype).to(device)
    out = flash_attn_ext.attention(q, k, v, causal=causal, window_size=window, softcap=cap)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    w = _window(causal, window)

    def ref_grads(ref_dtype):
        qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v))
        o, _ = reference_attention(qr, kr, vr, window=w, softcap=cap, dtype=ref_dtype)
        return torch.autograd.grad(o, (qr, kr, vr), dout.to(ref_dtype))

    ref = ref_grads(torch.float64)
    low = ref_grads(dtype) if dtype in LOW_PRECISION else ref
    for name, ours, r, lo in zip(("dq", "dk", "dv"), grads, ref, low):
        assert_matches(ours, r, lo, dtype, f"softcap {name} {case}", grad=True)


def test_softcap_with_mask_and_gradcheck(device):
    # float64 gradcheck through the op (mask added after the cap, as Gemma-2 does).
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv(1, 2, 1, 9, 11, 8, torch.float64, device))
    mask = torch.randn(1, 2, 9, 11, dtype=torch.float64, device=device)
    fn = lambda q, k, v: flash_attn_ext.attention(q * 3, k, v, attn_mask=mask, softcap=0.8, causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    ref = reference_attention(q * 3, k, v, window=(-1, 0), attn_mask=mask, softcap=0.8)[0]
    assert_matches(fn(q, k, v), ref, ref, torch.float64, "softcap + float mask")


@pytest.mark.parametrize("decode_path", ["require", "off"], ids=["decode_kernel", "tiled_kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_softcap_kvcache(device, dtype, decode_path, kernel_settings):
    kernel_settings(cpu_decode=decode_path)
    B, Hq, Hkv, S_max, D, cap = 3, 8, 2, 300, 64, 1.5
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    q = (rnd(B, 1, Hq, D).double() * 4).to(dtype)
    k_cache, v_cache = rnd(B, S_max, Hkv, D), rnd(B, S_max, Hkv, D)
    lens = torch.tensor([1, 150, 300], dtype=torch.int32, device=device)
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lens, causal=True, softcap=cap, return_softmax_lse=True
    )
    for b in range(B):
        n = int(lens[b])
        qb, kb, vb = (t[b : b + 1].transpose(1, 2) for t in (q, k_cache[:, :n], v_cache[:, :n]))
        ref, ref_lse = reference_attention(qb, kb, vb, window=(-1, 0), softcap=cap)
        low = (
            reference_attention(qb, kb, vb, window=(-1, 0), softcap=cap, dtype=dtype)[0]
            if dtype in LOW_PRECISION
            else ref
        )
        assert_matches(out[b : b + 1].transpose(1, 2), ref, low, dtype, f"kvcache softcap b={b}")
        assert_lse_matches(lse[b : b + 1], ref_lse, dtype, f"kvcache softcap lse b={b}")


def test_flash_attn_func_softcap_matches_attention(device):
    q, k, v = _inputs(device, torch.float32, 4, 2, 33, 40)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softcap=2.0)
    ref = reference_attention(q, k, v, window=(-1, 0), softcap=2.0)[0]
    assert_matches(out.transpose(1, 2), ref, ref, torch.float32, "flash_attn_func softcap")


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_softcap_rejects_bad_values(device, bad):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32, device)
    with pytest.raises(ValueError, match="softcap"):
        OPS.attention_forward(q, k, v, None, 0.0, 0.3, -1, -1, True, bad)
    k_cache, v_cache = torch.zeros(1, 2, 8, 8, device=device), torch.zeros(1, 2, 8, 8, device=device)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="softcap"):
        OPS.attention_kvcache(
            q[:, :, :1],
            k_cache,
            v_cache,
            torch.tensor([2], dtype=torch.int32, device=device),
            k[:, :, :1],
            v[:, :, :1],
            0.3,
            -1,
            0,
            None,
            bad,
        )
    assert torch.equal(k_cache, before), "nothing is written before the error"
