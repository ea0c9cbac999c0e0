"""Ring attention: K/V shards travel the ring (batch_isend_irecv), the next transfer posted before
the current block is computed; each block is one fused attention call whose partial output is
merged exactly by its lse. The backward reuses the global out / lse (no second merge): dQ stays
local, dK/dV accumulators travel the ring back to their owner.

Coordinates: the full sequences have 2W chunks of cq query rows and ck keys; this rank's query
chunks are r and 2W - 1 - r (zigzag_shard), the K/V block in hand at step t is rank
(r - t) mod W's. Alignment is bottom-right on the full sequences, as attention()'s default."""

import math
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist


_OPS = torch.ops.flash_attn_ext


class Block(NamedTuple):
    """One fused call: query rows [q0, q1) and keys [k0, k1) of this rank's local shards, with a
    top-left aligned window (wl, wr) (-1 = unbounded) equal to the global one there."""

    q0: int
    q1: int
    k0: int
    k1: int
    wl: int
    wr: int


def chunk_block(d: int, cq: int, ck: int, left: int, right: int) -> Optional[tuple]:
    """The part of a (query chunk, key chunk) pair that the window (left, right) lets through.
    Key j of the chunk is visible to row i iff i + d - left <= j <= i + d + right (d the chunk
    offset, qa + o - ka): returns (q0, q1, k0, k1, wl, wr) in chunk coordinates with wl, wr >= 0
    or -1, the form the kernels take, or None when no pair is visible. Rows before q0 and keys
    before k0 see / are seen by nothing, which is what makes the shifted window expressible."""
    q0 = max(0, -(d + right)) if right >= 0 else 0  # rows whose window ends before key 0
    d += q0
    k0 = max(0, d - left) if left >= 0 else 0  # keys before the first row's window
    d -= k0
    if q0 >= cq or k0 >= ck:
        return None
    n_q, n_k = cq - q0, ck - k0
    if right >= 0:  # keys past the last row's window
        n_k = min(n_k, n_q + d + right)
    if left >= 0:  # rows whose window starts past the last key
        n_q = min(n_q, n_k - d + left)
    return q0, q0 + n_q, k0, k0 + n_k, (left - d if left >= 0 else -1), (right + d if right >= 0 else -1)


def blocks(rank: int, src: int, world: int, cq: int, ck: int, left: int, right: int) -> List[Block]:
    """The fused calls of this rank's queries against rank src's K/V shard (up to 4 chunk pairs)."""
    offset = 2 * world * (ck - cq)  # bottom-right: S - L of the full sequences
    out = []
    for qi, qc in enumerate((rank, 2 * world - 1 - rank)):
        for ki, kc in enumerate((src, 2 * world - 1 - src)):
            b = chunk_block(qc * cq + offset - kc * ck, cq, ck, left, right)
            if b is not None:
                q0, q1, k0, k1, wl, wr = b
                out.append(Block(qi * cq + q0, qi * cq + q1, ki * ck + k0, ki * ck + k1, wl, wr))
    return out


class Ring:
    """Sends tensors to the next rank and receives their like from the previous one. With
    communicate=False (benchmarks: the same blocks computed alone) it hands back what it sent."""

    def __init__(self, group, rank: int, world: int, tag: int, communicate: bool = True):
        self.group, self.tag, self.communicate = group, tag, communicate
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world
        self.works, self.incoming = [], None

    def post(self, tensors):
        if not self.communicate:
            self.incoming = tensors
            return
        self.incoming = tuple(torch.empty_like(t) for t in tensors)
        ops = [
            dist.P2POp(dist.isend, t, group=self.group, group_peer=self.next, tag=self.tag + i)
            for i, t in enumerate(tensors)
        ]
        ops += [
            dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.prev, tag=self.tag + i)
            for i, t in enumerate(self.incoming)
        ]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self):
        for w in self.works:
            w.wait()
        self.works, incoming, self.incoming = [], self.incoming, None
        return incoming


