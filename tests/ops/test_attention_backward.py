"""Gradients of the fused attention op against autograd through the float64 reference."""

import pytest
import torch

import flash_attn_ext
from reference import LOW_PRECISION, assert_matches, make_qkv, reference_attention
from tile_backends import cpu_tile_cases


def check_backward(
    device,
    dtype,
    B,
    Hq,
    Hkv,
    L,
    S,
    D,
    *,
    Dv=None,
    causal=False,
    window=(-1, -1),
    bottom_right=True,
    attn_mask=None,
    scale=None,
    layout="bhld",
    seed=0,
    lse_grad=False,
):
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, dtype, device, Dv=Dv, layout=layout, seed=seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(B, Hq, L, v.shape[-1], generator=g, dtype=torch.float64).to(dtype).to(device)
    # lse_grad: a gradient flows into the lse too (scaled up so that its share of dS is not lost
    # in the output's).
    dlse = 4 * torch.randn(B, Hq, L, generator=g, dtype=torch.float64).to(device) if lse_grad else None
    out, lse = flash_attn_ext.attention(
        q,
        k,
        v,
        causal=causal,
        window_size=window,
        scale=scale,
        attn_mask=attn_mask,
        alignment="bottom_right" if bottom_right else "top_left",
        return_lse=True,
    )
    if lse_grad:
        dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse.to(lse.dtype)))
    else:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    w = (window[0], (0 if window[1] < 0 else min(window[1], 0)) if causal else window[1])

    def ref_grads(ref_dtype):
        qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v))
        o, lse_r = reference_attention(
            qr, kr, vr, scale=scale, window=w, bottom_right=bottom_right, attn_mask=attn_mask, dtype=ref_dtype
        )
        if lse_grad:
            return torch.autograd.grad((o, lse_r), (qr, kr, vr), (dout.to(ref_dtype), dlse.to(lse_r.dtype)))
        return torch.autograd.grad(o, (qr, kr, vr), dout.to(ref_dtype))

    ref = ref_grads(torch.float64)
    low = ref_grads(dtype) if dtype in LOW_PRECISION else ref
    what = f"{dtype} B={B} Hq={Hq} Hkv={Hkv} L={L} S={S} D={D} w={w} br={bottom_right}"
    for name, ours, r, lo, inp in (
        ("dq", dq, ref[0], low[0], q),
        ("dk", dk, ref[1], low[1], k),
        ("dv", dv, ref[2], low[2], v),
    ):
        assert ours.dtype == dtype and ours.shape == inp.shape
        assert_matches(ours, r, lo, dtype, f"{name} {what}", grad=True)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 97), (113, 203), (203, 113), (256, 512)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("D", [1, 33, 64, 128])
def test_grad_plain(device, dtype, L, S, D):
    check_backward(device, dtype, 1, 2, 2, L, S, D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", SHAPES + [(1023, 1024)])
@pytest.mark.parametrize("bottom_right", [True, False], ids=["bottom_right", "top_left"])
def test_grad_causal(device, dtype, L, S, bottom_right):
    check_backward(device, dtype, 1, 2, 2, L, S, 64, causal=True, bottom_right=bottom_right)


@pytest.mark.parametrize("window", [(0, 0), (1, 0), (16, 16), (64, 0), (65, 3), (-1, 40), (5000, 5000)], ids=str)
@pytest.mark.parametrize("L,S", [(113, 203), (203, 113)])
def test_grad_window(device, window, L, S):
    check_backward(device, torch.float32, 1, 2, 1, L, S, 32, window=window)
    check_backward(device, torch.float32, 1, 2, 1, L, S, 32, window=window, bottom_right=False)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 2), (8, 1), (16, 2), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_gqa(device, Hq, Hkv, dtype):
    check_backward(device, dtype, 2, Hq, Hkv, 77, 131, 64, causal=True)


@pytest.mark.parametrize("L", [1, 3, 5])
def test_grad_few_query_rows(device, L):
    check_backward(device, torch.float32, 2, 4, 2, L, 130, 40, causal=True)


@pytest.mark.parametrize("D", [8, 80, 256])
def test_grad_head_dims(device, D):
    check_backward(device, torch.float32, 1, 2, 1, 100, 150, D, causal=True)
    check_backward(device, torch.bfloat16, 1, 2, 1, 100, 150, D)


@pytest.mark.parametrize("layout", ["blhd", "sliced"])
def test_grad_strided(device, layout):
    check_backward(device, torch.float32, 2, 4, 2, 70, 90, 48, layout=layout, causal=True)


def test_grad_value_head_dim_differs(device):
    check_backward(device, torch.float32, 2, 4, 2, 50, 70, 40, Dv=24, causal=True)


@pytest.mark.parametrize("kind", ["bool", "float", "bool_bcast"])
def test_grad_with_mask(device, kind):
    B, H, L, S = 2, 2, 70, 90
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = torch.rand(B, H, L, S, generator=g) > 0.3
        mask[:, :, 5] = False  # a fully masked row: zero gradient, no NaN
    elif kind == "float":
        mask = torch.randn(B, 1, L, S, generator=g)
    else:
        mask = torch.rand(B, 1, 1, S, generator=g) > 0.2
    check_backward(device, torch.float32, B, H, H, L, S, 32, attn_mask=mask.to(device))


