"""Trainable additive biases: the gradient of a float attn_mask (any broadcast shape) and of
learned ALiBi slopes, computed inside the fused backward (CPU), against the float64 reference
of SPEC.md section 6, gradcheck, PyTorch's math SDPA, and bitwise repeatability."""

import os

import pytest
import torch
import torch.nn.functional as F

import flash_attn_ext
from reference import LOW_PRECISION, assert_matches, make_qkv, reference_attention

OPS = torch.ops.flash_attn_ext
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
B, HQ = 2, 4


def mask_shapes(L, S):
    """Every way a mask broadcasts to (B, Hq, L, S): per head, per batch, both, neither, a
    size-1 query or key dim, 2-D."""
    return [
        (L, S),
        (1, HQ, L, S),
        (B, 1, L, S),
        (B, HQ, L, S),
        (1, 1, 1, S),
        (B, HQ, L, 1),
        (1, HQ, 1, 1),
    ]


# (Hkv, L, S, causal, window, softcap)
CASES = [
    (4, 37, 37, False, (-1, -1), 0.0),
    (2, 113, 203, True, (-1, -1), 0.0),
    (1, 70, 150, False, (16, 8), 0.0),
    (2, 64, 130, True, (-1, -1), 2.0),
]


def run_case(device, dtype, Hkv, L, S, causal, window, cap, mask_shape, seed=0):
    """Our gradients of (q, k, v, mask) and the float64 / input-dtype references'."""
    q, k, v = make_qkv(B, HQ, Hkv, L, S, 32, dtype, device, seed=seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 7)
    mask = (2 * torch.randn(mask_shape, generator=g, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
    dout = torch.randn(B, HQ, L, 32, generator=g, dtype=torch.float64).to(dtype).to(device)
    out = flash_attn_ext.attention(q, k, v, causal=causal, window_size=window, softcap=cap, attn_mask=mask)
    ours = torch.autograd.grad(out, (q, k, v, mask), dout)
    w = (window[0], 0 if causal else window[1])

    def ref(ref_dtype):
        xs = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        m = mask.detach().to(ref_dtype if ref_dtype == torch.float64 else dtype).requires_grad_()
        o, _ = reference_attention(*xs, window=w, softcap=cap, attn_mask=m, dtype=ref_dtype)
        return torch.autograd.grad(o, (*xs, m), dout.to(ref_dtype))

    r64 = ref(torch.float64)
    low = ref(dtype) if dtype in LOW_PRECISION else r64
    return ours, r64, low


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_mask_gradient_matches_reference(device, dtype, case):
    if device != "cpu":
        pytest.skip("bias gradients are computed by the CPU kernels only")
    Hkv, L, S = case[:3]
    for shape in mask_shapes(L, S):
        ours, r64, low = run_case(device, dtype, *case, shape)
        assert ours[3].shape == torch.Size(shape) and ours[3].dtype == dtype
        for name, a, r, lo in zip(("dq", "dk", "dv", "dmask"), ours, r64, low):
            assert_matches(a, r, lo, dtype, f"{name} mask {shape} {case}", grad=True)


def test_mask_gradient_is_not_trivial():
    """The cases above are not passed by zeros: the reference's mask gradient is of order 1e-1
    per element, except where a mask broadcasts over every key of a row (its gradient is a row
    sum of dS, exactly 0 up to the rounding of the output delta is formed from)."""
    ours, r64, _ = run_case("cpu", torch.float32, *CASES[1], (B, HQ, 113, 203))
    assert r64[3].abs().max() > 0.05
    ours, r64, _ = run_case("cpu", torch.float32, *CASES[1], (B, HQ, 113, 1))
    assert r64[3].abs().max() < 1e-12


@pytest.mark.parametrize(
    "shape,causal,window,Hkv,dropout,cap,with_sinks",
    [
        ((5, 9), False, (-1, -1), 2, 0.0, 0.0, False),
        ((1, 2, 5, 9), True, (-1, -1), 1, 0.0, 0.0, False),
        ((2, 1, 5, 9), False, (2, 1), 2, 0.0, 1.5, False),
        ((2, 2, 5, 9), True, (-1, -1), 2, 0.3, 0.0, False),
        ((1, 1, 1, 9), False, (3, 3), 1, 0.0, 0.0, False),
        ((2, 2, 5, 1), True, (-1, -1), 2, 0.0, 0.0, False),
        ((1, 1, 5, 9), True, (-1, -1), 2, 0.2, 2.0, False),
        ((2, 2, 5, 9), True, (-1, -1), 1, 0.0, 0.0, True),  # with learned sinks
        ((1, 2, 1, 9), False, (-1, -1), 2, 0.0, 1.0, True),
    ],
)
def test_mask_gradcheck(shape, causal, window, Hkv, dropout, cap, with_sinks):
    q, k, v = make_qkv(2, 2, Hkv, 5, 9, 8, torch.float64, requires_grad=True)
    mask = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True) if with_sinks else None

    def f(q, k, v, mask, sinks):
        torch.manual_seed(3)  # the same dropout mask at every evaluation
        return flash_attn_ext.attention(
            q, k, v, causal=causal, window_size=window, attn_mask=mask, dropout_p=dropout, softcap=cap, sinks=sinks
        )

    assert torch.autograd.gradcheck(f, (q, k, v, mask, sinks), eps=1e-6, atol=1e-8)


def test_mask_gradient_bitwise_repeatable():
    """One writer per gradient element (no atomics): two runs give the same bits, for a mask
    broadcast over the batch and heads (one task per key-tile split) and over the keys (copies
    per split, summed in order)."""
    q, k, v = make_qkv(3, 8, 2, 150, 300, 32, torch.float32, requires_grad=True)
    for shape in ((1, 1, 150, 300), (3, 8, 150, 1), (3, 8, 150, 300)):
        mask = torch.randn(shape, requires_grad=True)
        grads = []
        for _ in range(2):
            out = flash_attn_ext.attention(q, k, v, causal=True, attn_mask=mask)
            grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, mask)))
        for a, b in zip(*grads):
            assert torch.equal(a, b), shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 8, 77, 77), (2, 1, 77, 77), (77, 77)], ids=str)
