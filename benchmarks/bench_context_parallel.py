"""Context-parallel attention (flash_attn_ext.distributed) on this machine: W gloo ranks over
loopback against one process at the same total sequence length.

For each total length, world size and pass (fwd, fwd+bwd), W processes each hold a zigzag shard
(B, H, L/W, D) and run ring_attention and ulysses_attention; one process runs attention() and
PyTorch's SDPA (flash backend) on the whole sequence. Reported per method:
  time (slowest rank), the time against one process running attention(), peak memory per rank
  (peak RSS growth from before the inputs were made, so inputs, outputs and every temporary
  count; MiB, the largest rank's) against the one process's, and for the ring with/alone = time
  with transfers / time of the same blocks computed with no transfer (1.00: every transfer
  hidden behind compute); ring_transfers_alone times the same transfers with no compute.
Ranks get cores // W threads each (at least 1: W = 4 on 2 cores oversubscribes, as said in
the table); the single process gets all cores. The matmul ceiling and the loopback transfer rate
are measured in the same run. gloo over loopback only: the NCCL path runs the same code and
has not run on GPUs here.

    python benchmarks/bench_context_parallel.py [--lengths 16384 32768 65536 131072] [--worlds 2 4]
        [--passes fwd fwd+bwd] [--heads 4] [--kv-heads 1] [--dim 64] [--dtype float32]
        [--no-causal] [--csv out.csv] [--plot out.png]
"""

import argparse
import datetime
import os
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import attn_flops, matmul_ceiling, write_csv  # noqa: E402

import flash_attn_ext  # noqa: E402
from flash_attn_ext.config import cpu_description  # noqa: E402
from flash_attn_ext.distributed import ring_attention, ulysses_attention  # noqa: E402
from flash_attn_ext.distributed._ring import Ring  # noqa: E402


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """Peak resident memory (MiB) over the with-block above `base` (the RSS before the inputs
    were made), sampled every 0.5 ms. The processes run with MALLOC_MMAP_THRESHOLD_ set
    (main()), so freed tensors leave the RSS at once."""

    def __init__(self, base):
        self.base = base

    def __enter__(self):
        self.peak, self.done = 0.0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.mib = max(0.0, max(self.peak, _rss_mib()) - self.base)


def _call(fn, q, k, v, backward):
    if not backward:
        with torch.no_grad():
            return fn(q, k, v)
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def _timed(fn, reps, sync=lambda: None):
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _tensors(B, H, Hkv, L, D, dtype, backward, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, h, L, D, generator=g).to(dtype).requires_grad_(backward) for h in (H, Hkv, Hkv)
    ]  # fmt: skip


