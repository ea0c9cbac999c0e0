"""Packed variable-length batches (flash_attn_varlen_func) against padding, in one process.

A batch of sequences of different lengths (causal self-attention, as in packed fine-tuning)
is served three ways: our varlen kernels on the packed (total, H, D) tensors; our dense kernel
on the right-padded (B, max_len, H, D) batch (causal top-left, so valid rows never see a pad);
PyTorch's SDPA on the same padded batch (every CPU or CUDA backend it has). GFLOP/s count only
the useful work (each sequence's own causal pairs), so padding shows up as lost throughput;
the machine's matmul ceiling is measured in the same run.

    python benchmarks/bench_varlen.py [--lengths 2048 64 700 1500 32 900 ...] [--dtypes bfloat16 float32]
                                      [--passes fwd fwd+bwd] [--device cpu|cuda] [--csv out.csv] [--plot out.png]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import attn_flops, timeit, write_csv  # noqa: E402

from flash_attn_ext.flash_attn_interface import flash_attn_func, flash_attn_varlen_func  # noqa: E402

# A skewed mix, as packed SFT batches are: a few long sequences, many short ones.
DEFAULT_LENGTHS = [2048, 64, 700, 1500, 32, 900, 300, 120]


def matmul_ceiling(dtype, device):
    n = 4096 if device == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    t = timeit(_synced(lambda: a @ b, device), min_time=1.0)
    return 2 * n**3 / t / 1e9


def _synced(fn, device):
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def runners(lengths, H, Hkv, D, dtype, device, backward):
    B, total, max_len = len(lengths), sum(lengths), max(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(total, H, D, dtype=dtype, device=device, requires_grad=backward)
    k = torch.randn(total, Hkv, D, dtype=dtype, device=device, requires_grad=backward)
    v = torch.randn(total, Hkv, D, dtype=dtype, device=device, requires_grad=backward)

    def pad(t):  # (total, h, D) -> right-padded (B, max_len, h, D), a leaf of its own
        out = t.new_zeros(B, max_len, t.shape[1], D)
        for b, n in enumerate(lengths):
            out[b, :n] = t.detach()[cu[b] : cu[b] + n]
        return out.requires_grad_(backward)

    qp, kp, vp = pad(q), pad(k), pad(v)
    qt, kt, vt = (x.transpose(1, 2) for x in (qp, kp, vp))
    fns = {
        "ours_varlen": (lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True), (q, k, v)),
        "ours_padded": (lambda: flash_attn_func(qp, kp, vp, causal=True), (qp, kp, vp)),
    }
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    if device == "cuda":
        backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for be in backends:

        def sdpa(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        fns["torch_padded_" + be.name.lower()] = (sdpa, (qp, kp, vp))
    out = {}
    for name, (fn, inputs) in fns.items():
        if backward:

            def fwd_bwd(fn=fn, inputs=inputs):
                o = fn()
                return torch.autograd.grad(o, inputs, torch.ones_like(o))

            out[name] = fwd_bwd
        else:
            out[name] = fn
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=DEFAULT_LENGTHS)
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--csv")
    ap.add_argument("--plot", help="PNG: useful GFLOP/s per method and row")
    args = ap.parse_args()
    dev, H, Hkv, D, lengths = args.device, args.heads, args.kv_heads, args.dim, args.lengths
    useful = sum(attn_flops(1, H, n, n, D, True) for n in lengths)
    padded = attn_flops(len(lengths), H, max(lengths), max(lengths), D, True)
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}; {len(lengths)} sequences, {sum(lengths)} tokens (max {max(lengths)}), "
        f"H={H} Hkv={Hkv} D={D}, causal; padding does {padded / useful:.2f}x the useful work"
    )
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ceiling = matmul_ceiling(dtype, dev)
        for passes in args.passes:
            backward = passes == "fwd+bwd"
            flops = useful * (3.5 if backward else 1.0)  # backward: 2.5x the forward's matmuls
            times = {}
            for name, fn in runners(lengths, H, Hkv, D, dtype, dev, backward).items():
                try:
                    times[name] = timeit(_synced(fn, dev), min_time=args.min_time)
                except RuntimeError as e:  # a backend that does not take this case
                    print(f"  {name}: not available ({str(e).splitlines()[0][:80]})")
            base = times["ours_varlen"]
            for name, t in times.items():
                gflops = flops / t / 1e9
                rows.append(
                    dict(
                        dtype=dtype_name,
                        passes=passes,
                        method=name,
                        ms=t * 1e3,
                        useful_gflops=gflops,
                        of_ceiling=gflops / ceiling,
                        time_vs_ours_varlen=t / base,
                        ceiling_gflops=ceiling,
                    )
                )
                print(
                    f"{dtype_name:9} {passes:8} {name:28} {t * 1e3:9.2f} ms {gflops:8.1f} GFLOP/s "
                    f"{gflops / ceiling:6.2f} of matmul ({ceiling:.0f}) {t / base:6.2f}x ours_varlen",
                    flush=True,
                )
    if args.csv and rows:
        write_csv(args.csv, rows)
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = sorted({(r["dtype"], r["passes"]) for r in rows}, key=str)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(methods)
        for m_i, m in enumerate(methods):
            ys = [
                next((r["useful_gflops"] for r in rows if (r["dtype"], r["passes"]) == g and r["method"] == m), 0)
                for g in groups
            ]
            ax.bar([x + m_i * width for x in range(len(groups))], ys, width, label=m)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], [f"{d} {p}" for d, p in groups])
        ax.set_ylabel("useful GFLOP/s")
        ax.set_title(f"packed batch of {len(lengths)} sequences, {where}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
