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


def _scores(q, k, scale, window, bottom_right, attn_mask, softcap, alibi_slopes):
    """Scaled scores with softcap, ALiBi and the mask applied (-inf where invisible), in q's
    dtype; and the softcap slope d(capped)/d(raw) (None without softcap). k is repeated per
    query head already."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    s = scale * (q @ k.transpose(-1, -2))
    slope = None
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
        slope = 1 - (s / softcap) ** 2
    if alibi_slopes is not None:
        o = S - L if bottom_right else 0
        dist = (torch.arange(L, device=q.device).unsqueeze(-1) + o - torch.arange(S, device=q.device)).abs()
        slopes = alibi_slopes.to(q.dtype).reshape(-1 if alibi_slopes.dim() == 2 else 1, Hq, 1, 1)
        s = s - slopes * dist.to(q.dtype)
    vis = visibility(L, S, window[0], window[1], bottom_right, q.device).expand(B, Hq, L, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            s = s + attn_mask.to(q.dtype)
    return s.masked_fill(~vis, float("-inf")), slope


def _sink_column(s, sinks):
    """The sink logits (Hq,) as one more score column of s (B, Hq, L, S), in s's dtype."""
    B, Hq, L, _ = s.shape
    return sinks.to(s.dtype).view(1, Hq, 1, 1).expand(B, Hq, L, 1)


def _softmax_parts(s, sinks=None):
    """exp(s - m) with m the row max (0 for rows that see nothing), the row sum l, and the lse.
    sinks ((Hq,)): a sink logit joins every row (in m, l and the lse) without a column of e."""
    full = s if sinks is None else torch.cat((s, _sink_column(s, sinks)), dim=-1)
    m = full.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    if sinks is not None:
        l = l + torch.exp(_sink_column(s, sinks) - m)
    safe_l = torch.where(l > 0, l, torch.ones_like(l))
    lse = torch.where(l > 0, m + torch.log(safe_l), torch.full_like(l, float("-inf"))).squeeze(-1)
    return e, l, safe_l, lse


class _KernelRounding(torch.autograd.Function):
    """Attention in float32 that rounds where the low-precision kernels round, the input-dtype
    baseline of SPEC.md section 6: scores, softmax and every sum in float32 (as the kernels keep
    them), the unnormalised probabilities P rounded to `dtype` before P V, and in the backward
    (flash-attn's algorithm) delta = rowsum(dO * O) from the output as stored (rounded), P
    rounded before P^T dO and dS rounded before dS K and dS^T Q; a gradient into the lse enters
    dS as P * dlse (delta - dlse in place of delta, as the kernels fold it). The caller rounds the output
    and the gradients to `dtype` once (the .to() around this function)."""

    @staticmethod
    def forward(
        ctx, q, k, v, scale, window, bottom_right, attn_mask, softcap, alibi_slopes, keep, dropout_p, dtype, sinks
    ):
        s, slope = _scores(q, k, scale, window, bottom_right, attn_mask, softcap, alibi_slopes)
        e, l, safe_l, lse = _softmax_parts(s, sinks)
        keep_scale = 1.0 / (1.0 - dropout_p)
        pe = e if keep is None else e * keep.to(e.dtype)
        out = (pe.to(dtype).float() @ v) * torch.where(l > 0, keep_scale / safe_l, torch.zeros_like(l))
        ctx.save_for_backward(q, k, v, lse, out.to(dtype).float(), keep, slope, attn_mask, alibi_slopes)
        ctx.args = (scale, window, bottom_right, softcap, dropout_p, dtype)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, lse, out_stored, keep, _slope, attn_mask, alibi_slopes = ctx.saved_tensors
        scale, window, bottom_right, softcap, dropout_p, dtype = ctx.args
        s, slope = _scores(q, k, scale, window, bottom_right, attn_mask, softcap, alibi_slopes)
        finite = torch.isfinite(lse).unsqueeze(-1)
        p = torch.where(
            finite,
            torch.exp(s - torch.where(finite, lse.unsqueeze(-1), torch.zeros_like(s[..., :1]))),
            torch.zeros_like(s),
        )
        keep_scale = 1.0 / (1.0 - dropout_p)
        p_used = p if keep is None else p * keep.to(p.dtype)
        dv = keep_scale * (p_used.to(dtype).float().transpose(-1, -2) @ dout)
        dp = dout @ v.transpose(-1, -2)
        if keep is not None:
            dp = dp * keep.to(dp.dtype) * keep_scale
        delta = (dout * out_stored).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse.unsqueeze(-1)
        ds = p * (dp - delta)
        # The mask and ALiBi are added after the cap: their gradients are dS before its slope,
        # in float32 (autograd sums the mask's over its broadcast dims and rounds it to its dtype).
        dmask = ds if attn_mask is not None and ctx.needs_input_grad[6] else None
        dslopes = None
        if alibi_slopes is not None and ctx.needs_input_grad[8]:
            B, Hq, L, S = ds.shape
            o = S - L if bottom_right else 0
            dist = (torch.arange(L, device=ds.device).unsqueeze(-1) + o - torch.arange(S, device=ds.device)).abs()
            dslopes = -(ds * dist.to(ds.dtype)).sum((-1, -2))  # (B, Hq)
            dslopes = dslopes.sum(0) if alibi_slopes.dim() == 1 else dslopes
        if slope is not None:
            ds = ds * slope
        ds = ds.to(dtype).float()
        dq = scale * (ds @ k)
        dk = scale * (ds.transpose(-1, -2) @ q)
        # (no gradient for sinks here: the sink gradients are checked in float32 / float64)
        return dq, dk, dv, None, None, None, dmask, None, dslopes, None, None, None, None


