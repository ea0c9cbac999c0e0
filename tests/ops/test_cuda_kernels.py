"""CUDA-only checks beyond the device-parameterised suite (which already runs every CPU test
on CUDA against the float64 reference): agreement with PyTorch's own CUDA SDPA backends, the
same dropout mask on CPU and CUDA, stream / graph behaviour and grid limits. Skipped without
a GPU or without the CUDA kernels (see conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_ext
from flash_attn_ext import _ops
from reference import assert_matches, make_qkv, reference_attention

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ops.has_kernel("cuda")),
    reason="needs a GPU and the CUDA kernels (FLASH_ATTN_EXT_CUDA_KERNELS=1)",
)

BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_matches_torch_cuda_backends(backend, dtype, causal, D):
    """Ours and PyTorch's backend, both against the float64 reference: ours within the SPEC
    bound, and never more than twice as far from it as PyTorch's kernel (plus epsilon)."""
    q, k, v = make_qkv(2, 4, 4, 257, 257, D, dtype, "cuda", seed=D)
    try:
        with sdpa_kernel([backend]):
            theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    except RuntimeError as e:  # backend not available for this GPU / build
        pytest.skip(f"{backend.name}: {e}")
    ours = flash_attn_ext.attention(q, k, v, causal=causal, alignment="top_left")
    ref, _ = reference_attention(q, k, v, window=(-1, 0) if causal else (-1, -1), bottom_right=False)
    low, _ = reference_attention(q, k, v, window=(-1, 0) if causal else (-1, -1), bottom_right=False, dtype=dtype)
    assert_matches(ours, ref, low, dtype, f"ours vs float64 ({backend.name} case)")
    err_ours = (ours.double() - ref).abs().max().item()
    err_theirs = (theirs.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, f"ours {err_ours:.3e} vs {backend.name} {err_theirs:.3e}"


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_same_on_cpu_and_cuda(causal):
    """The CUDA forward's rng_state regenerates the identical mask in the CPU backward: the
    Philox mask is a function of (seed, offset, bh, i, j) alone, whatever the device."""
    B, Hq, Hkv, L, S, D, p = 2, 4, 2, 33, 47, 16, 0.3
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, torch.float64, "cuda", seed=3)
    dout = torch.randn(B, Hq, L, D, dtype=torch.float64, device="cuda")
    wr = 0 if causal else -1
    out, lse, rng = torch.ops.flash_attn_ext.attention_forward(q, k, v, None, p, D**-0.5, -1, wr, True)
    assert rng.device.type == "cuda" and rng.dtype == torch.int64
    grads_cuda = torch.ops.flash_attn_ext.attention_backward(
        dout, q, k, v, out, lse, rng, None, p, D**-0.5, -1, wr, True
    )
    grads_cpu = torch.ops.flash_attn_ext.attention_backward(
        *(t.cpu() for t in (dout, q, k, v, out, lse, rng)), None, p, D**-0.5, -1, wr, True
    )
    for name, a, b in zip(("dq", "dk", "dv"), grads_cuda, grads_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, msg=name)


def test_dropout_follows_cuda_generator():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32, torch.float32, "cuda")
    torch.cuda.manual_seed(7)
    a = flash_attn_ext.attention(q, k, v, dropout_p=0.5)
    torch.cuda.manual_seed(7)
    b = flash_attn_ext.attention(q, k, v, dropout_p=0.5)
    c = flash_attn_ext.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_runs_on_current_stream_and_device_guard():
    q, k, v = make_qkv(1, 2, 1, 100, 120, 64, torch.bfloat16, "cuda")
    expected = flash_attn_ext.attention(q, k, v, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = flash_attn_ext.attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got, expected)


def test_cuda_graph_capture_and_replay():
    q, k, v = make_qkv(2, 4, 2, 64, 96, 32, torch.float16, "cuda")
    eager = flash_attn_ext.attention(q, k, v, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        flash_attn_ext.attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = flash_attn_ext.attention(q, k, v, causal=True)
        dropped = flash_attn_ext.attention(q, k, v, dropout_p=0.5)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    first = dropped.clone()
    g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, dropped), "each replay must draw a fresh dropout mask"


