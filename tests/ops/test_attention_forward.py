"""Forward of the fused attention op against the float64 reference (SPEC.md section 6)."""

import pytest
import torch

import flash_attn_ext
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, make_qkv, reference_attention
from tile_backends import cpu_tile_cases

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (1, 97), (113, 203), (203, 113), (256, 512), (1023, 1024)]
HEAD_DIMS = [1, 8, 33, 64, 80, 128, 256]


def check_forward(
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
):
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, dtype, device, Dv=Dv, layout=layout, seed=seed)
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
    w = (window[0], 0 if causal and window[1] < 0 else (min(window[1], 0) if causal else window[1]))
    ref, ref_lse = reference_attention(q, k, v, scale=scale, window=w, bottom_right=bottom_right, attn_mask=attn_mask)
    low = (
        reference_attention(
            q, k, v, scale=scale, window=w, bottom_right=bottom_right, attn_mask=attn_mask, dtype=dtype
        )[0]
        if dtype in LOW_PRECISION
        else ref
    )
    what = f"out {dtype} B={B} Hq={Hq} Hkv={Hkv} L={L} S={S} D={D} w={w} br={bottom_right}"
    assert out.dtype == dtype and out.device.type == device
    assert_matches(out, ref, low, dtype, what)
    # lse: float32 (float64 for float64 inputs), -inf exactly where a row sees nothing.
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_lse_matches(lse, ref_lse, dtype, what)
    return out, lse


# float64 at the largest sizes only adds run time (it is the reference's own precision).
PLAIN_GRID = [
    (dtype, L, S, D)
    for dtype in DTYPES
    for (L, S) in SHAPES
    for D in HEAD_DIMS
    if not (dtype == torch.float64 and L * S * D > 1023 * 1024 * 64)
]


