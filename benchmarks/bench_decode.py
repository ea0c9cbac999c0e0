"""CPU decode benchmark: one query token (L = 1) against KV caches of 1k-32k positions.

Decode reads the whole cache once, so it is memory-bound: the table reports GB/s of K/V read
and its fraction of the machine's copy bandwidth (a large tensor copy, measured in the same
run), next to PyTorch's SDPA on the same cache (enable_gqa) and the naive pattern without a
cache kernel (concatenate the new token's K/V to the past, then SDPA).

    python benchmarks/bench_decode.py [--seq 8192 32768] [--batch 1 4] [--kv-heads 8]
                                      [--dtypes bfloat16 float32] [--csv out.csv]
    python benchmarks/bench_decode.py --issue-grid      # B 1/8/32 x S 1k/8k/32k x 32/8, 32/32 heads (long)
    python benchmarks/bench_decode.py --device cuda --issue-grid   # adds S = 128k; CUDA SDPA backends
    [--csv out.csv] [--plot out.png]

8-bit caches: --cache-dtypes takes int8 and float8_e4m3fn beside the float dtypes (the query is
then bf16); --quant-grid runs the 8-bit cache comparison (S 128 / 512 / 4k / 32k, B 1 / 8,
Hq/Hkv 32/8, D 128, caches bf16 / int8 / fp8 / float32). Bytes read count the codes and their
float32 scales; "vs bf16 cache" is the time over the bf16 cache's at the same (B, S); the
"dequant+attend" column times what transformers' QuantizedCache does per call (dequantize the
whole cache to bf16, then SDPA).

    python benchmarks/bench_decode.py --quant-grid [--csv out.csv]
"""

import argparse
import time

import torch
import torch.nn.functional as F

import flash_attn_ext
from bench_attention import write_csv  # the script's directory is on sys.path
from flash_attn_ext.config import cpu_description

QUANTIZED = ("int8", "float8_e4m3fn")