def test_grid_stride_over_many_rows():
    """More rows than one launch's grid covers (the kernels loop grid-stride)."""
    L = (1 << 22) + 3
    q = torch.randn(1, 1, L, 8, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 1, 4, 8, device="cuda", dtype=torch.float16)
    v = torch.randn(1, 1, 4, 8, device="cuda", dtype=torch.float16)
    out = flash_attn_ext.attention(q, k, v)
    ref, _ = reference_attention(q[:, :, -5:], k, v)
    low, _ = reference_attention(q[:, :, -5:], k, v, dtype=torch.float16)
    assert_matches(out[:, :, -5:], ref, low, torch.float16, "last rows")
    assert not torch.isnan(out).any()


def test_head_dim_over_256_is_a_clear_error_and_sdpa_falls_back():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 264, torch.float32, "cuda")
    with pytest.raises(ValueError, match="head dims up to 256"):
        flash_attn_ext.attention(q, k, v)
    flash_attn_ext.reset_fallback_counts()
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v)
    assert flash_attn_ext.fallback_counts() == {"head dim > 256 on CUDA": 1}
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


MMA_CASES = {  # name: (L, S, Hq, Hkv, window, bottom_right)
    "full": (77, 203, 4, 4, (-1, -1), True),
    "causal_top_left": (130, 130, 4, 4, (-1, 0), False),
    "causal_bottom_right_L_gt_S": (150, 70, 2, 2, (-1, 0), True),  # early rows see nothing
    "window": (300, 300, 2, 2, (37, 5), True),
    "gqa_8_2": (64, 129, 8, 2, (-1, 0), True),
    "mqa_long": (1031, 1031, 4, 1, (-1, -1), True),
    # The forward's interior phase (tiles every row sees whole) between masked edge tiles: after
    # the causal band's start, and on both sides of a window wider than several tiles.
    "causal_long_bottom_right": (1000, 1300, 2, 2, (-1, 0), True),
    "wide_window_gqa": (700, 700, 4, 2, (300, 130), True),
}


@pytest.mark.parametrize("D", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(MMA_CASES))
def test_tensor_core_forward(kernel_settings, case, dtype, D):
    """The tensor-core kernel (pinned with cuda_fast='require') against the float64 reference with
    the SPEC bound, and against the safety-net kernel (cuda_fast='off')."""
    L, S, Hq, Hkv, window, br = MMA_CASES[case]
    q, k, v = make_qkv(2, Hq, Hkv, L, S, D, dtype, "cuda", layout="blhd", seed=L + D)
    kw = dict(window_size=window, alignment="bottom_right" if br else "top_left", return_lse=True)
    kernel_settings(cuda_fast="require")
    out, lse = flash_attn_ext.attention(q, k, v, **kw)
    kernel_settings(cuda_fast="off")
    safe_out, safe_lse = flash_attn_ext.attention(q, k, v, **kw)
    ref, ref_lse = reference_attention(q, k, v, window=window, bottom_right=br)
    low, _ = reference_attention(q, k, v, window=window, bottom_right=br, dtype=dtype)
    assert_matches(out, ref, low, dtype, f"tensor-core out {case} D={D}")
    assert_matches(safe_out, ref, low, dtype, f"safety-net out {case} D={D}")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < 2e-2
    assert (lse[finite] - safe_lse[finite]).abs().max().item() < 2e-2


