"""Dropout: driven by PyTorch's CPU generator, regenerated exactly by the backward."""

import pytest
import torch

import flash_attn_ext
from reference import assert_matches, make_qkv, reference_attention


def _keep_mask(device, B, Hq, Hkv, L, S, p, seed, causal=False):
    """Recover the kernel's keep-mask: with V = I, out = P o Z / (1 - p) (Z does not depend on V)."""
    q, k, _ = make_qkv(B, Hq, Hkv, L, S, 16, torch.float64, device)
    eye = torch.eye(S, dtype=torch.float64, device=device).expand(B, Hkv, S, S)
    torch.manual_seed(seed)
    out = flash_attn_ext.attention(q, k, eye, dropout_p=p, causal=causal)
    ref, _ = reference_attention(q, k, eye, window=(-1, 0) if causal else (-1, -1))
    return out != 0, out, ref


def test_same_generator_state_same_result(device):
    q, k, v = make_qkv(2, 4, 2, 64, 80, 32, torch.float32, device)
    torch.manual_seed(123)
    a = flash_attn_ext.attention(q, k, v, dropout_p=0.3)
    b = flash_attn_ext.attention(q, k, v, dropout_p=0.3)  # generator advanced: different mask
    torch.manual_seed(123)
    c = flash_attn_ext.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_no_dropout_does_not_consume_generator(device):
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, torch.float32, device)
    torch.manual_seed(5)
    flash_attn_ext.attention(q, k, v)
    after = torch.rand(3, device=device)  # the generator of the device the kernel ran on
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3, device=device))


@pytest.mark.parametrize("varlen", [False, True])
def test_rng_state_empty_without_dropout(device, varlen):
    """Without dropout the forward returns an empty rng_state (no generator draw, no device work
    for it) and the backward takes it; with dropout, [seed, offset] on the inputs' device. A
    dropout backward refuses a state of any other size, naming rng_state."""
    ops = torch.ops.flash_attn_ext
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, torch.float32, device)
    if varlen:
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)

        def fwd(p):
            return ops.attention_varlen_forward(q, k, v, cu, cu, 5, 5, p, 0.25, -1, -1, True)

        def bwd(out, lse, rng, p):
            return ops.attention_varlen_backward(
                torch.ones_like(out), q, k, v, out, lse, rng, cu, cu, 5, 5, p, 0.25, -1, -1, True
            )
    else:

        def fwd(p):
            return ops.attention_forward(q, k, v, None, p, 0.25, -1, -1, True)

        def bwd(out, lse, rng, p):
            return ops.attention_backward(torch.ones_like(out), q, k, v, out, lse, rng, None, p, 0.25, -1, -1, True)

    out, lse, rng = fwd(0.0)
    assert rng.shape == (0,) and rng.dtype == torch.int64 and rng.device == q.device
    dq, dk, dv = bwd(out, lse, rng, 0.0)[:3]
    assert dq.abs().sum() > 0 and dv.abs().sum() > 0
    with pytest.raises(ValueError, match="rng_state"):
        bwd(out, lse, rng, 0.2)
    out, lse, rng = fwd(0.2)
    assert rng.shape == (2,) and rng.dtype == torch.int64 and rng.device == q.device
    bwd(out, lse, rng, 0.2)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scaling(device, p):
    keep, out, ref = _keep_mask(device, 2, 2, 2, 96, 128, p, seed=1)
    rate = keep.double().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5), f"keep rate {rate} for p={p}"
    # kept probabilities are the reference's scaled by 1/(1-p), dropped ones are exactly zero
    expected = torch.where(keep, ref / (1 - p), torch.zeros_like(ref))
    assert (out - expected).abs().max().item() < 1e-10


def test_mask_differs_across_heads_and_rows(device):
    keep, _, _ = _keep_mask(device, 1, 2, 2, 32, 64, 0.5, seed=2)
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_match_reference_with_same_mask(device, dtype, causal):
    B, Hq, Hkv, L, S, D, p, seed = 2, 4, 2, 70, 90, 32, 0.25, 11
    keep, _, _ = _keep_mask(device, B, Hq, Hkv, L, S, p, seed, causal)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, dtype, device, seed=4, requires_grad=True)
    dout = torch.randn(B, Hq, L, D, dtype=torch.float64).to(dtype).to(device)
    torch.manual_seed(seed)
    out = flash_attn_ext.attention(q, k, v, dropout_p=p, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    w = (-1, 0) if causal else (-1, -1)

    def ref(ref_dtype):
        qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v))
        o, _ = reference_attention(qr, kr, vr, window=w, keep=keep, dropout_p=p, dtype=ref_dtype)
        return (o,) + torch.autograd.grad(o, (qr, kr, vr), dout.to(ref_dtype))

    r64 = ref(torch.float64)
    low = ref(dtype) if dtype != torch.float32 else r64
    for name, ours, a, b in zip(("out", "dq", "dk", "dv"), (out,) + grads, r64, low):
        assert_matches(ours.detach(), a.detach(), b.detach(), dtype, f"dropout {name}", grad=name != "out")


def test_gradcheck_with_dropout(device):
    q, k, v = make_qkv(1, 2, 1, 7, 9, 4, torch.float64, device, requires_grad=True)

    def fn(q, k, v):
        torch.manual_seed(0)  # same mask on every evaluation
        return flash_attn_ext.attention(q, k, v, dropout_p=0.3, causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)
