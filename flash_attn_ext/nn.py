"""Attention modules: multi-head / grouped-query / multi-query self-attention on the fused
kernels, with an optional KV cache for generation.

    attn = flash_attn_ext.nn.Attention(embed_dim=1024, num_heads=16, num_kv_heads=4, causal=True)
    y = attn(x)                                  # training / full sequences, (B, L, embed_dim)
    cache = attn.make_cache(batch_size=2, max_seqlen=4096)
    y = attn(x_prompt, kv_cache=cache)           # prefill, then one token at a time: decode

The projections are named q_proj, k_proj, v_proj, o_proj, as in Llama / Mistral / Qwen2
checkpoints, so their weights load by name and flash_attn_ext's MHA -> GQA converter treats the
module like those architectures. K/V heads are shared by their query group, never repeated.
"""

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .attention import attention, normalize_window
from .kv_cache import KVCache


class Attention(nn.Module):
    """Self-attention with num_heads query heads sharing num_kv_heads key/value heads (MHA when
    equal, MQA when 1). window_size=(left, right) as in flash-attn ((W - 1, 0) with causal=True
    is a Mistral window of W tokens); dropout applies to the attention probabilities in training.
    sinks=True adds gpt-oss's learned attention sinks: a parameter `sinks` (num_heads,), one
    logit per head in every row's softmax denominator (named as in gpt-oss checkpoints).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        *,
        head_dim: Optional[int] = None,
        bias: bool = False,
        causal: bool = True,
        window_size: Tuple[int, int] = (-1, -1),
        dropout: float = 0.0,
        softmax_scale: Optional[float] = None,
        sinks: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
        head_dim = embed_dim // num_heads if head_dim is None else head_dim
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.causal, self.window_size = causal, normalize_window(window_size, causal)
        self.dropout, self.softmax_scale = dropout, softmax_scale
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, **kw)
        # float32 whatever the module's dtype: the kernels take the sink logits in float32
        self.sinks = nn.Parameter(torch.zeros(num_heads, device=device, dtype=torch.float32)) if sinks else None

    def make_cache(
        self,
        batch_size: int,
        max_seqlen: Optional[int] = None,
        *,
        rolling_window: Optional[int] = None,
        sink_tokens: int = 0,
        dtype: Optional[torch.dtype] = None,
    ) -> KVCache:
        """A KVCache shaped for this module (its dtype and device); rolling_window=W keeps only
        the last W positions (requires window_size=(W - 1, 0) or narrower, causal);
        sink_tokens=n with it keeps the first n positions too (StreamingLLM: the module then
        sees the sink tokens and its last W - n positions). dtype: the cache's storage, the
        module's dtype by default; torch.int8 / torch.float8_e4m3fn store K/V in 8 bits with
        per-(position, head) scales (see KVCache)."""
        w = self.q_proj.weight
        return KVCache(
            batch_size,
            max_seqlen,
            self.num_kv_heads,
            self.head_dim,
            dtype=w.dtype if dtype is None else dtype,
            device=w.device,
            window=rolling_window,
            sink_tokens=sink_tokens,
        )

    def forward(
        self, x: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None
    ) -> torch.Tensor:
        """x (B, L, embed_dim) -> (B, L, embed_dim). With kv_cache, x continues each cached
        sequence (prefill or decode; inference only): its keys/values are appended and its
        queries attend to everything cached, bottom-right aligned. attn_mask (bool: True =
        attend, or additive float) broadcastable to (B, num_heads, L, S) without a cache."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        if kv_cache is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask is not supported together with kv_cache")
            out = kv_cache.attend(
                q, k, v, causal=self.causal, window_size=self.window_size, softmax_scale=scale, sinks=self.sinks
            )
        else:
            out = attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                causal=self.causal,
                window_size=self.window_size,
                scale=scale,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                sinks=self.sinks,
            ).transpose(1, 2)
        return self.o_proj(out.reshape(B, L, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, window_size={self.window_size}, "
            f"dropout={self.dropout}, sinks={self.sinks is not None}"
        )
