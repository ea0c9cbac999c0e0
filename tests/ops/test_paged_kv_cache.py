"""Paged KV cache (block_table, vLLM / flash-attn style): append and attention through a block
table equal the same calls on a contiguous cache holding the same positions, and the float64
reference; bad tables raise before anything is written."""

import pytest
import torch

import flash_attn_ext
from test_attention_kvcache import _check


def _paged_copy(kc, vc, block_size, seed=0, spare=3):
    """Scatters a contiguous (B, S_max, H, D) cache into shuffled blocks of a paged cache
    (num_blocks, block_size, H, D) (a few spare NaN blocks too); returns (kp, vp, table)."""
    B, S_max, H, D = kc.shape
    per_seq = -(-S_max // block_size)
    n_blocks = B * per_seq + spare
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_blocks, generator=g)[: B * per_seq].view(B, per_seq).to(torch.int32)
    kp = torch.full((n_blocks, block_size, H, D), float("nan"), dtype=kc.dtype, device=kc.device)
    vp = kp.clone()
    for b in range(B):
        for blk in range(per_seq):
            lo, hi = blk * block_size, min(S_max, (blk + 1) * block_size)
            kp[order[b, blk], : hi - lo] = kc[b, lo:hi]
            vp[order[b, blk], : hi - lo] = vc[b, lo:hi]
    return kp, vp, order.to(kc.device)


