"""Packed variable-length sequences (attention_varlen_forward/backward, flash_attn_varlen_func):
each sequence, at its cu_seqlens offsets, against the float64 reference of that sequence alone
(SPEC.md section 6); the varlen and the padded (B, S, H, D) layouts give the same results; bad
cu_seqlens are refused before anything runs."""

import itertools

import pytest
import torch

from flash_attn_ext.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, reference_attention

OPS = torch.ops.flash_attn_ext
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Query and key lengths per sequence: empty sequences, single tokens, lengths off the 64-row
# tiles, L != S (chunked prefill against a longer context), L > S.
LENGTHS = [
    ([5, 0, 70, 1, 130], [9, 4, 70, 0, 200]),
    ([1, 1, 1], [300, 17, 64]),
    ([113], [113]),
    ([64, 65, 63], [64, 65, 63]),
]
# (Hq, Hkv, causal, window, softcap)
OPTIONS = [
    (4, 4, False, (-1, -1), 0.0),
    (4, 2, True, (-1, -1), 0.0),
    (6, 1, True, (7, 0), 0.0),
    (4, 2, False, (5, 9), 0.0),
    (2, 1, True, (-1, -1), 1.5),
]


def cu(lengths, device):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)


def packed(lengths, heads, dim, dtype, device, gen, requires_grad=False):
    t = torch.randn(sum(lengths), heads, dim, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def per_sequence(t, cu_seqlens, b):
    """Sequence b of a packed (total, H, D) tensor as (1, H, len, D)."""
    return t[int(cu_seqlens[b]) : int(cu_seqlens[b + 1])].transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_varlen_forward_backward(device, dtype, lengths, options):
    Hq, Hkv, causal, window, cap = options
    lq, lk = lengths
    D = 32
    g = torch.Generator().manual_seed(len(lq) * 31 + Hq)
    q, k, v = (packed(ls, h, D, dtype, device, g, requires_grad=True) for ls, h in ((lq, Hq), (lk, Hkv), (lk, Hkv)))
    cq, ck = cu(lq, device), cu(lk, device)
    out, lse, probs = flash_attn_varlen_func(
        q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window, softcap=cap, return_attn_probs=True
    )
    assert probs is None and out.shape == q.shape and lse.shape == (Hq, sum(lq)) and lse.dtype == torch.float32
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    w = (window[0], 0 if causal else window[1])
    for b in range(len(lq)):
        what = f"{dtype} seq {b} (L={lq[b]}, S={lk[b]}) {options}"
        qb, kb, vb = (per_sequence(t.detach(), c, b) for t, c in ((q, cq), (k, ck), (v, ck)))
        dob = per_sequence(dout, cq, b)

        def ref(ref_dtype):
            xs = [t.to(ref_dtype).requires_grad_(True) for t in (qb, kb, vb)]
            o, l = reference_attention(*xs, window=w, softcap=cap, dtype=ref_dtype)
            gs = (
                torch.autograd.grad(o, xs, dob.to(ref_dtype), allow_unused=True)
                if o.numel()
                else [torch.zeros_like(x) for x in xs]
            )
            return o, l, [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs, gs)]

        r64 = ref(torch.float64)
        low = ref(dtype) if dtype in LOW_PRECISION else r64
        assert_matches(per_sequence(out, cq, b), r64[0], low[0], dtype, "out " + what)
        lse_b = lse[:, int(cq[b]) : int(cq[b + 1])].unsqueeze(0)
        assert_lse_matches(lse_b, r64[1], dtype, "lse " + what)
        for name, grad, c, r, lo in zip(("dq", "dk", "dv"), grads, (cq, ck, ck), r64[2], low[2]):
            assert_matches(per_sequence(grad, c, b), r, lo, dtype, f"{name} " + what, grad=True)


def test_varlen_matches_padded_layouts(device):
    """Equal-length sequences: the varlen, qkv-packed and kv-packed forms all give what
    flash_attn_func gives on the (B, S, H, D) batch, forward and backward."""
    B, S, H, D = 3, 45, 4, 16
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(device).requires_grad_(True)
    cs = cu([S] * B, device)
    dense = flash_attn_qkvpacked_func(qkv, causal=True)
    ragged = flash_attn_varlen_qkvpacked_func(qkv.reshape(B * S, 3, H, D), cs, S, causal=True)
    torch.testing.assert_close(ragged.reshape(B, S, H, D), dense, rtol=0, atol=1e-6)
    (g_dense,) = torch.autograd.grad(dense.square().sum(), (qkv,))
    (g_ragged,) = torch.autograd.grad(ragged.square().sum(), (qkv,))
    torch.testing.assert_close(g_ragged, g_dense, rtol=0, atol=1e-5)

    q = torch.randn(B, 7, H, D, generator=g).to(device)
    kv = torch.randn(B, S, 2, 2, D, generator=g).to(device)
    dense = flash_attn_kvpacked_func(q, kv, causal=True, window_size=(10, 0))
    ragged = flash_attn_varlen_kvpacked_func(
        q.reshape(-1, H, D), kv.reshape(-1, 2, 2, D), cu([7] * B, device), cs, 7, S, causal=True, window_size=(10, 0)
    )
    torch.testing.assert_close(ragged.reshape(B, 7, H, D), dense, rtol=0, atol=1e-6)
    ragged2 = flash_attn_varlen_func(
        q.reshape(-1, H, D),
        kv[:, :, 0].reshape(-1, 2, D),
        kv[:, :, 1].reshape(-1, 2, D),
        cu([7] * B, device),
        cs,
        7,
        S,
        causal=True,
        window_size=(10, 0),
    )
    dense2 = flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True, window_size=(10, 0))
    torch.testing.assert_close(ragged2.reshape(B, 7, H, D), dense2, rtol=0, atol=1e-6)


