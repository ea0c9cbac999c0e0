"""What issue 20's arguments cost: each call timed with and without the argument, in one
process, interleaved, as the ratio with / without (1.00 = free).

- sinks: the dense forward and forward+backward (the backward adds the sink gradient, one
  O(L * D) pass), and decode against a KV cache (the CPU decode kernel, split-KV included);
  next to them gpt-oss's eager formulation (an extra score column, softmax, matmul: what
  transformers runs without a fused kernel) as a ratio of ours over it;
- cache_leftpad (one-position blocks through a block table), cache_batch_idx (whole cache rows
  as blocks) and rotary embedding (applied to q and the new key before the append) in decode;
- flash_attn_varlen_func with block_table (the queries padded to max_seqlen_q) against the
  same packed call on contiguous K/V;
- trainable biases (issue 37): forward+backward with a (1, H, L, S) float attn_mask that
  requires grad against the same call with the mask detached, and ALiBi slopes that require
  grad against fixed ones, and T5's bucketed relative bias (its table trained, in the kernels)
  against no bias; the last column is ours over PyTorch's SDPA on the same call for the mask
  (which computes a mask gradient on its math path only, through the full L x S matrices), and
  for T5's bias ours over the same bias passed as a (1, H, L, S) mask that requires grad. The
  floor of a mask gradient, writing its bytes into a fresh tensor, and the copy bandwidth are
  measured in the same run.

    python benchmarks/bench_attention_args.py [--quick] [--only bias] [--csv out.csv]

The header names the CPU; each figure is the best of interleaved repeats.
"""

import argparse
import math
import time

import torch

import flash_attn_ext
from bench_attention import write_csv  # the script's directory is on sys.path
from bench_decode import copy_bandwidth_gbs
from flash_attn_ext.config import cpu_description


