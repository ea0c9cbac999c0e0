"""Relative-position biases that depend on the key-query distance only (T5's learned, bucketed
table), served inside the fused kernels: the kernels read one bias per head and distance,
(Hq, L + S - 1), never an (L, S) matrix, forward or backward."""

import math
from dataclasses import dataclass

import torch


def t5_relative_position_bucket(
    distance: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each distance (key position minus query position), as int64.

    Bidirectional (encoders): half the buckets for keys after the query, half for the rest.
    Unidirectional (causal decoders): keys after the query share bucket 0. In each half, the
    first n/2 distances get a bucket each, and larger ones share buckets spaced logarithmically
    up to max_distance (farther ones: the last bucket). Logs in float32, as T5 takes them, so the
    boundaries fall where T5's do."""
    check_bucket_arguments(num_buckets, max_distance, bidirectional)
    n = num_buckets // 2 if bidirectional else num_buckets
    if bidirectional:
        base = (distance > 0).long() * n
        back = distance.abs()
    else:
        base = torch.zeros_like(distance, dtype=torch.long)
        back = (-distance).clamp(min=0)
    exact = n // 2
    # Distances of `exact` and more: exact + (n - exact) * log(d / exact) / log(max_distance / exact).
    grows = torch.log(back.float() / exact) / math.log(max_distance / exact)
    far = (exact + (grows * (n - exact)).long()).clamp(max=n - 1)
    return base + torch.where(back < exact, back.long(), far)


def check_bucket_arguments(num_buckets, max_distance, bidirectional) -> None:
    for name, v in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"RelativeBias: {name} must be an int, got {v!r}")
    need = 4 if bidirectional else 2  # each direction needs one exact and one log-spaced bucket
    if num_buckets < need:
        raise ValueError(
            f"RelativeBias: num_buckets must be >= {need} ({'bidirectional' if bidirectional else 'causal'}), "
            f"got {num_buckets}"
        )
    exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance <= exact:
        raise ValueError(
            f"RelativeBias: max_distance must exceed the exact range ({exact} distances for {num_buckets} buckets), "
            f"got {max_distance}"
        )


@dataclass(frozen=True)
class RelativeBias:
    """T5's relative-position bias for attention(..., relative_bias=): score (h, i, j) gains
    table[bucket(j - (i + o)), h] (o the alignment offset, so a decoding step's query sits at its
    absolute position), with T5's bucket function. table: (num_buckets, Hq), trainable (its
    gradient is accumulated per bucket and head from the kernels' per-distance gradient)."""

    table: torch.Tensor
    num_buckets: int
    max_distance: int
    bidirectional: bool

    def __post_init__(self):
        if not isinstance(self.table, torch.Tensor):
            raise TypeError(f"RelativeBias: table must be a torch.Tensor, got {type(self.table).__name__}")
        if not isinstance(self.bidirectional, bool):
            raise TypeError(f"RelativeBias: bidirectional must be a bool, got {self.bidirectional!r}")
        check_bucket_arguments(self.num_buckets, self.max_distance, self.bidirectional)
        if self.table.dim() != 2 or self.table.shape[0] != self.num_buckets:
            raise ValueError(
                f"RelativeBias: table must have shape (num_buckets={self.num_buckets}, heads), got "
                f"{tuple(self.table.shape)}"
            )
        if not self.table.is_floating_point():
            raise TypeError(f"RelativeBias: table must be floating point, got {self.table.dtype}")

    def per_distance(self, len_q: int, len_k: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
        """(Hq, L + S - 1): column j - i + L - 1 holds each head's bias at that distance (the
        layout the kernels read), gathered from the table (differentiable in it)."""
        distance = torch.arange(len_q + len_k - 1, device=self.table.device) - (len_q - 1) - offset
        buckets = t5_relative_position_bucket(
            distance, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return self.table.to(dtype)[buckets].t().contiguous()