def test_varlen_dropout_is_reproducible_and_backward_consistent(device):
    g = torch.Generator().manual_seed(2)
    lq = [20, 33]
    q, k, v = (packed(lq, 2, 16, torch.float64, device, g, requires_grad=True) for _ in range(3))
    cs = cu(lq, device)
    torch.manual_seed(11)
    a = flash_attn_varlen_func(q, k, v, cs, cs, 33, 33, dropout_p=0.3)
    torch.manual_seed(11)
    b = flash_attn_varlen_func(q, k, v, cs, cs, 33, 33, dropout_p=0.3)
    assert torch.equal(a, b)
    c = flash_attn_varlen_func(q, k, v, cs, cs, 33, 33, dropout_p=0.3)
    assert not torch.equal(a, c), "a fresh generator state draws a fresh mask"
    # The backward regenerates the forward's mask: gradcheck through a fixed-seed forward.

    def fn(q, k, v):
        torch.manual_seed(11)
        return flash_attn_varlen_func(q, k, v, cs, cs, 33, 33, dropout_p=0.3, causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_varlen_opcheck(device):
    g = torch.Generator().manual_seed(4)
    lq, lk = [5, 17, 0], [8, 17, 3]
    q = packed(lq, 4, 16, torch.float32, device, g, requires_grad=True)
    k, v = (packed(lk, 2, 16, torch.float32, device, g, requires_grad=True) for _ in range(2))
    args = (q, k, v, cu(lq, device), cu(lk, device), 17, 17, 0.0, 0.25, -1, 0, True, 0.0)
    torch.library.opcheck(OPS.attention_varlen_forward, args)
    torch.library.opcheck(OPS.attention_varlen_forward, args[:-1] + (2.0,))
    out, lse, rng = OPS.attention_varlen_forward(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, rng) + args[3:]
    torch.library.opcheck(OPS.attention_varlen_backward, bargs)


@pytest.mark.parametrize("dynamic", [False, True])
def test_varlen_compiles_fullgraph(device, dynamic):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    lq = [9, 30, 2]
    q, k, v = (packed(lq, 2, 16, torch.float32, device, g, requires_grad=True) for _ in range(3))
    cs = cu(lq, device)
    fn = lambda q, k, v: flash_attn_varlen_func(q, k, v, cs, cs, 30, 30, causal=True, softcap=3.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    eager = fn(q, k, v)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), (q,))[0], torch.autograd.grad(eager.sum(), (q,))[0])


def _bad(device):
    q = torch.randn(10, 2, 8, device=device)
    k = torch.randn(12, 2, 8, device=device)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda cq, ck: (cq.long(), ck), "cu_seqlens_q must be int32"),
        (lambda cq, ck: (cq + 1, ck), r"cu_seqlens_q\[0\] must be 0"),
        (lambda cq, ck: (torch.tensor([0, 7, 3, 10], dtype=torch.int32, device=cq.device), ck), "non-decreasing"),
        (
            lambda cq, ck: (torch.tensor([0, 3, 4, 9], dtype=torch.int32, device=cq.device), ck),
            r"must equal query.size\(0\)",
        ),
        (lambda cq, ck: (cq, ck[:3]), "same length"),
        (lambda cq, ck: (cq.view(2, 2), ck.view(2, 2)), "1-D"),
    ],
)
def test_varlen_rejects_bad_cu_seqlens(device, mutate, match):
    q, k, v = _bad(device)
    cq = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    cq, ck = mutate(cq, ck)
    with pytest.raises((ValueError, TypeError), match=match):
        OPS.attention_varlen_forward(q, k, v, cq, ck, 10, 12, 0.0, 0.3, -1, -1, True, 0.0)


def test_varlen_rejects_bad_shapes_and_max_seqlen(device):
    q, k, v = _bad(device)
    cq = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="max_seqlen_q = 5 is shorter"):
        OPS.attention_varlen_forward(q, k, v, cq, ck, 5, 12, 0.0, 0.3, -1, -1, True, 0.0)
    with pytest.raises(ValueError, match="max_seqlen_k = 6 is shorter"):
        OPS.attention_varlen_forward(q, k, v, cq, ck, 6, 6, 0.0, 0.3, -1, -1, True, 0.0)
    with pytest.raises(ValueError, match="query must be 3-D"):
        OPS.attention_varlen_forward(q[None], k, v, cq, ck, 6, 12, 0.0, 0.3, -1, -1, True, 0.0)
    with pytest.raises(ValueError, match="number of rows"):
        OPS.attention_varlen_forward(q, k, v[:11], cq, ck, 6, 12, 0.0, 0.3, -1, -1, True, 0.0)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        OPS.attention_varlen_forward(
            torch.randn(10, 3, 8, device=device), k, v, cq, ck, 6, 12, 0.0, 0.3, -1, -1, True, 0.0
        )
    # with block_table, k and v are the blocks of a paged cache: packed (total, H, D) ones are refused
    with pytest.raises(ValueError, match="k must be a paged cache"), torch.no_grad():
        flash_attn_varlen_func(q, k, v, cq, ck, 6, 12, block_table=torch.zeros(3, 1, dtype=torch.int32))


def test_varlen_grad_through_lse_gradcheck(device):
    """A gradient into the packed lse (Hq, total_q) reaches q, k, v (P * dlse in dS)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(9, 4, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 12], dtype=torch.int32, device=device)

    def fn(q, k, v):
        out, lse, _ = OPS.attention_varlen_forward(q, k, v, cu_q, cu_k, 5, 7, 0.0, 0.3, 3, 0, True)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))
