"""A/B of the CPU tile back ends (flash_attn_ext.cpu_tiles) in one process, interleaved: each
round times every back end once per shape, so the VM's drift (+-20% between minutes on the
2-core development machine) hits them alike; the table keeps each back end's best round and its
ratio to the automatic choice, with PyTorch's CPU flash time of the same rounds for scale.

    python benchmarks/bench_cpu_tiles.py                       # bf16 + float32, L=2048, D 64/128
    python benchmarks/bench_cpu_tiles.py --rounds 5 --csv tiles.csv
    python benchmarks/bench_cpu_tiles.py --skinny --rounds 7     # issue 16's small shapes, float32 + bf16

A round times each call at least 0.2 s (several calls of a small shape, averaged).
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_ext
from bench_attention import attn_flops, write_csv
from flash_attn_ext.config import cpu_description


def runnable(dtype):
    """The explicit back ends that really run `dtype` here."""
    out = []
    for backend in ("float", "avx512_bf16", "brgemm"):
        with flash_attn_ext.cpu_tiles(backend):
            if flash_attn_ext.cpu_tiles_in_use(dtype)[0] == backend:
                out.append(backend)
    return out


def once(fn, reps=1):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--seq", type=int, nargs="*", default=[2048])
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--skinny",
        action="store_true",
        help="issue 16's small shapes instead: B=60, H=4, D=32, (L, S) in (799, 3), (1, 239), (3, 799)",
    )
    ap.add_argument("--csv")
    a = ap.parse_args()
    if a.skinny:
        a.batch, a.heads = 60, 4
        shapes = [(L, S, 32) for L, S in ((799, 3), (1, 239), (3, 799))]
    else:
        shapes = [(L, L, D) for L in a.seq for D in a.dims]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cpu: {cpu_description()}")
    rows = []
    print(
        f"{'dtype':8} {'L':>5} {'S':>5} {'D':>4} {'causal':>6} {'pass':>7} {'auto':>11} | "
        f"{'back end':>11} {'best ms':>9} {'GFLOP/s':>8} {'/auto':>6} {'/torch':>7}"
    )
    for dtype in (getattr(torch, d) for d in a.dtypes):
        backends = runnable(dtype)
        auto = flash_attn_ext.cpu_tiles_in_use(dtype)[0]
        for L, S, D in shapes:
            for causal in (False, True):
                for pass_ in a.passes:
                    backward = pass_ == "fwd+bwd"
                    q = torch.randn(a.batch, a.heads, L, D, dtype=dtype, requires_grad=backward)
                    k, v = (torch.randn(a.batch, a.heads, S, D, dtype=dtype, requires_grad=backward) for _ in range(2))
                    g = torch.randn(a.batch, a.heads, L, D, dtype=dtype)

                    def ours(backend):
                        def run():
                            with flash_attn_ext.cpu_tiles(backend):
                                o = flash_attn_ext.attention(q, k, v, causal=causal, alignment="top_left")
                                if backward:
                                    torch.autograd.grad(o, (q, k, v), g)

                        return run

                    def theirs():
                        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            if backward:
                                torch.autograd.grad(o, (q, k, v), g)

                    fns = {b: ours(b) for b in backends}
                    fns["torch"] = theirs
                    reps = {}
                    for name, fn in fns.items():
                        fn()  # warm-up: thread pool, oneDNN's kernel generation
                        reps[name] = max(1, int(0.2 / max(once(fn), 1e-6)))
                    best = {name: float("inf") for name in fns}
                    for _ in range(a.rounds):
                        for name, fn in fns.items():
                            best[name] = min(best[name], once(fn, reps[name]))
                    flops = attn_flops(a.batch, a.heads, L, S, D, causal) * (3.5 if backward else 1.0)
                    for b in backends:
                        row = dict(
                            dtype=str(dtype).replace("torch.", ""),
                            L=L,
                            S=S,
                            D=D,
                            causal=causal,
                            pass_=pass_,
                            auto=auto,
                            backend=b,
                            best_ms=best[b] * 1e3,
                            gflops=flops / best[b] / 1e9,
                            ratio_vs_auto=best[b] / best[auto],
                            ratio_vs_torch=best[b] / best["torch"],
                            torch_ms=best["torch"] * 1e3,
                        )
                        rows.append(row)
                        print(
                            f"{row['dtype']:8} {L:>5} {S:>5} {D:>4} {str(causal):>6} {pass_:>7} {auto:>11} | "
                            f"{b:>11} {row['best_ms']:9.2f} {row['gflops']:8.1f} {row['ratio_vs_auto']:6.2f} "
                            f"{row['ratio_vs_torch']:7.2f}",
                            flush=True,
                        )
    if a.csv:
        write_csv(a.csv, rows)
        print(f"wrote {a.csv}")


if __name__ == "__main__":
    main()
