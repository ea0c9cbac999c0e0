"""Learned attention sinks (gpt-oss, issue 20): a logit per query head in every row's softmax
denominator, no value. Every op takes them (dense, varlen, KV cache incl. decode and split-KV,
where the sink must be counted once at the merge); checked against the float64 reference with
the sink as one more score column, and the sink gradient
d sink_h = -sum_i exp(sink_h - lse_i) * rowsum(dO_i * O_i) by gradcheck and against the
reference's autograd."""

import pytest
import torch

import flash_attn_ext
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, make_qkv, reference_attention

OPS = torch.ops.flash_attn_ext


def _sinks(H, seed, device, dtype=torch.float32, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, generator=g, dtype=torch.float64) * spread).to(dtype).to(device)


def _check_forward(q, k, v, sinks, dtype, what, **kw):
    out, lse = flash_attn_ext.attention(q, k, v, sinks=sinks, return_lse=True, **kw)
    ref_kw = dict(
        window=kw.get("window_size", (-1, -1)), bottom_right=kw.get("alignment", "bottom_right") != "top_left"
    )
    if kw.get("causal"):
        ref_kw["window"] = (ref_kw["window"][0], 0)
    for name in ("softcap", "alibi_slopes"):
        if name in kw:
            ref_kw[name] = kw[name]
    ref, ref_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), sinks=sinks.cpu().double(), **ref_kw)
    low = (
        reference_attention(q.cpu(), k.cpu(), v.cpu(), sinks=sinks.cpu(), dtype=dtype, **ref_kw)[0]
        if dtype in LOW_PRECISION
        else ref
    )
    assert_matches(out.cpu(), ref, low, dtype, what)
    assert_lse_matches(lse.cpu(), ref_lse, dtype, what)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "L,S,Hq,Hkv,causal,window",
    [
        (37, 37, 4, 4, False, (-1, -1)),
        (70, 90, 4, 2, True, (-1, -1)),
        (90, 40, 4, 1, True, (-1, -1)),  # the first 50 queries see no key: zeros, lse = sink
        (64, 200, 6, 2, False, (17, 5)),
        (1, 300, 8, 2, True, (-1, -1)),  # decode shape
    ],
)
def test_forward_with_sinks(device, dtype, L, S, Hq, Hkv, causal, window):
    q, k, v = make_qkv(2, Hq, Hkv, L, S, 32, dtype, device, seed=1)
    sinks = _sinks(Hq, 2, device)
    out, lse = _check_forward(q, k, v, sinks, dtype, "sinks", causal=causal, window_size=window)
    # the sink is in the denominator: without it the output is larger by exactly that factor
    plain, plain_lse = flash_attn_ext.attention(q, k, v, causal=causal, window_size=window, return_lse=True)
    seen = torch.isfinite(plain_lse)
    expected = torch.exp(plain_lse - lse)[seen]
    ratio = (out.double() * plain.double()).sum(-1)[seen] / (plain.double() ** 2).sum(-1).clamp(min=1e-30)[seen]
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    torch.testing.assert_close(ratio, expected.double(), rtol=tol, atol=tol)
    if causal and L > S:  # rows without a visible key
        assert torch.all(out[:, :, : L - S] == 0)
        torch.testing.assert_close(lse[:, :, : L - S], sinks.view(1, -1, 1).expand(2, -1, L - S).to(lse.dtype))


def test_sinks_extremes(device):
    """A sink far above every score takes all the mass (output ~0); -inf is no sink at all."""
    q, k, v = make_qkv(1, 3, 3, 20, 30, 16, torch.float32, device, seed=3)
    sinks = torch.tensor([60.0, float("-inf"), -3.0], device=device)
    out, lse = _check_forward(q, k, v, sinks, torch.float32, "extreme sinks")
    plain, plain_lse = flash_attn_ext.attention(q, k, v, return_lse=True)
    assert out[:, 0].abs().max() < 1e-20 and torch.allclose(lse[:, 0], torch.full_like(lse[:, 0], 60.0))
    assert torch.equal(out[:, 1], plain[:, 1]) and torch.equal(lse[:, 1], plain_lse[:, 1])


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("decode", ["auto", "off"])
def test_sinks_on_the_cache_paths_count_once(device, kernel_settings, splits, decode):
    """KV cache (CPU decode kernel or the forward, split-KV forced or not): the merge of split
    partial states must count the sink once, not once per split."""
    if device == "cuda" and decode == "off":
        pytest.skip("cpu_decode is a CPU setting")
    kernel_settings(num_splits=splits, cpu_decode=decode)
    B, S_max, Hq, Hkv, D = 2, 600, 8, 2, 32
    kc = torch.randn(B, S_max, Hkv, D, device=device)
    vc = torch.randn(B, S_max, Hkv, D, device=device)
    lens = torch.tensor([517, 233], dtype=torch.int32, device=device)
    sinks = _sinks(Hq, 4, device)
    for L in (1, 3):
        q = torch.randn(B, L, Hq, D, device=device)
        with torch.no_grad():
            out, lse = flash_attn_ext.attention_with_kvcache(
                q, kc, vc, cache_seqlens=lens, causal=True, sinks=sinks, return_softmax_lse=True
            )
        for b in range(B):
            n = int(lens[b])
            ref, ref_lse = reference_attention(
                q[b : b + 1].transpose(1, 2).cpu(),
                kc[b : b + 1, :n].transpose(1, 2).cpu(),
                vc[b : b + 1, :n].transpose(1, 2).cpu(),
                window=(-1, 0),
                sinks=sinks.cpu().double(),
            )
            assert_matches(out[b : b + 1].transpose(1, 2).cpu(), ref, ref, torch.float32, f"kvcache L={L} b={b}")
            assert_lse_matches(lse[b : b + 1].cpu(), ref_lse, torch.float32, f"kvcache lse L={L} b={b}")