def test_tensor_core_path_declines_what_it_does_not_serve(kernel_settings):
    kernel_settings(cuda_fast="require")
    q, k, v = make_qkv(1, 2, 2, 16, 16, 80, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head dim not in"):
        flash_attn_ext.attention(q, k, v)
    q, k, v = make_qkv(1, 2, 2, 16, 16, 64, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="dtype"):
        flash_attn_ext.attention(q, k, v)
    q, k, v = make_qkv(1, 2, 2, 16, 16, 64, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="softcap"):
        flash_attn_ext.attention(q, k, v, softcap=5.0)
    with pytest.raises(RuntimeError, match="sinks"):  # (served by the safety net, tests/features/test_sinks.py)
        flash_attn_ext.attention(q, k, v, sinks=torch.zeros(2, device="cuda"))
    kc, vc = (
        torch.zeros(1, 64, 2, 64, dtype=torch.float16, device="cuda"),
        torch.zeros(1, 64, 2, 64, dtype=torch.float16, device="cuda"),
    )
    with pytest.raises(RuntimeError, match="sinks"), torch.no_grad():  # the split-KV decode kernel
        flash_attn_ext.attention_with_kvcache(
            q[:, :, :1].transpose(1, 2), kc, vc, cache_seqlens=9, sinks=torch.zeros(2, device="cuda")
        )
    # The kernel's running max is over unscaled scores: a negative (or zero) scale goes to the
    # safety net, which serves it correctly.
    with pytest.raises(RuntimeError, match="scale <= 0"):
        flash_attn_ext.attention(q, k, v, scale=-0.3)
    kernel_settings(cuda_fast="auto")
    ref, _ = reference_attention(q, k, v, scale=-0.3)
    low, _ = reference_attention(q, k, v, scale=-0.3, dtype=torch.float16)
    assert_matches(flash_attn_ext.attention(q, k, v, scale=-0.3), ref, low, torch.float16, "negative scale")
    kernel_settings(cuda_fast="require")
    with pytest.raises(RuntimeError, match="scale <= 0"):  # positive, but 0 as a float32
        flash_attn_ext.attention(q, k, v, scale=1e-47)
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device="cuda")
    packed = q[0].transpose(0, 1).contiguous()
    with pytest.raises(RuntimeError, match="variable-length"):
        torch.ops.flash_attn_ext.attention_varlen_forward(
            packed, packed, packed, cu, cu, 9, 9, 0.0, 0.125, -1, 0, True, 0.0
        )


def test_varlen_and_softcap_same_on_cpu_and_cuda():
    """Varlen with dropout and softcap: the CUDA row programs and the CPU kernels draw the same
    dropout mask and compute the same gradients (float64, so only rounding differs)."""
    lengths = [5, 0, 33, 17]
    cu = torch.tensor([0, 5, 5, 38, 55], dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(55, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(55, 4, 16, generator=g, dtype=torch.float64)
    args = (33, 33, 0.3, 0.25, 6, 0, True, 2.0)
    out, lse, rng = torch.ops.flash_attn_ext.attention_varlen_forward(
        q.cuda(), k.cuda(), v.cuda(), cu.cuda(), cu.cuda(), *args
    )
    grads_cuda = torch.ops.flash_attn_ext.attention_varlen_backward(
        dout.cuda(), q.cuda(), k.cuda(), v.cuda(), out, lse, rng, cu.cuda(), cu.cuda(), *args
    )
    grads_cpu = torch.ops.flash_attn_ext.attention_varlen_backward(
        dout, q, k, v, out.cpu(), lse.cpu(), rng.cpu(), cu, cu, *args
    )
    for name, a, b in zip(("dq", "dk", "dv"), grads_cuda, grads_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, msg=name)
    assert sum(lengths) == 55


@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(MMA_CASES))
def test_tensor_core_backward(kernel_settings, case, dtype, D):
    """The tensor-core backward (pinned with cuda_fast='require') against float64
    gradients with the SPEC bound, bitwise repeatable, and close to the safety net."""
    L, S, Hq, Hkv, window, br = MMA_CASES[case]
    q, k, v = make_qkv(2, Hq, Hkv, L, S, D, dtype, "cuda", layout="blhd", seed=L + D, requires_grad=True)
    dout = torch.randn(2, Hq, L, D, dtype=torch.float64).to(dtype).to("cuda")
    kw = dict(window_size=window, alignment="bottom_right" if br else "top_left")

    def grads(fast):
        kernel_settings(cuda_fast=fast)
        out = flash_attn_ext.attention(q, k, v, **kw)
        return torch.autograd.grad(out, (q, k, v), dout)

    ours, again, safe = grads("require"), grads("require"), grads("off")

    def ref(ref_dtype):
        qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v))
        o, _ = reference_attention(qr, kr, vr, window=window, bottom_right=br, dtype=ref_dtype)
        return torch.autograd.grad(o, (qr, kr, vr), dout.to(ref_dtype))

    r64, low = ref(torch.float64), ref(dtype)
    for name, a, b, c, r, lo in zip(("dq", "dk", "dv"), ours, again, safe, r64, low):
        assert torch.equal(a, b), f"{name}: not bitwise repeatable"
        assert_matches(a, r, lo, dtype, f"tensor-core {name} {case} D={D}", grad=True)
        assert_matches(c, r, lo, dtype, f"safety-net {name} {case} D={D}", grad=True)


