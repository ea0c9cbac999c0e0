"""CPU attention benchmark: flash_attn_ext against every PyTorch SDPA backend, in one process.

For each shape: forward and forward+backward time, GFLOP/s, and the ratio our_time /
their_time for PyTorch's CPU flash kernel (SDPA's default on CPU) and its math path, next to
the machine's float32 matmul ceiling measured in the same run. Optionally the peak extra
memory of one long sequence (ours against the math path).

    python benchmarks/bench_attention.py --quick              # a minute: the README demo
    python benchmarks/bench_attention.py                      # the issue's grid (long on 2 cores)
    python benchmarks/bench_attention.py --csv out.csv --plot out.png --memory 16384
    python benchmarks/bench_attention.py --tiles avx512_bf16 brgemm   # each CPU tile back end, A/B
    python benchmarks/bench_attention.py --kv-heads 8 --heads 32      # GQA 32/8
    python benchmarks/bench_attention.py --skinny                     # B=60, H=4, d=32, (L, S) like (799, 3)

The header names the CPU (model, ISA flags), the tile back end each dtype runs on
(flash_attn_ext.cpu_tiles_in_use) and the matmul ceiling of each dtype measured in the run.
"""

import argparse
import csv
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_ext
from flash_attn_ext.config import cpu_description

MATH_MAX_SEQ = 2048  # the math path materialises B*H*L*S scores: skipped above this