@pytest.mark.parametrize("dtype,L,S,D", PLAIN_GRID, ids=str)
def test_plain_grid(device, dtype, L, S, D):
    check_forward(device, dtype, 1, 2, 2, L, S, D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("bottom_right", [True, False], ids=["bottom_right", "top_left"])
def test_causal(device, dtype, L, S, bottom_right):
    check_forward(device, dtype, 2, 3, 3, L, S, 64, causal=True, bottom_right=bottom_right)


WINDOWS = [(0, 0), (1, 0), (0, 5), (16, 16), (63, 0), (64, 0), (65, 3), (300, -1), (-1, 40), (5000, 5000), (2000, 0)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("L,S", [(1, 97), (113, 203), (203, 113), (256, 512)])
@pytest.mark.parametrize("bottom_right", [True, False], ids=["bottom_right", "top_left"])
def test_window(device, window, L, S, bottom_right):
    check_forward(device, torch.float32, 1, 2, 1, L, S, 32, window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("window,causal", [((127, 0), True), ((32, 32), False)])
def test_window_low_precision(device, dtype, window, causal):
    check_forward(device, dtype, 2, 4, 2, 300, 300, 64, window=window, causal=causal)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 2), (8, 1), (16, 2), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gqa(device, Hq, Hkv, dtype):
    check_forward(device, dtype, 2, Hq, Hkv, 77, 131, 64)
    check_forward(device, dtype, 2, Hq, Hkv, 77, 131, 64, causal=True)


@pytest.mark.parametrize("layout", ["blhd", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_inputs(device, layout, dtype):
    check_forward(device, dtype, 2, 4, 2, 70, 90, 48, layout=layout, causal=True)


@pytest.mark.parametrize("L", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_few_query_rows(device, L, dtype):
    # Tiles of <= 4 rows take the row-dot-product path for S = Q K^T (decode, short chunks).
    check_forward(device, dtype, 2, 4, 2, L, 150, 40, causal=True)
    mask = (torch.rand(2, 1, L, 150) > 0.3).to(device)
    check_forward(device, dtype, 2, 4, 2, L, 150, 40, attn_mask=mask, window=(70, -1))


@pytest.mark.parametrize("B,Hq,Hkv,L", [(1, 8, 2, 1), (1, 8, 2, 37), (2, 6, 2, 130), (1, 4, 1, 3)])
def test_gqa_packing_independent_of_thread_count(device, B, Hq, Hkv, L):
    # With enough tasks the query heads of a GQA group share one tile; with few (1 thread vs
    # many) they do not. Both layouts of the work must give the reference result.
    threads = torch.get_num_threads()
    try:
        for n in (1, 16):
            torch.set_num_threads(n)
            check_forward(device, torch.float32, B, Hq, Hkv, L, 150, 32, causal=True)
            mask = (torch.rand(B, Hq, L, 150) > 0.2).to(device)
            check_forward(device, torch.bfloat16, B, Hq, Hkv, L, 150, 32, attn_mask=mask, window=(60, 5))
    finally:
        torch.set_num_threads(threads)


def test_value_head_dim_differs(device):
    check_forward(device, torch.float32, 2, 4, 2, 50, 70, 40, Dv=24)
    check_forward(device, torch.float32, 1, 2, 2, 33, 33, 16, Dv=72, causal=True)


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0])
def test_custom_scale(device, scale):
    check_forward(device, torch.float32, 1, 2, 2, 65, 65, 32, scale=scale, causal=True)


def _masks(B, H, L, S, device, dtype):
    g = torch.Generator().manual_seed(7)
    return {
        "bool_full": torch.rand(B, H, L, S, generator=g) > 0.3,
        "bool_bcast_rows": (torch.rand(B, 1, 1, S, generator=g) > 0.2),  # padding-mask style
        "bool_bcast_heads": torch.rand(1, 1, L, S, generator=g) > 0.5,
        "float_full": torch.randn(B, H, L, S, generator=g).to(dtype),
        "float_bcast": torch.randn(1, H, 1, S, generator=g).to(dtype),
        "float_neg_inf": torch.where(torch.rand(B, 1, L, S, generator=g) > 0.4, 0.0, float("-inf")).to(dtype),
    }


@pytest.mark.parametrize(
    "kind", ["bool_full", "bool_bcast_rows", "bool_bcast_heads", "float_full", "float_bcast", "float_neg_inf"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attn_mask(device, kind, dtype):
    B, H, L, S = 2, 3, 97, 130
    mask = _masks(B, H, L, S, device, dtype)[kind].to(device)
    check_forward(device, dtype, B, H, H, L, S, 32, attn_mask=mask)
    check_forward(device, dtype, B, H, H, L, S, 32, attn_mask=mask, causal=True, window=(40, -1))


def test_mask_as_noncontiguous_view(device):
    B, H, L, S = 2, 2, 40, 60
    big = torch.rand(B, H, S, L) > 0.3
    check_forward(device, torch.float32, B, H, H, L, S, 16, attn_mask=big.transpose(-1, -2).to(device))


def test_fully_masked_rows_are_zero_not_nan(device):
    B, H, L, S, D = 1, 2, 20, 30, 16
    mask = torch.rand(B, H, L, S) > 0.5
    mask[:, :, 3] = False  # row 3 sees nothing
    mask[:, 1, 7] = False
    out, lse = check_forward(device, torch.float32, B, H, H, L, S, D, attn_mask=mask.to(device))
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf"))
    # window that leaves the first queries without keys (bottom-right, L > S)
    out, lse = check_forward(device, torch.float32, 1, 1, 1, 50, 10, 8, causal=True)
    assert torch.all(out[0, 0, :40] == 0) and torch.all(torch.isneginf(lse[0, 0, :40]))


def test_empty_key_sequence(device):
    q = torch.randn(1, 2, 5, 8, device=device)
    k = torch.randn(1, 2, 0, 8, device=device)
    out, lse = flash_attn_ext.attention(q, k, k, return_lse=True)
    assert out.shape == (1, 2, 5, 8) and torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_empty_query_sequence(device):
    q = torch.randn(1, 2, 0, 8, device=device)
    k = torch.randn(1, 2, 4, 8, device=device)
    out, lse = flash_attn_ext.attention(q, k, k, return_lse=True)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize(
    "shape_q,shape_kv", [((0, 2, 5, 4), (0, 2, 5, 4)), ((1, 0, 5, 4), (1, 0, 5, 4)), ((1, 2, 0, 4), (1, 2, 5, 4))]
)
def test_empty_tensors_forward_and_backward(device, shape_q, shape_kv):
    q = torch.randn(shape_q, device=device, requires_grad=True)
    k = torch.randn(shape_kv, device=device, requires_grad=True)
    v = torch.randn(shape_kv, device=device, requires_grad=True)
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape
    out.sum().backward()  # the expanded (stride 0) gradient of an empty output
    assert q.grad.shape == q.shape and torch.all(k.grad == 0) and torch.all(v.grad == 0)


def test_nan_stays_in_its_row(device):
    q, k, v = make_qkv(1, 1, 1, 16, 16, 8, torch.float32, device)
    q = q.clone()
    q[0, 0, 5, 2] = float("nan")
    out = flash_attn_ext.attention(q, k, v)
    assert torch.isnan(out[0, 0, 5]).all()
    rest = torch.cat([out[0, 0, :5], out[0, 0, 6:]])
    assert torch.isfinite(rest).all()


def test_extreme_logits_are_stable(device):
    # Scores around +-1e4: the running max keeps exp() in range.
    q, k, v = make_qkv(1, 2, 2, 64, 200, 16, torch.float32, device)
    check_forward(device, torch.float32, 1, 2, 2, 64, 200, 16, scale=300.0)
    out = flash_attn_ext.attention(q * 100, k * 100, v)
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (3, 1), (8, 2)])
def test_large_sweep(device, dtype, D, causal, Hq, Hkv):
    for L, S in SHAPES + [(2048, 2048), (4095, 77)]:
        check_forward(device, dtype, 2, Hq, Hkv, L, S, D, causal=causal, window=(333, -1) if causal else (-1, -1))


@pytest.mark.parametrize("splits", [2, 7])
@pytest.mark.parametrize("L,S", [(1, 300), (5, 700), (70, 130)])
def test_split_kv_forward(device, kernel_settings, splits, L, S):
    """The forward with its key bands split (num_splits) and merged: causal,
    windows, masks and GQA against the reference; dropout draws the same mask either way."""
    kernel_settings(num_splits=splits)
    check_forward(device, torch.float32, 2, 4, 2, L, S, 32, causal=True)
    check_forward(device, torch.bfloat16, 1, 3, 1, L, S, 64, window=(90, 3))
    mask = torch.rand(2, 1, L, S, device=device) > 0.3
    check_forward(device, torch.float32, 2, 2, 2, L, S, 16, attn_mask=mask)
    q, k, v = make_qkv(1, 2, 2, L, S, 16, torch.float64, device)
    torch.manual_seed(3)
    split = flash_attn_ext.attention(q, k, v, dropout_p=0.4)
    kernel_settings(num_splits=1)
    torch.manual_seed(3)
    whole = flash_attn_ext.attention(q, k, v, dropout_p=0.4)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,backend", cpu_tile_cases([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize(
    "L,S,D,Hq,Hkv,causal,window",
    [
        (113, 203, 33, 4, 2, True, (-1, -1)),  # odd head dim (a zero pair), odd key tail, GQA packing
        (203, 113, 64, 2, 2, False, (16, 16)),  # L > S, window edges inside tiles
        (64, 64, 128, 8, 1, True, (-1, -1)),  # MQA, exact tiles
        (17, 1, 80, 2, 1, False, (-1, -1)),  # one key: an odd pair count in P V
        (256, 512, 256, 2, 2, True, (100, 0)),  # the largest head dim
    ],
)
def test_bf16_tile_paths(device, dtype, backend, L, S, D, Hq, Hkv, causal, window):
    """The forward on every CPU tile back end this machine runs (tile_backends.py): float tiles,
    vdpbf16ps (bf16 on AVX512-BF16) and oneDNN brgemm, P rounded to bf16 on the bf16 ones; each
    within the SPEC bound of the float64 reference, with a float mask too."""
    with flash_attn_ext.cpu_tiles(backend):
        check_forward(device, dtype, 2, Hq, Hkv, L, S, D, causal=causal, window=window, seed=L + D)
        mask = torch.randn(1, 1, L, S).to(device)
        check_forward(device, dtype, 1, Hq, Hkv, L, S, D, attn_mask=mask, seed=L + D + 1)
