"""int8 / float8_e4m3fn KV caches: the append's quantization (codes, scales, untouched slots) and
attention over the quantized cache in every path, against the float64 reference on the
dequantized values (code * scale), by SPEC.md section 6's rule. A second, independent check of
the cache modes: a float cache fed the same tokens rounded through the quantizer gives the same
outputs as the quantized cache."""

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import KVCache, attention_with_kvcache, kv_cache_append, quantize_kv_cache
from reference import LOW_PRECISION, assert_lse_matches, assert_matches, reference_attention

QDTYPES = [torch.int8, torch.float8_e4m3fn]
MAX_CODE = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_ref(x: torch.Tensor, qdtype: torch.dtype):
    """The quantizer written out in torch: (codes, scales) of rows x (..., D), float32 math."""
    xf = x.float()
    scale = xf.abs().amax(-1) / MAX_CODE[qdtype]
    y = torch.where(scale[..., None] > 0, xf / scale[..., None], torch.zeros_like(xf))
    y = y.clamp(-MAX_CODE[qdtype], MAX_CODE[qdtype])
    codes = torch.round(y).to(torch.int8) if qdtype == torch.int8 else y.to(torch.float8_e4m3fn)
    return codes, scale


def dequant(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    return codes.to(dtype) * scale.to(dtype)[..., None]


def rnd(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def random_bytes(shape, qdtype, g):
    """Cache storage filled with random codes (no NaN codes for fp8), to see which slots change."""
    b = torch.randint(0, 127, shape, generator=g, dtype=torch.uint8)
    return b.view(torch.int8) if qdtype == torch.int8 else b.view(torch.float8_e4m3fn)


# ---------------------------------------------------------------- the append


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_append_quantizes_rows_and_touches_nothing_else(device, qdtype, src, layout):
    g = torch.Generator().manual_seed(1)
    B, S, H, D, L = 3, 40, 2, 72, 9
    shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    kc, vc = random_bytes(shape, qdtype, g), random_bytes(shape, qdtype, g)
    ks, vs = torch.rand(shape[:3], generator=g), torch.rand(shape[:3], generator=g)
    before = [t.clone() for t in (kc, vc, ks, vs)]
    new_shape = (B, L, H, D) if layout == "bshd" else (B, H, L, D)
    k, v = rnd(g, *new_shape, scale=3.0).to(src), rnd(g, *new_shape).to(src)
    k[1].select(1 if layout == "bshd" else 0, 0).zero_()  # a zero row: scale 0, codes 0
    lens = [0, 17, S - L]
    dev = [t.to(device) for t in (kc, vc, k, v, ks, vs)]
    kv_cache_append(
        *dev[:4],
        torch.tensor(lens, dtype=torch.int32, device=device),
        layout=layout,
        k_cache_scale=dev[4],
        v_cache_scale=dev[5],
    )
    kc, vc, ks, vs = (t.cpu() for t in (dev[0], dev[1], dev[4], dev[5]))
    pos_dim = 1 if layout == "bshd" else 2
    for cache, scale, new, old_c, old_s in ((kc, ks, k, before[0], before[2]), (vc, vs, v, before[1], before[3])):
        codes_ref, scale_ref = quantize_ref(new, qdtype)
        written = torch.zeros(shape[:3], dtype=torch.bool)
        for b, n in enumerate(lens):
            sl = [b, slice(None), slice(None)]
            sl[pos_dim] = slice(n, n + L)
            written[tuple(sl)] = True
            got_c, got_s = cache[tuple(sl)], scale[tuple(sl)]
            # the kernel's bytes are the quantizer's, bit for bit
            assert torch.equal(got_c.view(torch.uint8), codes_ref[b].view(torch.uint8)), (b, qdtype, src)
            assert torch.equal(got_s, scale_ref[b])
            # each row's largest magnitude is the largest code, exactly
            top = got_c.float().abs().amax(-1)
            nonzero = scale_ref[b] > 0
            assert torch.all(top[nonzero] == MAX_CODE[qdtype])
            assert torch.all(got_s[~nonzero] == 0) and torch.all(got_c.float()[~nonzero] == 0)
            # round trip within half a quantization step (int8) / half an e4m3 ulp (fp8), plus the
            # float32 rounding of x / scale (a few ulps of 127: 1e-5 of a step)
            err = (dequant(got_c, got_s) - new[b].double()).abs()
            if qdtype == torch.int8:
                bound = got_s.double()[..., None] * (0.5 + 1e-5)
            else:  # e4m3: 3 mantissa bits, half an ulp is 2^-4 relative (below 2^-6: the subnormal step)
                mag = (new[b].double().abs() / got_s.double()[..., None].clamp_min(1e-30)).clamp_min(2**-6)
                bound = got_s.double()[..., None] * mag * (2**-4 + 1e-5)
            assert torch.all(err <= bound), float((err - bound).max())
        # every other slot bitwise untouched
        assert torch.equal(cache.view(torch.uint8)[~written], old_c.view(torch.uint8)[~written])
        assert torch.equal(scale[~written], old_s[~written])


def test_ties_round_to_even():
    """Codes exactly halfway between two steps: int8 rounds half to even (not away from zero),
    e4m3 to the even mantissa. The row's amax is the largest code, so the scale is 1."""
    k = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, 126.5, -0.5, 3.5]]).reshape(1, 1, 1, 8)
    kc, vc = torch.zeros(1, 4, 1, 8, dtype=torch.int8), torch.zeros(1, 4, 1, 8, dtype=torch.int8)
    ks, vs = torch.zeros(1, 4, 1), torch.zeros(1, 4, 1)
    kv_cache_append(kc, vc, k, k, torch.zeros(1, dtype=torch.int32), k_cache_scale=ks, v_cache_scale=vs)
    assert ks[0, 0, 0] == 1.0
    assert kc[0, 0, 0].tolist() == [127, 0, 2, 2, -2, 126, 0, 4]
    x = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 0.0, 3.0, 2.125, 2.375]).reshape(1, 1, 1, 8)
    kf, vf = torch.zeros(1, 4, 1, 8, dtype=torch.float8_e4m3fn), torch.zeros(1, 4, 1, 8, dtype=torch.float8_e4m3fn)
    kv_cache_append(kf, vf, x, x, torch.zeros(1, dtype=torch.int32), k_cache_scale=ks, v_cache_scale=vs)
    assert ks[0, 0, 0] == 1.0
    assert kf[0, 0, 0].float().tolist() == [448.0, 1.0, 1.25, -1.0, 0.0, 3.0, 2.0, 2.5]


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
def test_append_rolling_and_paged(qdtype):
    g = torch.Generator().manual_seed(2)
    B, W, H, D = 2, 8, 2, 32
    kc, vc = torch.zeros(B, W, H, D, dtype=qdtype), torch.zeros(B, W, H, D, dtype=qdtype)
    ks, vs = torch.zeros(B, W, H), torch.zeros(B, W, H)
    k, v = rnd(g, B, 11, H, D).float(), rnd(g, B, 11, H, D).float()
    kv_cache_append(
        kc, vc, k, v, torch.tensor([3, 0], dtype=torch.int32), rolling=True, k_cache_scale=ks, v_cache_scale=vs
    )
    codes, scales = quantize_ref(k, qdtype)
    for b, start in enumerate([3, 0]):
        for t in range(11 - W, 11):  # the last W positions survive, position p in slot p % W
            slot = (start + t) % W
            assert torch.equal(kc[b, slot].view(torch.uint8), codes[b, t].view(torch.uint8))
            assert torch.equal(ks[b, slot], scales[b, t])
    # paged: (num_blocks, block_size, H, D), block_table naming blocks out of order
    nb, bs = 6, 4
    kp, vp = torch.zeros(nb, bs, H, D, dtype=qdtype), torch.zeros(nb, bs, H, D, dtype=qdtype)
    kps, vps = torch.zeros(nb, bs, H), torch.zeros(nb, bs, H)
    table = torch.tensor([[5, 1, 3], [0, 2, 4]], dtype=torch.int32)
    kn, vn = rnd(g, B, 6, H, D).float(), rnd(g, B, 6, H, D).float()
    kv_cache_append(
        kp, vp, kn, vn, torch.tensor([2, 5], dtype=torch.int32), block_table=table, k_cache_scale=kps, v_cache_scale=vps
    )
    codes, scales = quantize_ref(vn, qdtype)
    for b, start in enumerate([2, 5]):
        for t in range(6):
            pos = start + t
            blk, row = int(table[b, pos // bs]), pos % bs
            assert torch.equal(vp[blk, row].view(torch.uint8), codes[b, t].view(torch.uint8))
            assert torch.equal(vps[blk, row], scales[b, t])


# ---------------------------------------------------------------- attention over the cache


def _filled_cache(g, B, S, Hkv, D, qdtype, lens, layout="bshd"):
    """A quantized cache holding lens[b] positions (appended by the kernel), with its scales."""
    shape = (B, S, Hkv, D) if layout == "bshd" else (B, Hkv, S, D)
    kc, vc = torch.zeros(shape, dtype=qdtype), torch.zeros(shape, dtype=qdtype)
    ks, vs = torch.zeros(shape[:3]), torch.zeros(shape[:3])
    n = max(lens)
    new_shape = (B, n, Hkv, D) if layout == "bshd" else (B, Hkv, n, D)
    # keys with a few outlier channels, as real models' keys have
    k = rnd(g, *new_shape)
    k[..., :3] *= 20.0
    v = rnd(g, *new_shape)
    kv_cache_append(
        kc,
        vc,
        k.float(),
        v.float(),
        torch.zeros(B, dtype=torch.int32),
        layout=layout,
        k_cache_scale=ks,
        v_cache_scale=vs,
    )
    return kc, vc, ks, vs


def _reference(q, kc, vc, ks, vs, lens, window, dtype, layout, softcap=0.0, alibi=None, sinks=None, tiles=False):
    """Per sequence: the float64 reference over the dequantized cache positions [0, lens[b]),
    and the input-dtype baseline on the dequantized values rounded to q's dtype. tiles: the call
    is served by the tile kernels, which read the cache dequantized into q's dtype (the decode
    kernel reads code * scale in float32): the reference takes the values rounded so."""
    outs = []
    for b, n in enumerate(lens):
        if layout == "bshd":
            qb = q[b : b + 1].transpose(1, 2)
            kb = dequant(kc[b : b + 1, :n], ks[b : b + 1, :n]).transpose(1, 2)
            vb = dequant(vc[b : b + 1, :n], vs[b : b + 1, :n]).transpose(1, 2)
        else:
            qb = q[b : b + 1]
            kb = dequant(kc[b : b + 1, :, :n], ks[b : b + 1, :, :n])
            vb = dequant(vc[b : b + 1, :, :n], vs[b : b + 1, :, :n])
        if tiles:
            kb, vb = kb.to(q.dtype).double(), vb.to(q.dtype).double()
        kw = dict(window=window, bottom_right=True, softcap=softcap, sinks=sinks)
        if alibi is not None:
            kw["alibi_slopes"] = alibi
        ref, ref_lse = reference_attention(qb, kb, vb, **kw)
        low = ref
        if dtype in LOW_PRECISION:
            low = reference_attention(qb, kb.to(dtype), vb.to(dtype), dtype=dtype, **kw)[0]
        outs.append((ref, ref_lse, low))
    return outs


def _assert_all(out, lse, refs, dtype, layout, what):
    for b, (ref, ref_lse, low) in enumerate(refs):
        ob = out[b : b + 1].transpose(1, 2) if layout == "bshd" else out[b : b + 1]
        assert_matches(ob, ref, low, dtype, f"{what} b={b}")
        assert_lse_matches(lse[b : b + 1], ref_lse, dtype, f"{what} lse b={b}")


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("L", [1, 3, 40])  # decode kernel; decode kernel (MHA) / tiles (GQA); tiles
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_attention_over_quantized_cache(device, qdtype, dtype, L, Hq, Hkv, layout):
    g = torch.Generator().manual_seed(3)
    B, S, D = 3, 300, 64
    lens = [L, 97, S]
    kc, vc, ks, vs = _filled_cache(g, B, S, Hkv, D, qdtype, lens, layout)
    q = rnd(g, *((B, L, Hq, D) if layout == "bshd" else (B, Hq, L, D))).to(dtype)
    with torch.no_grad():
        out, lse = attention_with_kvcache(
            q.to(device),
            kc.to(device),
            vc.to(device),
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
            causal=True,
            return_softmax_lse=True,
            layout=layout,
            k_cache_scale=ks.to(device),
            v_cache_scale=vs.to(device),
        )
    out, lse = out.cpu(), lse.cpu()
    # more query rows per KV head than the CPU decode kernel takes, and every CUDA call: tiles
    # read a copy dequantized into q's dtype
    tiles = L * Hq // Hkv > 8 or device == "cuda"  # more query rows per KV head than the decode kernel takes
    refs = _reference(q, kc, vc, ks, vs, lens, (-1, 0), dtype, layout, tiles=tiles)
    _assert_all(out, lse, refs, dtype, layout, f"{qdtype} L={L} {Hq}/{Hkv} {layout}")


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q8_avx2", ["auto", "off"])  # the AVX2 widening where the CPU has it; the portable loops
def test_every_code_reads_back_exactly(kernel_settings, qdtype, dtype, q8_avx2):
    """Every stored byte reads back as code * scale exactly (fp8 subnormals, both signs, the NaN
    codes as NaN, as torch reads them), through the vector loop and the tail of a head dim of
    254 / 256. V: one key per sequence (probability 1), the output is the V row. K: query b
    one-hot at feature b, one key, so the lse is code[b] * scale."""
    kernel_settings(cpu_q8_avx2=q8_avx2)
    codes = torch.arange(256, dtype=torch.int32)
    if qdtype == torch.int8:
        codes = codes[:254]
    D = codes.numel()
    raw = torch.stack([codes, codes.flip(0)]).to(torch.uint8)  # two sequences, the codes in both orders
    vc = raw.view(qdtype).reshape(2, 1, 1, D)
    kc = torch.zeros(2, 1, 1, D, dtype=qdtype)
    scale = torch.tensor([0.5, 3.0]).reshape(2, 1, 1)
    q = torch.randn(2, 1, 1, D).to(dtype)
    with torch.no_grad():
        out = attention_with_kvcache(q, kc, vc, cache_seqlens=1, k_cache_scale=torch.ones(2, 1, 1), v_cache_scale=scale)
    expect = (vc.float() * scale[..., None]).to(dtype)
    torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True)
    # K: D sequences, sequence b's query one-hot at feature b, its one key the code row (the NaN
    # codes zeroed: 0 * NaN would poison every score)
    k_raw = raw[:1].masked_fill((raw[:1] & 0x7F) == 0x7F, 0) if qdtype == torch.float8_e4m3fn else raw[:1]
    kk = k_raw.view(qdtype).reshape(1, 1, 1, D).expand(D, 1, 1, D).contiguous()
    qk = torch.eye(D).reshape(D, 1, 1, D).to(dtype)
    with torch.no_grad():
        _, lse = attention_with_kvcache(
            qk,
            kk,
            torch.zeros_like(kk),
            cache_seqlens=1,
            softmax_scale=1.0,
            return_softmax_lse=True,
            k_cache_scale=torch.full((D, 1, 1), 0.5),
            v_cache_scale=torch.ones(D, 1, 1),
        )
    torch.testing.assert_close(lse.flatten(), kk[:, 0, 0].float().diagonal() * 0.5, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("q8_avx2", ["auto", "off"])
@pytest.mark.parametrize("Hq,L,D", [(8, 1, 64), (4, 2, 72), (8, 1, 130)])  # head dims with a tail past 8 / 16
def test_avx2_and_portable_loops(kernel_settings, qdtype, q8_avx2, Hq, L, D):
    """The decode kernel's two sets of 8-bit loops, each against the reference (GQA groups of 1-8
    rows, head dims with a tail)."""
    kernel_settings(cpu_q8_avx2=q8_avx2)
    g = torch.Generator().manual_seed(10)
    B, S, Hkv = 2, 150, 2
    lens = [150, 61]
    kc, vc, ks, vs = _filled_cache(g, B, S, Hkv, D, qdtype, lens)
    q = rnd(g, B, L, Hq, D).float()
    with torch.no_grad():
        out, lse = attention_with_kvcache(
            q,
            kc,
            vc,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32),
            causal=True,
            return_softmax_lse=True,
            k_cache_scale=ks,
            v_cache_scale=vs,
        )
    refs = _reference(q, kc, vc, ks, vs, lens, (-1, 0), torch.float32, "bshd")
    _assert_all(out, lse, refs, torch.float32, "bshd", f"{qdtype} q8_avx2={q8_avx2} D={D}")


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("decode", ["auto", "off"])
@pytest.mark.parametrize("feature", ["softcap", "alibi", "sinks", "window", "split"], ids=lambda f: f)
def test_attention_features_over_quantized_cache(qdtype, decode, feature):
    """Softcap, ALiBi, learned sinks, a sliding window and split-KV (one long sequence) on the
    decode kernel and, with cpu_decode off, on the dequantized tiles."""
    g = torch.Generator().manual_seed(4)
    B, S, Hq, Hkv, D, L = 2, 700, 8, 2, 64, 2
    lens = [S, 351] if feature != "split" else [S, S]
    kc, vc, ks, vs = _filled_cache(g, B, S, Hkv, D, qdtype, lens)
    q = rnd(g, B, L, Hq, D).float()
    kw, ref_kw, window = {}, {}, (-1, 0)
    if feature == "softcap":
        kw["softcap"] = ref_kw["softcap"] = 5.0
    elif feature == "alibi":
        kw["alibi_slopes"] = ref_kw["alibi"] = torch.rand(Hq, generator=g) * 0.1
    elif feature == "sinks":
        kw["sinks"] = ref_kw["sinks"] = rnd(g, Hq).float()
    elif feature == "window":
        window = (63, 0)
    splits = {"num_splits": 4} if feature == "split" else {}  # split-KV whatever the thread count
    with torch.no_grad(), flash_attn_ext.kernel_config(cpu_decode=decode, **splits):
        out, lse = attention_with_kvcache(
            q,
            kc,
            vc,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32),
            causal=True,
            window_size=window,
            return_softmax_lse=True,
            k_cache_scale=ks,
            v_cache_scale=vs,
            **kw,
        )
    refs = _reference(q, kc, vc, ks, vs, lens, window, torch.float32, "bshd", **ref_kw)
    _assert_all(out, lse, refs, torch.float32, "bshd", f"{qdtype} {feature} decode={decode}")


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("L_new", [1, 5])
@pytest.mark.parametrize("decode", ["auto", "off"])  # off: the tiles on the compact dequantized blocks
def test_append_then_attend_in_one_call_paged_and_leftpad(kernel_settings, qdtype, L_new, decode):
    """k / v appended (quantized) by the attention call itself, on a paged cache, with
    cache_batch_idx and cache_leftpad addressing it (the scales are addressed with it)."""
    kernel_settings(cpu_decode=decode)
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, nb, bs = 2, 4, 2, 32, 8, 16
    kp, vp = torch.zeros(nb, bs, Hkv, D, dtype=qdtype), torch.zeros(nb, bs, Hkv, D, dtype=qdtype)
    kps, vps = torch.zeros(nb, bs, Hkv), torch.zeros(nb, bs, Hkv)
    table = torch.tensor([[7, 2, 4, 0], [1, 3, 5, 6]], dtype=torch.int32)
    lens = [30, 45]
    k0, v0 = rnd(g, B, 45, Hkv, D).float(), rnd(g, B, 45, Hkv, D).float()
    kv_cache_append(
        kp, vp, k0, v0, torch.zeros(B, dtype=torch.int32), block_table=table, k_cache_scale=kps, v_cache_scale=vps
    )
    q = rnd(g, B, L_new, Hq, D).float()
    kn, vn = rnd(g, B, L_new, Hkv, D).float(), rnd(g, B, L_new, Hkv, D).float()
    with torch.no_grad():
        out = attention_with_kvcache(
            q,
            kp,
            vp,
            kn,
            vn,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32),
            causal=True,
            block_table=table,
            k_cache_scale=kps,
            v_cache_scale=vps,
        )
    # the reference gathers each sequence's positions through the table and dequantizes them
    for b, n in enumerate(lens):
        pos = torch.arange(n + L_new)
        blk, row = table[b, pos // bs].long(), pos % bs
        kb = dequant(kp[blk, row], kps[blk, row]).unsqueeze(0).transpose(1, 2)
        vb = dequant(vp[blk, row], vps[blk, row]).unsqueeze(0).transpose(1, 2)
        # the appended rows are the quantizer's
        assert torch.equal(kp[blk, row][n:].view(torch.uint8), quantize_ref(kn[b], qdtype)[0].view(torch.uint8))
        ref, _ = reference_attention(q[b : b + 1].transpose(1, 2), kb, vb, window=(-1, 0))
        assert_matches(out[b : b + 1].transpose(1, 2), ref, ref, torch.float32, f"paged b={b}")
    # cache_batch_idx + cache_leftpad on a plain cache: the same values through the remap
    S = 64
    kc, vc, ks, vs = _filled_cache(g, 3, S, Hkv, D, qdtype, [S, S, S])
    idx = torch.tensor([2, 0], dtype=torch.int32)
    pad = torch.tensor([5, 0], dtype=torch.int32)
    seq = torch.tensor([40, 64], dtype=torch.int32)
    q2 = rnd(g, 2, 1, Hq, D).float()
    with torch.no_grad():
        out2 = attention_with_kvcache(
            q2,
            kc,
            vc,
            cache_seqlens=seq,
            cache_batch_idx=idx,
            cache_leftpad=pad,
            k_cache_scale=ks,
            v_cache_scale=vs,
        )
    for b in range(2):
        r, lo, hi = int(idx[b]), int(pad[b]), int(seq[b])
        kb = dequant(kc[r : r + 1, lo:hi], ks[r : r + 1, lo:hi]).transpose(1, 2)
        vb = dequant(vc[r : r + 1, lo:hi], vs[r : r + 1, lo:hi]).transpose(1, 2)
        ref, _ = reference_attention(q2[b : b + 1].transpose(1, 2), kb, vb)
        assert_matches(out2[b : b + 1].transpose(1, 2), ref, ref, torch.float32, f"leftpad b={b}")


# ---------------------------------------------------------------- KVCache modes


def _fed_through_quantizer(x, qdtype):
    codes, scale = quantize_ref(x, qdtype)
    return dequant(codes, scale, torch.float32)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize(
    "mode", [dict(), dict(window=16), dict(window=16, sink_tokens=4)], ids=["plain", "rolling", "sinks"]
)
def test_kvcache_modes_match_a_float_cache_of_the_dequantized_tokens(qdtype, mode):
    """Prefill (a chunk longer than the window), decode steps, another chunk: every output of the
    quantized cache equals the float cache's fed the same tokens rounded through the quantizer."""
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, D = 2, 4, 2, 32
    quant = KVCache(B, 64, Hkv, D, dtype=qdtype, **mode)
    ref = KVCache(B, 64, Hkv, D, dtype=torch.float32, **mode)
    assert quant.quantized and quant.k.dtype == qdtype and quant.k_scale.shape == quant.k.shape[:3]
    with torch.no_grad():
        for L in (20, 1, 1, 1, 5, 1):
            q = rnd(g, B, L, Hq, D).float()
            k, v = rnd(g, B, L, Hkv, D).float(), rnd(g, B, L, Hkv, D).float()
            out = quant.attend(q, k, v)
            expect = ref.attend(q, _fed_through_quantizer(k, qdtype), _fed_through_quantizer(v, qdtype))
            torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-5, msg=f"{mode} L={L}")
    assert torch.equal(quant.seqlens, ref.seqlens)