def write_csv(path, rows):
    """rows (dicts with the same keys) as a CSV file with a header; the benchmarks' --csv."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def attn_flops(B, H, L, S, D, causal):
    """Matmul FLOPs of the forward (QK^T and PV) over visible pairs; backward is 2.5x."""
    pairs = sum(min(S, max(0, i + S - L + 1)) for i in range(L)) if causal else L * S
    return 4 * B * H * pairs * D


def timeit(fn, min_time=0.5, max_reps=20):
    """Best of repeated runs after a warm-up; runs over 5 s are timed once after it."""
    t0 = time.perf_counter()
    fn()  # warm-up (allocations, thread pool)
    min_reps = 1 if time.perf_counter() - t0 > 5.0 else 2
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < min_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_ceiling(dtype=torch.float32, n=2048):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = timeit(lambda: a @ b, min_time=1.0)
    return 2 * n**3 / t / 1e9


def make_runners(q, k, v, causal, backward, tiles=(None,)):
    gqa = q.shape[1] != k.shape[1]

    def ours_on(backend):
        def run():
            if backend is None:
                return flash_attn_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            with flash_attn_ext.cpu_tiles(backend):
                return flash_attn_ext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        return run

    def torch_backend(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        return run

    runners = {("ours" if t is None else f"ours[{t}]"): ours_on(t) for t in tiles}
    runners["torch_flash"] = torch_backend(SDPBackend.FLASH_ATTENTION)
    if q.shape[-2] <= MATH_MAX_SEQ:
        runners["torch_math"] = torch_backend(SDPBackend.MATH)
    if backward:
        g = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

        def with_backward(fwd):
            return lambda: torch.autograd.grad(fwd(), (q, k, v), g)

        runners = {name: with_backward(fn) for name, fn in runners.items()}
    return runners


def run_grid(shapes, dtypes, causals, passes, min_time, tiles=(None,), kv_heads=None):
    """shapes: (B, H, L, D) with S = L, or (B, H, L, S, D). tiles: CPU tile back ends to run ours
    with (None: the automatic choice), one row each, timed in the same process as PyTorch."""
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            B, H, L, S, D = shape if len(shape) == 5 else (shape[0], shape[1], shape[2], shape[2], shape[3])
            Hkv = kv_heads or H
            for causal in causals:
                for backward in passes:
                    q = torch.randn(B, H, L, D, dtype=dtype, requires_grad=backward)
                    k, v = (torch.randn(B, Hkv, S, D, dtype=dtype, requires_grad=backward) for _ in range(2))
                    flops = attn_flops(B, H, L, S, D, causal) * (3.5 if backward else 1.0)
                    runners = make_runners(q, k, v, causal, backward, tiles)
                    if L > MATH_MAX_SEQ or S > MATH_MAX_SEQ:
                        runners.pop("torch_math", None)
                    times = {name: timeit(fn, min_time) for name, fn in runners.items()}
                    for t in tiles:
                        name = "ours" if t is None else f"ours[{t}]"
                        ran = flash_attn_ext.cpu_tiles_in_use(dtype)[0] if t is None else t
                        row = dict(
                            dtype=str(dtype).replace("torch.", ""),
                            B=B,
                            H=H,
                            Hkv=Hkv,
                            L=L,
                            S=S,
                            D=D,
                            causal=causal,
                            pass_="fwd+bwd" if backward else "fwd",
                            tiles=ran,
                            ours_ms=times[name] * 1e3,
                            ours_gflops=flops / times[name] / 1e9,
                        )
                        for other in ("torch_flash", "torch_math"):
                            row[f"{other}_ms"] = times[other] * 1e3 if other in times else float("nan")
                            row[f"ratio_vs_{other}"] = times[name] / times[other] if other in times else float("nan")
                        rows.append(row)
                        print(format_row(row), flush=True)
    return rows


HEADER = (
    f"{'dtype':8} {'B':>2} {'H':>3} {'Hkv':>3} {'L':>5} {'S':>5} {'D':>4} {'causal':>6} {'pass':>7} "
    f"{'tiles':>11} | {'ours ms':>9} {'GFLOP/s':>8} | {'flash ms':>9} {'ours/flash':>10} | {'math ms':>9} "
    f"{'ours/math':>9}"
)


def format_row(r):
    return (
        f"{r['dtype']:8} {r['B']:>2} {r['H']:>3} {r['Hkv']:>3} {r['L']:>5} {r['S']:>5} {r['D']:>4} "
        f"{str(r['causal']):>6} {r['pass_']:>7} {r['tiles']:>11} | "
        f"{r['ours_ms']:9.2f} {r['ours_gflops']:8.1f} | {r['torch_flash_ms']:9.2f} {r['ratio_vs_torch_flash']:10.2f} | "
        f"{r['torch_math_ms']:9.2f} {r['ratio_vs_torch_math']:9.2f}"
    )


_MEMORY_CHILD = r"""
import os, sys, threading, time, torch, flash_attn_ext
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
L, which = int(sys.argv[1]), sys.argv[2]
q, k, v = (torch.randn(1, 1, L, 64) for _ in range(3))
flash_attn_ext.scaled_dot_product_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :])  # load everything
with sdpa_kernel([SDPBackend.MATH]):
    F.scaled_dot_product_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :])
