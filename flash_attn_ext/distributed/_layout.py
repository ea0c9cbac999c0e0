"""The zigzag layout of a sequence over W ranks: cut into 2W equal chunks, rank r holds chunks r
and 2W - 1 - r, so that under a causal mask every rank has the same amount of work (one early
chunk, cheap, and one late chunk, dear)."""

import torch
import torch.distributed as dist

from ._checks import rank_and_world


def _chunks(fn: str, length: int, world: int, dim: int) -> int:
    if length % (2 * world):
        raise ValueError(
            f"{fn}: the length along dim {dim} ({length}) must be divisible by 2 x world size ({2 * world})"
        )
    return length // (2 * world)


def zigzag_shard(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's shard of the full sequence x (the same x on every rank) along dim: chunks r and
    2W - 1 - r of 2W, concatenated. A view-free copy; differentiable."""
    rank, world = rank_and_world("flash_attn_ext.distributed.zigzag_shard", group)
    _chunks("flash_attn_ext.distributed.zigzag_shard", x.shape[dim], world, dim)
    pieces = x.chunk(2 * world, dim)
    return torch.cat([pieces[rank], pieces[2 * world - 1 - rank]], dim)


def zigzag_positions(length: int, group=None, device=None) -> torch.Tensor:
    """The global positions (int64) of this rank's shard of a sequence of `length`: what rotary
    embeddings and position ids of the shard must use."""
    return zigzag_shard(torch.arange(length, device=device), 0, group)


def _gather(x: torch.Tensor, dim: int, group, world: int) -> torch.Tensor:
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    ordered = [None] * (2 * world)
    for r, shard in enumerate(shards):
        ordered[r], ordered[2 * world - 1 - r] = shard.chunk(2, dim)
    return torch.cat(ordered, dim)


class _Unshard(torch.autograd.Function):
    # The full sequence from every rank's shard; the gradient of a rank's shard is the sum over
    # ranks of their gradients of the full sequence (each rank's loss counts), as
    # torch.distributed.nn.functional.all_gather's.
    @staticmethod
    def forward(ctx, x, dim, group, world):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group, world)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return zigzag_shard(grad, ctx.dim, ctx.group), None, None, None


def zigzag_unshard(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """The full sequence from this rank's zigzag shard x (every rank calls it with a shard of the
    same shape): an all_gather along dim. Differentiable: a shard's gradient sums the ranks'
    gradients of the full tensor."""
    fn = "flash_attn_ext.distributed.zigzag_unshard"
    _, world = rank_and_world(fn, group)
    if x.shape[dim] % 2:
        raise ValueError(f"{fn}: a zigzag shard holds two equal chunks; its length along dim {dim} is {x.shape[dim]}")
    return _Unshard.apply(x, dim, group, world)
