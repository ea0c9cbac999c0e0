"""Every CUDA kernel once on small inputs, forward and backward: the workload that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, initcheck, synccheck). Small on purpose:
the sanitizer slows kernels down by orders of magnitude. Prints 'ok' at the end."""

import os

os.environ.setdefault("FLASH_ATTN_EXT_CUDA_KERNELS", "1")

import torch  # noqa: E402

import flash_attn_ext  # noqa: E402

dev = "cuda"
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for D in (24, 64, 128, 256):
        q = torch.randn(2, 4, 37, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, 45, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 2, 45, D, device=dev, dtype=dtype, requires_grad=True)
        mask = torch.rand(2, 1, 37, 45, device=dev) > 0.2
        slopes = torch.rand(2, 4, device=dev)
        for kw in (
            dict(causal=True),
            dict(window_size=(7, 3)),
            dict(attn_mask=mask, dropout_p=0.2),
            dict(causal=True, softcap=2.0, alibi_slopes=slopes),
        ):
            out = flash_attn_ext.attention(q, k, v, **kw)
            out.float().square().sum().backward()

# the tensor-core kernels past one key tile with no mask: the double-buffered K/V prefetch and
# the unmasked (interior tile) path, which the 45-key cases above never reach at D=64/128
for dtype in (torch.float16, torch.bfloat16):
    for D in (64, 128):
        q, k, v = (torch.randn(1, 2, 200, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        for kw in (dict(), dict(causal=True)):
            out = flash_attn_ext.attention(q, k, v, **kw)
            out.float().square().sum().backward()

# packed varlen sequences (an empty one, one shorter than the others): forward and backward
from flash_attn_ext.flash_attn_interface import flash_attn_varlen_func  # noqa: E402

cu = torch.tensor([0, 5, 5, 38, 55], device=dev, dtype=torch.int32)
for dtype in (torch.float16, torch.float32):
    q = torch.randn(55, 4, 64, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(55, 2, 64, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(55, 2, 64, device=dev, dtype=dtype, requires_grad=True)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 33, 33, causal=True, window_size=(9, 0), softcap=3.0, dropout_p=0.1)
    out.float().square().sum().backward()

with torch.no_grad():
    B, H, S_max, D = 3, 2, 64, 64
    kc = torch.randn(B, S_max, H, D, device=dev, dtype=torch.float16)
    vc = torch.randn(B, S_max, H, D, device=dev, dtype=torch.float16)
    lens = torch.tensor([0, 17, 60], device=dev, dtype=torch.int32)
    q = torch.randn(B, 1, 8, D, device=dev, dtype=torch.float16)
    kn = torch.randn(B, 4, H, D, device=dev, dtype=torch.float16)
    vn = torch.randn(B, 4, H, D, device=dev, dtype=torch.float16)
    flash_attn_ext.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True)
    flash_attn_ext.kv_cache_append(
        kc,
        vc,
        torch.randn(B, 70, H, D, device=dev, dtype=torch.float16),
        torch.randn(B, 70, H, D, device=dev, dtype=torch.float16),
        lens,
        rolling=True,
    )
    oa, la = flash_attn_ext.attention(
        q.transpose(1, 2),
        kc.transpose(1, 2)[:, :, :32].repeat(1, 4, 1, 1)[:, :8],
        vc.transpose(1, 2)[:, :, :32].repeat(1, 4, 1, 1)[:, :8],
        return_lse=True,
    )
    flash_attn_ext.merge_attention_states(oa, la, oa, la)
    # the split-KV decode kernels with their combine step: 8 query rows per KV head, window
    kc2 = torch.randn(2, 600, 2, 128, device=dev, dtype=torch.bfloat16)
    vc2 = torch.randn(2, 600, 2, 128, device=dev, dtype=torch.bfloat16)
    q2 = torch.randn(2, 2, 8, 128, device=dev, dtype=torch.bfloat16)
    with flash_attn_ext.kernel_config(num_splits=3):
        flash_attn_ext.attention_with_kvcache(
            q2,
            kc2,
            vc2,
            cache_seqlens=torch.tensor([599, 300], device=dev, dtype=torch.int32),
            causal=True,
            window_size=(200, 0),
        )
    # device-checked calls (what a CUDA graph capture runs): the check kernel with a good, a
    # negative and a past-the-cache length, the skipping append, the poison kernel
    with flash_attn_ext.kernel_config(cuda_device_checks="require"):
        bad = torch.tensor([17, -3, 62], device=dev, dtype=torch.int64)
        flash_attn_ext.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=bad, causal=True)
        flash_attn_ext.kv_cache_append(kc, vc, kn, vn, bad, rolling=True)
    try:
        flash_attn_ext.check_kvcache_errors()
        raise AssertionError("the device-checked calls above must report their skipped sequences")
    except RuntimeError as e:
        assert "negative" in str(e), e
torch.cuda.synchronize()
print("ok")