def test_fully_invisible_rows_have_zero_grad(device):
    q, k, v = make_qkv(1, 1, 1, 50, 10, 8, torch.float32, device, requires_grad=True)
    out = flash_attn_ext.attention(q, k, v, causal=True)  # bottom-right: rows < 40 see nothing
    out.sum().backward()
    assert torch.all(q.grad[0, 0, :40] == 0) and torch.isfinite(q.grad).all()
    check_backward(device, torch.float32, 1, 1, 1, 50, 10, 8, causal=True)


@pytest.mark.parametrize(
    "causal,window,mask",
    [(False, (-1, -1), False), (True, (-1, -1), False), (False, (3, 2), False), (False, (-1, -1), True)],
)
def test_gradcheck_float64(device, causal, window, mask):
    q, k, v = make_qkv(1, 2, 1, 9, 11, 5, torch.float64, device, requires_grad=True)
    attn_mask = (torch.rand(1, 2, 9, 11) > 0.3).to(device) if mask else None
    fn = lambda q, k, v: flash_attn_ext.attention(q, k, v, causal=causal, window_size=window, attn_mask=attn_mask)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_backward_is_bitwise_repeatable(device):
    q, k, v = make_qkv(2, 4, 2, 200, 300, 64, torch.float32, device, requires_grad=True)
    grads = []
    for _ in range(2):
        out = flash_attn_ext.attention(q, k, v, causal=True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,Hq,Hkv", [(1, 1, 1), (1, 4, 1), (2, 4, 2)])
def test_backward_same_for_any_thread_count(device, B, Hq, Hkv):
    # Few (batch, kv head) units split their key tiles across threads; the split must not
    # change the result beyond float32 summation order, and each split is bitwise repeatable.
    q, k, v = make_qkv(B, Hq, Hkv, 150, 333, 32, torch.float32, device, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3, 3):
            torch.set_num_threads(n)
            out = flash_attn_ext.attention(q, k, v, causal=True)
            results.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.equal(b, c)


def test_double_backward_raises(device):
    q, k, v = make_qkv(1, 1, 1, 8, 8, 4, torch.float64, device, requires_grad=True)
    out = flash_attn_ext.attention(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


@pytest.mark.parametrize("dtype,backend", cpu_tile_cases([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize(
    "L,S,D,Hq,Hkv,causal,window",
    [
        (113, 203, 33, 4, 2, True, (-1, -1)),  # odd head dim, odd row and key tails, GQA
        (203, 113, 64, 2, 2, False, (16, 16)),  # L > S, window edges inside tiles
        (64, 64, 128, 8, 1, True, (-1, -1)),  # MQA: dK/dV summed over 8 query heads
        (17, 1, 80, 2, 1, False, (-1, -1)),  # one key
    ],
)
def test_bf16_tile_paths_backward(device, dtype, backend, L, S, D, Hq, Hkv, causal, window):
    """The backward on every CPU tile back end this machine runs (tile_backends.py), P and dS
    rounded to bf16 on the bf16 ones; each within the SPEC bound of autograd through the float64
    reference."""
    with flash_attn_ext.cpu_tiles(backend):
        check_backward(device, dtype, 2, Hq, Hkv, L, S, D, causal=causal, window=window, seed=L + D)


@pytest.mark.parametrize("head_passes", ["require", "off"], ids=["per_head_pass", "group_pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "Hq,Hkv,causal,window", [(8, 2, True, (-1, -1)), (6, 2, False, (20, 5)), (4, 1, False, (-1, -1))]
)
def test_gqa_backward_loop_orders(device, kernel_settings, head_passes, dtype, Hq, Hkv, causal, window):
    """GQA dK/dV on the CPU backward's two loop orders (one pass per query head with the packed
    K/V tiles kept for the group's later heads, or one pass for the whole group; the kernel picks
    by working set, cpu_bwd_head_passes='require' / 'off' forces one), both against the reference."""
    kernel_settings(cpu_bwd_head_passes=head_passes)
    check_backward(device, dtype, 2, Hq, Hkv, 150, 197, 48, causal=causal, window=window)


# A gradient into the lse (ring attention merges partial results by it) adds P * dlse to dS.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "Hq,Hkv,L,S,causal,window",
    [(2, 2, 113, 203, False, (-1, -1)), (4, 2, 203, 113, True, (-1, -1)), (2, 1, 130, 130, False, (16, 5))],
    ids=["plain", "causal_gqa", "window_mqa"],
)
def test_grad_through_lse(device, dtype, Hq, Hkv, L, S, causal, window):
    check_backward(device, dtype, 1, Hq, Hkv, L, S, 64, causal=causal, window=window, lse_grad=True)


def test_grad_through_lse_alone_gradcheck(device):
    """lse alone (no gradient into out): the backward runs with grad_out = 0."""
    q, k, v = make_qkv(1, 4, 2, 9, 13, 8, torch.float64, device, seed=5, requires_grad=True)
    fn = lambda q, k, v: flash_attn_ext.attention(q, k, v, window_size=(6, 2), softcap=3.0, return_lse=True)[1]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    both = lambda q, k, v: flash_attn_ext.attention(q, k, v, causal=True, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(both, (q, k, v))