def reference_attention(
    q,
    k,
    v,
    *,
    scale=None,
    window=(-1, -1),
    bottom_right=True,
    attn_mask=None,
    keep=None,
    dropout_p=0.0,
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
    dtype=torch.float64,
):
    """Returns (out, lse). dtype float64: the reference, plain softmax(scale * Q K^T + mask) V,
    differentiable by autograd. dtype float16/bfloat16: the input-dtype baseline, computed as the
    kernels round (_KernelRounding), the output rounded to dtype and its lse float32.
    keep: the dropout keep-mask (B, Hq, L, S) to apply. softcap > 0: scores become
    softcap * tanh(score / softcap) before the mask. alibi_slopes ((Hq,) or (B, Hq)): score
    (b, h, i, j) gains -slope * |i + o - j|. sinks ((Hq,)): learned attention sinks, a logit per
    head in every row's softmax denominator with a zero value (differentiable in float64)."""
    work = torch.float32 if dtype in LOW_PRECISION else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if S == 0 and sinks is None:  # no key at all: zero rows, lse -inf (differentiable, all-zero gradients)
        zero = 0 * q.sum() + 0 * k.sum() + 0 * v.sum()
        return (
            (torch.zeros(B, Hq, L, v.shape[-1], dtype=work, device=q.device) + zero).to(dtype),
            torch.full((B, Hq, L), float("-inf"), dtype=work, device=q.device),
        )
    if dtype in LOW_PRECISION:
        out, lse = _KernelRounding.apply(
            q, k, v, scale, window, bottom_right, attn_mask, softcap, alibi_slopes, keep, dropout_p, dtype, sinks
        )
        return out.to(dtype), lse
    s, _ = _scores(q, k, scale, window, bottom_right, attn_mask, softcap, alibi_slopes)
    e, l, safe_l, lse = _softmax_parts(s, None if sinks is None else sinks.to(work))
    p = torch.where(l > 0, e / safe_l, torch.zeros_like(e))
    if keep is not None:
        p = p * keep.to(dtype) / (1.0 - dropout_p)
    return p @ v, lse


def _ulp(dtype):
    return 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # at 1: bf16 keeps 8 significant bits, fp16 11