def test_kvcache_bf16_queries_and_make_cache():
    g = torch.Generator().manual_seed(7)
    attn = flash_attn_ext.nn.Attention(64, 4, 2).to(torch.bfloat16)
    cache = attn.make_cache(2, 32, dtype=torch.int8)
    assert cache.k.dtype == torch.int8 and cache.k_scale.dtype == torch.float32
    x = rnd(g, 2, 6, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = attn(x, kv_cache=cache)
        y_ref = attn(x, kv_cache=attn.make_cache(2, 32))
    assert y.dtype == torch.bfloat16
    # the int8 cache's output is close to the bf16 cache's (a quality check, not the semantics)
    assert (y.float() - y_ref.float()).abs().max() < 0.05 * y_ref.float().abs().max()


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
def test_quantize_kv_cache_helper(qdtype):
    g = torch.Generator().manual_seed(8)
    k, v = rnd(g, 2, 10, 3, 16).float(), rnd(g, 2, 10, 3, 16).float()
    kq, vq, ks, vs = quantize_kv_cache(k, v, qdtype)
    for t, c, s in ((k, kq, ks), (v, vq, vs)):
        codes, scale = quantize_ref(t, qdtype)
        assert torch.equal(c.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(s, scale)


# ---------------------------------------------------------------- bad input


def _q_cache(qdtype=torch.int8):
    kc, vc = torch.zeros(2, 8, 2, 16, dtype=qdtype), torch.zeros(2, 8, 2, 16, dtype=qdtype)
    return torch.randn(2, 1, 4, 16), kc, vc, torch.zeros(2, 8, 2), torch.zeros(2, 8, 2)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k_cache_scale=None), "k_cache_scale"),
        (dict(v_cache_scale=None), "v_cache_scale"),
        (dict(k_cache_scale=torch.zeros(2, 8, 2, dtype=torch.float16)), "k_cache_scale must be float32"),
        (dict(v_cache_scale=torch.zeros(2, 2, 8)), "v_cache_scale must have"),
        (dict(k_cache_scale=torch.zeros(2, 8, 2, device="meta")), "k_cache_scale is on"),
    ],
)
def test_bad_scales_raise_before_writing(change, match):
    q, kc, vc, ks, vs = _q_cache()
    args = dict(k_cache_scale=ks, v_cache_scale=vs)
    args.update(change)
    k = torch.randn(2, 1, 2, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        attention_with_kvcache(q, kc, vc, k, k.clone(), cache_seqlens=3, **args)
    with pytest.raises((ValueError, TypeError), match=match):
        kv_cache_append(kc, vc, k, k.clone(), torch.zeros(2, dtype=torch.int32), **args)
    assert not kc.view(torch.uint8).any() and not ks.any()


def test_scales_with_a_float_cache_and_nonfinite_rows_raise():
    q, kc, vc, ks, vs = _q_cache()
    with pytest.raises(ValueError, match="k_cache_scale is for int8"):
        attention_with_kvcache(q, kc.float(), vc.float(), cache_seqlens=3, k_cache_scale=ks, v_cache_scale=vs)
    k = torch.randn(2, 1, 2, 16)
    k[1, 0, 1, 3] = float("nan")
    for bad in (k, k.masked_fill(k.isnan(), float("inf"))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            kv_cache_append(
                kc, vc, bad, bad.nan_to_num(), torch.zeros(2, dtype=torch.int32), k_cache_scale=ks, v_cache_scale=vs
            )
        with pytest.raises(ValueError, match="NaN or Inf"):
            attention_with_kvcache(q, kc, vc, bad, bad, cache_seqlens=3, k_cache_scale=ks, v_cache_scale=vs)
    assert not kc.view(torch.uint8).any() and not ks.any()
    # new rows in another dtype than the queries'
    with pytest.raises(TypeError, match="query's dtype"):
        attention_with_kvcache(
            q,
            kc,
            vc,
            k.nan_to_num().bfloat16(),
            k.nan_to_num().bfloat16(),
            cache_seqlens=3,
            k_cache_scale=ks,
            v_cache_scale=vs,
        )


def test_flash_attn_descale_arguments_raise():
    from flash_attn_ext.flash_attn_interface import flash_attn_with_kvcache

    q, kc, vc, ks, vs = _q_cache(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_descale"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, k_descale=torch.ones(2, 2))
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, k_cache_scale=ks, v_cache_scale=vs)
    assert out.shape == q.shape and torch.all(out == 0)  # zero rows (scale 0) read back as zeros


def test_opcheck_quantized():
    g = torch.Generator().manual_seed(9)
    q, kc, vc, ks, vs = _q_cache()
    k = rnd(g, 2, 2, 1, 16).float()
    lens = torch.tensor([2, 5], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.flash_attn_ext.kv_cache_append,
        (
            kc.transpose(1, 2),
            vc.transpose(1, 2),
            k,
            k.clone(),
            lens,
            False,
            None,
            ks.transpose(1, 2),
            vs.transpose(1, 2),
        ),
    )
    torch.library.opcheck(
        torch.ops.flash_attn_ext.attention_kvcache,
        (
            q.transpose(1, 2),
            kc.transpose(1, 2),
            vc.transpose(1, 2),
            lens,
            k,
            k.clone(),
            0.25,
            -1,
            0,
            None,
            0.0,
            None,
            None,
            ks.transpose(1, 2),
            vs.transpose(1, 2),
        ),
    )