@pytest.mark.parametrize("block_size", [16, 48, 256])
@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 4)])
@pytest.mark.parametrize("decode_path", ["require", "off"])
def test_paged_attention_equals_contiguous(device, kernel_settings, block_size, L, Hq, Hkv, decode_path):
    if decode_path == "require" and L * (Hq // Hkv) > 8:
        pytest.skip(
            "more query rows per KV head than the CPU decode kernel serves (kMaxDecodeRows = 8): "
            "the general kernel ('off') serves this case"
        )
    kernel_settings(cpu_decode=decode_path)
    B, S_max, D = 3, 256, 32
    g = torch.Generator().manual_seed(block_size + L)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().to(device)  # noqa: E731
    q, kc, vc = rnd(B, L, Hq, D), rnd(B, S_max, Hkv, D), rnd(B, S_max, Hkv, D)
    kn, vn = rnd(B, L, Hkv, D), rnd(B, L, Hkv, D)
    lens = torch.tensor([0, 100, S_max - L], dtype=torch.int32, device=device)
    kp, vp, table = _paged_copy(kc, vc, block_size)
    with torch.no_grad():
        ref_out, ref_lse = flash_attn_ext.attention_with_kvcache(
            q, kc, vc, kn, vn, cache_seqlens=lens, causal=True, window_size=(63, 0), return_softmax_lse=True
        )
        out, lse = flash_attn_ext.attention_with_kvcache(
            q,
            kp,
            vp,
            kn,
            vn,
            cache_seqlens=lens,
            causal=True,
            window_size=(63, 0),
            return_softmax_lse=True,
            block_table=table,
        )
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    _check(out, lse, q, kc, vc, (lens + L).tolist(), (63, 0), torch.float32)  # kc, vc were appended to
    # The appended rows landed in their blocks; spare blocks are untouched (still NaN).
    for b, n in enumerate(lens.tolist()):
        for t in range(L):
            pos = n + t
            assert torch.equal(kp[table[b, pos // block_size], pos % block_size], kn[b, t])
            assert torch.equal(vp[table[b, pos // block_size], pos % block_size], vn[b, t])
    used = set(table.flatten().tolist())
    spare = [i for i in range(kp.shape[0]) if i not in used]
    assert spare and torch.isnan(kp[spare]).all() and torch.isnan(vp[spare]).all()


def test_paged_append_bhsd_layout_and_splits(device, kernel_settings):
    kernel_settings(num_splits=3)
    B, H, D, bs, per_seq = 2, 2, 16, 16, 4
    kp = torch.randn(B * per_seq, H, bs, D, device=device)  # positions before cache_seqlens hold data
    vp = torch.randn(B * per_seq, H, bs, D, device=device)
    table = torch.arange(B * per_seq, dtype=torch.int32, device=device).flip(0).view(B, per_seq)
    lens = torch.tensor([0, 10], dtype=torch.int32, device=device)
    kn, vn = torch.randn(B, H, 40, D, device=device), torch.randn(B, H, 40, D, device=device)
    flash_attn_ext.kv_cache_append(kp, vp, kn, vn, lens, layout="bhsd", block_table=table)
    for b in range(B):
        for t in range(40):
            pos = lens[b].item() + t
            assert torch.equal(kp[table[b, pos // bs], :, pos % bs], kn[b, :, t])
    q = torch.randn(B, 4, 1, D, device=device)
    with torch.no_grad():
        out = flash_attn_ext.attention_with_kvcache(
            q, kp, vp, cache_seqlens=lens + 40, causal=True, layout="bhsd", block_table=table
        )
    kc = torch.stack([torch.cat([kp[table[b, i]] for i in range(per_seq)], dim=1) for b in range(B)])
    vc = torch.stack([torch.cat([vp[table[b, i]] for i in range(per_seq)], dim=1) for b in range(B)])
    with torch.no_grad():
        ref = flash_attn_ext.attention_with_kvcache(q, kc, vc, cache_seqlens=lens + 40, causal=True, layout="bhsd")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t: t.to(torch.int64), "block_table must be int32"),
        (lambda t: t[:1], "block_table must have shape"),
        (lambda t: t.flatten(), "must be 2-D"),
        (lambda t: torch.where(t == t[1, 0], torch.full_like(t, 99), t), r"block_table\[1, 0\] = 99"),
        (lambda t: torch.where(t == t[1, 1], torch.full_like(t, -1), t), r"block_table\[1, 1\] = -1"),
        (lambda t: t[:, :1], r"sequence 1 needs 19 positions .* block_table gives 1 blocks of 16"),
    ],
)
def test_bad_block_table_raises_before_writing(make, match):
    B, H, D, bs = 2, 2, 8, 16
    kp, vp = torch.zeros(6, bs, H, D), torch.zeros(6, bs, H, D)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([3, 17], dtype=torch.int32)
    kn, vn = torch.ones(B, 2, H, D), torch.ones(B, 2, H, D)
    for call in (
        lambda: flash_attn_ext.kv_cache_append(kp, vp, kn, vn, lens, block_table=make(table)),
        lambda: flash_attn_ext.attention_with_kvcache(
            torch.ones(B, 1, 4, D), kp, vp, kn, vn, cache_seqlens=lens, block_table=make(table)
        ),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            with torch.no_grad():
                call()
        assert kp.abs().sum() == 0 and vp.abs().sum() == 0, "a rejected call wrote to the cache"


def test_paged_and_rolling_is_an_error():
    kp = torch.zeros(4, 16, 2, 8)
    with pytest.raises(ValueError, match="cannot also be rolling"):
        flash_attn_ext.kv_cache_append(
            kp,
            kp.clone(),
            torch.ones(1, 1, 2, 8),
            torch.ones(1, 1, 2, 8),
            torch.tensor([0]),
            rolling=True,
            block_table=torch.zeros(1, 4, dtype=torch.int32),
        )


def test_opcheck_paged(device):
    kp, vp = torch.randn(6, 2, 16, 8, device=device), torch.randn(6, 2, 16, 8, device=device)
    table = torch.tensor([[5, 0, 3], [1, 2, 4]], dtype=torch.int32, device=device)
    lens = torch.tensor([3, 30], dtype=torch.int32, device=device)
    kn, vn = torch.randn(2, 2, 2, 8, device=device), torch.randn(2, 2, 2, 8, device=device)
    torch.library.opcheck(torch.ops.flash_attn_ext.kv_cache_append, (kp, vp, kn, vn, lens, False, table))
    q = torch.randn(2, 4, 2, 8, device=device)
    torch.library.opcheck(torch.ops.flash_attn_ext.attention_kvcache, (q, kp, vp, lens, kn, vn, 8**-0.5, -1, 0, table))
