"""What each rank of the context-parallel tests runs (tests/distributed/test_context_parallel.py
spawns one process per rank over gloo): every case of `cases(world)` against single-process
attention() and the float64 reference, then the error cases and the random-shape run. Each rank
saves {case id: None (passed) or the failure} for the test process to assert on."""

import dataclasses
import datetime
import random
import traceback
import zlib

import torch
import torch.distributed as dist

import flash_attn_ext
from flash_attn_ext.distributed import ring_attention, ulysses_attention, zigzag_shard, zigzag_unshard
from reference import assert_lse_matches, assert_matches, reference_attention

FUNCTIONS = {"ring": ring_attention, "ulysses": ulysses_attention}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: str
    dtype: torch.dtype
    hq: int
    hkv: int
    cq: int  # query rows per zigzag chunk (the full length is 2 x world x cq)
    ck: int
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    d: int = 16

    @property
    def id(self):
        return f"{self.fn}-{self.name}-{str(self.dtype).split('.')[-1]}"


def cases(world: int):
    gqa = 3 if world == 3 else 2  # heads that ulysses can shard at this world size
    configs = [
        dict(name="causal_mha", hq=12, hkv=12, cq=5, ck=5, causal=True),
        dict(name="full_gqa_l_ne_s", hq=12, hkv=gqa, cq=3, ck=7),
        dict(name="window_mqa", hq=12, hkv=1, cq=6, ck=6, window=(5, 3)),
        dict(name="causal_window_gqa", hq=12, hkv=gqa, cq=4, ck=6, causal=True, window=(7, 0)),
        dict(name="softcap_causal", hq=12, hkv=12, cq=4, ck=4, causal=True, softcap=5.0),
        # L > S, bottom-right: the first rows see no key at all (out 0, lse -inf)
        dict(name="rows_seeing_nothing", hq=12, hkv=1, cq=5, ck=3, window=(-1, 4)),
        dict(name="head_dim_64_window_wide", hq=12, hkv=gqa, cq=8, ck=8, window=(9, 11), d=64),
    ]
    out = []
    for fn in FUNCTIONS:
        for dtype in (torch.float32, torch.bfloat16):
            out += [Case(fn=fn, dtype=dtype, **c) for c in configs]
    return out