base, peak, done = rss(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
t = threading.Thread(target=sample)
t.start()
if which == "ours":
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v)
else:
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q, k, v)
done[0] = True
t.join()
print((max(peak[0], rss()) - base) / 2**20)
"""


def peak_memory_mib(L, which):
    """Peak resident memory added by one forward (1 head, D=64, fp32), sampled every 0.5 ms
    in a fresh process; includes the (L, 64) output itself."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(L), which], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def plot(rows, path):
    """One panel per (dtype, pass): time vs L for each (D, causal), ours solid, torch flash dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["pass_"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (dtype, pass_) in zip(axes[0], panels):
        sel = [r for r in rows if r["dtype"] == dtype and r["pass_"] == pass_]
        for i, (D, causal) in enumerate(sorted({(r["D"], r["causal"]) for r in sel})):
            line = sorted((r for r in sel if (r["D"], r["causal"]) == (D, causal)), key=lambda r: r["L"])
            label = f"D={D} {'causal' if causal else 'full'}"
            color = f"C{i}"
            ax.plot([r["L"] for r in line], [r["ours_ms"] for r in line], "o-", color=color, label="ours " + label)
            ax.plot(
                [r["L"] for r in line], [r["torch_flash_ms"] for r in line], "x--", color=color, label="torch " + label
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L = S")
        ax.set_title(f"{dtype} {pass_}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time (ms)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("flash_attn_ext (solid) vs torch SDPA CPU flash (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("B", "H", "Hkv", "L", "S", "D"):
            if key in r:
                r[key] = int(r[key])
        r["causal"] = r["causal"] == "True"
        for key, value in r.items():
            if key.endswith("_ms") or key.startswith("ratio") or key.endswith("gflops"):
                r[key] = float(value)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid (about a minute)")
    ap.add_argument("--seq", type=int, nargs="*", help="sequence lengths (default 512 2048 8192)")
    ap.add_argument("--dims", type=int, nargs="*", help="head dims (default 64 128)")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats per measurement")
    ap.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA; default: --heads)")
    ap.add_argument(
        "--tiles",
        nargs="*",
        default=None,
        help="CPU tile back ends to run ours with, one row each (auto float avx512_bf16 brgemm)",
    )
    ap.add_argument(
        "--skinny",
        action="store_true",
        help="the skinny shapes of issue 16 instead: B=60, H=4, D=32, (L, S) in (799, 3), (1, 239), (3, 799)",
    )
    ap.add_argument("--memory", type=int, default=0, help="also measure peak memory at this L (one head)")
    ap.add_argument("--csv", help="write the rows to this CSV file")
    ap.add_argument("--plot", help="draw time vs sequence length into this PNG")
    ap.add_argument("--from-csv", nargs="*", help="only plot rows from these CSV files (no runs)")
    args = ap.parse_args()
    if args.from_csv:
        plot([r for path in args.from_csv for r in read_csv(path)], args.plot or "bench.png")
        return

    seqs = args.seq or ([256, 1024] if args.quick else [512, 2048, 8192])
    dims = args.dims or ([64] if args.quick else [64, 128])
    heads = 4 if args.quick else args.heads
    dtypes = [getattr(torch, d) for d in args.dtypes]
    print(
        f"torch {torch.__version__}, flash_attn_ext {flash_attn_ext.__version__}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"cpu: {cpu_description()}")
    for dtype in dtypes:
        print(f"cpu tiles {dtype}: %s (%s)" % flash_attn_ext.cpu_tiles_in_use(dtype))
    ceilings = {str(d).replace("torch.", ""): matmul_ceiling(d) for d in dtypes}
    print("matmul ceilings (2048^3): " + ", ".join(f"{d} {c:.1f} GFLOP/s" for d, c in ceilings.items()))
    print(HEADER)
    tiles = [None if t == "auto" else t for t in args.tiles] if args.tiles else [None]
    if args.skinny:
        shapes = [(60, 4, L, S, 32) for (L, S) in ((799, 3), (1, 239), (3, 799))]
    else:
        shapes = [(args.batch, heads, L, D) for L in seqs for D in dims]
    rows = run_grid(
        shapes, dtypes, [False, True], [p == "fwd+bwd" for p in args.passes], args.min_time, tiles, args.kv_heads
    )
    for r in rows:
        r["matmul_ceiling_gflops"] = ceilings[r["dtype"]]
        r["fraction_of_ceiling"] = r["ours_gflops"] / ceilings[r["dtype"]]
    print(
        "\nours / the dtype's matmul ceiling: "
        + ", ".join(
            f"{r['dtype']} L={r['L']} D={r['D']} {'causal' if r['causal'] else 'full'} {r['pass_']} {r['tiles']}: "
            f"{r['fraction_of_ceiling']:.2f}"
            for r in rows
        )
    )
    if args.memory:
        ours, math_path = peak_memory_mib(args.memory, "ours"), peak_memory_mib(args.memory, "math")
        print(
            f"\npeak extra memory, L=S={args.memory}, 1 head, D=64, fp32 "
            f"(output {args.memory * 64 * 4 / 2**20:.1f} MiB included): ours {ours:.1f} MiB, "
            f"torch math path {math_path:.1f} MiB"
        )
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    fallbacks = flash_attn_ext.fallback_counts()
    if fallbacks:
        print("fallbacks to torch SDPA:", fallbacks)


if __name__ == "__main__":
    main()
