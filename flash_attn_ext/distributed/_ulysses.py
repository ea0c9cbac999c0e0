"""Ulysses (DeepSpeed) attention: all-to-all from sequence to head sharding, one fused attention
over the full sequence for this rank's heads, all-to-all back."""

import torch
import torch.distributed as dist


def _seq_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(B, H, L, ...) sequence shard of every head -> (B, H / W, W * L, ...) all rows of this rank's
    heads, rows in rank order (rank s's shard at [s * L, (s + 1) * L))."""
    B, H, L = x.shape[:3]
    send = x.reshape(B, world, H // world, L, *x.shape[3:]).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, *range(3, recv.dim())).reshape(B, H // world, world * L, *x.shape[3:])


def _heads_to_seq(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """The inverse of _seq_to_heads."""
    B, Hs, WL = x.shape[:3]
    L = WL // world
    send = x.reshape(B, Hs, world, L, *x.shape[3:]).permute(2, 0, 1, 3, *range(4, x.dim() + 1)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(B, world * Hs, L, *x.shape[3:])


class AllToAll(torch.autograd.Function):
    """_seq_to_heads (to_heads=True) or _heads_to_seq, differentiable: each is the other's
    backward."""

    @staticmethod
    def forward(ctx, x, to_heads, group, world):
        ctx.to_heads, ctx.group, ctx.world = to_heads, group, world
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group, ctx.world), None, None, None


def zigzag_order(world: int, chunk: int, device) -> torch.Tensor:
    """Row indices that put the rank-ordered zigzag shards (rank s: chunks s, 2W - 1 - s) back in
    sequence order."""
    position = torch.empty(2 * world, dtype=torch.long)
    for s in range(world):
        position[s] = 2 * s
        position[2 * world - 1 - s] = 2 * s + 1
    rows = torch.arange(chunk)
    return (position.unsqueeze(1) * chunk + rows).flatten().to(device)