def best_time(fn, reps=10):
    """Minimum wall time of fn over reps (after a warm-up), synchronising the GPU if one is used."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth_gbs(device="cpu", nbytes=1 << 30):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), reps=5)
    return 2 * nbytes / t / 1e9  # read + write


def machine_header(dev):
    """Measures the copy ceiling and prints the machine (the CPU's model and ISA flags on CPU);
    returns (copy GB/s, a short name of where it ran)."""
    ceiling = copy_bandwidth_gbs(dev)
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; copy bandwidth {ceiling:.1f} GB/s")
    if dev == "cpu":
        print(f"cpu: {cpu_description()}")
    return ceiling, where


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--csv")
    ap.add_argument("--plot", help="PNG: our fraction of the copy bandwidth per row")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--issue-grid", action="store_true", help="the issue's full grid, bf16 (long on 2 cores)")
    ap.add_argument("--max-gb", type=float, default=4.0, help="skip rows whose K+V caches exceed this")
    ap.add_argument("--cache-dtypes", nargs="*", help="cache storage dtypes (int8 / float8_e4m3fn: 8-bit caches)")
    ap.add_argument("--quant-grid", action="store_true", help="the 8-bit cache comparison grid (see above)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--kv-compare",
        action="store_true",
        help="the lecture's T_infer comparison: decode time per token against one long cache for MHA, "
        "GQA-8 and MQA at the same --heads query heads",
    )
    args = ap.parse_args()
    grid = [(args.kv_heads, B, S) for B in args.batch for S in args.seq]
    if args.kv_compare:
        grid = [(hkv, B, S) for B in args.batch for S in args.seq for hkv in (args.heads, 8, 1)]
    if args.issue_grid:
        args.dtypes = ["bfloat16"]
        seqs = (1024, 8192, 32768) + ((131072,) if args.device == "cuda" else ())
        grid = [(hkv, B, S) for hkv in (8, 32) for B in (1, 8, 32) for S in seqs]
    if args.quant_grid:
        args.heads, args.dim = 32, 128
        grid = [(8, B, S) for B in (1, 8) for S in (128, 512, 4096, 32768)]
        args.cache_dtypes = ["bfloat16", "int8", "float8_e4m3fn", "float32"]
    if args.cache_dtypes:
        return quant_main(args, grid)
    dev = args.device
    ceiling, where = machine_header(dev)
    print(
        f"{'dtype':9} {'Hkv':>3} {'B':>2} {'S':>6} | {'ours us':>9} {'GB/s':>6} {'of copy':>7} | "
        f"{'torch us':>9} {'ours/torch':>10} | {'concat us':>9} {'ours/concat':>11}"
    )
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for Hkv, B, S in grid:
            H, D = args.heads, args.dim
            if 2 * B * S * Hkv * D * dtype.itemsize > args.max_gb * 2**30:
                print(f"{dtype_name:9} {Hkv:>3} {B:>2} {S:>6} | skipped: the caches exceed --max-gb {args.max_gb}")
                continue
            kc = torch.randn(B, S, Hkv, D, dtype=dtype, device=dev)
            vc = torch.randn(B, S, Hkv, D, dtype=dtype, device=dev)
            q = torch.randn(B, 1, H, D, dtype=dtype, device=dev)
            lens = torch.full((B,), S, dtype=torch.int32, device=dev)
            with torch.inference_mode():
                ours = best_time(
                    lambda: flash_attn_ext.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)
                )
                qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                theirs = best_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
                # No cache kernel: each step concatenates the new token to the past K/V.
                past_k, past_v, new_k, new_v = kt[:, :, :-1], vt[:, :, :-1], kt[:, :, -1:], vt[:, :, -1:]
                concat = best_time(
                    lambda: F.scaled_dot_product_attention(
                        qt, torch.cat([past_k, new_k], 2), torch.cat([past_v, new_v], 2), enable_gqa=True
                    ),
                    reps=3,
                )
            nbytes = 2 * B * S * Hkv * D * kc.element_size()
            gbs = nbytes / ours / 1e9
            row = dict(
                dtype=dtype_name,
                Hkv=Hkv,
                B=B,
                S=S,
                ours_us=ours * 1e6,
                gbs=gbs,
                fraction_of_copy=gbs / ceiling,
                torch_us=theirs * 1e6,
                ratio_vs_torch=ours / theirs,
                concat_us=concat * 1e6,
                ratio_vs_concat=ours / concat,
                copy_gbs=ceiling,
            )
            rows.append(row)
            print(
                f"{dtype_name:9} {Hkv:>3} {B:>2} {S:>6} | {row['ours_us']:9.0f} {gbs:6.1f} "
                f"{row['fraction_of_copy']:7.2f} | "
                f"{row['torch_us']:9.0f} {row['ratio_vs_torch']:10.2f} | {row['concat_us']:9.0f} "
                f"{row['ratio_vs_concat']:11.2f}",
                flush=True,
            )
    if args.kv_compare:  # T_infer per token and its ratio to MHA, per (dtype, B, S)
        print(f"\ndecode time per token, {args.heads} query heads, D={args.dim} (ours):")
        for key in sorted({(r["dtype"], r["B"], r["S"]) for r in rows}):
            same = {r["Hkv"]: r["ours_us"] for r in rows if (r["dtype"], r["B"], r["S"]) == key}
            mha = same.get(args.heads)
            print(
                f"  {key[0]} B={key[1]} S={key[2]}: "
                + ", ".join(
                    f"{'MHA' if h == args.heads else 'MQA' if h == 1 else f'GQA-{h}'} {t / 1e3:.2f} ms"
                    + (f" ({t / mha:.2f} of MHA)" if mha and h != args.heads else "")
                    for h, t in same.items()
                )
            )
    if args.csv and rows:
        write_csv(args.csv, rows)
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['dtype'][:4]} {r['Hkv']}kv B{r['B']} S{r['S'] // 1024}k" for r in rows]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4))
        ax.bar(range(len(rows)), [r["fraction_of_copy"] for r in rows])
        ax.axhline(0.7 if dev == "cpu" else 0.8, color="red", linestyle="--", label="target")
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("K/V read GB/s / copy GB/s")
        ax.set_title(f"decode, {where}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


def quant_main(args, grid):
    """Decode per token over caches stored in each of args.cache_dtypes (queries bf16), timed in
    one process with the copy bandwidth; per (B, S) the dtypes are timed in turn, twice, and the
    better of the two rounds kept, so drift on the machine hits every dtype alike."""
    dev = args.device
    ceiling, where = machine_header(dev)
    H, D = args.heads, args.dim
    print(f"decode, q bf16 (B, 1, {H}, {D}), one step per call, caches (B, S, Hkv, {D})")
    print(
        f"{'cache':14} {'Hkv':>3} {'B':>2} {'S':>6} | {'ours us':>9} {'GB/s':>6} {'of copy':>7} | "
        f"{'vs bf16 cache':>13} | {'deq+attend us':>13} {'ours/deq':>8}"
    )
    rows = []
    for Hkv, B, S in grid:
        g = torch.Generator().manual_seed(0)
        k = torch.randn(B, S, Hkv, D, generator=g, dtype=torch.bfloat16).to(dev)
        v = torch.randn(B, S, Hkv, D, generator=g, dtype=torch.bfloat16).to(dev)
        q = torch.randn(B, 1, H, D, dtype=torch.bfloat16, device=dev)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        caches = {}
        for name in args.cache_dtypes:
            dtype = getattr(torch, name)
            if name in QUANTIZED:
                kq, vq, ks, vs = flash_attn_ext.quantize_kv_cache(k, v, dtype)
                caches[name] = (kq, vq, dict(k_cache_scale=ks, v_cache_scale=vs))
            else:
                caches[name] = (k.to(dtype), v.to(dtype), {})
        best = {}
        with torch.inference_mode():
            for _ in range(2):
                for name, (kc, vc, scales) in caches.items():
                    qq = q.float() if name == "float32" else q
                    t = best_time(
                        lambda: flash_attn_ext.attention_with_kvcache(
                            qq, kc, vc, cache_seqlens=lens, causal=True, **scales
                        ),
                        reps=args.reps,
                    )
                    best[name] = min(best.get(name, t), t)
            deq = {}
            for name, (kc, vc, scales) in caches.items():
                if not scales:
                    continue

                def dequant_then_attend():
                    kd = (kc.float() * scales["k_cache_scale"][..., None]).to(torch.bfloat16)
                    vd = (vc.float() * scales["v_cache_scale"][..., None]).to(torch.bfloat16)
                    return F.scaled_dot_product_attention(
                        q.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2), enable_gqa=True
                    )

                deq[name] = best_time(dequant_then_attend, reps=max(2, args.reps // 3))
        for name, (kc, vc, scales) in caches.items():
            nbytes = 2 * B * S * Hkv * (D * kc.element_size() + (4 if scales else 0))
            t = best[name]
            gbs = nbytes / t / 1e9
            row = dict(
                cache=name,
                Hkv=Hkv,
                B=B,
                S=S,
                ours_us=t * 1e6,
                gbs=gbs,
                fraction_of_copy=gbs / ceiling,
                time_vs_bf16_cache=t / best["bfloat16"] if "bfloat16" in best else float("nan"),
                dequant_attend_us=deq[name] * 1e6 if name in deq else float("nan"),
                ratio_vs_dequant=t / deq[name] if name in deq else float("nan"),
                copy_gbs=ceiling,
                cpu=cpu_description() if dev == "cpu" else where,
            )
            rows.append(row)
            print(
                f"{name:14} {Hkv:>3} {B:>2} {S:>6} | {row['ours_us']:9.0f} {gbs:6.1f} {row['fraction_of_copy']:7.2f} | "
                f"{row['time_vs_bf16_cache']:13.2f} | {row['dequant_attend_us']:13.0f} {row['ratio_vs_dequant']:8.2f}",
                flush=True,
            )
    if args.csv and rows:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
