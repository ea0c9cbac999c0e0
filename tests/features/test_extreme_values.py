"""Extreme values (issue 9): huge logits, float16 near its maximum, -inf masks and fully
masked rows, NaN confined to where it belongs, memory the kernels must never read, batch*heads
past CUDA's 65535 grid limit and sequences longer than 65535."""

import pytest
import torch

import flash_attn_ext
from reference import assert_matches, make_qkv, reference_attention, visibility

LOWP_REF_OK = (torch.float32, torch.bfloat16)  # dtypes whose input-dtype reference stays finite


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    return torch.autograd.grad(out, inputs, dout), dout


@pytest.mark.parametrize("dtype", LOWP_REF_OK, ids=str)
@pytest.mark.parametrize("how", ["inputs", "mask"])
def test_logits_around_1e4(device, dtype, how):
    """Scores of magnitude ~1e4, from large Q/K or from a +-1e4 additive mask: the online
    softmax's running max keeps every exp in range; out and lse match the float64 reference."""
    q, k, v = make_qkv(2, 4, 2, 97, 131, 64, torch.float64, seed=3)
    mask = None
    if how == "inputs":
        q, k = q * 100, k * 100  # scale 1/8: scores ~ N(0, 1e4^2)
    else:
        g = torch.Generator().manual_seed(4)
        mask = ((torch.rand(2, 4, 97, 131, generator=g, dtype=torch.float64) * 2 - 1) * 1e4).to(dtype).to(device)
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    out, lse = flash_attn_ext.attention(q, k, v, attn_mask=mask, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, attn_mask=mask)
    low, _ = reference_attention(q, k, v, attn_mask=mask, dtype=dtype)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if dtype == torch.float32:
        # A float32 score near 1e4 carries ~1e-3 of rounding: SPEC's float32 bound (1e-4) is out
        # of reach for any float32 kernel there, so float32 gets the low-precision rule: no
        # worse than twice the plain float32 computation's error.
        err = (out.double() - ref).abs().max().item()
        assert err <= max(1e-4, 2 * (low.double() - ref).abs().max().item() + 1e-5), f"error {err}"
    else:
        assert_matches(out, ref, low, dtype, f"logits ~1e4 ({how})")
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-6 * ref_lse.abs().max().item() + 0.05


def test_float16_near_its_maximum(device):
    """float16 Q/K/V of magnitude ~6e4 (max 65504): scores far past float16's range are formed
    in float32; out (a convex combination of V rows) stays finite and matches float64."""
    g = torch.Generator().manual_seed(5)
    shape = (1, 2, 70, 32)
    q, k, v = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * 65504 for _ in range(3))
    q, k, v = (t.half().to(device) for t in (q, k, v))
    out, lse = flash_attn_ext.attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, window=(-1, 0))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-3 * 65504, f"float16 near max: error {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_minus_inf_masks_and_fully_masked_rows(device, dtype):
    """A float mask of -inf entries, whole rows of -inf, and a bool mask with all-False rows:
    visible entries match the reference, fully masked rows give zeros and lse -inf, and every
    gradient is finite (zero for the masked rows)."""
    q, k, v = make_qkv(2, 4, 2, 67, 90, 32, dtype, device, seed=6, requires_grad=True)
    g = torch.Generator().manual_seed(7)
    fmask = torch.where(torch.rand(2, 4, 67, 90, generator=g) < 0.4, float("-inf"), 0.0).to(dtype)
    fmask[:, :, 5] = float("-inf")
    bmask = torch.rand(2, 1, 67, 90, generator=g) < 0.6
    bmask[:, :, 9] = False
    for mask, dead in ((fmask.to(device), 5), (bmask.to(device), 9)):
        out, lse = flash_attn_ext.attention(q, k, v, attn_mask=mask, return_lse=True)
        ref, ref_lse = reference_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
        low, _ = reference_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask, dtype=dtype)
        assert_matches(out, ref, low, dtype, f"-inf mask {mask.dtype}")
        assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
        assert torch.isneginf(lse[:, :, dead]).all() and torch.isneginf(ref_lse[:, :, dead]).all()
        (dq, dk, dv), dout = _grads(out, (q, k, v))
        assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
        assert torch.equal(dq[:, :, dead], torch.zeros_like(dq[:, :, dead]))
        for ref_dtype in (torch.float64, dtype):  # the gradients match the reference's too
            leaves = [t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v)]
            o, _ = reference_attention(*leaves, attn_mask=mask, dtype=ref_dtype)
            got = torch.autograd.grad(o, leaves, dout.to(ref_dtype))
            if ref_dtype == torch.float64:
                g64 = got
        for name, ours, r, lo in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, got if dtype != torch.float32 else g64):
            assert_matches(ours, r, lo, dtype, f"{name}, -inf mask {mask.dtype}", grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (20, 5))], ids=str)