@pytest.mark.parametrize("causal,Hkv,extras", [(False, 3, False), (True, 1, False), (True, 3, True)])
def test_sink_gradients_gradcheck(device, causal, Hkv, extras):
    """extras: a float mask and ALiBi slopes too (other tensor arguments before the sinks)."""
    q, k, v = make_qkv(1, 3, Hkv, 6, 9, 8, torch.float64, device, seed=5, requires_grad=True)
    sinks = _sinks(3, 6, device, torch.float64).requires_grad_()
    kw = {}
    if extras:
        kw = dict(attn_mask=torch.randn(6, 9, dtype=torch.float64, device=device), alibi_slopes=_sinks(3, 7, device))
        kw["alibi_slopes"] = kw["alibi_slopes"].abs()

    def f(q, k, v, sinks):
        out, lse = flash_attn_ext.attention(q, k, v, causal=causal, sinks=sinks, return_lse=True, **kw)
        return out, lse  # the gradient through lse too (it includes the sink)

    torch.autograd.gradcheck(f, (q, k, v, sinks))
    (ds,) = torch.autograd.grad(f(q, k, v, sinks)[0].sum(), sinks)
    assert ds.abs().min() > 1e-6  # (a sink gradient dropped for these arguments would be zero)


def test_nan_sink_makes_its_head_nan(device, kernel_settings):
    """A diverged (NaN) sink must not turn into zero rows: its head is NaN, the others exact."""
    q, k, v = make_qkv(1, 2, 1, 5, 40, 8, torch.float32, device, seed=14)
    sinks = torch.tensor([float("nan"), 0.5], device=device)
    plain = flash_attn_ext.attention(q, k, v)
    for splits in (0, 3):
        kernel_settings(num_splits=splits)
        out = flash_attn_ext.attention(q, k, v, sinks=sinks)
        assert torch.isnan(out[:, 0]).all() and not torch.isnan(out[:, 1]).any()
        assert not torch.equal(out[:, 1], plain[:, 1])  # head 1's sink was counted
        with torch.no_grad():
            dec = flash_attn_ext.attention_with_kvcache(
                q[:, :, -1:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=40, sinks=sinks
            )
        assert torch.isnan(dec[:, :, 0]).all() and not torch.isnan(dec[:, :, 1]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sink_gradients_against_reference(device, dtype):
    q, k, v = make_qkv(2, 4, 2, 50, 70, 32, dtype, device, seed=7, requires_grad=True)
    sinks = _sinks(4, 8, device).requires_grad_()
    out = flash_attn_ext.attention(q, k, v, causal=True, window_size=(30, 0), sinks=sinks)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(dtype).to(device)
    dq, dk, dv, ds = torch.autograd.grad(out, (q, k, v, sinks), g)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    s64 = sinks.detach().cpu().double().requires_grad_()
    ref, _ = reference_attention(q64, k64, v64, window=(30, 0), sinks=s64)
    r = torch.autograd.grad(ref, (q64, k64, v64, s64), g.cpu().double())
    if dtype in LOW_PRECISION:  # the input-dtype baseline of the q/k/v gradients
        ql, kl, vl = (t.detach().cpu().float().requires_grad_() for t in (q, k, v))
        low_out, _ = reference_attention(ql, kl, vl, window=(30, 0), sinks=sinks.detach().cpu(), dtype=dtype)
        low = [t.to(dtype) for t in torch.autograd.grad(low_out.float(), (ql, kl, vl), g.cpu().float())]
    else:
        low = r[:3]
    for name, ours, ref_g, low_g in zip(("dq", "dk", "dv"), (dq, dk, dv), r[:3], low):
        assert_matches(ours.cpu(), ref_g, low_g, dtype, name, grad=True)
    # d sinks: a sum over every row of the head, formed in float32 from rounded O and dO
    # (measured: bf16 errs up to ~1.2e-3 of the largest sink gradient, float32 ~1e-6)
    tol = (1e-4 if dtype == torch.float32 else 5e-3) * r[3].abs().max().item()
    assert (ds.cpu().double() - r[3]).abs().max() <= tol, (ds, r[3])


def test_varlen_with_sinks_and_gradcheck(device):
    cu = torch.tensor([0, 5, 5, 14, 17], dtype=torch.int32, device=device)
    H, D = 2, 8
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(17, H, D, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(3))
    sinks = _sinks(H, 10, device, torch.float64).requires_grad_()

    def f(q, k, v, sinks):
        return flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True, sinks=sinks)

    def with_alibi_and_lse(q, k, v, sinks):  # ALiBi before the sinks; the gradient through lse too
        out, lse, _ = flash_attn_ext.flash_attn_varlen_func(
            q,
            k,
            v,
            cu,
            cu,
            9,
            9,
            causal=True,
            sinks=sinks,
            alibi_slopes=_sinks(H, 15, device).abs(),
            return_attn_probs=True,
        )
        return out, lse

    torch.autograd.gradcheck(with_alibi_and_lse, (q, k, v, sinks))
    out = f(q, k, v, sinks)
    for b in range(4):
        a, e = int(cu[b]), int(cu[b + 1])
        if a == e:
            continue
        ref, _ = reference_attention(
            *(t[a:e].detach().cpu().transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
            window=(-1, 0),
            sinks=sinks.detach().cpu(),
        )
        torch.testing.assert_close(out[a:e].detach().cpu(), ref[0].transpose(0, 1), rtol=1e-10, atol=1e-10)
    torch.autograd.gradcheck(f, (q, k, v, sinks))


@pytest.mark.parametrize(
    "sinks,exc,match",
    [
        (torch.zeros(3), ValueError, r"sinks must have shape \(4,\)"),
        (torch.zeros(1, 4), ValueError, r"sinks must have shape \(4,\)"),
        (torch.zeros(4, dtype=torch.bfloat16), TypeError, r"sinks must be float32"),
        (torch.zeros(8)[::2], ValueError, r"sinks must be contiguous"),
        ([0.0] * 4, TypeError, r"sinks must be a torch.Tensor"),
    ],
)
def test_bad_sinks_raise_naming_them(sinks, exc, match):
    q, k, v = make_qkv(1, 4, 2, 5, 5, 8, torch.float32, "cpu", seed=11)
    with pytest.raises(exc, match=match):
        flash_attn_ext.attention(q, k, v, sinks=sinks)
    kc, vc = torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8)
    kn = torch.ones(1, 1, 2, 8)
    with pytest.raises(exc, match=match), torch.no_grad():  # checked before the append writes
        flash_attn_ext.attention_with_kvcache(q[:, :, :1].transpose(1, 2), kc, vc, kn, kn, cache_seqlens=3, sinks=sinks)
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0
    for cache in (
        flash_attn_ext.KVCache(1, None, 2, 8, window=6),
        flash_attn_ext.KVCache(1, None, 2, 8, window=6, sink_tokens=2),
    ):  # the decode steps that read the slots in place write first: they check first
        with pytest.raises((ValueError, TypeError), match="sinks"), torch.no_grad():
            cache.attend(q[:, :, :1].transpose(1, 2), kn, kn, sinks=sinks)
        assert cache.seqlens.tolist() == [0] and cache.k.abs().sum() == 0


def test_opcheck_with_sinks(device):
    q, k, v = make_qkv(1, 4, 2, 6, 9, 8, torch.float32, device, seed=12)
    sinks = _sinks(4, 13, device).requires_grad_()
    torch.library.opcheck(OPS.attention_forward, (q, k, v, None, 0.0, 0.3, -1, 0, True, 0.0, None, sinks))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    torch.library.opcheck(
        OPS.attention_varlen_forward, (qp[:6], kp[:6], vp[:6], cu, cu, 4, 4, 0.0, 0.3, -1, 0, True, 0.0, None, sinks)
    )
    kc, vc = torch.zeros(1, 2, 16, 8, device=device), torch.zeros(1, 2, 16, 8, device=device)
    lens = torch.tensor([5], dtype=torch.int32, device=device)
    torch.library.opcheck(
        OPS.attention_kvcache, (q[:, :, :1], kc, vc, lens, None, None, 0.3, -1, -1, None, 0.0, None, sinks.detach())
    )
