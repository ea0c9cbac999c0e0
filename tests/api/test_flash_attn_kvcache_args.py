"""The rest of flash-attn's API (issue 20, part 3): top-level exports, rotary embedding,
cache_batch_idx and cache_leftpad in flash_attn_with_kvcache, block_table in
flash_attn_varlen_func, RuntimeError-compatible errors, and the SDPA drop-in's refusal of key
and value of different lengths. Every result is checked against a float64 reference built here
from the definitions (rotation by complex multiplication, per-sequence attention on the keys
the arguments name), not against another path of the package."""

import math

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import flash_attn_interface as fai
from flash_attn_ext.rotary import apply_rotary_emb
from reference import LOW_PRECISION, assert_matches, reference_attention

NAMES = (
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
)


def test_flash_attn_names_at_top_level():
    for name in NAMES:
        assert getattr(flash_attn_ext, name) is getattr(fai, name), name
        assert name in flash_attn_ext.__all__
    from flash_attn_ext import flash_attn_func, flash_attn_with_kvcache  # noqa: F401  (flash-attn's import line)


def _rnd(*shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _rotary_tables(n, rotary_dim, seed, device="cpu"):
    angle = torch.rand(n, rotary_dim // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    angle = angle * 2 * math.pi
    return torch.cos(angle).float().to(device), torch.sin(angle).float().to(device)


def rotate64(x, cos, sin, positions, interleaved):
    """The definition: feature pairs as complex numbers times exp(i * angle) (float64).
    x (B, S, H, D), positions (B, S)."""
    x = x.double()
    rd = 2 * cos.shape[1]
    rot = torch.complex(cos.double(), sin.double())[positions].unsqueeze(2)  # (B, S, 1, rd / 2)
    xr = x[..., :rd]
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * rot
        rotated = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        z = torch.complex(xr[..., : rd // 2], xr[..., rd // 2 :]) * rot
        rotated = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rotated, x[..., rd:]), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_apply_rotary_emb_against_definition(interleaved, rotary_dim):
    x = _rnd(3, 7, 2, 16, seed=1)
    cos, sin = _rotary_tables(20, rotary_dim, seed=2)
    offsets = torch.tensor([0, 5, 13])
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    ref = rotate64(x, cos, sin, offsets[:, None] + torch.arange(7), interleaved)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    # the other pairing is a different rotation: the test can tell them apart
    other = rotate64(x, cos, sin, offsets[:, None] + torch.arange(7), not interleaved)
    assert (out.double() - other).abs().max() > 0.1
    with pytest.raises(ValueError, match="past cos/sin"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=14)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_emb(x, *_rotary_tables(20, 18, seed=3))


def _expected_attention(q, keys, values, lens, *, causal, window, dtype, alibi=None):
    """Per sequence b: attention of q[b] (L, Hq, D) to keys[b][:lens[b]] (bottom-right), float64
    and the input-dtype baseline. keys/values: lists of (S_b, Hkv, D) float64 tensors."""
    outs, lows = [], []
    w = (window[0], 0) if causal else window
    for b in range(q.shape[0]):
        qb = q[b : b + 1].transpose(1, 2)
        kb = keys[b][: lens[b]].unsqueeze(0).transpose(1, 2)
        vb = values[b][: lens[b]].unsqueeze(0).transpose(1, 2)
        a = None if alibi is None else alibi
        ref, _ = reference_attention(qb, kb, vb, window=w, bottom_right=True, alibi_slopes=a)
        low = (
            reference_attention(qb, kb, vb, window=w, bottom_right=True, alibi_slopes=a, dtype=dtype)[0]
            if dtype in LOW_PRECISION
            else ref
        )
        outs.append(ref.transpose(1, 2))
        lows.append(low.transpose(1, 2))
    return torch.cat(outs), torch.cat(lows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "L,causal,window,interleaved,rotary_dim,paged",
    [
        (1, True, (-1, -1), True, 16, False),  # decode
        (3, True, (-1, -1), False, 8, False),  # chunk: queries at their own positions
        (3, False, (-1, -1), True, 16, False),  # not causal: every query at cache_seqlens
        (4, False, (5, 1), False, 16, True),  # windowed counts as local: own positions; paged
    ],
)
def test_with_kvcache_rotary(device, dtype, L, causal, window, interleaved, rotary_dim, paged):
    B, S_max, Hq, Hkv, D, L_new = 3, 24, 4, 2, 16, L
    k_cache, v_cache = _rnd(B, S_max, Hkv, D, seed=4, dtype=dtype), _rnd(B, S_max, Hkv, D, seed=5, dtype=dtype)
    q, k, v = (_rnd(B, n, h, D, seed=s, dtype=dtype) for n, h, s in ((L, Hq, 6), (L_new, Hkv, 7), (L_new, Hkv, 8)))
    seqlens = torch.tensor([0, 9, 17], dtype=torch.int32)
    cos, sin = _rotary_tables(S_max, rotary_dim, seed=9)
    kc, vc = k_cache.clone().to(device), v_cache.clone().to(device)
    table = None
    if paged:  # blocks of 8 in a shuffled order
        order = torch.randperm(B * 3, generator=torch.Generator().manual_seed(10))
        table = order.view(B, 3).to(torch.int32)
        kc_p, vc_p = torch.empty(B * 3, 8, Hkv, D, dtype=dtype), torch.empty(B * 3, 8, Hkv, D, dtype=dtype)
        kc_p[order] = k_cache.reshape(B * 3, 8, Hkv, D)
        vc_p[order] = v_cache.reshape(B * 3, 8, Hkv, D)
        kc, vc, table = kc_p.to(device), vc_p.to(device), table.to(device)
    out = fai.flash_attn_with_kvcache(
        q.to(device),
        kc,
        vc,
        k.to(device),
        v.to(device),
        rotary_cos=cos.to(device),
        rotary_sin=sin.to(device),
        cache_seqlens=seqlens.to(device),
        block_table=table,
        causal=causal,
        window_size=window,
        rotary_interleaved=interleaved,
    )
    pos_k = seqlens.long()[:, None] + torch.arange(L_new)
    per_position = causal or window != (-1, -1)
    pos_q = seqlens.long()[:, None] + (torch.arange(L) if per_position else torch.zeros(L, dtype=torch.long))
    k_rot = rotate64(k, cos, sin, pos_k, interleaved)
    q_rot = rotate64(q, cos, sin, pos_q, interleaved)
    keys, values = [], []
    for b in range(B):
        n = int(seqlens[b])
        keys.append(torch.cat([k_cache[b, :n].double(), k_rot[b]]))
        values.append(torch.cat([v_cache[b, :n].double(), v[b].double()]))
    # the cache now holds the rotated keys (rounded once to the dtype) and the plain values
    got_k = kc.cpu() if not paged else kc.cpu()[table.cpu()].reshape(B, S_max, Hkv, D)
    got_v = vc.cpu() if not paged else vc.cpu()[table.cpu()].reshape(B, S_max, Hkv, D)
    ulp = 2e-6 if dtype == torch.float32 else 2**-7
    for b in range(B):
        n = int(seqlens[b])
        new_k = got_k[b, n : n + L_new].double()
        assert ((new_k - k_rot[b]).abs() <= ulp * k_rot[b].abs().clamp(min=1)).all(), "rotated keys in the cache"
        assert torch.equal(got_v[b, n : n + L_new], v[b]) and torch.equal(got_k[b, :n], k_cache[b, :n])
    ref, low = _expected_attention(
        q_rot.to(dtype), keys, values, [int(s) + L_new for s in seqlens], causal=causal, window=window, dtype=dtype
    )
    assert_matches(out.cpu(), ref, low, dtype, "flash_attn_with_kvcache(rotary)")


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("leftpad", [False, True])
@pytest.mark.parametrize("batch_idx", [False, True])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (6, 0))])
def test_with_kvcache_batch_idx_and_leftpad(device, rotary, paged, leftpad, batch_idx, causal, window):
    """cache_batch_idx / cache_leftpad, paged or not, with rotary too (rotated at the absolute
    cache positions, cache_leftpad or not, as flash-attn): the cache holds what the arguments
    say afterwards (read back from the device) and the output is attention over those keys."""
    if not (leftpad or batch_idx):
        pytest.skip("neither argument: covered by the KV-cache op tests")
    B, B_cache, S_max, Hq, Hkv, D, L, L_new = 3, 5, 32, 4, 2, 16, 2, 2
    k_cache, v_cache = _rnd(B_cache, S_max, Hkv, D, seed=11), _rnd(B_cache, S_max, Hkv, D, seed=12)
    q, k, v = _rnd(B, L, Hq, D, seed=13), _rnd(B, L_new, Hkv, D, seed=14), _rnd(B, L_new, Hkv, D, seed=15)
    seqlens = torch.tensor([12, 0, 29], dtype=torch.int32)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32) if batch_idx else None
    pad = torch.tensor([5, 0, 13], dtype=torch.int32) if leftpad else None
    rows = idx.long() if batch_idx else torch.arange(B)
    kc, vc, table = k_cache.clone(), v_cache.clone(), None
    if paged:  # each cache row as 4 blocks of 8, blocks shuffled; block_table has B_cache rows
        order = torch.randperm(B_cache * 4, generator=torch.Generator().manual_seed(16))
        kc, vc = torch.empty(B_cache * 4, 8, Hkv, D), torch.empty(B_cache * 4, 8, Hkv, D)
        kc[order] = k_cache.reshape(B_cache * 4, 8, Hkv, D)
        vc[order] = v_cache.reshape(B_cache * 4, 8, Hkv, D)
        table = order.view(B_cache, 4).to(torch.int32)
        if not batch_idx:
            table = table[:B].contiguous()
    cos, sin = _rotary_tables(S_max, 8, seed=17) if rotary else (None, None)
    on = lambda t: None if t is None else t.to(device)
    kc_dev, vc_dev = kc.to(device), vc.to(device)  # (on the CPU the same tensors)
    out, lse = fai.flash_attn_with_kvcache(
        q.to(device),
        kc_dev,
        vc_dev,
        k.to(device),
        v.to(device),
        rotary_cos=on(cos),
        rotary_sin=on(sin),
        cache_seqlens=seqlens.to(device),
        cache_batch_idx=on(idx),
        cache_leftpad=on(pad),
        block_table=on(table),
        causal=causal,
        window_size=window,
        rotary_interleaved=False,
        return_softmax_lse=True,
    )
    base = seqlens.long()[:, None]
    k_new, q_rot = k.double(), q.double()
    if rotary:
        k_new = rotate64(k, cos, sin, base + torch.arange(L_new), False)
        q_rot = rotate64(q, cos, sin, base + torch.arange(L), False)  # causal or windowed: own positions
        if not causal and window == (-1, -1):
            q_rot = rotate64(q, cos, sin, base.expand(B, L), False)
    # what the cache must hold afterwards: the new tokens at [seqlens, seqlens + L_new) of row rows[b]
    exp_k, exp_v = k_cache.double(), v_cache.clone()
    for b in range(B):
        n = int(seqlens[b])
        exp_k[rows[b], n : n + L_new] = k_new[b]
        exp_v[rows[b], n : n + L_new] = v[b]
    got_k, got_v = kc_dev.cpu(), vc_dev.cpu()
    if paged:
        got_k = got_k[order].reshape(B_cache, S_max, Hkv, D)
        got_v = got_v[order].reshape(B_cache, S_max, Hkv, D)
    torch.testing.assert_close(got_k.double(), exp_k, rtol=0, atol=2e-6 if rotary else 0)
    assert torch.equal(got_v, exp_v), "the append wrote where the arguments say"
    start = pad.long() if leftpad else torch.zeros(B, dtype=torch.long)
    keys = [exp_k[rows[b], start[b] :] for b in range(B)]
    values = [exp_v[rows[b], start[b] :].double() for b in range(B)]
    lens = [int(seqlens[b]) + L_new - int(start[b]) for b in range(B)]
    ref, low = _expected_attention(q_rot, keys, values, lens, causal=causal, window=window, dtype=torch.float32)
    assert_matches(out.cpu(), ref, low, torch.float32, "flash_attn_with_kvcache(cache_batch_idx / cache_leftpad)")
    assert lse.shape == (B, Hq, L)


