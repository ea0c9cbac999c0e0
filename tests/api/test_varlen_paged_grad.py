"""flash_attn_varlen_func(..., block_table=) with inputs that require grad: as in flash-attn, the
forward is computed (flash-attn's test_flash_attn_varlen_causal calls it so and checks only the
forward in its paged cases) and only the backward is missing. Here the output is connected to
the inputs that require grad through a node whose backward raises NotImplementedError, so a
backward fails loudly instead of leaving them without a gradient; with nothing requiring grad
(or grad mode off) the result carries no autograd history, as before."""

import pytest
import torch

from flash_attn_ext import flash_attn_interface as fai

HQ, HKV, D, BLOCK, PER_SEQ = 4, 2, 16, 4, 3
CU_Q = [0, 3, 4, 10]  # query lengths 3, 1, 6
CU_K = [0, 9, 13, 19]  # key lengths 9, 4, 6
MAX_Q, MAX_K = 6, 9
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]


def _rnd(*shape, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _case(dtype, device):
    """Packed queries (10, HQ, D), a paged cache of 12 blocks of BLOCK positions (blocks
    shuffled), and the block table naming PER_SEQ blocks per sequence."""
    q = _rnd(CU_Q[-1], HQ, D, seed=40, dtype=dtype, device=device)
    kp = _rnd(12, BLOCK, HKV, D, seed=41, dtype=dtype, device=device)
    vp = _rnd(12, BLOCK, HKV, D, seed=42, dtype=dtype, device=device)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(43))
    table = perm[: 3 * PER_SEQ].view(3, PER_SEQ).to(torch.int32).to(device)
    cu_q = torch.tensor(CU_Q, dtype=torch.int32, device=device)
    cu_k = torch.tensor(CU_K, dtype=torch.int32, device=device)
    return q, kp, vp, cu_q, cu_k, table


def _call(q, kp, vp, cu_q, cu_k, table, **kw):
    return fai.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, MAX_Q, MAX_K, causal=True, block_table=table, **kw)


def _grad_inputs(which, q, kp, vp):
    """Copies of q, k, v with those named in which requiring grad (leaves)."""
    return [t.clone().requires_grad_(name in which) for name, t in zip("qkv", (q, kp, vp))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["q", "k", "v", "qkv"])
def test_forward_computed_with_inputs_requiring_grad(device, dtype, which):
    q, kp, vp, cu_q, cu_k, table = _case(dtype, device)
    with torch.no_grad():
        ref = _call(q, kp, vp, cu_q, cu_k, table)
    gq, gk, gv = _grad_inputs(which, q, kp, vp)
    out = _call(gq, gk, gv, cu_q, cu_k, table)
    assert out.requires_grad and out.grad_fn is not None
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out.detach(), ref)  # the same forward, bitwise
    assert torch.equal(gq, q) and torch.equal(gk, kp) and torch.equal(gv, vp)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["q", "k", "v", "qkv"])
def test_backward_raises_not_implemented(device, dtype, which):
    q, kp, vp, cu_q, cu_k, table = _case(dtype, device)
    gq, gk, gv = _grad_inputs(which, q, kp, vp)
    out = _call(gq, gk, gv, cu_q, cu_k, table)
    with pytest.raises(NotImplementedError, match="block_table") as info:
        out.sum().backward()
    assert "flash_attn_varlen_func" in str(info.value) and "forward-only" in str(info.value)
    assert all(t.grad is None for t in (gq, gk, gv))  # nothing written, no silent zeros
    with pytest.raises(NotImplementedError, match="block_table"):
        torch.autograd.grad(out.sum(), [t for t in (gq, gk, gv) if t.requires_grad])


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_attn_probs_lse_matches_no_grad(device, dtype):
    q, kp, vp, cu_q, cu_k, table = _case(dtype, device)
    with torch.no_grad():
        ref_out, ref_lse, ref_p = _call(q, kp, vp, cu_q, cu_k, table, return_attn_probs=True)
    gq, gk, gv = _grad_inputs("qkv", q, kp, vp)
    out, lse, p = _call(gq, gk, gv, cu_q, cu_k, table, return_attn_probs=True)
    assert p is None and ref_p is None
    assert lse.shape == (HQ, CU_Q[-1]) and lse.dtype == torch.float32
    assert torch.equal(out.detach(), ref_out) and torch.equal(lse.detach(), ref_lse)
    assert out.requires_grad and lse.requires_grad
    with pytest.raises(NotImplementedError, match="block_table"):
        lse.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_and_no_grad_inputs_leave_no_autograd_node(device, dtype):
    q, kp, vp, cu_q, cu_k, table = _case(dtype, device)
    with torch.no_grad():
        ref, ref_lse, _ = _call(q, kp, vp, cu_q, cu_k, table, return_attn_probs=True)
    gq, gk, gv = _grad_inputs("qkv", q, kp, vp)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out, lse, _ = _call(gq, gk, gv, cu_q, cu_k, table, return_attn_probs=True)
        assert not out.requires_grad and out.grad_fn is None
        assert not lse.requires_grad and lse.grad_fn is None
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out = _call(q, kp, vp, cu_q, cu_k, table)  # grad mode on, nothing requires grad
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, ref)


def test_sinks_requiring_grad_raise_too(device):
    """sinks are differentiable elsewhere in the package: here their backward raises as well,
    rather than leaving them without a gradient."""
    q, kp, vp, cu_q, cu_k, table = _case(torch.float32, device)
    sinks = torch.linspace(-1, 1, HQ, device=device)
    with torch.no_grad():
        ref = _call(q, kp, vp, cu_q, cu_k, table, sinks=sinks)
    learned = sinks.clone().requires_grad_()
    out = _call(q, kp, vp, cu_q, cu_k, table, sinks=learned)
    assert out.requires_grad and torch.equal(out.detach(), ref)
    with pytest.raises(NotImplementedError, match="block_table"):
        out.sum().backward()
    assert learned.grad is None


def test_output_may_be_modified_in_place(device):
    q, kp, vp, cu_q, cu_k, table = _case(torch.float32, device)
    gq, gk, gv = _grad_inputs("q", q, kp, vp)
    out = _call(gq, gk, gv, cu_q, cu_k, table)
    expected = out.detach() * 2
    out.mul_(2)
    assert torch.equal(out.detach(), expected)
    with pytest.raises(NotImplementedError, match="block_table"):
        out.sum().backward()


def test_dropout_still_refused_with_grad(device):
    q, kp, vp, cu_q, cu_k, table = _case(torch.float32, device)
    gq, gk, gv = _grad_inputs("qkv", q, kp, vp)
    with pytest.raises(ValueError, match="dropout_p must be 0 with block_table") as info:
        _call(gq, gk, gv, cu_q, cu_k, table, dropout_p=0.1)
    assert isinstance(info.value, RuntimeError)  # flash-attn's users catch RuntimeError