def _rank_main(rank, world, init, cfg, out):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    B, H, Hkv, L, D, dtype, causal, backward, reps = cfg
    base = _rss_mib()
    q, k, v = _tensors(B, H, Hkv, L // world, D, dtype, backward, seed=rank)
    sync = lambda: dist.barrier()  # noqa: E731
    res = {}
    methods = {
        "ring": lambda q, k, v: ring_attention(q, k, v, causal=causal),
        "ring_blocks_alone": lambda q, k, v: ring_attention(q, k, v, causal=causal, _communicate=False),
    }
    if H % world == 0 and (Hkv % world == 0 or world % Hkv == 0):
        methods["ulysses"] = lambda q, k, v: ulysses_attention(q, k, v, causal=causal)
    for name, fn in methods.items():
        _call(fn, q, k, v, backward)  # warm-up
        with _PeakRss(base) as mem:
            t = _timed(lambda: _call(fn, q, k, v, backward), reps, sync)
        stats = torch.tensor([t, mem.mib])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank, the most memory
        res[name] = tuple(stats.tolist())
    # the K/V transfers alone: W - 1 ring steps (x 2 for fwd+bwd: K/V again, then dK/dV)
    ring = Ring(None, rank, world, 0)

    def transfers():
        kv = (k.detach(), v.detach())
        for _ in range((world - 1) * (2 if backward else 1) + (1 if backward else 0)):
            ring.post(kv)
            kv = ring.wait()

    t = torch.tensor([_timed(transfers, reps, sync)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    res["transfers_alone"] = (t.item(), float("nan"))
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def _single_main(_, cfg, out):
    torch.set_num_threads(os.cpu_count() or 1)
    B, H, Hkv, L, D, dtype, causal, backward, reps = cfg
    base = _rss_mib()
    q, k, v = _tensors(B, H, Hkv, L, D, dtype, backward, seed=0)
    res = {}

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    for name, fn in {"one_process": lambda q, k, v: flash_attn_ext.attention(q, k, v, causal=causal),
                     "one_process_torch_sdpa_flash": sdpa}.items():  # fmt: skip
        _call(fn, q, k, v, backward)
        with _PeakRss(base) as mem:
            t = _timed(lambda: _call(fn, q, k, v, backward), reps)
        res[name] = (t, mem.mib)
    torch.save(res, out)


def run_config(world, cfg):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        if world == 0:
            mp.spawn(_single_main, (cfg, out), nprocs=1, join=True)
        else:
            mp.spawn(_rank_main, (world, os.path.join(d, "init"), cfg, out), nprocs=world, join=True)
        return torch.load(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--worlds", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--csv")
    ap.add_argument("--plot", help="PNG: time against one process per length and world size")
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned processes' allocator
    dtype, causal = getattr(torch, args.dtype), not args.no_causal
    ceiling = matmul_ceiling(dtype)
    print(
        f"{cpu_description()}; {os.cpu_count()} cores; torch {torch.__version__}; gloo over loopback\n"
        f"B={args.batch} H={args.heads} Hkv={args.kv_heads} D={args.dim} {args.dtype} "
        f"{'causal' if causal else 'full'}; matmul ceiling {ceiling:.0f} GFLOP/s (all cores)"
    )
    print(
        f"{'L':>7} {'W':>2} {'pass':8} {'method':30} {'s':>8} {'vs 1 proc':>9} {'MiB/rank':>9} "
        f"{'vs 1 proc':>9} {'with/alone':>10}"
    )
    rows = []
    for L in args.lengths:
        for passes in args.passes:
            backward = passes == "fwd+bwd"
            cfg = (args.batch, args.heads, args.kv_heads, L, args.dim, dtype, causal, backward, args.reps)
            single = run_config(0, cfg)
            base_t, base_m = single["one_process"]
            flops = attn_flops(args.batch, args.heads, L, L, args.dim, causal) * (3.5 if backward else 1.0)
            results = [(1, n, t, m, None) for n, (t, m) in single.items()]
            for world in args.worlds:
                res = run_config(world, cfg)
                alone, transfers = res["ring_blocks_alone"][0], res["transfers_alone"][0]
                for n in ("ring", "ulysses"):
                    if n in res:
                        t, m = res[n]
                        results.append((world, n, t, m, t / alone if n == "ring" else None))
                results.append((world, "ring_blocks_alone", alone, res["ring_blocks_alone"][1], None))
                results.append((world, "ring_transfers_alone", transfers, float("nan"), None))
            for world, n, t, m, ratio in results:
                row = dict(
                    length=L, world=world, passes=passes, method=n, seconds=t, time_vs_one_process=t / base_t,
                    peak_mib_per_rank=m, mem_vs_one_process=m / base_m if base_m > 0 else float("nan"),
                    with_over_alone=ratio, gflops_total=flops / t / 1e9,
                    ceiling_gflops=ceiling, cpu=cpu_description(),
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{L:7} {world:2} {passes:8} {n:30} {t:8.2f} {t / base_t:9.2f} {m:9.0f} "
                    f"{row['mem_vs_one_process']:9.2f} {'' if ratio is None else f'{ratio:10.2f}':>10}",
                    flush=True,
                )
    if args.csv and rows:
        write_csv(args.csv, rows)
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.passes), figsize=(5 * len(args.passes), 4), squeeze=False)
        for ax, passes in zip(axes[0], args.passes):
            for world in args.worlds:
                for n in ("ring", "ulysses"):
                    pts = [(r["length"], r["time_vs_one_process"]) for r in rows
                           if r["passes"] == passes and r["world"] == world and r["method"] == n]  # fmt: skip
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{n} W={world}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("total sequence length")
            ax.set_ylabel("time / one process")
            ax.set_title(passes)
            ax.legend(fontsize=7)
        fig.suptitle(cpu_description()[:90], fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
