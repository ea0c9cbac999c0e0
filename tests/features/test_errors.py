"""Bad input that needs gradients or grad mode: a Python exception naming the argument."""

import pytest
import torch

import flash_attn_ext

OPS = torch.ops.flash_attn_ext


def _qkv(dtype=torch.float32):
    return (
        torch.randn(2, 4, 8, 16, dtype=dtype),
        torch.randn(2, 2, 10, 16, dtype=dtype),
        torch.randn(2, 2, 10, 16, dtype=dtype),
    )


def _fwd(q, k, v, mask=None, p=0.0, scale=0.25, wl=-1, wr=-1):
    return OPS.attention_forward(q, k, v, mask, p, scale, wl, wr, True)


# The malformed-call catalogue (every public function and op, run out of process) is
# tests/features/bad_input_cases.py; these are the checks that need a live autograd graph or grad mode.
q, k, v = _qkv()


def test_backward_checks_saved_tensors():
    out, lse, rng = _fwd(q, k, v)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        OPS.attention_backward(out[:, :, :3], q, k, v, out, lse, rng, None, 0.0, 0.25, -1, -1, True)
    with pytest.raises(ValueError, match="lse must be"):
        OPS.attention_backward(out, q, k, v, out, lse[:, :2], rng, None, 0.0, 0.25, -1, -1, True)


def test_mask_requiring_grad_gets_its_gradient():
    mask = torch.zeros(1, 1, 8, 10, requires_grad=True)
    out = flash_attn_ext.attention(q.requires_grad_(False), k, v, attn_mask=mask)
    out.square().sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_mask_requiring_grad_is_fine_without_grad_mode():
    # e.g. a learned bias (nn.Parameter) at inference time
    mask = torch.randn(1, 1, 8, 10, requires_grad=True)
    with torch.no_grad():
        out = flash_attn_ext.attention(q, k, v, attn_mask=mask)
        ref = flash_attn_ext.attention(q, k, v, attn_mask=mask.detach())
    assert torch.equal(out, ref)
