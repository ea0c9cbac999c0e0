"""patch_sdpa / unpatch_sdpa / sdpa_patched: stock PyTorch modules that call
torch.nn.functional.scaled_dot_product_attention run on this package's op while patched."""

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import flash_attn_ext

ORIGINAL = F.scaled_dot_product_attention


def _ran_our_op(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, any("flash_attn_ext::attention_forward" in e.name for e in prof.events())


def test_transformer_encoder_layer_and_multihead_attention_use_the_patch():
    torch.manual_seed(0)
    layer = (
        torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        .double()
        .train()
    )  # train: no fused fast path
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64, requires_grad=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10, dtype=torch.float64)

    stock, ours_used = _ran_our_op(lambda: layer(x, src_mask=causal, is_causal=True))
    assert not ours_used
    with flash_attn_ext.sdpa_patched():
        assert F.scaled_dot_product_attention is flash_attn_ext.scaled_dot_product_attention
        patched, ours_used = _ran_our_op(lambda: layer(x, src_mask=causal, is_causal=True))
        assert ours_used
        (g_patched,) = torch.autograd.grad(patched.sum(), x)
        attn, used_mha = _ran_our_op(lambda: mha(x, x, x, need_weights=False)[0])
        assert used_mha
    assert F.scaled_dot_product_attention is ORIGINAL
    (g_stock,) = torch.autograd.grad(stock.sum(), x)
    torch.testing.assert_close(patched, stock, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_patched, g_stock, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, mha(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-10)


def test_inference_fast_path_bypasses_the_patch():
    """What the README says of inference: in eval() under no_grad(), nn.MultiheadAttention and
    nn.TransformerEncoderLayer take PyTorch's fused fast path, which never calls SDPA, so the
    patch changes nothing there (float32: the fast path's dtypes)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 32)
    with flash_attn_ext.sdpa_patched(), torch.no_grad():
        _, used_layer = _ran_our_op(lambda: layer(x))
        _, used_mha = _ran_our_op(lambda: mha(x, x, x, need_weights=False)[0])
    assert not used_layer and not used_mha
    with flash_attn_ext.sdpa_patched():  # grad mode on: the same modules do call it
        _, used_mha = _ran_our_op(lambda: mha(x.requires_grad_(), x, x, need_weights=False)[0])
    assert used_mha


def test_patch_unpatch_and_nesting():
    flash_attn_ext.patch_sdpa()
    try:
        assert F.scaled_dot_product_attention is flash_attn_ext.scaled_dot_product_attention
        with flash_attn_ext.sdpa_patched():
            pass
        assert F.scaled_dot_product_attention is flash_attn_ext.scaled_dot_product_attention  # outer kept
    finally:
        flash_attn_ext.unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL
    q = torch.randn(1, 2, 5, 8)
    with flash_attn_ext.sdpa_patched():  # the fallback inside must not recurse into the patch
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, requires_grad=True))
    torch.testing.assert_close(out, ORIGINAL(q, q, q, attn_mask=torch.ones(5, 5)), rtol=1e-5, atol=1e-5)