def error_bound(ref64: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype) -> float:
    """SPEC.md section 6: float32 -> 1e-4 scaled to the output's magnitude (at least 1);
    float16/bfloat16 -> twice the max error of the input-dtype baseline (reference_attention
    with dtype=..., which rounds as the kernels do) plus a small epsilon; float64 -> 1e-10.

    The epsilon is one unit in the last place of the dtype at the output's own magnitude (not
    at least 1: small outputs get small bounds): the kernels round P at their running max, tile
    by tile, where the baseline rounds it at the row's final max, so the two roundings differ
    by up to that much even when the baseline happens to round luckily. A floor of 2^-16 (at
    least 1) covers outputs whose reference is exactly 0 (a gradient through one key, where
    dS = P (dP - delta) cancels): there the kernels and the baseline sum the same float32 terms,
    of magnitude up to the head dim, in different orders (hypothesis: 7e-6 at D=128, scale 1).
    It is 1/256 of a bfloat16 ulp at 1 and 1/32 of a float16 one: no rounding mistake hides in it."""
    if dtype == torch.float64:
        return 1e-10 * (max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0)
    if dtype == torch.float32:
        return 1e-4 * (max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0)
    mag = ref64.abs().max().item() if ref64.numel() else 0.0
    base = (ref_lowp.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    return 2.0 * base + _ulp(dtype) * mag + 2.0**-16 * max(1.0, mag)


def scale_bias(ours: torch.Tensor, ref64: torch.Tensor) -> float:
    """The systematic relative error of `ours`: the c of ours ~ (1 + c) ref that fits best,
    <ours - ref, ref> / <ref, ref>. Round-to-nearest leaves c at the noise level (~ulp / sqrt(n));
    a rounding by truncation, a lost key or a wrong scale moves it by a whole fraction of an ulp,
    which a max-error bound of several ulps cannot see."""
    r = ref64.double().flatten()
    den = (r * r).sum().item()
    return ((ours.double().flatten() - r) * r).sum().item() / den if den > 0 else 0.0


def bias_bound(ref64: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype, sigmas: float = 6.0) -> float:
    """Twice the baseline's |scale_bias| plus the noise floor of unbiased rounding: were the
    errors e_i independent draws, scale_bias would scatter by sqrt(sum e_i^2 r_i^2) / sum r_i^2;
    allowed is `sigmas` of those, with e the baseline's errors. (A truncating rounding shifts the
    forward's scale_bias by about half an ulp, tens of these noise floors for a tile of outputs.)"""
    r = ref64.double().flatten()
    den = (r * r).sum().item()
    if den == 0:
        return 0.0
    e = ref_lowp.double().flatten() - r
    noise = (e * r).pow(2).sum().sqrt().item() / den
    return 2.0 * abs(scale_bias(ref_lowp, ref64)) + sigmas * noise + 2.0**-20


def assert_matches(
    ours: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    grad: bool = False,
    extra: float = 0.0,
) -> None:
    """The max-error bound of error_bound and, for low precision, the bias bound. Gradients get
    twice the noise floor (12 sigmas): their rounding errors are correlated (one rounding of
    delta = rowsum(dO * O) shifts a whole row of dS, one rounded dS enters a row of dQ and a
    column of dK), so fewer independent roundings average out than there are elements; the long
    hypothesis profile found correct kernels at up to 1.5x the 6-sigma floor. A truncated dS
    still moves dQ and dK by about half an ulp in scale: scripts/mutants.py trunc_ds_only.
    extra: an a-priori bound on an error term the caller derives from the float64 reference
    (test_properties.delta_rounding_floor), added to the max-error bound and, as the most such
    an error can move the scale fit, to the bias bound."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ours).any(), f"{what}: NaN in output"
    if ours.numel() == 0:
        return
    err = (ours.double() - ref64).abs().max().item()
    bound = error_bound(ref64, ref_lowp, dtype) + extra
    assert err <= bound, f"{what}: max abs error {err:.3e} > bound {bound:.3e} ({dtype})"
    if dtype in LOW_PRECISION:
        bias, limit = scale_bias(ours, ref64), bias_bound(ref64, ref_lowp, dtype, 12.0 if grad else 6.0)
        if extra > 0:  # an error of at most `extra` per element moves scale_bias by at most this
            r = ref64.double().flatten()
            limit += extra * r.abs().sum().item() / max((r * r).sum().item(), 1e-300)
        assert abs(bias) <= limit, f"{what}: systematic relative error {bias:.3e} > {limit:.3e} ({dtype})"


def lse_tolerance(dtype: torch.dtype) -> float:
    """The lse is float32 for every input dtype but float64 and the kernels form it from float32
    scores and sums: about 1e-5 relative (at least 1) for all of them, whatever the input dtype."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_lse_matches(lse: torch.Tensor, ref_lse: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """-inf exactly where the reference's row sees nothing, elsewhere within lse_tolerance."""
    ref_lse = ref_lse.detach().double().to(lse.device)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{what}: lse -inf rows"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
        tol = lse_tolerance(dtype) * max(1.0, ref_lse[finite].abs().max().item())
        assert err <= tol, f"{what}: lse error {err:.3e} > {tol:.3e}"


def make_qkv(B, Hq, Hkv, L, S, D, dtype, device="cpu", Dv=None, layout="bhld", seed=0, requires_grad=False):
    """Fresh random inputs. layout 'blhd' returns transposed views of (B, L, H, D) storage
    (non-contiguous, as flash-attn callers pass them); 'sliced' returns views into wider
    tensors (row stride > D)."""
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv

    def rnd(h, n, d):
        if layout == "blhd":
            t = torch.randn(B, n, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        elif layout == "sliced":
            t = torch.randn(B, h, n, d + 7, generator=g, dtype=torch.float64).to(dtype)[..., 3 : 3 + d]
        else:
            t = torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype)
        t = t.to(device)
        if requires_grad:
            t.requires_grad_(True)
        return t

    return rnd(Hq, L, D), rnd(Hkv, S, D), rnd(Hkv, S, Dv)
