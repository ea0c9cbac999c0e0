"""Attention against a KV cache (decode and chunked prefill) with per-sequence lengths,
against the float64 reference on each sequence's valid prefix."""

import pytest
import torch

import flash_attn_ext
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, reference_attention


def _case(B, Hq, Hkv, L, S_max, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)
    return rnd(B, L, Hq, D), rnd(B, S_max, Hkv, D), rnd(B, S_max, Hkv, D)


def _check(out, lse, q, kc, vc, lens, window, dtype):
    """Per sequence: reference over cache positions [0, lens[b]), bottom-right aligned."""
    for b, n in enumerate(lens):
        qb = q[b : b + 1].transpose(1, 2)
        kb, vb = kc[b : b + 1, :n].transpose(1, 2), vc[b : b + 1, :n].transpose(1, 2)
        ref, ref_lse = reference_attention(qb, kb, vb, window=window, bottom_right=True)
        low = (
            reference_attention(qb, kb, vb, window=window, bottom_right=True, dtype=dtype)[0]
            if dtype in LOW_PRECISION
            else ref
        )
        assert_matches(out[b : b + 1].transpose(1, 2), ref, low, dtype, f"kvcache out b={b} len={n} w={window}")
        assert_lse_matches(lse[b : b + 1], ref_lse, dtype, f"kvcache lse b={b} len={n} w={window}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("L", [1, 7, 64])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (31, -1))])
def test_decode_and_prefill_against_cache(device, dtype, L, Hq, Hkv, causal, window):
    B, S_max, D = 3, 200, 64
    q, kc, vc = _case(B, Hq, Hkv, L, S_max, D, dtype, device)
    lens = [L, 77, S_max]  # a sequence exactly as long as its query chunk, one mid-cache, one full
    with torch.no_grad():
        out, lse = flash_attn_ext.attention_with_kvcache(
            q,
            kc,
            vc,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
            causal=causal,
            window_size=window,
            return_softmax_lse=True,
        )
    w = (window[0], 0 if causal else window[1])
    _check(out, lse, q, kc, vc, lens, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,L", [(1, 1), (1, 2), (2, 3), (1, 5)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (True, (300, -1))])
def test_mqa_decode_many_query_heads(device, dtype, B, L, causal, window):
    """MQA with 32 query heads: more rows per KV head than the decode path takes. The whole
    group's rows fit one tile at L <= 2 (packed, one task per sequence, split-KV across the
    threads); L = 3 and 5 do not (a query head per task, as before)."""
    Hq, Hkv, S_max, D = 32, 1, 700, 64
    q, kc, vc = _case(B, Hq, Hkv, L, S_max, D, dtype, device, seed=L)
    lens = [S_max, 450][:B]
    with torch.no_grad():
        out, lse = flash_attn_ext.attention_with_kvcache(
            q,
            kc,
            vc,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
            causal=causal,
            window_size=window,
            return_softmax_lse=True,
        )
    _check(out, lse, q, kc, vc, lens, (window[0], 0), dtype)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_append_then_attend(device, layout):
    B, Hq, Hkv, L, S_max, D = 2, 4, 2, 5, 64, 32
    q, kc, vc = _case(B, Hq, Hkv, L, S_max, D, torch.float32, device)
    knew, vnew = (
        _case(B, Hkv, Hkv, L, 1, D, torch.float32, device, seed=3)[0],
        _case(B, Hkv, Hkv, L, 1, D, torch.float32, device, seed=4)[0],
    )
    lens = torch.tensor([10, 40], device=device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    for b, n in enumerate(lens.tolist()):
        kc_ref[b, n : n + L], vc_ref[b, n : n + L] = knew[b], vnew[b]
    t = (lambda x: x.transpose(1, 2)) if layout == "bhsd" else (lambda x: x)
    with torch.inference_mode():
        out, lse = flash_attn_ext.attention_with_kvcache(
            t(q),
            t(kc),
            t(vc),
            t(knew),
            t(vnew),
            cache_seqlens=lens,
            causal=True,
            return_softmax_lse=True,
            layout=layout,
        )
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    out = out.transpose(1, 2) if layout == "bhsd" else out
    _check(out, lse, q, kc_ref, vc_ref, [n + L for n in lens.tolist()], (-1, 0), torch.float32)


def test_generation_loop_equals_full_causal_attention(device):
    # Token-by-token decoding through the cache reproduces causal attention over the sequence.
    B, H, T, D = 2, 4, 23, 16
    q, k, v = (torch.randn(B, T, H, D, device=device) for _ in range(3))
    kc, vc = torch.zeros(B, 32, H, D, device=device), torch.zeros(B, 32, H, D, device=device)
    lens = torch.zeros(B, dtype=torch.int32, device=device)
    outs = []
    with torch.no_grad():
        for t in range(T):
            outs.append(
                flash_attn_ext.attention_with_kvcache(
                    q[:, t : t + 1], kc, vc, k[:, t : t + 1], v[:, t : t + 1], cache_seqlens=lens, causal=True
                )
            )
            lens += 1
        full = flash_attn_ext.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=1), full.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_errors_before_any_write(device):
    B, S_max, H, D = 2, 16, 2, 8
    kc, vc = torch.zeros(B, S_max, H, D, device=device), torch.zeros(B, S_max, H, D, device=device)
    knew = torch.ones(B, 3, H, D, device=device)
    lens = torch.tensor([2, 14], dtype=torch.int32, device=device)  # 14 + 3 > 16
    with pytest.raises(ValueError, match="does not fit the cache"), torch.no_grad():
        flash_attn_ext.attention_with_kvcache(
            torch.randn(B, 3, H, D, device=device), kc, vc, knew, knew, cache_seqlens=lens
        )
    bad_q = torch.randn(B, 3, 3, D, device=device)  # 3 query heads, 2 kv heads
    with pytest.raises(ValueError, match="query heads must be a multiple of the cache.s"), torch.no_grad():
        flash_attn_ext.attention_with_kvcache(
            bad_q, kc, vc, knew, knew, cache_seqlens=torch.tensor([0, 0], device=device)
        )
    # The append inside attention_kvcache is validated with the attention (one read of
    # cache_seqlens), so new tokens that do not match the cache are refused here, by name.
    ok_q, zero = torch.randn(B, 3, H, D, device=device), torch.tensor([0, 0], dtype=torch.int32, device=device)
    for k_new, v_new, name in [
        (torch.ones(B, 3, H, D + 1, device=device), knew, "k_new"),
        (knew, torch.ones(B, 3, H + 1, D, device=device), "v_new"),
        (knew, torch.ones(B, 2, H, D, device=device), "v_new"),
        (knew[:1], knew[:1], "k_new"),
    ]:
        with pytest.raises(ValueError, match=name), torch.no_grad():
            flash_attn_ext.attention_with_kvcache(ok_q, kc, vc, k_new, v_new, cache_seqlens=zero)
    assert torch.all(kc == 0) and torch.all(vc == 0)
    with pytest.raises(RuntimeError, match="inference-only"):
        flash_attn_ext.attention_with_kvcache(torch.randn(B, 1, H, D, device=device, requires_grad=True), kc, vc)


def test_opcheck(device):
    B, S_max, H, D = 2, 16, 2, 8
    kc, vc = torch.randn(B, H, S_max, D, device=device), torch.randn(B, H, S_max, D, device=device)
    q = torch.randn(B, 4, 2, D, device=device)
    lens = torch.tensor([3, 9], dtype=torch.int32, device=device)
    knew, vnew = torch.randn(B, H, 2, D, device=device), torch.randn(B, H, 2, D, device=device)
    for args in [
        (q, kc, vc, lens, None, None, 0.3, -1, 0),
        (q, kc, vc, lens, knew, vnew, 0.3, 4, 0),
        (q, kc, vc, lens, knew, vnew, 0.3, 4, 0, None, 2.0),
    ]:
        torch.library.opcheck(torch.ops.flash_attn_ext.attention_kvcache, args)


def test_kvcache_class_prefill_then_decode(device):
    B, Hq, Hkv, D, P, N = 2, 4, 2, 16, 9, 6
    q, k, v = (torch.randn(B, P + N, h, D, device=device) for h in (Hq, Hkv, Hkv))
    cache = flash_attn_ext.KVCache(B, 32, Hkv, D, device=device)
    with torch.no_grad():
        outs = [cache.attend(q[:, :P], k[:, :P], v[:, :P])]  # prefill chunk
        for t in range(P, P + N):
            outs.append(cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]))
        full = flash_attn_ext.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert cache.seqlens.tolist() == [P + N] * B
    torch.testing.assert_close(torch.cat(outs, 1), full.transpose(1, 2), atol=1e-5, rtol=1e-5)
    cache.reset(torch.tensor([1], device=device))
    assert cache.seqlens.tolist() == [P + N, 0]
    cache.append(k[:, :3], v[:, :3])
    assert cache.seqlens.tolist() == [P + N + 3, 3]
    with pytest.raises(ValueError, match="overflows the cache"):
        cache.append(torch.zeros(B, 30, Hkv, D, device=device), torch.zeros(B, 30, Hkv, D, device=device))
    assert cache.seqlens.tolist() == [P + N + 3, 3]  # unchanged by the failed append


