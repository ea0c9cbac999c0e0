"""ALiBi (alibi_slopes, as flash-attn: score (b, h, i, j) gains -slope * |i + o - j|, o the
alignment offset) in the forward, backward, varlen and KV-cache kernels, against the float64
reference of SPEC.md section 6."""

import itertools

import pytest
import torch

import flash_attn_ext
from flash_attn_ext.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, make_qkv, reference_attention

OPS = torch.ops.flash_attn_ext
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (Hq, Hkv, L, S, causal, window, per_batch_slopes, softcap)
CASES = [
    (4, 4, 37, 37, False, (-1, -1), False, 0.0),
    (4, 2, 113, 203, True, (-1, -1), True, 0.0),
    (6, 1, 203, 113, True, (16, 0), False, 0.0),
    (4, 2, 64, 130, False, (8, 8), True, 2.0),
    (2, 1, 1, 97, True, (-1, -1), False, 0.0),
]


def slopes_for(B, Hq, per_batch, device):
    # The ALiBi paper's geometric slopes 2^(-8 h / H), per batch entry shifted so they differ.
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)], dtype=torch.float32)
    if per_batch:
        base = torch.stack([base * (1.0 + 0.5 * b) for b in range(B)])
    return base.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_alibi_forward_backward(device, dtype, case):
    Hq, Hkv, L, S, causal, window, per_batch, cap = case
    B = 2
    q, k, v = make_qkv(B, Hq, Hkv, L, S, 32, dtype, device, requires_grad=True)
    slopes = slopes_for(B, Hq, per_batch, device)
    out, lse = flash_attn_ext.attention(
        q, k, v, causal=causal, window_size=window, softcap=cap, alibi_slopes=slopes, return_lse=True
    )
    w = (window[0], 0 if causal else window[1])
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def ref(ref_dtype):
        xs = [t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v)]
        o, l = reference_attention(*xs, window=w, softcap=cap, alibi_slopes=slopes.cpu(), dtype=ref_dtype)
        return o, l, torch.autograd.grad(o, xs, dout.to(ref_dtype))

    r64 = ref(torch.float64)
    low = ref(dtype) if dtype in LOW_PRECISION else r64
    assert_matches(out, r64[0], low[0], dtype, f"alibi out {case}")
    assert_lse_matches(lse, r64[1], dtype, f"alibi lse {case}")
    for name, ours, r, lo in zip(("dq", "dk", "dv"), grads, r64[2], low[2]):
        assert_matches(ours, r, lo, dtype, f"alibi {name} {case}", grad=True)
    # The bias changes the result (a kernel that ignored it would fail above by this much).
    plain = reference_attention(q.detach(), k.detach(), v.detach(), window=w, softcap=cap)[0]
    assert (plain - r64[0]).abs().max().item() > 1e-2


def test_alibi_top_left_alignment_and_gradcheck(device):
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv(1, 2, 1, 7, 11, 8, torch.float64, device))
    slopes = torch.tensor([0.5, 0.25], device=device)
    fn = lambda q, k, v: flash_attn_ext.attention(q, k, v, alibi_slopes=slopes, alignment="top_left")  # noqa: E731
    ref = reference_attention(q, k, v, alibi_slopes=slopes.cpu(), bottom_right=False)[0]
    assert_matches(fn(q, k, v), ref, ref, torch.float64, "alibi top-left")
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_alibi_flash_attn_func_and_varlen(device):
    """flash_attn_func and flash_attn_varlen_func apply the same per-sequence bias: each packed
    sequence equals the dense call on that sequence alone (its own Sk - Sq offset)."""
    g = torch.Generator().manual_seed(3)
    lq, lk = [5, 30, 1], [9, 30, 40]
    H = 4
    q = torch.randn(sum(lq), H, 16, generator=g).to(device)
    k = torch.randn(sum(lk), 2, 16, generator=g).to(device)
    v = torch.randn(sum(lk), 2, 16, generator=g).to(device)
    cq = torch.tensor([0, *itertools.accumulate(lq)], dtype=torch.int32, device=device)
    ck = torch.tensor([0, *itertools.accumulate(lk)], dtype=torch.int32, device=device)
    slopes = torch.stack([slopes_for(1, H, False, device)] * 3) * torch.tensor([[1.0], [2.0], [0.5]], device=device)
    out = flash_attn_varlen_func(q, k, v, cq, ck, 30, 40, causal=True, alibi_slopes=slopes)
    for b in range(3):
        qs, ks, vs = q[cq[b] : cq[b + 1]][None], k[ck[b] : ck[b + 1]][None], v[ck[b] : ck[b + 1]][None]
        dense = flash_attn_func(qs, ks, vs, causal=True, alibi_slopes=slopes[b : b + 1])
        torch.testing.assert_close(out[cq[b] : cq[b + 1]], dense[0], rtol=0, atol=1e-6)
        ref = reference_attention(
            qs.transpose(1, 2),
            ks.transpose(1, 2),
            vs.transpose(1, 2),
            window=(-1, 0),
            alibi_slopes=slopes[b : b + 1].cpu(),
        )[0]
        assert_matches(dense.transpose(1, 2), ref, ref, torch.float32, f"varlen alibi seq {b}")


