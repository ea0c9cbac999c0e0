"""GPU attention benchmark: flash_attn_ext against every CUDA backend of PyTorch's SDPA
(flash, cuDNN, efficient), in one process, timed with CUDA events.

For each shape: median time, TFLOP/s over the visible (query, key) pairs, the ratio to a
bf16 matmul ceiling measured in the same run, and our time over each backend's time.
B * H fills the GPU: B * L = 16k tokens and H * D = 2048 (H = 32 query heads for GQA 32/8).

    python benchmarks/bench_attention_cuda.py --quick            # the GPU check's grid
    python benchmarks/bench_attention_cuda.py --csv out.csv --plot out.png
"""

import argparse
import csv
import os
import sys

os.environ.setdefault("FLASH_ATTN_EXT_CUDA_KERNELS", "1")  # benchmark the kernels themselves

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import flash_attn_ext  # noqa: E402

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def visible_pairs(L, S, left, right):
    """Visible (query, key) pairs, bottom-right aligned (L == S here)."""
    o, n = S - L, 0
    for i in range(L):
        lo = 0 if left < 0 else max(0, i + o - left)
        hi = S if right < 0 else min(S, i + o + right + 1)
        n += max(0, hi - lo)
    return n


def cuda_time(fn, reps):
    """Median milliseconds over reps after two warm-ups, with CUDA events."""
    fn(), fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def matmul_ceiling(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (cuda_time(lambda: a @ b, 20) * 1e-3) / 1e12


def runners(q, k, v, causal, window, backward):
    left, right = window if window else (-1, 0 if causal else -1)

    def wrap(fwd):
        if not backward:
            return fwd

        def step():
            out = fwd()
            out.backward(grad)

        grad = torch.randn_like(q)
        return step

    def ours():
        return flash_attn_ext.attention(q, k, v, window_size=(left, right))

    out = {"ours": wrap(ours)}
    gqa = q.shape[1] != k.shape[1]
    mask = None
    if window:  # SDPA has no window: the equivalent boolean mask (efficient backend only)
        i = torch.arange(q.shape[2], device="cuda").unsqueeze(1)
        j = torch.arange(k.shape[2], device="cuda")
        mask = (j >= i - left) & (j <= i + right)
    for name, backend in BACKENDS.items():

        def theirs(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa
                )

        out[name] = wrap(theirs)
    return out


def grid(quick):
    rows = []
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    dims = [64, 128] if quick else [64, 128, 256]
    seqs = [1024, 4096] if quick else [1024, 4096, 16384]
    for dtype in dtypes:
        for D in dims:
            for L in seqs:
                for causal in (False, True):
                    rows.append(dict(dtype=dtype, D=D, L=L, Hq=2048 // D, Hkv=2048 // D, causal=causal, window=None))
    L = 4096 if quick else 16384
    rows.append(dict(dtype=torch.bfloat16, D=128, L=L, Hq=16, Hkv=16, causal=True, window=(4095, 0)))
    rows.append(dict(dtype=torch.bfloat16, D=128, L=L, Hq=32, Hkv=8, causal=True, window=None))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small grid of scripts/gpu_check.sh")
    ap.add_argument("--passes", default="fwd,fwdbwd")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--csv")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention_cuda.py needs a CUDA GPU")
    torch.manual_seed(0)
    ceiling = matmul_ceiling()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    header = ["pass", "dtype", "D", "L", "Hq/Hkv", "mask", "ours ms", "TFLOP/s", "of ceil"] + [
        f"/{n}" for n in BACKENDS
    ]
    print(" | ".join(header))
    results = []
    for case in grid(args.quick):
        L, D = case["L"], case["D"]
        B = max(1, 16384 // L)
        mask = f"win{case['window'][0] + 1}" if case["window"] else ("causal" if case["causal"] else "none")
        left, right = case["window"] if case["window"] else (-1, 0 if case["causal"] else -1)
        flops = 4 * B * case["Hq"] * visible_pairs(L, L, left, right) * D
        for pass_ in args.passes.split(","):
            backward = pass_ == "fwdbwd"
            mk = lambda h: torch.randn(B, h, L, D, device="cuda", dtype=case["dtype"], requires_grad=backward)  # noqa: E731
            q, k, v = mk(case["Hq"]), mk(case["Hkv"]), mk(case["Hkv"])
            row = dict(
                pass_=pass_,
                dtype=str(case["dtype"]).replace("torch.", ""),
                D=D,
                L=L,
                heads=f"{case['Hq']}/{case['Hkv']}",
                mask=mask,
                B=B,
            )
            times = {}
            for name, fn in runners(q, k, v, case["causal"], case["window"], backward).items():
                try:
                    times[name] = cuda_time(fn, args.reps)
                except RuntimeError as e:  # backend unavailable for this case
                    times[name] = float("nan")
                    if name == "ours":
                        print(f"  ours failed: {e}")
            total = flops * (3.5 if backward else 1.0)
            tflops = total / (times["ours"] * 1e-3) / 1e12
            row.update(
                ours_ms=times["ours"],
                tflops=tflops,
                of_ceiling=tflops / ceiling,
                **{f"{n}_ms": times[n] for n in BACKENDS},
            )
            results.append(row)
            ratios = [f"{times['ours'] / times[n]:.2f}" if times[n] == times[n] else "n/a" for n in BACKENDS]
            print(
                " | ".join(
                    [
                        pass_,
                        row["dtype"],
                        str(D),
                        str(L),
                        row["heads"],
                        mask,
                        f"{times['ours']:.3f}",
                        f"{tflops:.1f}",
                        f"{tflops / ceiling:.3f}",
                    ]
                    + ratios
                ),
                flush=True,
            )
            del q, k, v
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0].keys()) + ["ceiling_tflops"])
            w.writeheader()
            for r in results:
                w.writerow(dict(r, ceiling_tflops=ceiling))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in ["ours"] + list(BACKENDS):
            # a backend's TFLOP/s: same FLOPs, its own time
            pts = [
                (r["L"], r["tflops"] * r["ours_ms"] / r[f"{name}_ms"])
                for r in results
                if r["pass_"] == "fwd"
                and r["mask"] == "causal"
                and r["D"] == 128
                and r["dtype"] == "bfloat16"
                and r["heads"] == "16/16"
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (causal, D=128, bf16)")
        ax.set_ylabel("forward TFLOP/s")
        ax.axhline(ceiling, color="grey", linestyle=":", label="bf16 matmul")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