def test_generate_example_same_tokens_with_and_without_cache():
    import importlib.util
    import os

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "generate.py"
    )
    spec = importlib.util.spec_from_file_location("generate_example", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    torch.manual_seed(1)
    model = gen.Decoder(dim=64, layers=2, heads=4, kv_heads=2).eval()
    prompt = torch.randint(0, 256, (2, 11))
    plain = gen.generate(model, prompt, 17, use_cache=False)
    cached = gen.generate(model, prompt, 17, use_cache=True)
    assert plain.shape == (2, 28)
    assert torch.equal(plain, cached)


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 1, 9, 1, 3], [13, 1, 1, 1], [3, 17, 2]])
def test_rolling_cache_matches_sliding_window_attention(device, chunks):
    # Mistral-style: window of W tokens (including the query's own), a cache of W slots.
    B, Hq, Hkv, D, W = 2, 4, 2, 16, 6
    T = sum(chunks)
    q, k, v = (torch.randn(B, T, h, D, device=device) for h in (Hq, Hkv, Hkv))
    cache = flash_attn_ext.KVCache(B, None, Hkv, D, device=device, window=W)
    outs, t = [], 0
    with torch.no_grad():
        for n in chunks:  # chunks longer than W overwrite slots their own early queries need
            outs.append(cache.attend(q[:, t : t + n], k[:, t : t + n], v[:, t : t + n]))
            t += n
        full = flash_attn_ext.attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=(W - 1, 0)
        )
    assert cache.seqlens.tolist() == [T] * B and cache.k.shape[1] == W
    torch.testing.assert_close(torch.cat(outs, 1), full.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # the buffer holds the last W positions at slot p % W
    for p in range(T - W, T):
        assert torch.equal(cache.k[:, p % W], k[:, p])


def test_rolling_cache_rejects_wider_windows(device):
    cache = flash_attn_ext.KVCache(1, None, 1, 4, device=device, window=4)
    q = torch.randn(1, 1, 1, 4, device=device)
    with pytest.raises(ValueError, match="rolling cache of 4 slots"), torch.no_grad():
        cache.attend(q, q, q, window_size=(10, 0))
    with pytest.raises(ValueError, match="rolling cache of 4 slots"), torch.no_grad():
        cache.attend(q, q, q, causal=False)


@pytest.mark.parametrize("decode_path", ["require", "off"])
@pytest.mark.parametrize("splits", [1, 2, 5, 16])
@pytest.mark.parametrize("Hq,Hkv,L", [(8, 2, 1), (4, 1, 1), (4, 4, 3)])
@pytest.mark.parametrize("window", [(-1, -1), (100, -1)])
def test_split_kv_forced_both_ways(device, kernel_settings, splits, Hq, Hkv, L, window, decode_path):
    """Split-KV (the band cut into key ranges, merged exactly) against the reference, with the
    split count forced (num_splits), through the CPU decode path (cpu_decode='require': all KV
    heads of a key tile at once) and the general kernel (cpu_decode='off'); 16 splits leave
    some ranges empty, and the length-0 sequence has no visible key at all."""
    kernel_settings(num_splits=splits, cpu_decode=decode_path)
    B, S_max, D = 3, 700, 32
    q, kc, vc = _case(B, Hq, Hkv, L, S_max, D, torch.float32, device, seed=int(splits))
    lens = [0, 333, S_max]
    with torch.no_grad():
        out, lse = flash_attn_ext.attention_with_kvcache(
            q,
            kc,
            vc,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
            causal=True,
            window_size=window,
            return_softmax_lse=True,
        )
    _check(out[1:], lse[1:], q[1:], kc[1:], vc[1:], lens[1:], (window[0], 0), torch.float32)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("bf16_dot", ["auto", "off"])
@pytest.mark.parametrize("D", [40, 64, 128])
@pytest.mark.parametrize("Hq,Hkv,L", [(8, 2, 1), (4, 4, 1), (8, 1, 1), (4, 2, 3)])
def test_bf16_decode_both_score_loops(kernel_settings, bf16_dot, D, Hq, Hkv, L):
    """CPU bf16 decode through both score loops: AVX512-BF16 vdpbf16ps where the CPU has it and
    the widening loop (cpu_bf16_dot='off'); head dims with and without a tail past
    the last 16 features; flash-attn (B, S, H, D) and transformers (B, H, S, D) cache layouts."""
    kernel_settings(cpu_bf16_dot=bf16_dot)
    B, S_max = 2, 300
    q, kc, vc = _case(B, Hq, Hkv, L, S_max, D, torch.bfloat16, "cpu", seed=D + Hkv)
    lens = [S_max, 131]
    for layout in ("bshd", "bhsd"):
        k_in = kc if layout == "bshd" else kc.transpose(1, 2).contiguous().transpose(1, 2)
        v_in = vc if layout == "bshd" else vc.transpose(1, 2).contiguous().transpose(1, 2)
        with torch.no_grad():
            out, lse = flash_attn_ext.attention_with_kvcache(
                q, k_in, v_in, cache_seqlens=torch.tensor(lens, dtype=torch.int32), causal=True, return_softmax_lse=True
            )
        _check(out, lse, q, kc, vc, lens, (-1, 0), torch.bfloat16)