def _inputs(c: Case, world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    L, S = 2 * world * c.cq, 2 * world * c.ck
    shapes = ((c.hq, L, c.d), (c.hkv, S, c.d), (c.hkv, S, c.d), (c.hq, L, c.d))
    # Values the dtype holds exactly (float64 copies of them): the reference sees what the kernels see.
    q, k, v, dout = (torch.randn(2, *shape, generator=g, dtype=torch.float64).to(c.dtype).double() for shape in shapes)
    dlse = torch.randn(2, c.hq, L, generator=g, dtype=torch.float64).float().double()
    return q, k, v, dout, dlse


def _grads(fn, q, k, v, dout, dlse, dtype):
    """out, lse and the gradients of <out, dout> + <lse, dlse> with respect to q, k, v."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout.to(out.dtype), dlse.to(lse.dtype)))
    return out.detach(), lse.detach(), grads


def check_case(c: Case, world: int) -> None:
    q, k, v, dout, dlse = _inputs(c, world, seed=zlib.crc32(c.id.encode()) % 1000)  # alike on every rank
    opts = dict(causal=c.causal, window_size=c.window, softcap=c.softcap)
    shard = lambda t: zigzag_shard(t, 2)  # noqa: E731
    ours = _grads(
        lambda q, k, v: FUNCTIONS[c.fn](q, k, v, return_lse=True, **opts),
        *(shard(t) for t in (q, k, v, dout, dlse)),
        c.dtype,
    )
    single = _grads(
        lambda q, k, v: flash_attn_ext.attention(q, k, v, return_lse=True, **opts), q, k, v, dout, dlse, c.dtype
    )
    names = ("out", "lse", "dq", "dk", "dv")
    flat = lambda r: (r[0], r[1], *r[2])  # noqa: E731
    if c.dtype == torch.float32:  # the same kernels over other blocks: float32 rounding apart
        for name, a, b in zip(names, flat(ours), flat(single)):
            b = shard(b)
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a)), f"{c.id} {name}: -inf rows differ"
            err = (a[finite].double() - b[finite].double()).abs().max().item() if finite.any() else 0.0
            tol = 1e-5 * max(1.0, b[finite].abs().max().item() if finite.any() else 1.0)
            assert err <= tol, f"{c.id} {name}: max error {err:.3e} against attention() > {tol:.3e}"
        return
    # bfloat16: SPEC's rule against the float64 reference (the input-dtype baseline's error x 2)
    w = (c.window[0], 0 if c.causal else c.window[1]) if c.causal and c.window[1] < 0 else c.window
    ref = lambda dt: _grads(  # noqa: E731
        lambda q, k, v: reference_attention(q, k, v, window=w, softcap=c.softcap, dtype=dt), q, k, v, dout, dlse, dt
    )
    r64, low = flat(ref(torch.float64)), flat(ref(c.dtype))
    for i, (name, a) in enumerate(zip(names, flat(ours))):
        if name == "lse":
            assert_lse_matches(a, shard(r64[1]), c.dtype, f"{c.id} lse")
        else:
            assert_matches(a, shard(r64[i]), shard(low[i]), c.dtype, f"{c.id} {name}", grad=name != "out")


def _expect_error(fn, match: str) -> None:
    try:
        fn()
    except ValueError as e:
        assert match in str(e), f"error {e!r} does not say {match!r}"
        return
    raise AssertionError(f"no ValueError (expected one saying {match!r})")


def error_cases(world: int, rank: int):
    """Each is wrong on one rank only and must raise on every rank (and then let the next run)."""
    q = torch.randn(1, 4, 4 * world, 8)
    last = world - 1
    odd = q[:, :, :-1] if rank == last else q[:, :, : 4 * world]
    narrow = q[..., :4] if rank == 0 else q
    return {
        "error-odd-length-on-one-rank": lambda: _expect_error(
            lambda: ring_attention(odd, odd, odd, causal=True), f"on rank {last}: a zigzag shard"
        ),
        "error-head-dim-differs": lambda: _expect_error(
            lambda: ring_attention(narrow, narrow, narrow), "disagree on head dim"
        ),
        "error-ulysses-heads": lambda: _expect_error(
            lambda: ulysses_attention(*(torch.randn(1, world + 1, 2, 8),) * 3), "must divide by the world size"
        ),
        "error-not-4d": lambda: _expect_error(
            lambda: ring_attention(q[0] if rank == last else q, q, q), f"on rank {last}: query must be 4-D"
        ),
    }


def random_run(world: int, rank: int, steps: int = 100) -> None:
    """steps calls with shapes drawn alike on every rank (one in ten wrong on one rank), checked
    against attention(); then a monitored barrier proves that no rank fell behind."""
    rng = random.Random(1234)
    for step in range(steps):
        fn = rng.choice(["ring", "ulysses"])
        hkv = rng.choice([1, world, 2 * world])
        hq = hkv * rng.choice([1, 2]) if hkv >= world else world * rng.choice([1, 2])
        cq, ck = rng.randint(1, 4), rng.randint(1, 4)
        causal = rng.random() < 0.5
        window = rng.choice([(-1, -1), (rng.randint(0, 9), rng.randint(0, 9))])
        bad_rank = rng.randrange(world) if step % 10 == 9 else None
        g = torch.Generator().manual_seed(step)
        q = torch.randn(1, hq, 2 * world * cq, 8, generator=g)
        k, v = (torch.randn(1, hkv, 2 * world * ck, 8, generator=g) for _ in range(2))
        qs, ks, vs = (zigzag_shard(t, 2) for t in (q, k, v))
        if bad_rank is not None:
            if rank == bad_rank:
                ks = ks[:, :, :-1]
            _expect_error(lambda: FUNCTIONS[fn](qs, ks, vs, causal=causal, window_size=window), f"on rank {bad_rank}")
            continue
        out = FUNCTIONS[fn](qs, ks, vs, causal=causal, window_size=window)
        ref = zigzag_shard(flash_attn_ext.attention(q, k, v, causal=causal, window_size=window), 2)
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"step {step} {fn} hq={hq} hkv={hkv} cq={cq} ck={ck} {causal} {window}: error {err:.3e}"
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))


def unshard_check(world: int) -> None:
    x = torch.randn(2, 3, 2 * world * 3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    xs = zigzag_shard(x, 2).requires_grad_()
    full = zigzag_unshard(xs, 2)
    assert torch.equal(full, x), "zigzag_unshard(zigzag_shard(x)) != x"
    (full * x).sum().backward()  # every rank's loss counts: the shard's gradient is world x its part of x
    assert torch.equal(xs.grad, world * zigzag_shard(x, 2)), "zigzag_unshard's gradient"


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results = {}

    def record(name, fn):
        try:
            fn()
            results[name] = None
        except Exception as e:  # noqa: BLE001  (reported per case to the test process)
            results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"

    for c in cases(world):
        record(c.id, lambda: check_case(c, world))
    for name, fn in error_cases(world, rank).items():
        record(name, fn)
    record("zigzag-unshard", lambda: unshard_check(world))
    record("random-100-steps", lambda: random_run(world, rank))
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