def test_sdpa_dropin_mask_gradient_against_math(dtype, shape):
    """The SDPA drop-in serves a mask that requires grad (no fallback) and its gradients match
    PyTorch's math SDPA by SPEC's rule (float64 math SDPA the reference, the input-dtype math
    SDPA the baseline)."""
    q, k, v = make_qkv(2, 8, 2, 77, 77, 32, dtype, requires_grad=True)
    mask = torch.randn(shape).to(dtype).requires_grad_()
    dout = torch.randn(2, 8, 77, 32).to(dtype)
    flash_attn_ext.reset_fallback_counts()
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert flash_attn_ext.fallback_counts() == {}
    ours = torch.autograd.grad(out, (q, k, v, mask), dout)

    def math(ref_dtype):
        xs = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v, mask)]
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            o = F.scaled_dot_product_attention(*xs[:3], attn_mask=xs[3], enable_gqa=True)
        return torch.autograd.grad(o, xs, dout.to(ref_dtype))

    r64, low = math(torch.float64), math(dtype)
    for name, a, r, lo in zip(("dq", "dk", "dv", "dmask"), ours, r64, low):
        assert_matches(a, r, lo, dtype, f"sdpa {name} {shape}", grad=True)


def slopes_of(per_batch):
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / HQ) for h in range(HQ)])
    return torch.stack([base * (1 + 0.5 * b) for b in range(B)]) if per_batch else base


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_alibi_slope_gradient(device, dtype, per_batch, case):
    if device != "cpu":
        pytest.skip("bias gradients are computed by the CPU kernels only")
    Hkv, L, S, causal, window, cap = case
    q, k, v = make_qkv(B, HQ, Hkv, L, S, 32, dtype, device, requires_grad=True)
    slopes = slopes_of(per_batch).to(device).requires_grad_()
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(B, HQ, L, 32, generator=g, dtype=torch.float64).to(dtype).to(device)
    out = flash_attn_ext.attention(q, k, v, causal=causal, window_size=window, softcap=cap, alibi_slopes=slopes)
    ours = torch.autograd.grad(out, (q, k, v, slopes), dout)
    assert ours[3].shape == slopes.shape and ours[3].dtype == torch.float32
    w = (window[0], 0 if causal else window[1])

    def ref(ref_dtype):
        xs = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        s = slopes.detach().to(torch.float64 if ref_dtype == torch.float64 else torch.float32).requires_grad_()
        o, _ = reference_attention(*xs, window=w, softcap=cap, alibi_slopes=s, dtype=ref_dtype)
        return torch.autograd.grad(o, (*xs, s), dout.to(ref_dtype))

    r64 = ref(torch.float64)
    low = ref(dtype) if dtype in LOW_PRECISION else r64
    assert r64[3].abs().max() > 1e-2  # the slopes matter here
    for name, a, r, lo in zip(("dq", "dk", "dv", "dslopes"), ours, r64, low):
        # The slopes' gradient is a float32 sum over L x S terms (of either sign) in every dtype.
        d = torch.float32 if name == "dslopes" and dtype == torch.float32 else dtype
        assert_matches(a, r, lo, d, f"{name} alibi per_batch={per_batch} {case}", grad=True)


