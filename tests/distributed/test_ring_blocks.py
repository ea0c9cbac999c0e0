"""ring_attention's block planning (chunk_block) against brute force: the block it returns, with
its shifted top-left window, must see exactly the (row, key) pairs the global window lets
through, and nothing outside it; None exactly when no pair is visible."""

import itertools
import random

from flash_attn_ext.distributed._ring import chunk_block


def _visible(i, j, d, left, right):
    return (left < 0 or j >= i + d - left) and (right < 0 or j <= i + d + right)


def test_chunk_block_matches_brute_force():
    rng = random.Random(0)
    for _ in range(4000):
        cq, ck = rng.randint(1, 9), rng.randint(1, 9)
        left, right = rng.choice([-1, rng.randint(0, 12)]), rng.choice([-1, rng.randint(0, 12)])
        d = rng.randint(-20, 20)
        want = {(i, j) for i, j in itertools.product(range(cq), range(ck)) if _visible(i, j, d, left, right)}
        block = chunk_block(d, cq, ck, left, right)
        if block is None:
            assert not want, (d, cq, ck, left, right)
            continue
        q0, q1, k0, k1, wl, wr = block
        assert 0 <= q0 < q1 <= cq and 0 <= k0 < k1 <= ck and wl >= -1 and wr >= -1
        got = {
            (q0 + i, k0 + j)
            for i, j in itertools.product(range(q1 - q0), range(k1 - k0))
            if (wl < 0 or j >= i - wl) and (wr < 0 or j <= i + wr)  # the kernels' top-left window
        }
        assert got == want, (d, cq, ck, left, right, block)
