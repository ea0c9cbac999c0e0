"""flash_attn_ext.kv_cache_append: in-place, bitwise equal to an indexing reference, nothing
outside the written slots changes, bad input raises before anything is written."""

import pytest
import torch

import flash_attn_ext

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _poisoned_cache(B, S_max, H, D, dtype, device, layout):
    shape = (B, S_max, H, D) if layout == "bshd" else (B, H, S_max, D)
    return torch.full(shape, float("nan"), dtype=dtype, device=device), torch.full(
        shape, float("nan"), dtype=dtype, device=device
    )


def _reference(cache, new, lens, layout, rolling):
    ref = cache.clone()
    S_max = cache.shape[1] if layout == "bshd" else cache.shape[2]
    L_new = new.shape[1] if layout == "bshd" else new.shape[2]
    for b, n in enumerate(lens.tolist()):
        for t in range(L_new):
            slot = (n + t) % S_max if rolling else n + t
            if layout == "bshd":
                ref[b, slot] = new[b, t]
            else:
                ref[b, :, slot] = new[b, :, t]
    return ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("L_new", [1, 5])
def test_append_matches_indexing(device, dtype, layout, L_new):
    B, S_max, H, D = 3, 16, 2, 24
    kc, vc = _poisoned_cache(B, S_max, H, D, dtype, device, layout)
    shape = (B, L_new, H, D) if layout == "bshd" else (B, H, L_new, D)
    kn, vn = (torch.randn(shape, dtype=torch.float64).to(dtype).to(device) for _ in range(2))
    lens = torch.tensor([0, 7, S_max - L_new], dtype=torch.int32, device=device)
    k_ref, v_ref = _reference(kc, kn, lens, layout, False), _reference(vc, vn, lens, layout, False)
    k_ptr = kc.data_ptr()
    flash_attn_ext.kv_cache_append(kc, vc, kn, vn, lens, layout=layout)
    assert kc.data_ptr() == k_ptr  # in place
    # bitwise, NaN poison included: equal_nan compares the untouched slots
    assert torch.equal(torch.nan_to_num(kc, nan=7.0), torch.nan_to_num(k_ref, nan=7.0))
    assert torch.equal(torch.nan_to_num(vc, nan=7.0), torch.nan_to_num(v_ref, nan=7.0))
    assert torch.isnan(kc).sum() == torch.isnan(k_ref).sum()


def test_append_strided_new_and_int64_lengths(device):
    B, S_max, H, D = 2, 12, 3, 8
    kc, vc = _poisoned_cache(B, S_max, H, D, torch.float32, device, "bhsd")
    big = torch.randn(B, 4, H, D + 5, device=device)
    kn = big[..., :D].transpose(1, 2)  # (B, H, 4, D) view with row stride H*(D+5)
    vn = kn * 2
    lens = torch.tensor([3, 8], dtype=torch.int64, device=device)
    k_ref, v_ref = _reference(kc, kn, lens, "bhsd", False), _reference(vc, vn, lens, "bhsd", False)
    flash_attn_ext.kv_cache_append(kc, vc, kn, vn, lens, layout="bhsd")
    assert torch.equal(kc.nan_to_num(3.0), k_ref.nan_to_num(3.0))
    assert torch.equal(vc.nan_to_num(3.0), v_ref.nan_to_num(3.0))


# A rolling cache's lengths count every position ever appended: past W they wrap, and a long
# stream takes them past 2^32 (the CUDA kernel indexes with 32 bits after reducing them mod W).
@pytest.mark.parametrize("starts", [(5, 20), (2**33 + 3, 2**32 - 2)], ids=["wrapped", "past_2^32"])
@pytest.mark.parametrize("L_new", [1, 3, 7, 11])
def test_rolling_buffer(device, L_new, starts):
    B, W, H, D = 2, 7, 1, 4
    kc, vc = _poisoned_cache(B, W, H, D, torch.float32, device, "bshd")
    kn, vn = torch.randn(B, L_new, H, D, device=device), torch.randn(B, L_new, H, D, device=device)
    lens = torch.tensor(starts, device=device)
    k_ref = _reference(kc, kn, lens, "bshd", True)  # later tokens overwrite earlier ones
    v_ref = _reference(vc, vn, lens, "bshd", True)
    flash_attn_ext.kv_cache_append(kc, vc, kn, vn, lens, rolling=True)
    assert torch.equal(kc.nan_to_num(1.0), k_ref.nan_to_num(1.0))
    assert torch.equal(vc.nan_to_num(1.0), v_ref.nan_to_num(1.0))
    # Position p lives in slot p % W: the last min(L_new, W) tokens are all there, K and V alike.
    for b in range(B):
        for t in range(max(0, L_new - W), L_new):
            assert torch.equal(kc[b, (lens[b].item() + t) % W], kn[b, t])
            assert torch.equal(vc[b, (lens[b].item() + t) % W], vn[b, t])