def test_gradients_of_mask_and_slopes_together():
    q, k, v = make_qkv(2, 4, 2, 33, 65, 16, torch.float64, requires_grad=True)
    mask = torch.randn(1, 4, 33, 65, dtype=torch.float64, requires_grad=True)
    slopes = slopes_of(True).requires_grad_()
    out = flash_attn_ext.attention(q, k, v, causal=True, attn_mask=mask, alibi_slopes=slopes)
    ours = torch.autograd.grad(out.sum(), (q, k, v, mask, slopes))
    xs = [t.detach().requires_grad_() for t in (q, k, v, mask)]
    s64 = slopes.detach().double().requires_grad_()
    o, _ = reference_attention(*xs[:3], attn_mask=xs[3], alibi_slopes=s64, window=(-1, 0))
    ref = torch.autograd.grad(o.sum(), (*xs, s64))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


def test_bias_gradient_op_checks():
    q, k, v = make_qkv(1, 2, 2, 8, 10, 8, torch.float32)
    out, lse, rng = OPS.attention_forward(q, k, v, None, 0.0, 0.25, -1, -1, True)
    args = (torch.randn_like(out), q, k, v, out, lse, rng)
    bool_mask = torch.ones(1, 1, 8, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="grad_attn_mask=True needs a floating-point attn_mask"):
        OPS.attention_backward(*args, bool_mask, 0.0, 0.25, -1, -1, True, 0.0, None, None, True, False)
    with pytest.raises(ValueError, match="grad_attn_mask=True needs a floating-point attn_mask"):
        OPS.attention_backward(*args, None, 0.0, 0.25, -1, -1, True, 0.0, None, None, True, False)
    with pytest.raises(ValueError, match="grad_alibi_slopes=True needs alibi_slopes"):
        OPS.attention_backward(*args, None, 0.0, 0.25, -1, -1, True, 0.0, None, None, False, True)
    # Not asked for: empty.
    grads = OPS.attention_backward(*args, torch.zeros(1, 1, 8, 10), 0.0, 0.25, -1, -1, True)
    assert grads[3].shape == (0,) and grads[4].shape == (0,) and grads[5].shape == (0,)
    # Head dims of 0: without a gradient into the lse the bias gradients are 0 (dS = 0); with
    # one they would be P * grad_lse, which the kernels do not form there: refused.
    q0, k0, v0 = (torch.zeros(1, 2, n, 0) for n in (8, 10, 10))
    out0, lse0, rng0 = OPS.attention_forward(q0, k0, v0, None, 0.0, 0.25, -1, -1, True)
    mask = torch.zeros(1, 1, 8, 10)
    args0 = (torch.zeros_like(out0), q0, k0, v0, out0, lse0, rng0, mask, 0.0, 0.25, -1, -1, True, 0.0, None)
    assert OPS.attention_backward(*args0, None, True, False)[3].abs().sum() == 0
    with pytest.raises(NotImplementedError, match="head dims of 0 and a gradient into the lse"):
        OPS.attention_backward(*args0, torch.ones_like(lse0), True, False)


