"""merge_attention_states: attention over two disjoint key sets, merged, equals attention
over their union (output and lse); gradients through the merge are exact."""

import pytest
import torch

import flash_attn_ext
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, make_qkv, reference_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("split", [1, 50, 99])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (20, -1))])
def test_split_keys_merge_to_full_attention(device, dtype, split, causal, window):
    B, Hq, Hkv, L, S, D = 2, 4, 2, 33, 100, 32
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, dtype, device)
    full, full_lse = flash_attn_ext.attention(q, k, v, causal=causal, window_size=window, return_lse=True)
    # Each half sees the keys of its range at their global positions: express that with a mask.
    i = torch.arange(L, device=device).unsqueeze(-1) + (S - L)
    j = torch.arange(S, device=device)
    band = torch.ones(L, S, dtype=torch.bool, device=device)
    if causal:
        band &= j <= i
    if window[0] >= 0:
        band &= j >= i - window[0]
    halves = []
    for lo, hi in ((0, split), (split, S)):
        mask = band[:, lo:hi]
        halves.append(flash_attn_ext.attention(q, k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask, return_lse=True))
    out, lse = flash_attn_ext.merge_attention_states(halves[0][0], halves[0][1], halves[1][0], halves[1][1])
    # Against the float64 reference of attention over all keys; the input-dtype baseline merges
    # (in float64) the two halves as the kernels round them, each stored in the dtype.
    w = (window[0], 0 if causal else -1)
    ref, ref_lse = reference_attention(q, k, v, window=w)
    low = ref
    if dtype in LOW_PRECISION:
        parts = [
            reference_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=band[:, lo:hi], dtype=dtype)
            for lo, hi in ((0, split), (split, S))
        ]
        both = torch.logaddexp(parts[0][1].double(), parts[1][1].double())
        safe = torch.where(torch.isfinite(both), both, torch.zeros_like(both)).unsqueeze(-1)
        low = sum(o.double() * torch.exp(l.double().unsqueeze(-1) - safe) for o, l in parts).to(dtype)
    assert_matches(out, ref, low, dtype, f"merged {dtype} split={split} causal={causal} window={window}")
    assert_lse_matches(lse, ref_lse, dtype, "merged lse")
    assert torch.equal(torch.isinf(lse), torch.isinf(full_lse))


def test_empty_sides(device):
    oa, ob = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    ninf = float("-inf")
    la = torch.tensor([0.5, ninf, ninf], device=device)
    lb = torch.tensor([ninf, 1.5, ninf], device=device)
    out, lse = flash_attn_ext.merge_attention_states(oa, la, ob, lb)
    assert torch.equal(out[0], oa[0]) and torch.equal(out[1], ob[1]) and torch.all(out[2] == 0)
    assert lse[0] == 0.5 and lse[1] == 1.5 and lse[2] == ninf


def test_gradcheck(device):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    oa, ob, la, lb = mk(2, 3, 5, 4), mk(2, 3, 5, 4), mk(2, 3, 5), mk(2, 3, 5)
    assert torch.autograd.gradcheck(lambda *a: flash_attn_ext.merge_attention_states(*a), (oa, la, ob, lb))
    # one side empty in some rows: its weight and gradients are zero there
    lb2 = lb.detach().clone()
    lb2[0, 1] = float("-inf")
    oa2, la2, ob2 = (t.detach().clone().requires_grad_(True) for t in (oa, la, ob))
    out, lse = flash_attn_ext.merge_attention_states(oa2, la2, ob2, lb2)
    (out.sum() + lse.sum()).backward()
    assert torch.all(ob2.grad[0, 1] == 0) and torch.isfinite(la2.grad).all()


def test_opcheck(device):
    oa, ob = torch.randn(2, 3, 5, 8, device=device, requires_grad=True), torch.randn(2, 3, 5, 8, device=device)
    la, lb = torch.randn(2, 3, 5, device=device), torch.randn(2, 3, 5, device=device)
    torch.library.opcheck(torch.ops.flash_attn_ext.merge_attention_states, (oa, la, ob, lb))
    torch.library.opcheck(
        torch.ops.flash_attn_ext.merge_attention_states, (oa.detach().bfloat16(), la, ob.bfloat16(), lb)
    )


def test_bad_input():
    with pytest.raises(ValueError, match="lse_a and lse_b must have out_a's shape"):
        flash_attn_ext.merge_attention_states(torch.randn(2, 4), torch.randn(3), torch.randn(2, 4), torch.randn(3))
    with pytest.raises(TypeError, match="must both be float32 or float64"):
        flash_attn_ext.merge_attention_states(
            torch.randn(2, 4), torch.randn(2).half(), torch.randn(2, 4), torch.randn(2).half()
        )