BAD = [
    ("overflows the cache", lambda kc, vc, kn, vn: (kc, vc, kn, vn, torch.tensor([0, 14]))),
    ("is negative", lambda kc, vc, kn, vn: (kc, vc, kn, vn, torch.tensor([-1, 0]))),
    ("cache_seqlens must be int32 or int64", lambda kc, vc, kn, vn: (kc, vc, kn, vn, torch.tensor([0.0, 1.0]))),
    ("cache_seqlens must have shape", lambda kc, vc, kn, vn: (kc, vc, kn, vn, torch.tensor([0, 1, 2]))),
    ("k_new dtype", lambda kc, vc, kn, vn: (kc, vc, kn.double(), vn, torch.tensor([0, 1]))),
    ("does not match", lambda kc, vc, kn, vn: (kc, vc, kn[:, :1], vn, torch.tensor([0, 1]))),
    ("k_new has 3 new positions, v_new 2", lambda kc, vc, kn, vn: (kc, vc, kn, vn[:, :, :2], torch.tensor([0, 1]))),
    ("must be 4-D", lambda kc, vc, kn, vn: (kc[0], vc, kn, vn, torch.tensor([0, 1]))),
    (
        "contiguous last dimension",
        lambda kc, vc, kn, vn: (kc, vc, torch.randn(2, 2, 8, 3).transpose(-1, -2), vn, torch.tensor([0, 1])),
    ),
]


@pytest.mark.parametrize("match,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_writing(match, make):
    kc, vc = torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8)
    kn, vn = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    args = make(kc, vc, kn, vn)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.flash_attn_ext.kv_cache_append(*args, False)
    assert torch.all(kc == 0) and torch.all(vc == 0)


def test_bad_layout():
    kc = torch.zeros(1, 4, 1, 2)
    with pytest.raises(ValueError, match="layout must be"):
        flash_attn_ext.kv_cache_append(kc, kc, kc[:, :1], kc[:, :1], torch.tensor([0]), layout="bsdh")


def test_opcheck(device):
    kc, vc = torch.zeros(2, 2, 16, 8, device=device), torch.zeros(2, 2, 16, 8, device=device)
    kn, vn = torch.randn(2, 2, 3, 8, device=device), torch.randn(2, 2, 3, 8, device=device)
    torch.library.opcheck(
        torch.ops.flash_attn_ext.kv_cache_append,
        (kc, vc, kn, vn, torch.tensor([1, 4], dtype=torch.int32, device=device), False),
    )


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(kc, vc, kn, vn, lens):
        flash_attn_ext.kv_cache_append(kc, vc, kn, vn, lens)
        return kc.sum() + vc.sum()

    kc, vc = torch.zeros(2, 16, 2, 8, device=device), torch.zeros(2, 16, 2, 8, device=device)
    kn, vn = torch.randn(2, 3, 2, 8, device=device), torch.randn(2, 3, 2, 8, device=device)
    lens = torch.tensor([2, 9], device=device)
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(kc, vc, kn, vn, lens)
    torch.testing.assert_close(total, kn.sum() + vn.sum())
    assert torch.equal(kc[1, 9:12], kn[1])