def test_leftpad_decode_matches_the_unpadded_cache():
    """Left-padded batched decode (what transformers' generate does with a left-padded prompt):
    each sequence's output equals attention against its unpadded keys alone."""
    B, S_max, H, D = 2, 16, 2, 8
    kc, vc = _rnd(B, S_max, H, D, seed=17), _rnd(B, S_max, H, D, seed=18)
    q = _rnd(B, 1, H, D, seed=19)
    pad, seqlens = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([10, 10], dtype=torch.int32)
    with torch.no_grad():
        out = flash_attn_ext.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, cache_leftpad=pad, causal=True)
        alone = flash_attn_ext.flash_attn_with_kvcache(q[:1], kc[:1, 3:], vc[:1, 3:], cache_seqlens=7, causal=True)
        padded_in = flash_attn_ext.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True)
    torch.testing.assert_close(out[:1], alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1:], padded_in[1:], rtol=0, atol=0)
    assert (out[:1] - padded_in[:1]).abs().max() > 1e-3  # the padding keys would have changed it


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(cache_leftpad=torch.tensor([0, 11], dtype=torch.int32)), ValueError, r"cache_leftpad\[1\] = 11"),
        (dict(cache_leftpad=torch.tensor([0, -1], dtype=torch.int32)), ValueError, r"cache_leftpad\[1\] = -1"),
        (dict(cache_leftpad=torch.zeros(3, dtype=torch.int32)), ValueError, r"cache_leftpad must have shape \(2,\)"),
        (dict(cache_leftpad=torch.zeros(2)), TypeError, r"cache_leftpad must be int32"),
        (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError, r"cache_batch_idx entries"),
        (dict(cache_batch_idx=torch.tensor([0, -1], dtype=torch.int32)), ValueError, r"cache_batch_idx entries"),
        (dict(cache_batch_idx=[0, 1]), TypeError, r"cache_batch_idx must be a torch.Tensor"),
        (dict(rotary_cos=torch.ones(32, 4)), ValueError, r"both rotary_cos and rotary_sin"),
        (dict(rotary_cos=torch.ones(31, 4), rotary_sin=torch.ones(31, 4)), ValueError, r"31 rows, fewer"),
        (dict(rotary_cos=torch.ones(32, 9), rotary_sin=torch.ones(32, 9)), ValueError, r"rotary_dim 18"),
    ],
)
def test_bad_new_arguments_raise_before_writing(kw, exc, match):
    B, S_max, H, D = 2, 32, 2, 16
    kc, vc = torch.zeros(B, S_max, H, D), torch.zeros(B, S_max, H, D)
    kn, vn = torch.ones(B, 1, H, D), torch.ones(B, 1, H, D)
    with torch.no_grad(), pytest.raises(exc, match=match) as info:
        fai.flash_attn_with_kvcache(
            torch.ones(B, 1, 4, D), kc, vc, kn, vn, cache_seqlens=torch.tensor([3, 10], dtype=torch.int32), **kw
        )
    assert isinstance(info.value, RuntimeError), "flash-attn's users catch RuntimeError"
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0, "a rejected call wrote to the cache"


