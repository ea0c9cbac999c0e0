"""flash_attn_ext.nn.Attention: the module against the same projections run through PyTorch's
SDPA with repeated K/V heads (float64), its gradients, and generation through its KV cache."""

import pytest
import torch
import torch.nn.functional as F

from flash_attn_ext.nn import Attention


def _reference(mod, x, window):
    """The module's math with PyTorch ops: K/V repeated per query head, an explicit mask."""
    B, L, _ = x.shape
    q = mod.q_proj(x).view(B, L, mod.num_heads, mod.head_dim).transpose(1, 2)
    k = mod.k_proj(x).view(B, L, mod.num_kv_heads, mod.head_dim).transpose(1, 2)
    v = mod.v_proj(x).view(B, L, mod.num_kv_heads, mod.head_dim).transpose(1, 2)
    g = mod.num_heads // mod.num_kv_heads
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(L)
    left, right = window
    vis = torch.ones(L, L, dtype=torch.bool)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=vis)
    return mod.o_proj(out.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, -1)), (False, (3, 3))])
def test_matches_sdpa_reference_with_gradients(heads, kv_heads, causal, window):
    torch.manual_seed(heads * 10 + kv_heads)
    mod = Attention(64, heads, kv_heads, causal=causal, window_size=window, bias=True, dtype=torch.float64)
    x = torch.randn(2, 19, 64, dtype=torch.float64, requires_grad=True)
    out = mod(x)
    ref = _reference(mod, x, mod.window_size)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    params = [x] + list(mod.parameters())
    ours = torch.autograd.grad(out, params, g)
    theirs = torch.autograd.grad(_reference(mod, x, mod.window_size), params, g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rolling", [False, True])
def test_generation_with_cache_equals_full_forward(device, rolling):
    """Prefill 7 tokens, then decode 9 one at a time through the module's cache: the outputs
    equal one full causal forward over the 16 tokens (a window of 6 tokens with the rolling cache)."""
    torch.manual_seed(0)
    W = 6
    mod = Attention(32, 4, 2, causal=True, window_size=(W - 1, 0) if rolling else (-1, -1), device=device)
    x = torch.randn(3, 16, 32, device=device)
    with torch.no_grad():
        full = mod(x)
        cache = mod.make_cache(3, None if rolling else 16, rolling_window=W if rolling else None)
        steps = [mod(x[:, :7], kv_cache=cache)] + [mod(x[:, t : t + 1], kv_cache=cache) for t in range(7, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.seqlens.tolist() == [16, 16, 16]


def test_dropout_only_in_training():
    mod = Attention(32, 4, dropout=0.5)
    x = torch.randn(2, 10, 32)
    mod.eval()
    assert torch.equal(mod(x), mod(x))
    mod.train()
    torch.manual_seed(1)
    a = mod(x)
    torch.manual_seed(1)
    assert torch.equal(a, mod(x))
    assert not torch.equal(a, mod(x))


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(64, 8, 3)
    with pytest.raises(ValueError, match="dropout"):
        Attention(64, 8, dropout=1.0)
    mod = Attention(16, 2)
    with pytest.raises(ValueError, match="attn_mask is not supported together with kv_cache"):
        with torch.no_grad():
            mod(torch.randn(1, 3, 16), attn_mask=torch.ones(3, 3, dtype=torch.bool), kv_cache=mod.make_cache(1, 8))


def test_names_match_llama_checkpoints():
    """q_proj/k_proj/v_proj/o_proj: Llama-style weights load by name (the converter relies on it)."""
    mod = Attention(64, 8, 2)
    assert set(mod.state_dict()) == {f"{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert mod.k_proj.weight.shape == (2 * 8, 64)


def test_learned_sinks_forward_gradients_and_cache(device):
    """sinks=True: the module's sink parameter joins the softmax (against the float64 reference
    with a sink column), gets its gradient, and generation through the cache (plain and
    rolling) equals the full forward."""
    from reference import reference_attention

    torch.manual_seed(1)
    mod = Attention(32, 4, 2, causal=True, window_size=(5, 0), sinks=True, dtype=torch.float64)
    assert mod.sinks.shape == (4,) and mod.sinks.dtype == torch.float32
    with torch.no_grad():
        mod.sinks.copy_(torch.tensor([1.5, -0.5, 3.0, float("-inf")]))
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    B, L = 2, 11
    q = mod.q_proj(x).view(B, L, 4, 8).transpose(1, 2)
    k = mod.k_proj(x).view(B, L, 2, 8).transpose(1, 2)
    v = mod.v_proj(x).view(B, L, 2, 8).transpose(1, 2)
    s64 = mod.sinks.detach().double().requires_grad_()
    ref_attn, _ = reference_attention(q, k, v, window=(5, 0), sinks=s64)
    ref = mod.o_proj(ref_attn.transpose(1, 2).reshape(B, L, 32))
    out = mod(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # (the sinks are float32)
    g = torch.randn_like(out)
    (ds,) = torch.autograd.grad(out, mod.sinks, g)
    (ds_ref,) = torch.autograd.grad(ref, s64, g)
    torch.testing.assert_close(ds.double(), ds_ref, rtol=1e-5, atol=1e-7)
    assert ds[3] == 0 and ds[:3].abs().min() > 1e-6  # a -inf sink takes no mass and gets no gradient

    for rolling in (False, True):
        m = Attention(32, 4, 2, causal=True, window_size=(5, 0), sinks=True, device=device)
        with torch.no_grad():
            m.sinks.copy_(torch.randn(4))
            xs = torch.randn(3, 16, 32, device=device)
            full = m(xs)
            cache = m.make_cache(3, None if rolling else 16, rolling_window=6 if rolling else None)
            steps = [m(xs[:, :7], kv_cache=cache)] + [m(xs[:, t : t + 1], kv_cache=cache) for t in range(7, 16)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