def test_cpu_ignores_device_checks_and_has_nothing_pending(kernel_settings):
    """cuda_device_checks concerns CUDA calls only: on CPU a bad length still raises at once,
    and check_kvcache_errors has nothing to report (and rejects a device it cannot check)."""
    kernel_settings(cuda_device_checks="require")
    kc, vc = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)
    before = kc.clone(), vc.clone()
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_ext.kv_cache_append(kc, vc, torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), torch.tensor([8]))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
    flash_attn_ext.check_kvcache_errors("cpu")
    if not torch.cuda.is_available():
        flash_attn_ext.check_kvcache_errors()
    with pytest.raises(ValueError, match="CUDA or CPU device"):
        flash_attn_ext.check_kvcache_errors("meta")


def _streaming_visibility(total, n, ring):
    i = torch.arange(total).unsqueeze(1)
    j = torch.arange(total)
    return (j <= i) & ((j < n) | (j > i - ring))


@pytest.mark.parametrize("n,W", [(2, 6), (4, 7), (1, 3)])
def test_sink_tokens_cache_equals_streaming_attention(device, n, W):
    """KVCache(window=W, sink_tokens=n): prefill chunks longer than W, decode steps, a short
    chunk; every output equals attention over the whole sequence with StreamingLLM's
    visibility (the first n positions and the last W - n), from the float64 reference."""
    from reference import reference_attention

    B, Hq, Hkv, D, total = 2, 4, 2, 8, 31
    g = torch.Generator().manual_seed(n * 10 + W)
    q, k, v = (torch.randn(B, total, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    cache = flash_attn_ext.KVCache(B, None, Hkv, D, dtype=torch.float64, device=device, window=W, sink_tokens=n)
    sinks = torch.randn(Hq, generator=g).to(device)
    # prefills that start at 0 < seen <= W and straddle it, chunks longer than W, decode steps,
    # a query without a new token (the last position again)
    chunks, t = [3, 2, 11, 1, 1, 5, 1, 0, 6, 1], 0
    outs = []
    with torch.no_grad():
        for c in chunks:
            if c == 0:
                again = cache.attend(q[:, t - 1 : t].to(device), sinks=sinks)
                torch.testing.assert_close(again, outs[-1][:, -1:], rtol=1e-12, atol=1e-12)
                continue
            sl = slice(t, t + c)
            outs.append(cache.attend(q[:, sl].to(device), k[:, sl].to(device), v[:, sl].to(device), sinks=sinks))
            t += c
    assert t == total and cache.seqlens.tolist() == [total] * B
    ours = torch.cat(outs, 1).cpu()
    vis = _streaming_visibility(total, n, W - n)
    ref, _ = reference_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=vis, sinks=sinks.cpu().double()
    )
    torch.testing.assert_close(ours, ref.transpose(1, 2), rtol=1e-6, atol=1e-6)
    # the plain window (no sink tokens) differs: the sink tokens are really attended to
    plain, _ = reference_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window=(W - n - 1, 0), sinks=sinks.cpu().double()
    )
    assert (ours - plain.transpose(1, 2)).abs().max() > 1e-3
    # what the slots hold: positions 0..n-1 and the last W - n
    kept = list(range(n)) + list(range(total - (W - n), total))
    slots = [p if p < n else n + (p - n) % (W - n) for p in kept]
    torch.testing.assert_close(cache.k[:, slots].cpu(), k[:, kept], rtol=0, atol=0)


def test_sink_tokens_bad_arguments():
    with pytest.raises(ValueError, match="sink_tokens"):
        flash_attn_ext.KVCache(1, 8, 1, 4, sink_tokens=2)  # needs a rolling cache
    with pytest.raises(ValueError, match="sink_tokens"):
        flash_attn_ext.KVCache(1, None, 1, 4, window=4, sink_tokens=4)
    cache = flash_attn_ext.KVCache(1, None, 1, 4, window=6, sink_tokens=2)
    with pytest.raises(ValueError, match=r"window_size=\(3, 0\)"), torch.no_grad():
        cache.attend(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), window_size=(5, 0))
    with torch.no_grad():
        cache.attend(torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4))
        with pytest.raises(ValueError, match="L <= L_new"):  # queries for cached positions
            cache.attend(torch.randn(1, 3, 1, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