def test_paged_cache_past_its_block_table_names_block_table():
    """flash-attn's own test: a paged cache asked past its block table's capacity raises
    RuntimeError matching "block_table"."""
    kp, vp = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="block_table") as info:
        fai.flash_attn_with_kvcache(
            torch.ones(2, 1, 2, 8),
            kp,
            vp,
            torch.ones(2, 3, 2, 8),
            torch.ones(2, 3, 2, 8),
            cache_seqlens=torch.tensor([4, 30], dtype=torch.int32),
            block_table=table,
        )
    assert isinstance(info.value, ValueError)  # and what the rest of the package raises
    assert "sequence 1 needs 33 positions" in str(info.value)
    assert kp.abs().sum() == 0


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2))])
def test_varlen_func_with_block_table(device, causal, window):
    lens_k = [9, 4, 6]  # query lengths 3, 1, 6
    Hq, Hkv, D, bs, bps = 4, 2, 16, 4, 3
    cu_q = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13, 19], dtype=torch.int32)
    q = _rnd(10, Hq, D, seed=20)
    kp, vp = _rnd(12, bs, Hkv, D, seed=21), _rnd(12, bs, Hkv, D, seed=22)
    table = torch.randperm(12, generator=torch.Generator().manual_seed(23))[:9].view(3, bps).to(torch.int32)
    with torch.no_grad():
        out, lse, _ = fai.flash_attn_varlen_func(
            q.to(device),
            kp.to(device),
            vp.to(device),
            cu_q.to(device),
            cu_k.to(device),
            6,
            9,
            causal=causal,
            window_size=window,
            block_table=table.to(device),
            return_attn_probs=True,
        )
    assert out.shape == q.shape and lse.shape == (Hq, 10)
    keys = [kp[table[b].long()].reshape(bps * bs, Hkv, D).double() for b in range(3)]
    values = [vp[table[b].long()].reshape(bps * bs, Hkv, D).double() for b in range(3)]
    for b in range(3):
        qb = q[cu_q[b] : cu_q[b + 1]].unsqueeze(0)
        ref, low = _expected_attention(
            qb, [keys[b]], [values[b]], [lens_k[b]], causal=causal, window=window, dtype=torch.float32
        )
        assert_matches(out[cu_q[b] : cu_q[b + 1]].unsqueeze(0).cpu(), ref, low, torch.float32, f"sequence {b}")
        w = (window[0], 0) if causal else window
        _, ref_lse = reference_attention(
            qb.transpose(1, 2),
            keys[b][: lens_k[b]].unsqueeze(0).transpose(1, 2),
            values[b][: lens_k[b]].unsqueeze(0).transpose(1, 2),
            window=w,
            bottom_right=True,
        )
        torch.testing.assert_close(lse[:, cu_q[b] : cu_q[b + 1]].cpu().double(), ref_lse[0], rtol=1e-5, atol=1e-5)
    # inputs requiring grad: the forward is computed (as flash-attn), the backward raises
    out_grad = fai.flash_attn_varlen_func(q.clone().requires_grad_(), kp, vp, cu_q, cu_k, 6, 9, block_table=table)
    with pytest.raises(NotImplementedError, match="forward-only"):
        out_grad.sum().backward()
    with torch.no_grad(), pytest.raises(ValueError, match="max_seqlen_q = 5"):
        fai.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 5, 9, block_table=table)
    with torch.no_grad(), pytest.raises(RuntimeError, match="block_table"):
        fai.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 6, 9, block_table=table[:, :2])


def test_sdpa_dropin_refuses_key_value_length_mismatch():
    """PyTorch's CPU flash kernel accepts key and value of different lengths and reads past the
    end of value; the drop-in raises PyTorch's math-path error instead of handing it the call."""
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 10, 16), torch.randn(2, 4, 12, 16)
    for value in (v, v[:, :, :7]):
        with pytest.raises(RuntimeError, match="Expected size for first two dimensions of batch2 tensor"):
            flash_attn_ext.scaled_dot_product_attention(q, k, value)
        with flash_attn_ext.sdpa_patched(), pytest.raises(RuntimeError, match="batch2"):
            torch.nn.functional.scaled_dot_product_attention(q, k, value, is_causal=True)
    assert sum(flash_attn_ext.fallback_counts().values()) == 0
