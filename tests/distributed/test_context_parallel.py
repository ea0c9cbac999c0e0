"""flash_attn_ext.distributed on CPU over gloo, world sizes 2, 3 and 4 (one spawned process per
rank, every case of cp_worker.py in one spawn per world size): ring_attention and
ulysses_attention against single-process attention() (float32) and the float64 reference
(bfloat16, SPEC's rule), forward, lse and gradients; errors raised on every rank; a 100-step
random run that leaves no rank behind."""

import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cp_worker

WORLDS = (2, 3, 4)
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


@functools.lru_cache(maxsize=None)
def results(world):
    """Each rank's {case: None or failure} of one spawn of `world` processes."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(cp_worker.run, (world, os.path.join(d, "init"), d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]


def _ids(world):
    ids = [c.id for c in cp_worker.cases(world)]
    ids += list(cp_worker.error_cases(world, 0))
    return ids + ["zigzag-unshard", "random-100-steps"]


@pytest.mark.parametrize("world,case", [(w, c) for w in WORLDS for c in _ids(w)], ids=lambda x: str(x))
def test_context_parallel(world, case):
    per_rank = results(world)
    failures = [f"rank {r}: {res.get(case, 'not run')}" for r, res in enumerate(per_rank) if res.get(case, "x")]
    assert not failures, "\n".join(failures)