def best_pair(a, b, reps):
    """Best times of a and b, run alternately (so drift hits both alike)."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def eager_sinks(q, k, v, sinks, causal):
    """gpt-oss's eager attention (transformers): the sink as one more score column."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if causal:
        S = k.shape[2]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(S - L + 1), float("-inf"))
    s = torch.cat([s, sinks.view(1, H, 1, 1).expand(B, H, L, 1).to(s.dtype)], dim=-1)
    p = torch.softmax(s - s.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return p.to(v.dtype) @ v


def dense_inputs(dtype, L):
    """The dense rows' shape, B=1 H=8/2 L=S D=64: q, k, v (requiring grad) and an output gradient."""
    B, H, Hkv, D = 1, 8, 2, 64
    q = torch.randn(B, H, L, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, dtype=dtype, requires_grad=True)
    return q, k, v, torch.randn(B, H, L, D, dtype=dtype)


def dense_rows(dtype, L, reps):
    rows = []
    H = 8
    q, k, v, g = dense_inputs(dtype, L)
    sinks = torch.randn(H, requires_grad=True)

    def fwd(s):
        return lambda: flash_attn_ext.attention(q.detach(), k.detach(), v.detach(), causal=True, sinks=s)

    def step(s):
        def run():
            out = flash_attn_ext.attention(q, k, v, causal=True, sinks=s)
            torch.autograd.grad(out, [q, k, v] + ([s] if s is not None else []), g)

        return run

    for what, make in (("forward", fwd), ("forward+backward", step)):
        t_with, t_without = best_pair(make(sinks), make(None), reps)
        row = dict(arg="sinks", case=f"{what} B=1 H=8/2 L=S={L} D=64 causal", dtype=str(dtype)[6:])
        row.update(with_s=t_with, without_s=t_without, ratio=t_with / t_without)
        if what == "forward" and L <= 4096:
            with torch.no_grad():
                t_eager, _ = best_pair(lambda: eager_sinks(q, k, v, sinks, True), lambda: None, max(2, reps // 3))
            row["ours_over_eager"] = t_with / t_eager
        rows.append(row)
    return rows


def bias_rows(dtype, L, reps):
    """Trainable biases, forward+backward: a (1, H, L, L) float mask, learned ALiBi slopes, T5's
    relative bias."""
    rows = []
    H = 8
    q, k, v, g = dense_inputs(dtype, L)
    bias = torch.randn(1, H, L, L, dtype=dtype, requires_grad=True)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], requires_grad=True)

    def ours(**kw):
        def run():
            out = flash_attn_ext.attention(q, k, v, **kw)
            biases = [t.table if isinstance(t, flash_attn_ext.RelativeBias) else t for t in kw.values()]
            leaves = [q, k, v] + [t for t in biases if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(out, leaves, g)

        return run

    def sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        torch.autograd.grad(out, [q, k, v, bias], g)

    t_with, t_without = best_pair(ours(attn_mask=bias), ours(attn_mask=bias.detach()), reps)
    t_torch, _ = best_pair(sdpa, lambda: None, reps)
    # The floor of the gradient's cost: writing its bytes once into a fresh allocation (what
    # any mask gradient costs: a new tensor of the mask's size, first touch of its pages).
    t_fresh, _ = best_pair(lambda: torch.empty_like(bias).fill_(0), lambda: None, reps)
    row = dict(arg="attn_mask grad (1,H,L,S)", case=f"forward+backward B=1 H=8/2 L=S={L} D=64", dtype=str(dtype)[6:])
    row.update(with_s=t_with, without_s=t_without, ratio=t_with / t_without, ours_over_eager=t_with / t_torch)
    row.update(grad_mib=bias.numel() * bias.element_size() / 2**20, fresh_write_s=t_fresh)
    rows.append(row)
    t_with, t_without = best_pair(
        ours(alibi_slopes=slopes, causal=True), ours(alibi_slopes=slopes.detach(), causal=True), reps
    )
    row = dict(arg="alibi_slopes grad", case=f"forward+backward B=1 H=8/2 L=S={L} D=64 causal", dtype=str(dtype)[6:])
    row.update(with_s=t_with, without_s=t_without, ratio=t_with / t_without)
    rows.append(row)
    table = torch.randn(32, H, requires_grad=True)
    t5 = flash_attn_ext.RelativeBias(table, 32, 128, True)
    t_with, t_without = best_pair(ours(relative_bias=t5), ours(), reps)
    t_mask, _ = best_pair(ours(attn_mask=bias), lambda: None, reps)  # the same shape of bias as a mask
    row = dict(arg="T5 relative_bias grad", case=f"forward+backward B=1 H=8/2 L=S={L} D=64", dtype=str(dtype)[6:])
    row.update(with_s=t_with, without_s=t_without, ratio=t_with / t_without, ours_over_eager=t_with / t_mask)
    rows.append(row)
    return rows


def decode_rows(dtype, S, reps):
    rows = []
    B, H, Hkv, D = 4, 32, 8, 128
    kc = torch.randn(B, S, Hkv, D, dtype=dtype)
    vc = torch.randn(B, S, Hkv, D, dtype=dtype)
    q = torch.randn(B, 1, H, D, dtype=dtype)
    kn, vn = torch.randn(B, 1, Hkv, D, dtype=dtype), torch.randn(B, 1, Hkv, D, dtype=dtype)
    lens = torch.full((B,), S - 64, dtype=torch.int32)
    pad = torch.tensor([0, 17, 300, 5], dtype=torch.int32)
    idx = torch.tensor([3, 0, 2, 1], dtype=torch.int32)
    angle = torch.rand(S, D // 2) * 6.3
    cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    base = dict(cache_seqlens=lens, causal=True)
    cases = {
        "sinks": dict(sinks=torch.randn(H)),
        "cache_leftpad": dict(cache_leftpad=pad),
        "cache_batch_idx": dict(cache_batch_idx=idx),
        "rotary (with the append)": dict(rotary_cos=cos, rotary_sin=sin),
    }
    for name, extra in cases.items():
        append = name.startswith("rotary")

        def call(kw, append=append):
            return lambda: flash_attn_ext.flash_attn_with_kvcache(
                q, kc, vc, kn if append else None, vn if append else None, **base, **kw
            )

        t_with, t_without = best_pair(call(extra), call({}), reps)
        rows.append(
            dict(
                arg=name,
                case=f"decode B=4 H=32/8 S={S} D=128",
                dtype=str(dtype)[6:],
                with_s=t_with,
                without_s=t_without,
                ratio=t_with / t_without,
            )
        )
    return rows


def varlen_paged_rows(dtype, reps):
    lens = [700, 90, 1500, 333]
    H, Hkv, D, bs = 8, 2, 64, 64
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, H, D, dtype=dtype)
    k, v = torch.randn(total, Hkv, D, dtype=dtype), torch.randn(total, Hkv, D, dtype=dtype)
    bps = (max(lens) + bs - 1) // bs
    kp = torch.zeros(len(lens) * bps, bs, Hkv, D, dtype=dtype)
    vp = torch.zeros_like(kp)
    table = torch.randperm(len(lens) * bps).view(len(lens), bps).to(torch.int32)
    for b, n in enumerate(lens):
        s = int(cu[b])
        for blk in range((n + bs - 1) // bs):
            m = min(bs, n - blk * bs)
            kp[table[b, blk], :m] = k[s + blk * bs : s + blk * bs + m]
            vp[table[b, blk], :m] = v[s + blk * bs : s + blk * bs + m]
    L = max(lens)
    t_with, t_without = best_pair(
        lambda: flash_attn_ext.flash_attn_varlen_func(q, kp, vp, cu, cu, L, L, causal=True, block_table=table),
        lambda: flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True),
        reps,
    )
    return [
        dict(
            arg="varlen block_table",
            case=f"lengths {lens} H=8/2 D=64 causal (padded rows x{len(lens) * L / total:.2f})",
            dtype=str(dtype)[6:],
            with_s=t_with,
            without_s=t_without,
            ratio=t_with / t_without,
        )
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--csv", help="write the rows to this CSV file")
    ap.add_argument("--only", choices=("bias",), help="only the trainable-bias rows")
    a = ap.parse_args()
    reps = 3 if a.quick else 7
    print(f"# {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    if a.only is None:
        with torch.no_grad():
            for dtype in (torch.float32, torch.bfloat16):
                for S in (4096,) if a.quick else (4096, 32768):
                    rows += decode_rows(dtype, S, reps)
                rows += varlen_paged_rows(dtype, reps)
        for dtype in (torch.float32, torch.bfloat16):
            for L in (2048,) if a.quick else (2048, 8192):
                rows += dense_rows(dtype, L, max(2, reps // 2))
    for dtype in (torch.float32, torch.bfloat16):
        for L in (1024,) if a.quick else (1024, 2048):
            rows += bias_rows(dtype, L, max(2, reps // 2))
    if any("fresh_write_s" in r for r in rows):
        print(f"copy bandwidth (1 GiB, read + write): {copy_bandwidth_gbs():.1f} GB/s")
    print(f"{'argument':26s} {'case':58s} {'dtype':9s} {'with':>9s} {'without':>9s} {'ratio':>6s}  ours/other")
    for r in rows:
        eager = f"{r['ours_over_eager']:.2f}" if "ours_over_eager" in r else ""
        print(
            f"{r['arg']:26s} {r['case']:58s} {r['dtype']:9s} {r['with_s'] * 1e3:8.2f}ms {r['without_s'] * 1e3:8.2f}ms "
            f"{r['ratio']:6.2f}  {eager}"
        )
    for r in rows:
        if "fresh_write_s" in r:
            print(
                f"{r['case']} {r['dtype']}: the mask gradient's {r['grad_mib']:.0f} MiB written once into a fresh "
                f"tensor take {r['fresh_write_s'] * 1e3:.1f} ms; the gradient adds "
                f"{(r['with_s'] - r['without_s']) * 1e3:.1f} ms"
            )
    if a.csv:
        blank = dict.fromkeys(("ours_over_eager", "grad_mib", "fresh_write_s"), "")
        write_csv(a.csv, [{**blank, **r} for r in rows])


if __name__ == "__main__":
    main()