def test_nan_in_one_query_row_stays_in_that_row(device, dtype, causal, window):
    """NaN in query row 30: output row 30 is NaN, every other row finite and bitwise unchanged.
    Backward: dQ row 30 is NaN, the other dQ rows finite; dV is NaN exactly at the keys row 30
    sees; dK is NaN there and may be at unseen keys sharing a key tile with them (dK = dS^T Q
    multiplies row 30's zero dS by its NaN query, 0 x NaN, as any GEMM-based backward does,
    PyTorch's included), but finite at keys more than a tile (<= 128) away."""
    n = 300
    q, k, v = make_qkv(1, 2, 1, n, n, 32, dtype, device, seed=8)
    clean = flash_attn_ext.attention(q, k, v, causal=causal, window_size=window)
    q = q.clone()
    q[:, :, 30, 3] = float("nan")
    q.requires_grad_(True)
    kk, vv = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out = flash_attn_ext.attention(q, kk, vv, causal=causal, window_size=window)
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows[:, :, 30].all() and nan_rows.sum() == nan_rows.shape[1]
    others = torch.arange(n, device=device) != 30
    assert torch.equal(out[:, :, others], clean[:, :, others])
    (dq, dk, dv), _ = _grads(out, (q, kk, vv))
    assert torch.isnan(dq).any(-1)[0, :, 30].all() and torch.isfinite(dq[:, :, others]).all()
    w = (window[0], 0) if causal else window
    seen = visibility(n, n, w[0], w[1], device=device)[30]  # the keys row 30 sees
    assert torch.equal(torch.isnan(dv).any(-1)[0, 0], seen)
    dk_nan = torch.isnan(dk).any(-1)[0, 0]
    assert dk_nan[seen].all()
    j = torch.arange(n, device=device)
    seen_idx = seen.nonzero().flatten()
    far = (j > seen_idx.max() + 128) | (j < seen_idx.min() - 128)
    assert not dk_nan[far].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [(-1, 0), (10, 10)], ids=str)
def test_nan_in_one_key_row_reaches_only_the_rows_that_see_it(device, dtype, window):
    """NaN in key row 70: exactly the query rows whose window contains key 70 turn NaN (a
    masked score is replaced, not added to)."""
    q, k, v = make_qkv(1, 2, 1, 100, 100, 32, dtype, device, seed=9)
    k = k.clone()
    k[:, :, 70, 0] = float("nan")
    out = flash_attn_ext.attention(q, k, v, window_size=window)
    sees = visibility(100, 100, window[0], window[1], device=device)[:, 70]
    assert torch.equal(torch.isnan(out).any(-1)[0, 0], sees)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 5])
