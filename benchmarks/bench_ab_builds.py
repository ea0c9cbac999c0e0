"""A/B of two builds of the extension (e.g. a refactor against the commit before it), interleaved.

Two checkouts, each built in place (`python setup.py build_ext --inplace`), are timed by turns in
fresh processes: round r runs A then B, round r + 1 B then A, so the VM's drift (+-20% between
minutes on the 2-core development machine) hits both alike. Each process times every case once
(several calls of a small case, averaged, >= 0.2 s a case) and PyTorch's CPU flash SDPA on the same
inputs; the table keeps each build's best round, the ratio B / A, and each build's ratio to PyTorch.

    git worktree add /tmp/base HEAD~1 && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/bench_ab_builds.py /tmp/base . --rounds 5 --csv ab.csv
"""

import argparse
import json
import os
import subprocess
import sys
import time

# Cases: (name, dtype, B, Hq, Hkv, L, S, D, causal, backward, kernel config).
CASES = (
    [
        (
            f"{dt} L=S=2048 D={D}{' causal' if causal else ''} {'fwd+bwd' if bwd else 'fwd'}",
            dt,
            2,
            16,
            16,
            2048,
            2048,
            D,
            causal,
            bwd,
            {},
        )
        for dt in ("float32", "bfloat16")
        for D, causal in ((64, False), (128, True))
        for bwd in (False, True)
    ]
    + [
        # the skinny backward (few query rows per key tile: row dot products) and a GQA decode step
        # on the tile kernel (cpu_decode off): the few-rows paths of both kernels
        (f"{dt} B=60 H=4 L=1 S=239 D=32 fwd+bwd", dt, 60, 4, 4, 1, 239, 32, False, True, {})
        for dt in ("float32", "bfloat16")
    ]
    + [
        (
            f"{dt} GQA 32/8 L=1 S=4096 D=128 fwd (decode off)",
            dt,
            1,
            32,
            8,
            1,
            4096,
            128,
            False,
            False,
            {"cpu_decode": "off"},
        )
        for dt in ("float32", "bfloat16")
    ]
)


def worker(tree):
    """Times every case once with the build in `tree`; prints {case: [ours_s, torch_s]} as JSON."""
    sys.path.insert(0, os.path.abspath(tree))
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flash_attn_ext

    assert os.path.abspath(flash_attn_ext.__file__).startswith(os.path.abspath(tree)), flash_attn_ext.__file__
    torch.manual_seed(0)
    out = {}
    for name, dt, B, Hq, Hkv, L, S, D, causal, bwd, config in CASES:
        dtype = getattr(torch, dt)
        q = torch.randn(B, Hq, L, D, dtype=dtype, requires_grad=bwd)
        k, v = (torch.randn(B, Hkv, S, D, dtype=dtype, requires_grad=bwd) for _ in range(2))
        g = torch.randn(B, Hq, L, D, dtype=dtype)

        def ours():
            with flash_attn_ext.kernel_config(**config):
                o = flash_attn_ext.attention(q, k, v, causal=causal, alignment="top_left")
                if bwd:
                    torch.autograd.grad(o, (q, k, v), g)

        def theirs():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv)
                if bwd:
                    torch.autograd.grad(o, (q, k, v), g)

        times = []
        for fn in (ours, theirs):
            fn()  # warm-up
            t0 = time.perf_counter()
            fn()
            reps = max(1, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps)
        out[name] = times
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="checkout A (the baseline), built in place")
    ap.add_argument("b", help="checkout B (the change), built in place")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--csv")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    best = {"a": {}, "b": {}}
    for r in range(a.rounds):
        for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
            tree = getattr(a, side)
            res = subprocess.run(
                [sys.executable, __file__, a.a, a.b, "--worker", tree],
                capture_output=True,
                text=True,
                cwd=tree,
                check=True,
            )
            for name, t in json.loads(res.stdout.strip().splitlines()[-1]).items():
                old = best[side].get(name, [float("inf")] * 2)
                best[side][name] = [min(x, y) for x, y in zip(old, t)]
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)

    sys.path.insert(0, os.path.abspath(a.b))
    import torch

    from flash_attn_ext.config import cpu_description

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cpu: {cpu_description()}")
    print(f"A = {a.a}, B = {a.b}, best of {a.rounds} interleaved rounds")
    print(f"{'case':52} {'A ms':>9} {'B ms':>9} {'B/A':>6} {'A/torch':>8} {'B/torch':>8}")
    rows = []
    for name, *_ in CASES:
        (ta, pa), (tb, pb) = best["a"][name], best["b"][name]
        rows.append(
            dict(case=name, a_ms=ta * 1e3, b_ms=tb * 1e3, b_over_a=tb / ta, a_over_torch=ta / pa, b_over_torch=tb / pb)
        )
        print(f"{name:52} {ta * 1e3:9.2f} {tb * 1e3:9.2f} {tb / ta:6.3f} {ta / pa:8.2f} {tb / pb:8.2f}")
    if a.csv:
        from bench_attention import write_csv

        write_csv(a.csv, rows)
        print(f"wrote {a.csv}")


if __name__ == "__main__":
    main()
