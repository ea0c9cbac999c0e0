"""Greedy generation with a small randomly initialised decoder, with and without the KV cache.

Both paths must produce the same tokens: without the cache every step recomputes causal
attention over the whole sequence; with it, the prompt is prefilled into each layer's
flash_attn_ext.KVCache and each new token attends to the cache (decode, L = 1). The attention
layers are flash_attn_ext.nn.Attention (GQA).

    python examples/generate.py [--layers 2 --dim 128 --heads 8 --kv-heads 2 --prompt 32 --new 64]
"""

import argparse
import time

import torch

import flash_attn_ext


class Decoder(torch.nn.Module):
    """Pre-norm decoder: GQA causal self-attention + MLP per layer, tied embeddings."""

    def __init__(self, vocab=256, dim=128, layers=2, heads=8, kv_heads=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(4096, dim)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(
                torch.nn.ModuleDict(
                    {
                        "norm1": torch.nn.LayerNorm(dim),
                        "attn": flash_attn_ext.nn.Attention(dim, heads, kv_heads, bias=True, causal=True),
                        "norm2": torch.nn.LayerNorm(dim),
                        "mlp": torch.nn.Sequential(
                            torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
                        ),
                    }
                )
            )
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, tokens, start=0, caches=None):
        """tokens (B, L) at positions start.. ; caches: one KVCache per layer, or None to
        attend over exactly these tokens. Returns logits (B, L, vocab)."""
        L = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(start, start + L, device=tokens.device))
        for i, blk in enumerate(self.blocks):
            x = x + blk["attn"](blk["norm1"](x), kv_cache=None if caches is None else caches[i])
            x = x + blk["mlp"](blk["norm2"](x))
        return self.norm(x) @ self.embed.weight.t()


@torch.inference_mode()
def generate(model, prompt, new_tokens, use_cache):
    B = prompt.shape[0]
    tokens = prompt
    if not use_cache:
        for _ in range(new_tokens):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens
    caches = [blk["attn"].make_cache(B, prompt.shape[1] + new_tokens) for blk in model.blocks]
    logits = model(prompt, 0, caches)  # prefill: one chunk per layer
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        logits = model(nxt, tokens.shape[1] - 1, caches)  # decode: L = 1 against the cache
    return tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Decoder(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads).eval()
    prompt = torch.randint(0, 256, (args.batch, args.prompt))
    t0 = time.perf_counter()
    plain = generate(model, prompt, args.new, use_cache=False)
    t1 = time.perf_counter()
    cached = generate(model, prompt, args.new, use_cache=True)
    t2 = time.perf_counter()
    same = torch.equal(plain, cached)
    print(f"without cache: {t1 - t0:.2f} s, with cache: {t2 - t1:.2f} s, same tokens: {same}")
    if not same:
        raise SystemExit("the cached generation diverged")


if __name__ == "__main__":
    main()