def test_cache_memory_past_the_lengths_is_never_read(device, dtype, L):
    """Cache positions past cache_seqlens (+ the appended tokens) hold NaN, as uninitialised
    memory may: the KV-cache attention never reads them, decode (L=1) and prefill alike, and a
    paged cache's unlisted blocks are never read either."""
    D, S_max = 32, 100
    g = torch.Generator().manual_seed(10)
    kc = torch.full((2, S_max, 2, D), float("nan"), dtype=dtype)
    vc = kc.clone()
    kc[:, :40] = torch.randn(2, 40, 2, D, generator=g).to(dtype)
    vc[:, :40] = torch.randn(2, 40, 2, D, generator=g).to(dtype)
    kc, vc = kc.to(device), vc.to(device)
    q = torch.randn(2, L, 8, D, generator=g).to(dtype).to(device)
    new = torch.randn(2, L, 2, D, generator=g).to(dtype).to(device)
    seqlens = torch.tensor([40 - L, 13], dtype=torch.int32, device=device)
    with torch.no_grad():
        out = flash_attn_ext.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True)
        out_app = flash_attn_ext.attention_with_kvcache(
            q, kc.clone(), vc.clone(), new, new, cache_seqlens=seqlens, causal=True
        )
        # paged: 10 blocks of 16 positions, the sequences use blocks [3, 1, 7] and [0]; the rest NaN
        blocks = torch.full((10, 16, 2, D), float("nan"), dtype=dtype, device=device)
        vblocks = blocks.clone()
        table = torch.tensor([[3, 1, 7], [0, 9, 9]], dtype=torch.int32, device=device)
        for b, n in ((0, 40), (1, 13)):
            for pos in range(n):
                blk = table[b, pos // 16].item()
                blocks[blk, pos % 16] = kc[b, pos]
                vblocks[blk, pos % 16] = vc[b, pos]
        lens_paged = torch.tensor([40 - L, 13 - L], dtype=torch.int32, device=device)
        out_paged = flash_attn_ext.attention_with_kvcache(
            q, blocks, vblocks, cache_seqlens=lens_paged, causal=True, block_table=table
        )
    assert torch.isfinite(out).all() and torch.isfinite(out_app).all() and torch.isfinite(out_paged).all()


def test_batch_times_heads_past_65535(device):
    """B * H = 70000 (past CUDA's 65535 limit on grid y/z): every (batch, head) computed."""
    q, k, v = make_qkv(7000, 10, 5, 3, 4, 8, torch.float32, device, seed=11, requires_grad=True)
    out = flash_attn_ext.attention(q, k, v, causal=True)
    ref, _ = reference_attention(q.detach(), k.detach(), v.detach(), window=(-1, 0))
    assert_matches(out, ref, ref, torch.float32, "B*H = 70000")
    (dq, dk, dv), dout = _grads(out, (q, k, v))
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    o64, _ = reference_attention(qr, kr, vr, window=(-1, 0))
    rq, rk, rv = torch.autograd.grad(o64, (qr, kr, vr), dout.double())
    for name, ours, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_matches(ours, r, r, torch.float32, f"{name} B*H = 70000")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_longer_than_65535(device, dtype):
    """L = S = 70000 with a causal window of 64 (forward and backward), and one decode query
    against a 70000-position cache: rows on both sides of 65535 match the float64 reference."""
    n, W, D = 70000, 64, 16
    q, k, v = make_qkv(1, 2, 1, n, n, D, dtype, device, seed=12, requires_grad=True)
    out = flash_attn_ext.attention(q, k, v, causal=True, window_size=(W, 0))
    r0, r1 = 65500, 65600  # query rows around 65535; they see keys [r0 - W, r1)
    (dq, dk, dv), dout = _grads(out, (q, k, v))
    # The reference of that block: query i' = i - r0 sees keys j' = j - (r0 - W) in [i', i' + W].
    qs, ks, vs = (
        t.detach()[:, :, a:b].double().requires_grad_(True)
        for t, a, b in ((q, r0, r1), (k, r0 - W, r1), (v, r0 - W, r1))
    )
    ref, _ = reference_attention(qs, ks, vs, window=(0, W), bottom_right=False)
    ql, kl, vl = (t.detach().to(dtype).requires_grad_(True) for t in (qs, ks, vs))
    low, _ = reference_attention(ql, kl, vl, window=(0, W), bottom_right=False, dtype=dtype)
    assert_matches(out[:, :, r0:r1], ref, low.detach(), dtype, "L = 70000, rows 65500-65600")
    assert_matches(
        out[:, :, -3:],
        reference_attention(
            q.detach()[:, :, -3:], k.detach()[:, :, -3 - W :], v.detach()[:, :, -3 - W :], window=(W, 0)
        )[0],
        reference_attention(
            q.detach()[:, :, -3:], k.detach()[:, :, -3 - W :], v.detach()[:, :, -3 - W :], window=(W, 0), dtype=dtype
        )[0],
        dtype,
        "L = 70000, last rows",
    )
    # dQ of those rows only depends on the block (its keys' other readers do not enter dQ).
    (rq,) = torch.autograd.grad(ref, (qs,), dout[:, :, r0:r1].double())
    (rq_low,) = torch.autograd.grad(low, (ql,), dout[:, :, r0:r1])
    assert_matches(dq[:, :, r0:r1], rq, rq_low, dtype, "dq, L = 70000, rows 65500-65600", grad=True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    # decode: one query against all 70000 cached positions
    kc, vc = k.detach().transpose(1, 2), v.detach().transpose(1, 2)  # (1, S, 1, D)
    qd = q.detach()[:, :, -1:].transpose(1, 2).contiguous()
    with torch.no_grad():
        od = flash_attn_ext.attention_with_kvcache(qd, kc, vc, cache_seqlens=n)
    refd, _ = reference_attention(qd.transpose(1, 2), k.detach(), v.detach())
    lowd, _ = reference_attention(qd.transpose(1, 2), k.detach(), v.detach(), dtype=dtype)
    assert_matches(od.transpose(1, 2), refd, lowd, dtype, "decode over 70000 positions")


@pytest.mark.parametrize("what", ["B=0", "H=0", "L=0", "S=0", "D=0", "Dv=0"])
def test_zero_sized_dims_match_pytorch(device, what):
    """Zero-sized tensors are valid input, as for PyTorch's SDPA: the same shapes and values
    (S=0: zero rows, here and there; D=0: every score 0, so the mean of V), and gradients of
    the right shapes."""
    dims = dict(B=2, H=2, L=5, S=6, D=8, Dv=8)
    dims[what.split("=")[0]] = 0
    B, H, L, S, D, Dv = (dims[n] for n in ("B", "H", "L", "S", "D", "Dv"))
    g = torch.Generator().manual_seed(13)
    q, k, v = (
        torch.randn(*s, generator=g).to(device).requires_grad_(True)
        for s in ((B, H, L, D), (B, H, S, D), (B, H, S, Dv))
    )
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v)
    ours_direct = flash_attn_ext.attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.detach().double(), k.detach().double(), v.detach().double()
    )
    assert out.shape == ref.shape == ours_direct.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_direct.double(), ref, atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(ours_direct.sum(), (q, k, v), allow_unused=True)
    assert all(gr is None or gr.shape == t.shape for gr, t in zip(grads, (q, k, v)))
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


def test_kvcache_with_nothing_cached_or_appended(device):
    """cache_seqlens all 0 (nothing to attend to): zero rows, lse -inf; appending L_new = 0
    positions is a no-op."""
    g = torch.Generator().manual_seed(14)
    kc = torch.randn(2, 16, 2, 8, generator=g).to(device)
    vc = torch.randn(2, 16, 2, 8, generator=g).to(device)
    q = torch.randn(2, 1, 4, 8, generator=g).to(device)
    zero = torch.zeros(2, dtype=torch.int32, device=device)
    with torch.no_grad():
        out, lse = flash_attn_ext.attention_with_kvcache(q, kc, vc, cache_seqlens=zero, return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    before = kc.clone(), vc.clone()
    flash_attn_ext.kv_cache_append(
        kc, vc, kc[:, :0], vc[:, :0], torch.tensor([3, 16], dtype=torch.int32, device=device)
    )
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
