"""Concurrency and determinism (issue 9): calls from several Python threads at once give the
results of the same calls made one at a time, bitwise; CPU forward and backward are bitwise
repeatable for a fixed thread count (every op, every path: tiles, GQA packing, split-KV,
decode, varlen, bf16 tiles, dropout with a seeded generator)."""

import threading

import pytest
import torch

import flash_attn_ext
from reference import make_qkv
from tile_backends import cpu_tile_cases

N_THREADS = 4


def _workloads(device):
    """Named calls, each returning a tuple of tensors; each builds its own inputs (a KV cache
    is written in place, so every call gets its own)."""

    def fwd(dtype, Hq, Hkv, L, S, D, **kw):
        def run():
            q, k, v = make_qkv(2, Hq, Hkv, L, S, D, dtype, device, seed=L + S + D)
            return (flash_attn_ext.attention(q, k, v, **kw),)

        return run

    def fwd_bwd(dtype, **kw):
        def run():
            q, k, v = make_qkv(2, 8, 2, 150, 170, 64, dtype, device, seed=3, requires_grad=True)
            out = flash_attn_ext.attention(q, k, v, **kw)
            g = torch.Generator().manual_seed(4)
            dout = torch.randn(out.shape, generator=g).to(dtype).to(device)
            return (out.detach(),) + torch.autograd.grad(out, (q, k, v), dout)

        return run

    def dropout():
        q, k, v = make_qkv(1, 4, 4, 90, 90, 32, torch.float32, device, seed=5, requires_grad=True)
        with torch.random.fork_rng(devices=[] if device == "cpu" else [device]):
            torch.manual_seed(6)  # dropout draws its seed from the default generator
            out = flash_attn_ext.attention(q, k, v, dropout_p=0.3)
        return (out.detach(),) + torch.autograd.grad(out.sum(), (q, k, v))

    def decode(dtype):
        def run():
            g = torch.Generator().manual_seed(7)
            kc = torch.randn(2, 600, 2, 64, generator=g).to(dtype).to(device)
            vc = torch.randn(2, 600, 2, 64, generator=g).to(dtype).to(device)
            q = torch.randn(2, 1, 8, 64, generator=g).to(dtype).to(device)
            new = torch.randn(2, 1, 2, 64, generator=g).to(dtype).to(device)
            lens = torch.tensor([599, 77], dtype=torch.int32, device=device)
            with torch.no_grad():
                out = flash_attn_ext.attention_with_kvcache(q, kc, vc, new, new, cache_seqlens=lens, causal=True)
            return out, kc, vc

        return run

    def varlen():
        from flash_attn_ext.flash_attn_interface import flash_attn_varlen_func

        g = torch.Generator().manual_seed(8)
        cu = torch.tensor([0, 50, 51, 180], dtype=torch.int32, device=device)
        q = torch.randn(180, 4, 32, generator=g).to(device)
        k = torch.randn(180, 2, 32, generator=g).to(device)
        v = torch.randn(180, 2, 32, generator=g).to(device)
        return (flash_attn_varlen_func(q, k, v, cu, cu, 129, 129, causal=True),)

    return {
        "fwd-f32-gqa-causal": fwd(torch.float32, 8, 2, 200, 260, 64, causal=True),
        "fwd-bf16-window": fwd(torch.bfloat16, 4, 4, 300, 300, 128, window_size=(40, 7)),
        "fwd-f32-split-kv": fwd(torch.float32, 2, 1, 3, 2000, 64),
        "fwd+bwd-f32": fwd_bwd(torch.float32, causal=True),
        "fwd+bwd-bf16": fwd_bwd(torch.bfloat16, window_size=(30, 30)),
        "fwd+bwd-dropout": dropout,
        "decode-f32": decode(torch.float32),
        "decode-bf16": decode(torch.bfloat16),
        "varlen": varlen,
    }


def _assert_bitwise(a, b, what):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype, what
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), what


# Each CPU tile back end this machine runs for bf16 (brgemm: oneDNN's per-thread kernels and
# tile contexts under concurrent callers).
TILES = pytest.mark.parametrize("dtype,backend", cpu_tile_cases([torch.bfloat16]))


@TILES
def test_every_path_is_bitwise_repeatable(device, dtype, backend):
    """The same call twice (fixed thread count) gives the same bits."""
    with flash_attn_ext.cpu_tiles(backend):
        for name, run in _workloads(device).items():
            _assert_bitwise(run(), run(), name)


@TILES
def test_calls_from_several_threads_match_serial_calls(device, dtype, backend):
    """N_THREADS Python threads run every workload at once (each in a different order); every
    result equals the serial one bitwise. The ops release the GIL, so the kernels overlap."""
    with flash_attn_ext.cpu_tiles(backend):
        _threads_match_serial(device)


def _threads_match_serial(device):
    # Dropout is left out here: it draws from PyTorch's global generator, which threads share.
    work = {n: w for n, w in _workloads(device).items() if "dropout" not in n}
    serial = {name: run() for name, run in work.items()}
    names = list(work)
    results, errors = {}, []
    start = threading.Barrier(N_THREADS)

    def worker(t):
        try:
            start.wait()
            order = names[t % len(names) :] + names[: t % len(names)]
            for rep in range(2):
                for name in order:
                    results[(t, rep, name)] = work[name]()
        except BaseException as e:  # noqa: B902  (report it in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    assert len(results) == N_THREADS * 2 * len(names)
    for (t, rep, name), got in results.items():
        _assert_bitwise(got, serial[name], f"thread {t} rep {rep}: {name}")


@TILES
@pytest.mark.parametrize("threads", [1, 3])
def test_forward_bitwise_repeatable_at_each_thread_count(device, threads, dtype, backend):
    """Forward at a fixed intra-op thread count (1 and 3: the task split changes with it)."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with flash_attn_ext.cpu_tiles(backend):
            for name, run in _workloads(device).items():
                _assert_bitwise(run(), run(), f"{name} at {threads} threads")
    finally:
        torch.set_num_threads(saved)
