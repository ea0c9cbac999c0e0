"""Issue 8's CPU targets beyond the main grid, each measured side by side in one process:

- sliding window: causal W = 512 at L = 16384 against PyTorch SDPA given the equivalent boolean
  mask (its default backend choice), and against the (L/W)-scaled cost of our full attention at
  L = W (the same number of visible pairs): targets >= 10x faster than SDPA, <= 2x the scaled cost;
- GQA 32/8 against MHA 32/32 on the same shapes, time per query head: target <= 1;
- peak extra memory of one forward at L = S = 32768 (1 head, D = 64, fp32) against the math
  path's: target < 64 MiB (the math path would need 4 GiB for its scores).

    python benchmarks/bench_cpu_targets.py [--dtypes float32 bfloat16] [--csv out.csv]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import peak_memory_mib, timeit, write_csv  # noqa: E402

import flash_attn_ext  # noqa: E402


def window_rows(dtype, L=16384, W=512, H=4, D=64, min_time=0.5):
    q, k, v = (torch.randn(1, H, L, D, dtype=dtype) for _ in range(3))
    ours = timeit(lambda: flash_attn_ext.attention(q, k, v, causal=True, window_size=(W - 1, 0)), min_time)
    i = torch.arange(L)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)  # (L, L) bool: the same window
    sdpa = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), min_time, max_reps=3)
    qw, kw, vw = q[:, :, :W], k[:, :, :W], v[:, :, :W]
    full_w = timeit(lambda: flash_attn_ext.attention(qw, kw, vw), min_time)
    scaled = full_w * L / W
    return [
        dict(
            target="window",
            dtype=str(dtype)[6:],
            case=f"L={L} W={W} H={H} D={D}",
            ours_ms=ours * 1e3,
            other_ms=sdpa * 1e3,
            other="torch SDPA + bool mask",
            speedup=sdpa / ours,
            bar=">= 10",
        ),
        dict(
            target="window",
            dtype=str(dtype)[6:],
            case=f"L={L} W={W} H={H} D={D}",
            ours_ms=ours * 1e3,
            other_ms=scaled * 1e3,
            other="ours full at L=W, x L/W",
            speedup=ours / scaled,
            bar="<= 2 (ours / scaled)",
        ),
    ]


def gqa_rows(dtype, L=2048, D=128, min_time=0.5):
    rows = []
    for backward in (False, True):
        times = {}
        for hkv in (32, 8):
            q = torch.randn(1, 32, L, D, dtype=dtype, requires_grad=backward)
            k = torch.randn(1, hkv, L, D, dtype=dtype, requires_grad=backward)
            v = torch.randn(1, hkv, L, D, dtype=dtype, requires_grad=backward)
            if backward:
                g = torch.randn(1, 32, L, D, dtype=dtype)
                fn = lambda q=q, k=k, v=v, g=g: torch.autograd.grad(  # noqa: E731
                    flash_attn_ext.attention(q, k, v, causal=True), (q, k, v), g
                )
            else:
                fn = lambda q=q, k=k, v=v: flash_attn_ext.attention(q, k, v, causal=True)  # noqa: E731
            times[hkv] = timeit(fn, min_time)
        rows.append(
            dict(
                target="gqa",
                dtype=str(dtype)[6:],
                case=f"{'fwd+bwd' if backward else 'fwd'} L={L} D={D} causal",
                ours_ms=times[8] * 1e3,
                other_ms=times[32] * 1e3,
                other="ours MHA 32/32",
                speedup=times[8] / times[32],
                bar="<= 1 (GQA / MHA per query head)",
            )
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--memory", type=int, default=32768)
    ap.add_argument("--csv")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        rows += window_rows(dtype) + gqa_rows(dtype)
    for r in rows:
        print(
            f"{r['target']:7} {r['dtype']:9} {r['case']:32} ours {r['ours_ms']:9.1f} ms | {r['other']:26} "
            f"{r['other_ms']:9.1f} ms | ratio {r['speedup']:6.2f} (bar {r['bar']})",
            flush=True,
        )
    if args.memory:
        ours, math_path = peak_memory_mib(args.memory, "ours"), peak_memory_mib(args.memory, "math")
        print(
            f"peak extra memory, L=S={args.memory}, 1 head, D=64, fp32 (output included): ours {ours:.1f} MiB, "
            f"torch math path {math_path:.1f} MiB (bar < 64 MiB)"
        )
        rows.append(
            dict(
                target="memory",
                dtype="float32",
                case=f"L={args.memory}",
                ours_ms=float("nan"),
                other_ms=float("nan"),
                other="torch math MiB",
                speedup=ours,
                bar=f"< 64 MiB; math {math_path:.0f}",
            )
        )
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
