"""CPU decode benchmark: one query token (L = 1) against KV caches of 8k-32k positions.

Decode reads the whole cache once, so it is memory-bound: the table reports GB/s of K/V read
and its fraction of the machine's copy bandwidth (a large tensor copy, measured in the same
run), next to PyTorch's SDPA on the same cache (enable_gqa).

    python benchmarks/bench_decode.py [--seq 8192 32768] [--dtypes bfloat16 float32] [--csv out.csv]
"""
import argparse
import csv
import time

import torch
import torch.nn.functional as F

import flash_attn_ext


def best_time(fn, reps=10):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth_gbs(nbytes=1 << 30):
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), reps=5)
    return 2 * nbytes / t / 1e9  # read + write


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--csv")
    args = ap.parse_args()
    ceiling = copy_bandwidth_gbs()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth {ceiling:.1f} GB/s")
    print(f"{'dtype':9} {'B':>2} {'S':>6} | {'ours us':>9} {'GB/s':>6} {'of copy':>7} | {'torch us':>9} {'ours/torch':>10}")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for B in args.batch:
            for S in args.seq:
                H, Hkv, D = args.heads, args.kv_heads, args.dim
                kc = torch.randn(B, S, Hkv, D, dtype=dtype)
                vc = torch.randn(B, S, Hkv, D, dtype=dtype)
                q = torch.randn(B, 1, H, D, dtype=dtype)
                lens = torch.full((B,), S, dtype=torch.int32)
                with torch.inference_mode():
                    ours = best_time(lambda: flash_attn_ext.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True))
                    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                    theirs = best_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
                nbytes = 2 * B * S * Hkv * D * kc.element_size()
                gbs = nbytes / ours / 1e9
                row = dict(dtype=dtype_name, B=B, S=S, ours_us=ours * 1e6, gbs=gbs, fraction_of_copy=gbs / ceiling,
                           torch_us=theirs * 1e6, ratio_vs_torch=ours / theirs, copy_gbs=ceiling)
                rows.append(row)
                print(f"{dtype_name:9} {B:>2} {S:>6} | {row['ours_us']:9.0f} {gbs:6.1f} {row['fraction_of_copy']:7.2f} | "
                      f"{row['torch_us']:9.0f} {row['ratio_vs_torch']:10.2f}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
