"""The float64 reference of SPEC.md section 6 and the tolerance rule every kernel test uses.

reference_attention is plain softmax(scale * Q K^T + mask) V with an explicit (L, S)
visibility matrix, K/V repeated per query head (tests only; the kernels never do that).
"""
import math

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def visibility(len_q, len_k, window_left=-1, window_right=-1, bottom_right=True, device="cpu"):
    """SPEC.md section 2: key j visible to query i iff i + o - left <= j <= i + o + right."""
    o = len_k - len_q if bottom_right else 0
    i = torch.arange(len_q, device=device).unsqueeze(-1) + o
    j = torch.arange(len_k, device=device)
    vis = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        vis &= j >= i - window_left
    if window_right >= 0:
        vis &= j <= i + window_right
    return vis


def reference_attention(q, k, v, *, scale=None, window=(-1, -1), bottom_right=True,
                        attn_mask=None, keep=None, dropout_p=0.0, softcap=0.0, alibi_slopes=None,
                        dtype=torch.float64):
    """Returns (out, lse), computed in `dtype` (float64 for the reference, the input dtype
    for the low-precision baseline). keep: the dropout keep-mask (B, Hq, L, S) to apply.
    softcap > 0: scores become softcap * tanh(score / softcap) before the mask. alibi_slopes
    ((Hq,) or (B, Hq)): score (b, h, i, j) gains -slope * |i + o - j|."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    s = (q * scale) @ k.transpose(-1, -2) if dtype in LOW_PRECISION else scale * (q @ k.transpose(-1, -2))
    if S == 0:  # no key at all: zero rows, lse -inf (differentiable, all-zero gradients)
        zero = 0 * q.sum() + 0 * k.sum() + 0 * v.sum()
        return (torch.zeros(B, Hq, L, v.shape[-1], dtype=dtype, device=q.device) + zero,
                torch.full((B, Hq, L), float("-inf"), dtype=dtype, device=q.device))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        o = S - L if bottom_right else 0
        dist = (torch.arange(L, device=q.device).unsqueeze(-1) + o - torch.arange(S, device=q.device)).abs()
        slopes = alibi_slopes.to(dtype).reshape(-1 if alibi_slopes.dim() == 2 else 1, Hq, 1, 1)
        s = s - slopes * dist.to(dtype)
    vis = visibility(L, S, window[0], window[1], bottom_right, q.device).expand(B, Hq, L, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            s = s + attn_mask.to(dtype)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    p = torch.where(l > 0, p / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(p))
    lse = torch.where(l > 0, m + torch.log(torch.where(l > 0, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf"))).squeeze(-1)
    if keep is not None:
        p = p * keep.to(dtype) / (1.0 - dropout_p)
    return p @ v, lse


def error_bound(ref64: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype) -> float:
    """SPEC.md section 6: float32 -> 1e-4 scaled to the output's magnitude; float16/bfloat16
    -> twice the input-dtype reference's error plus a small epsilon; float64 -> 1e-10.

    The epsilon is one unit in the last place of the dtype at the output's magnitude: two
    roundings no such kernel avoids, that of the stored result and that of P (or dS) before
    its low-precision product, as flash-attn's kernels round them. Without it a short case whose
    input-dtype reference happens to round luckily sets a bound below those two roundings
    (hypothesis found bf16 dV with S=2: 3.2e-3 against a bound of 2.6e-3 at magnitude 0.8)."""
    mag = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    if dtype == torch.float64:
        return 1e-10 * mag
    if dtype == torch.float32:
        return 1e-4 * mag
    base = (ref_lowp.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # at 1: bf16 keeps 8 significant bits, fp16 11
    return 2.0 * base + ulp * mag


def assert_matches(ours: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                   dtype: torch.dtype, what: str) -> None:
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ours).any(), f"{what}: NaN in output"
    if ours.numel() == 0:
        return
    err = (ours.double() - ref64).abs().max().item()
    bound = error_bound(ref64, ref_lowp, dtype)
    assert err <= bound, f"{what}: max abs error {err:.3e} > bound {bound:.3e} ({dtype})"


def make_qkv(B, Hq, Hkv, L, S, D, dtype, device="cpu", Dv=None, layout="bhld", seed=0,
             requires_grad=False):
    """Fresh random inputs. layout 'blhd' returns transposed views of (B, L, H, D) storage
    (non-contiguous, as flash-attn callers pass them); 'sliced' returns views into wider
    tensors (row stride > D)."""
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv

    def rnd(h, n, d):
        if layout == "blhd":
            t = torch.randn(B, n, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        elif layout == "sliced":
            t = torch.randn(B, h, n, d + 7, generator=g, dtype=torch.float64).to(dtype)[..., 3:3 + d]
        else:
            t = torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype)
        t = t.to(device)
        if requires_grad:
            t.requires_grad_(True)
        return t

    return rnd(Hq, L, D), rnd(Hkv, S, D), rnd(Hkv, S, Dv)