def test_training_loop_matches_torch_sdpa():
    """A few hundred steps of a small causal transformer on the GPU: the loss curve with our
    attention follows the same model with PyTorch's SDPA."""
    torch.manual_seed(0)
    vocab, dim, heads, seq, steps = 64, 128, 4, 128, 200

    class Block(torch.nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn, self.emb = attn, torch.nn.Embedding(vocab, dim)
            self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
            self.head = torch.nn.Linear(dim, vocab)

        def forward(self, x):
            h = self.emb(x)
            q, k, v = self.qkv(h).view(x.shape[0], seq, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            a = self.attn(q, k, v).transpose(1, 2).reshape(x.shape[0], seq, dim)
            return self.head(h + self.proj(a))

    ours = Block(lambda q, k, v: flash_attn_ext.attention(q, k, v, causal=True)).cuda().bfloat16()
    theirs = Block(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)).cuda().bfloat16()
    theirs.load_state_dict(ours.state_dict())
    start = torch.randint(0, vocab, (steps, 8, 1), device="cuda")  # learnable: x[t+1] = x[t] + 1
    data = (start + torch.arange(seq + 1, device="cuda")) % vocab
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curve = []
        for step in range(steps):
            x, y = data[step, :, :-1], data[step, :, 1:]
            loss = F.cross_entropy(model(x).float().reshape(-1, vocab), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[name] = torch.tensor(curve)
    assert losses["ours"][-20:].mean() < 0.5 * losses["ours"][:20].mean(), "the model did not learn"
    assert (losses["ours"] - losses["theirs"]).abs().max().item() < 0.05 * losses["theirs"].max().item()


DECODE_CASES = {  # B, Hq, Hkv, L, S_max, lens, window_left
    "gqa_decode": (3, 32, 8, 1, 1000, [1000, 1, 513], -1),
    "mqa_16_rows": (2, 16, 1, 1, 700, [700, 129], -1),
    "prefill_chunk": (2, 8, 2, 4, 600, [600, 4], -1),  # L = 4 rows per head, bottom-right causal
    "window": (2, 8, 2, 1, 900, [900, 300], 200),
    "empty_sequence": (2, 4, 4, 1, 300, [0, 300], -1),
}


@pytest.mark.parametrize("splits", [0, 1, 5], ids=["auto", "1", "5"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_split_kv_decode_kernel(kernel_settings, case, dtype, D, splits):
    """The CUDA decode kernels (pinned with cuda_fast='require'; split count
    automatic or forced) against the float64 reference per sequence, and against the safety net."""
    from test_attention_kvcache import _case, _check

    B, Hq, Hkv, L, S_max, lens, left = DECODE_CASES[case]
    q, kc, vc = _case(B, Hq, Hkv, L, S_max, D, dtype, "cuda", seed=D + len(case))
    kernel_settings(num_splits=splits)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kw = dict(cache_seqlens=seqlens, causal=True, window_size=(left, -1), return_softmax_lse=True)
    with torch.no_grad():
        kernel_settings(cuda_fast="require")
        out, lse = flash_attn_ext.attention_with_kvcache(q, kc, vc, **kw)
        kernel_settings(cuda_fast="off")
        safe_out, safe_lse = flash_attn_ext.attention_with_kvcache(q, kc, vc, **kw)
    seen = [b for b, n in enumerate(lens) if n > 0]  # a sequence of length 0: zeros and lse -inf
    for o, l in ((out, lse), (safe_out, safe_lse)):
        _check(o[seen], l[seen], q[seen], kc[seen], vc[seen], [lens[b] for b in seen], (left, 0), dtype)
        for b in set(range(B)) - set(seen):
            assert torch.equal(o[b], torch.zeros_like(o[b])) and torch.isneginf(l[b]).all()


def test_split_kv_decode_kernel_paged(kernel_settings):
    from test_attention_kvcache import _case, _check
    from test_paged_kv_cache import _paged_copy

    kernel_settings(cuda_fast="require", num_splits=3)
    q, kc, vc = _case(2, 8, 2, 1, 512, 128, torch.bfloat16, "cuda", seed=3)
    kp, vp, table = _paged_copy(kc, vc, 64)
    lens = [512, 77]
    with torch.no_grad():
        out, lse = flash_attn_ext.attention_with_kvcache(
            q,
            kp,
            vp,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
            causal=True,
            return_softmax_lse=True,
            block_table=table,
        )
    _check(out, lse, q, kc, vc, lens, (-1, 0), torch.bfloat16)


def test_split_kv_decode_kernel_declines_what_it_does_not_serve(kernel_settings):
    kernel_settings(cuda_fast="require")
    q = torch.randn(1, 1, 8, 80, device="cuda", dtype=torch.float16)
    kc = torch.randn(1, 32, 8, 80, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim not in"), torch.no_grad():
        flash_attn_ext.attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=torch.tensor([32], device="cuda"))
    kc = torch.randn(1, 32, 8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="softcap"), torch.no_grad():
        flash_attn_ext.attention_with_kvcache(
            q[..., :64], kc, kc.clone(), softcap=30.0, cache_seqlens=torch.tensor([32], device="cuda")
        )


def _decode_step_case(B=3, Hq=16, Hkv=4, S_max=640, D=128, dtype=torch.bfloat16, block_size=0):
    """Caches (contiguous, or paged with a shuffled table), a step's q / k_new / v_new."""
    from test_attention_kvcache import _case
    from test_paged_kv_cache import _paged_copy

    q, kc, vc = _case(B, Hq, Hkv, 1, S_max, D, dtype, "cuda", seed=11)
    k_new, v_new = (torch.randn(B, 1, Hkv, D, device="cuda", dtype=dtype) for _ in range(2))
    table = None
    if block_size:
        kc, vc, table = _paged_copy(kc, vc, block_size)
    return q, kc, vc, k_new, v_new, table


@pytest.mark.parametrize("block_size", [0, 64], ids=["contiguous", "paged"])
def test_decode_step_under_cuda_graph(kernel_settings, block_size):
    """A decode step (append k_new / v_new, attend) captured once and replayed while the lengths
    advance on the device: in auto mode the capture checks on the device (no host read, which a
    capture cannot make), each replay matches the float64 reference at that step's lengths and
    writes the new rows where the lengths say, and nothing is reported."""
    from test_attention_kvcache import _check

    flash_attn_ext.check_kvcache_errors()  # start clear, whatever ran before
    kernel_settings(cuda_device_checks="auto")
    q, kc, vc, k_new, v_new, table = _decode_step_case(block_size=block_size)
    seqlens = torch.tensor([100, 7, 500], dtype=torch.int32, device="cuda")
    kw = dict(cache_seqlens=seqlens, causal=True, block_table=table, return_softmax_lse=True)

    def step():
        return flash_attn_ext.attention_with_kvcache(q, kc, vc, k=k_new, v=v_new, **kw)

    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (host-checked) outside the graph
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out, lse = step()
        for _ in range(3):
            seqlens += 1  # outside the graph, on the device: the next step's lengths
            for t in (q, k_new, v_new):
                t.copy_(torch.randn_like(t))
            g.replay()
            torch.cuda.synchronize()
            lens = [n + 1 for n in seqlens.tolist()]
            dense_k, dense_v = _dense(kc, table, 640), _dense(vc, table, 640)
            for b, n in enumerate(seqlens.tolist()):
                assert torch.equal(dense_k[b, n], k_new[b, 0]) and torch.equal(dense_v[b, n], v_new[b, 0])
            _check(out, lse, q, dense_k, dense_v, lens, (-1, 0), torch.bfloat16)
    flash_attn_ext.check_kvcache_errors()  # nothing skipped: does not raise


def _dense(cache, table, S_max):
    """(B, S_max, H, D) positions of a contiguous or paged (num_blocks, block, H, D) cache."""
    if table is None:
        return cache
    return cache[table.long()].flatten(1, 2)[:, :S_max]


def test_device_checks_skip_bad_sequences_and_report(kernel_settings):
    """cuda_device_checks='require' outside a graph: a negative length, a length past the cache
    and a bad block table entry each skip their sequence (no row written, outputs NaN) while
    the good sequence matches the float64 reference and the host-checked result bit for bit;
    check_kvcache_errors raises naming each reason, once, and the next host-checked call raises
    what a later device-checked call recorded."""
    from test_attention_kvcache import _check

    flash_attn_ext.check_kvcache_errors()  # start clear, whatever ran before
    kernel_settings(num_splits=3)  # the same splits on both paths: bitwise comparable
    q, kc, vc, k_new, v_new, table = _decode_step_case(B=4, block_size=64)
    table[3, 0] = kc.shape[0] + 5  # sequence 3's first block is not a block of the cache
    seqlens = torch.tensor([300, -4, 640, 10], dtype=torch.int64, device="cuda")
    before_k, before_v = kc.clone(), vc.clone()
    kw = dict(cache_seqlens=seqlens, causal=True, block_table=table, return_softmax_lse=True)
    with torch.no_grad():
        kernel_settings(cuda_device_checks="require")
        out, lse = flash_attn_ext.attention_with_kvcache(q, kc, vc, k=k_new, v=v_new, **kw)
        torch.cuda.synchronize()
        assert out[1:].isnan().all() and lse[1:].isnan().all()
        dense_k = _dense(kc, table[:1], 640)
        assert torch.equal(dense_k[0, 300], k_new[0, 0])
        same = lambda a, b: torch.isclose(a, b, rtol=0, atol=0, equal_nan=True)  # the spare blocks hold NaN
        changed = ~same(kc, before_k).flatten(1).all(1) | ~same(vc, before_v).flatten(1).all(1)
        assert set(changed.nonzero().flatten().tolist()) == {table[0, 300 // 64].item()}, "only sequence 0 wrote"
        _check(out[:1], lse[:1], q[:1], dense_k[:1], _dense(vc, table[:1], 640)[:1], [301], (-1, 0), torch.bfloat16)
        with pytest.raises(RuntimeError, match="3 sequence.*negative.*past the cache.*not a block"):
            flash_attn_ext.check_kvcache_errors()
        flash_attn_ext.check_kvcache_errors()  # cleared
        # The good sequence, host-checked on a fresh copy, is the same bits.
        kernel_settings(cuda_device_checks="off")
        kc.copy_(before_k), vc.copy_(before_v)
        host_out, host_lse = flash_attn_ext.attention_with_kvcache(
            q[:1], kc, vc, k=k_new[:1], v=v_new[:1], **dict(kw, cache_seqlens=seqlens[:1], block_table=table[:1])
        )
        assert torch.equal(host_out, out[:1]) and torch.equal(host_lse, lse[:1])
        # A device-checked append with a bad length, then a host-checked call: it raises that.
        kernel_settings(cuda_device_checks="require")
        flash_attn_ext.kv_cache_append(kc, vc, k_new[:1], v_new[:1], seqlens[1:2], block_table=table[:1])
        kernel_settings(cuda_device_checks="auto")
        with pytest.raises(RuntimeError, match="1 sequence.*negative"):
            flash_attn_ext.attention_with_kvcache(
                q[:1], kc, vc, **dict(kw, cache_seqlens=seqlens[:1], block_table=table[:1])
            )
        flash_attn_ext.attention_with_kvcache(
            q[:1], kc, vc, **dict(kw, cache_seqlens=seqlens[:1], block_table=table[:1])
        )


@pytest.mark.parametrize("rolling", [False, True])
def test_device_checked_append_matches_host_checked(kernel_settings, rolling):
    """kv_cache_append checked on the device writes the same caches as the host-checked op,
    rolling lengths past 2^32 included."""
    flash_attn_ext.check_kvcache_errors()  # start clear, whatever ran before
    B, S_max, H, D = 3, 96, 4, 64
    kc = torch.randn(B, S_max, H, D, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    k_new, v_new = (torch.randn(B, 5, H, D, device="cuda", dtype=torch.float16) for _ in range(2))
    lens = [2**32 + 93, 7, 2**33] if rolling else [91, 0, 40]
    seqlens = torch.tensor(lens, dtype=torch.int64, device="cuda")
    results = []
    for mode in ("off", "require"):
        kernel_settings(cuda_device_checks=mode)
        k, v = kc.clone(), vc.clone()
        flash_attn_ext.kv_cache_append(k, v, k_new, v_new, seqlens, rolling=rolling)
        results.append((k, v))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    flash_attn_ext.check_kvcache_errors()


def test_host_checks_refuse_a_capture(kernel_settings):
    """cuda_device_checks='off' under capture raises a clear error before any host read."""
    kernel_settings(cuda_device_checks="off")
    q, kc, vc, k_new, v_new, _ = _decode_step_case(B=1)
    seqlens = torch.tensor([5], dtype=torch.int32, device="cuda")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cuda_device_checks"), torch.no_grad():
        with torch.cuda.graph(g):
            flash_attn_ext.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens)
