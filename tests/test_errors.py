"""Bad input to the ops and to attention(): a Python exception naming the argument."""
import pytest
import torch

import flash_attn_ext

OPS = torch.ops.flash_attn_ext


def _qkv(dtype=torch.float32):
    return torch.randn(2, 4, 8, 16, dtype=dtype), torch.randn(2, 2, 10, 16, dtype=dtype), torch.randn(2, 2, 10, 16, dtype=dtype)


def _fwd(q, k, v, mask=None, p=0.0, scale=0.25, wl=-1, wr=-1):
    return OPS.attention_forward(q, k, v, mask, p, scale, wl, wr, True)


q, k, v = _qkv()
BAD = [
    ("query must be 4-D", ValueError, lambda: _fwd(q[0], k, v)),
    ("key must be 4-D", ValueError, lambda: _fwd(q, k[0], v)),
    ("value must be 4-D", ValueError, lambda: _fwd(q, k, v[0])),
    ("query must be float32", TypeError, lambda: _fwd(q.int(), k.int(), v.int())),
    ("same dtype", TypeError, lambda: _fwd(q, k.double(), v)),
    ("batch sizes differ", ValueError, lambda: _fwd(q, k[:1], v[:1])),
    ("key and value must have the same length", ValueError, lambda: _fwd(q, k, v[:, :, :5])),
    ("head dims differ", ValueError, lambda: _fwd(q, k[..., :8], v)),
    ("multiple of the number of key/value heads", ValueError,
     lambda: _fwd(q[:, :3], k, v)),
    ("contiguous last dimension", ValueError,
     lambda: _fwd(torch.randn(2, 4, 16, 8).transpose(-1, -2), k, v)),
    ("dropout_p must be in", ValueError, lambda: _fwd(q, k, v, p=1.0)),
    ("dropout_p must be in", ValueError, lambda: _fwd(q, k, v, p=-0.1)),
    ("scale must be finite", ValueError, lambda: _fwd(q, k, v, scale=float("nan"))),
    ("window_left must be >= -1", ValueError, lambda: _fwd(q, k, v, wl=-2)),
    ("window_right must be >= -1", ValueError, lambda: _fwd(q, k, v, wr=-5)),
    ("attn_mask must be bool or floating", TypeError,
     lambda: _fwd(q, k, v, mask=torch.ones(1, 1, 8, 10, dtype=torch.int32))),
    ("attn_mask must be 4-D", ValueError, lambda: _fwd(q, k, v, mask=torch.ones(8, 10, dtype=torch.bool))),
    ("not broadcastable", ValueError, lambda: _fwd(q, k, v, mask=torch.ones(1, 3, 8, 10, dtype=torch.bool))),
    ("window_size must be a pair", ValueError, lambda: flash_attn_ext.attention(q, k, v, window_size=3)),
    ("alignment must be", ValueError, lambda: flash_attn_ext.attention(q, k, v, alignment="left")),
]


@pytest.mark.parametrize("match,exc,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(match, exc, call):
    with pytest.raises(exc, match=match):
        call()


def test_backward_checks_saved_tensors():
    out, lse, rng = _fwd(q, k, v)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        OPS.attention_backward(out[:, :, :3], q, k, v, out, lse, rng, None, 0.0, 0.25, -1, -1, True)
    with pytest.raises(ValueError, match="lse must be"):
        OPS.attention_backward(out, q, k, v, out, lse[:, :2], rng, None, 0.0, 0.25, -1, -1, True)


def test_mask_requiring_grad_is_refused_not_silently_ignored():
    mask = torch.zeros(1, 1, 8, 10, requires_grad=True)
    with pytest.raises(ValueError, match="gradients with respect to attn_mask"):
        flash_attn_ext.attention(q.requires_grad_(False), k, v, attn_mask=mask)


def test_mask_requiring_grad_is_fine_without_grad_mode():
    # e.g. a learned bias (nn.Parameter) at inference time
    mask = torch.randn(1, 1, 8, 10, requires_grad=True)
    with torch.no_grad():
        out = flash_attn_ext.attention(q, k, v, attn_mask=mask)
        ref = flash_attn_ext.attention(q, k, v, attn_mask=mask.detach())
    assert torch.equal(out, ref)