def test_varlen_refuses_slopes_that_require_grad():
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    slopes = torch.ones(2, requires_grad=True)
    with pytest.raises(NotImplementedError, match="alibi_slopes requires grad"):
        OPS.attention_varlen_forward(q, q, q, cu, cu, 6, 6, 0.0, 0.3, -1, -1, True, 0.0, slopes)
    with torch.no_grad():  # as data, it is served
        OPS.attention_varlen_forward(q, q, q, cu, cu, 6, 6, 0.0, 0.3, -1, -1, True, 0.0, slopes)


@pytest.mark.parametrize("mask_shape", [(1, 2, 8, 10), (2, 1, 8, 1), None])
def test_opcheck_backward_with_bias_gradients(mask_shape):
    q, k, v = make_qkv(2, 2, 1, 8, 10, 8, torch.float32)
    mask = None if mask_shape is None else torch.randn(mask_shape)
    slopes = torch.rand(2, 2)
    out, lse, rng = OPS.attention_forward(q, k, v, mask, 0.0, 0.25, -1, 0, True, 0.0, slopes)
    args = (torch.randn_like(out), q, k, v, out, lse, rng, mask, 0.0, 0.25, -1, 0, True, 0.0, slopes, None)
    torch.library.opcheck(OPS.attention_backward, (*args, mask is not None, True))
    if mask is not None:
        torch.library.opcheck(OPS.attention_forward, (q, k, v, mask.requires_grad_(), 0.0, 0.25, -1, 0, True))