def merge_into(out, lse, o, l):
    """out, lse (float32 accumulator views) become the exact lse merge with the block's (o, l),
    in place, o scaled in place too: merge_attention_states' arithmetic without its two new
    tensors of the output's size (bench_context_parallel.py, 32k fwd, 2 ranks, Zen 3: the per-rank
    peak fell from 1.05x to 0.93x one process's). Rows that see no key yet stay 0 / -inf."""
    new = torch.logaddexp(lse, l)
    seen = torch.isfinite(new)
    base = torch.where(seen, new, torch.zeros_like(new))
    old_w = torch.where(seen, torch.exp(lse - base), torch.zeros_like(new))
    new_w = torch.where(seen, torch.exp(l - base), torch.zeros_like(new))
    out.mul_(old_w.unsqueeze(-1)).add_(o.mul_(new_w.unsqueeze(-1)))
    lse.copy_(new)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, left, right, softcap, communicate):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        cq, ck = q.shape[2] // 2, k.shape[2] // 2
        acc = _acc_dtype(q.dtype)
        B, H, L, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
        # Partial results are merged in float32 (the kernels write each block's output in the
        # input dtype; the sum over blocks never is).
        out = torch.zeros(B, H, L, Dv, dtype=acc, device=q.device)
        lse = torch.full((B, H, L), -math.inf, dtype=acc, device=q.device)
        kv = (k.contiguous(), v.contiguous())
        ring = Ring(group, rank, world, 0, communicate)
        for step in range(world):
            if step + 1 < world:
                ring.post(kv)  # the next block travels while this one is computed
            for b in blocks(rank, (rank - step) % world, world, cq, ck, left, right):
                o, l, _ = _OPS.attention_forward(
                    q[:, :, b.q0 : b.q1], kv[0][:, :, b.k0 : b.k1], kv[1][:, :, b.k0 : b.k1],
                    None, 0.0, scale, b.wl, b.wr, False, softcap, None,
                )  # fmt: skip
                merge_into(out[:, :, b.q0 : b.q1], lse[:, :, b.q0 : b.q1], o.to(acc), l.to(acc))
            if step + 1 < world:
                kv = ring.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.window, ctx.softcap, ctx.communicate = (
            group,
            scale,
            (left, right),
            softcap,
            communicate,
        )
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, (left, right) = ctx.group, ctx.window
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        cq, ck = q.shape[2] // 2, k.shape[2] // 2
        acc = _acc_dtype(q.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        no_rng = torch.empty(0, dtype=torch.long, device=q.device)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = (k.contiguous(), v.contiguous())
        kv_ring = Ring(group, rank, world, 0, ctx.communicate)
        grad_ring = Ring(group, rank, world, 2, ctx.communicate)
        for step in range(world):
            if step + 1 < world:
                kv_ring.post(kv)
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            for b in blocks(rank, (rank - step) % world, world, cq, ck, left, right):
                rows, keys = slice(b.q0, b.q1), slice(b.k0, b.k1)
                g_lse = None if dlse is None else dlse[:, :, rows].contiguous()
                dq_b, dk_b, dv_b, *_ = _OPS.attention_backward(
                    dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], out[:, :, rows],
                    lse[:, :, rows].contiguous(), no_rng, None, 0.0, ctx.scale, b.wl, b.wr, False, ctx.softcap,
                    None, g_lse,
                )  # fmt: skip
                dq[:, :, rows] += dq_b
                dk[:, :, keys] += dk_b
                dv[:, :, keys] += dv_b
            if world > 1:
                if step > 0:  # the accumulator of this block, from the ranks it has visited
                    dk_in, dv_in = grad_ring.wait()
                    dk += dk_in
                    dv += dv_in
                grad_ring.post((dk, dv))
            if step + 1 < world:
                kv = kv_ring.wait()
        if world > 1:
            dk, dv = grad_ring.wait()  # this rank's own block, back from its last visitor
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