@pytest.mark.parametrize("decode_path", ["require", "off"], ids=["decode_kernel", "tiled_kernel"])
def test_alibi_kvcache(device, decode_path, kernel_settings):
    kernel_settings(cpu_decode=decode_path)
    B, Hq, Hkv, S_max, D = 2, 8, 2, 200, 32
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, 1, Hq, D, generator=g).to(device)
    kc, vc = (
        torch.randn(B, S_max, Hkv, D, generator=g).to(device),
        torch.randn(B, S_max, Hkv, D, generator=g).to(device),
    )
    lens = torch.tensor([7, 200], dtype=torch.int32, device=device)
    slopes = slopes_for(B, Hq, False, device)
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=lens, causal=True, alibi_slopes=slopes, return_softmax_lse=True
    )
    for b in range(B):
        n = int(lens[b])
        ref, ref_lse = reference_attention(
            q[b : b + 1].transpose(1, 2),
            kc[b : b + 1, :n].transpose(1, 2),
            vc[b : b + 1, :n].transpose(1, 2),
            window=(-1, 0),
            alibi_slopes=slopes.cpu(),
        )
        assert_matches(out[b : b + 1].transpose(1, 2), ref, ref, torch.float32, f"kvcache alibi b={b}")
        assert (lse[b : b + 1].double() - ref_lse).abs().max().item() < 1e-4


def test_alibi_opcheck(device):
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16, torch.float32, device, requires_grad=True)
    for slopes in (torch.rand(4, device=device), torch.rand(2, 4, device=device)):
        args = (q, k, v, None, 0.0, 0.25, -1, 0, True, 0.0, slopes)
        torch.library.opcheck(OPS.attention_forward, args)
        out, lse, rng = OPS.attention_forward(q.detach(), k.detach(), v.detach(), *args[3:])
        torch.library.opcheck(
            OPS.attention_backward,
            (
                torch.randn_like(out),
                q.detach(),
                k.detach(),
                v.detach(),
                out,
                lse,
                rng,
                None,
                0.0,
                0.25,
                -1,
                0,
                True,
                0.0,
                slopes,
            ),
        )


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda d: torch.ones(4, dtype=torch.float64, device=d), "alibi_slopes must be float32"),
        (lambda d: torch.ones(3, device=d), r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
        (lambda d: torch.ones(3, 4, device=d), r"alibi_slopes must have shape"),
        (lambda d: torch.ones(4, 2, device=d).t(), "contiguous last dimension"),
    ],
)
def test_alibi_rejects_bad_slopes(device, bad, match):
    q, k, v = make_qkv(2, 4, 2, 5, 5, 8, torch.float32, device)
    with pytest.raises((ValueError, TypeError), match=match):
        OPS.attention_forward(q, k, v, None, 0.0, 0.3, -1, -1, True, 0.0, bad(device))
    kc, vc = torch.zeros(2, 2, 8, 8, device=device), torch.zeros(2, 2, 8, 8, device=device)
    with pytest.raises((ValueError, TypeError), match=match):
        OPS.attention_kvcache(
            q[:, :, :1],
            kc,
            vc,
            torch.tensor([2, 3], dtype=torch.int32, device=device),
            k[:, :, :1],
            v[:, :, :1],
            0.3,
            -1,
            0,
            None,
            0.0,
            bad(device),
        )
    assert torch.all(kc == 0), "nothing is written before the error"