# --- T5's relative-position bias, computed in the kernels from a per-distance table ---


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (4, 9), (64, 50)])
def test_bucket_function_matches_transformers(bidirectional, num_buckets, max_distance):
    transformers = pytest.importorskip("transformers")
    T5Attention = transformers.models.t5.modeling_t5.T5Attention
    if bidirectional and num_buckets < 4:
        pytest.skip("fewer than 4 buckets")
    distance = torch.arange(-3000, 3001)
    ours = flash_attn_ext.t5_relative_position_bucket(
        distance, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    theirs = T5Attention._relative_position_bucket(
        distance, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)
    # The distances reach both ends of the bucket range (past max_distance: the last bucket).
    assert ours.min() == 0 and ours.max() == num_buckets - 1


def dense_relative_bias(per_distance, L, S):
    """The (1, Hq, L, S) matrix the per-distance bias stands for: entry (h, i, j) =
    per_distance[h, j - i + L - 1] (tests only: the kernels never form it)."""
    idx = torch.arange(S).view(1, S) - torch.arange(L).view(L, 1) + L - 1
    return per_distance[:, idx].unsqueeze(0)


def dense_t5_bias(table, L, S, offset, bidirectional, num_buckets=32, max_distance=64):
    """T5's bias as transformers' compute_bias forms it, (1, Hq, L, S): entry (h, i, j) =
    table[bucket(j - (i + offset)), h], from the positions themselves (independent of
    RelativeBias.per_distance's layout)."""
    distance = torch.arange(S).view(1, S) - (torch.arange(L).view(L, 1) + offset)
    buckets = flash_attn_ext.t5_relative_position_bucket(
        distance, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return table[buckets].permute(2, 0, 1).unsqueeze(0)


# (Hkv, L, S, causal, window, softcap, alignment, bidirectional)
REL_CASES = [
    (4, 37, 37, False, (-1, -1), 0.0, "bottom_right", True),
    (2, 113, 203, True, (-1, -1), 0.0, "bottom_right", False),
    (1, 150, 70, False, (16, 8), 0.0, "top_left", True),
    (2, 64, 130, True, (-1, -1), 2.0, "bottom_right", False),
    (2, 1, 97, True, (-1, -1), 0.0, "bottom_right", False),  # a decoding step at its absolute position
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", REL_CASES, ids=str)
def test_relative_bias_matches_reference(dtype, case):
    Hkv, L, S, causal, window, cap, alignment, bidi = case
    q, k, v = make_qkv(B, HQ, Hkv, L, S, 32, dtype, requires_grad=True)
    g = torch.Generator().manual_seed(11)
    table = (2 * torch.randn(32, HQ, generator=g)).requires_grad_()
    rb = flash_attn_ext.RelativeBias(table, 32, 64, bidi)
    dout = torch.randn(B, HQ, L, 32, generator=g, dtype=torch.float64).to(dtype)
    out = flash_attn_ext.attention(
        q, k, v, causal=causal, window_size=window, softcap=cap, relative_bias=rb, alignment=alignment
    )
    ours = torch.autograd.grad(out, (q, k, v, table), dout)
    offset = S - L if alignment == "bottom_right" else 0
    w = (window[0], 0 if causal else window[1])

    def ref(ref_dtype):
        xs = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        tab = table.detach().to(torch.float64 if ref_dtype == torch.float64 else torch.float32).requires_grad_()
        bias = dense_t5_bias(tab, L, S, offset, bidi)
        o, _ = reference_attention(
            *xs, window=w, softcap=cap, attn_mask=bias, bottom_right=alignment == "bottom_right", dtype=ref_dtype
        )
        return torch.autograd.grad(o, (*xs, tab), dout.to(ref_dtype))

    r64 = ref(torch.float64)
    low = ref(dtype) if dtype in LOW_PRECISION else r64
    assert r64[3].abs().max() > 1e-2
    for name, a, r, lo in zip(("dq", "dk", "dv", "dtable"), ours, r64, low):
        d = torch.float32 if name == "dtable" and dtype == torch.float32 else dtype
        assert_matches(a, r, lo, d, f"{name} relative bias {case}", grad=True)


@pytest.mark.parametrize("causal,window,dropout,cap,Hkv", [(False, (-1, -1), 0.0, 0.0, 2), (True, (2, 0), 0.3, 1.5, 1)])
def test_relative_bias_gradcheck(causal, window, dropout, cap, Hkv):
    q, k, v = make_qkv(2, 2, Hkv, 5, 9, 8, torch.float64, requires_grad=True)
    table = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    per_distance = torch.randn(2, 13, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, table, per_distance):
        torch.manual_seed(3)
        a = flash_attn_ext.attention(
            q, k, v, causal=causal, window_size=window, dropout_p=dropout, softcap=cap,
            relative_bias=flash_attn_ext.RelativeBias(table, 8, 12, not causal),
        )  # fmt: skip
        torch.manual_seed(3)
        b = flash_attn_ext.attention(
            q, k, v, causal=causal, window_size=window, dropout_p=dropout, softcap=cap, relative_bias=per_distance
        )
        return a, b

    assert torch.autograd.gradcheck(f, (q, k, v, table, per_distance), eps=1e-6, atol=1e-8)


def test_relative_bias_bitwise_repeatable_and_equals_the_mask_form():
    q, k, v = make_qkv(1, 8, 2, 200, 200, 32, torch.float32, requires_grad=True)
    table = torch.randn(32, 8, requires_grad=True)
    rb = flash_attn_ext.RelativeBias(table, 32, 128, True)
    runs = []
    for _ in range(2):
        out = flash_attn_ext.attention(q, k, v, relative_bias=rb)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, table))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # The same bias as a materialized (1, H, L, S) mask: the same attention.
    mask = dense_relative_bias(rb.per_distance(200, 200, 0, torch.float32), 200, 200)
    torch.testing.assert_close(runs[0][0], flash_attn_ext.attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_relative_bias_bad_input():
    q, k, v = make_qkv(1, 2, 2, 8, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="table must have shape"):
        flash_attn_ext.RelativeBias(torch.zeros(8, 2), 16, 32, True)
    with pytest.raises(ValueError, match="num_buckets must be >= 4"):
        flash_attn_ext.RelativeBias(torch.zeros(2, 2), 2, 32, True)
    with pytest.raises(ValueError, match="num_buckets must be >= 2"):
        flash_attn_ext.RelativeBias(torch.zeros(0, 2), 0, 32, False)
    with pytest.raises(ValueError, match="max_distance must exceed"):
        flash_attn_ext.RelativeBias(torch.zeros(8, 2), 8, 2, False)
    with pytest.raises(ValueError, match=r"relative_bias must have shape \(2, 17\)"):
        flash_attn_ext.attention(q, k, v, relative_bias=torch.zeros(2, 18))
    with pytest.raises(TypeError, match="relative_bias must be float32"):
        flash_attn_ext.attention(q, k, v, relative_bias=torch.zeros(2, 17, dtype=torch.float16))
    with pytest.raises(TypeError, match="relative_bias must be a RelativeBias or a torch.Tensor"):
        flash_attn_ext.attention(q, k, v, relative_bias=[0.0])
    # Heads of the table must be the query's (the kernel checks the per-distance shape).
    with pytest.raises(ValueError, match="relative_bias must have shape"):
        flash_attn_ext.attention(q, k, v, relative_bias=flash_attn_ext.RelativeBias(torch.zeros(8, 3), 8, 16, True))


def test_opcheck_with_relative_bias():
    q, k, v = make_qkv(2, 2, 1, 8, 10, 8, torch.float32)
    rel = torch.randn(2, 17, requires_grad=True)
    torch.library.opcheck(OPS.attention_forward, (q, k, v, None, 0.0, 0.25, -1, 0, True, 0.0, None, None, rel))
    out, lse, rng = OPS.attention_forward(q, k, v, None, 0.0, 0.25, -1, 0, True, 0.0, None, None, rel.detach())
    args = (torch.randn_like(out), q, k, v, out, lse, rng, None, 0.0, 0.25, -1, 0, True, 0.0, None, None, False, False)
    torch.library.opcheck(OPS.attention_backward, (*args, rel.detach(), True))


_RSS_SCRIPT = """
import resource, sys, torch, flash_attn_ext
torch.manual_seed(0)
L, H = 8192, 8
q, k, v = (torch.randn(1, H, L, 64, requires_grad=True) for _ in range(3))
rb = None
if sys.argv[1] == "bias":
    rb = flash_attn_ext.RelativeBias(torch.randn(32, H, requires_grad=True), 32, 128, True)
out = flash_attn_ext.attention(q, k, v, relative_bias=rb)
out.sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
"""


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""), reason="RSS under AddressSanitizer")
def test_relative_bias_memory_at_8k():
    """T5's bias at L = S = 8192 (8 heads, float32), forward and backward, adds less than
    64 MiB of peak RSS over the same call without it (an (H, L, S) float32 bias would be 2 GiB)."""
    import subprocess
    import sys

    peaks = {}
    for what in ("none", "bias"):
        r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, what], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        peaks[what] = int(r.stdout.split()[-1])
    grown = (peaks["bias"] - peaks["none"]) / 1024
    assert grown < 64, f"peak RSS grew by {grown:.1f} MiB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_shape_mask_gradient_writes_every_element(dtype):
    """A mask of the scores' own shape gets its gradient written straight into uninitialised
    memory: every element must be written, the ones no query sees included (zeros). The freed
    NaN-filled block of the same size is what the allocator hands out next (small sizes are
    reused), so an element left unwritten reads NaN."""
    # One head of 150 x 200: a gradient under glibc's mmap threshold (128 KiB), so it comes from
    # the heap that the poison was just returned to; several key tiles, so windows leave rows out.
    B_, H, L, S = 1, 1, 150, 200
    q, k, v = make_qkv(B_, H, H, L, S, 8, dtype, requires_grad=True)
    mask = torch.randn(B_, H, L, S).to(dtype).requires_grad_()
    for window in ((3, 0), (-1, 0), (2, 2), (70, 70)):
        out = flash_attn_ext.attention(q, k, v, window_size=window, attn_mask=mask)
        dout = torch.randn_like(out)
        for _ in range(3):
            poison = [torch.full((B_, H, L, S), float("nan"), dtype=dtype) for _ in range(8)]
            del poison
            (dmask,) = torch.autograd.grad(out, (mask,), dout, retain_graph=True)
            assert not dmask.isnan().any(), window
        qr, kr, vr = (t.detach().double() for t in (q, k, v))
        m64 = mask.detach().double().requires_grad_()
        o, _ = reference_attention(qr, kr, vr, window=window, attn_mask=m64)
        (ref,) = torch.autograd.grad(o, (m64,), dout.double())
        torch.testing.assert_close(dmask.double(), ref, rtol=0.05, atol=0.02)
        assert (dmask[ref == 0] == 0).all()
