"""Uptraining (the GQA paper's second step): continue training a converted causal LM for a
fraction alpha of a step budget, with this package's attention.

The model is a small byte-level decoder built from flash_attn_ext.nn.Attention, saved as a
HuggingFace-style directory (config.json with model_type "flash_attn_ext", model.safetensors),
so flash-attn-ext-convert converts it. The corpus is the Python standard library's own source
(always available offline), split into training and held-out bytes.

    python examples/uptrain.py --init mha --out mha-dir --steps 400          # train from scratch
    flash-attn-ext-convert --input mha-dir --output gqa2 --num-kv-heads 2
    python examples/uptrain.py --checkpoint gqa2 --out gqa2-up --steps 400 --alpha 0.05

AdamW, gradient accumulation, a tqdm progress bar, a checkpoint at the end (and every
--save-every steps), and held-out loss before and after. CPU by default; --device cuda where
a GPU is there.
"""

import argparse
import glob
import json
import math
import os
import sysconfig
import time

import torch
import torch.nn.functional as F

import flash_attn_ext


class TinyLM(torch.nn.Module):
    """Pre-norm decoder: learned positions, GQA self-attention + MLP blocks, tied embeddings."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        dim, heads = config["hidden_size"], config["num_attention_heads"]
        self.embed = torch.nn.Embedding(config["vocab_size"], dim)
        self.pos = torch.nn.Embedding(config["max_position_embeddings"], dim)
        self.layers = torch.nn.ModuleList()
        for _ in range(config["num_hidden_layers"]):
            self.layers.append(
                torch.nn.ModuleDict(
                    {
                        "norm1": torch.nn.LayerNorm(dim),
                        "attn": flash_attn_ext.nn.Attention(dim, heads, config["num_key_value_heads"], causal=True),
                        "norm2": torch.nn.LayerNorm(dim),
                        "mlp": torch.nn.Sequential(
                            torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
                        ),
                    }
                )
            )
        self.norm = torch.nn.LayerNorm(dim)
        for emb in (self.embed, self.pos):  # small init: the output head is the tied embedding
            torch.nn.init.normal_(emb.weight, std=0.02)

    def forward(self, tokens, start=0, caches=None):
        L = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(start, start + L, device=tokens.device))
        for i, blk in enumerate(self.layers):
            x = x + blk["attn"](blk["norm1"](x), kv_cache=None if caches is None else caches[i])
            x = x + blk["mlp"](blk["norm2"](x))
        return self.norm(x) @ self.embed.weight.t()


def new_config(dim=128, layers=4, heads=8, kv_heads=8, seq=128):
    return dict(
        model_type="flash_attn_ext",
        vocab_size=256,
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq,
        dtype="float32",  # (transformers 5 reads `dtype`, 4.x `torch_dtype`)
        torch_dtype="float32",
    )


def save_checkpoint(model: TinyLM, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # head tied to embed
    save_file(state, os.path.join(path, "model.safetensors"))


def load_checkpoint(path: str, device="cpu") -> TinyLM:
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = TinyLM(config)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.to(device)


def load_corpus(max_bytes=4 << 20, held_out=0.05):
    """The standard library's .py files in a fixed order, as bytes: (train, held-out)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    chunks, total = [], 0
    for path in files:
        if "test" in os.path.relpath(path, sysconfig.get_paths()["stdlib"]).split(os.sep)[0]:
            continue
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    data = torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()
    split = int(len(data) * (1 - held_out))
    return data[:split], data[split:]


def batch(data, batch_size, seq, generator, device):
    idx = torch.randint(0, len(data) - seq - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + seq + 1] for i in idx.tolist()]).to(device)
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model, data, seq, n_batches=8, batch_size=16, device="cpu"):
    """Mean next-byte cross-entropy (nats) on fixed held-out batches."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(n_batches):
        x, y = batch(data, batch_size, seq, g, device)
        losses.append(F.cross_entropy(model(x).reshape(-1, model.config["vocab_size"]), y.reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def train(
    model,
    train_data,
    held_out,
    steps,
    *,
    batch_size=16,
    seq=128,
    lr=2e-3,
    grad_accum=1,
    seed=0,
    eval_every=0,
    save_every=0,
    out=None,
    device="cpu",
    progress=True,
    warmup=20,
):
    """AdamW with linear warm-up and cosine decay; returns [(step, held-out loss)] at every
    eval_every steps (and at the end)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))),
    )
    g = torch.Generator().manual_seed(seed)
    curve = []
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="training", unit="step")
    model.train()
    for step in iterator:
        for _ in range(grad_accum):
            x, y = batch(train_data, batch_size, seq, g, device)
            loss = F.cross_entropy(model(x).reshape(-1, model.config["vocab_size"]), y.reshape(-1)) / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            iterator.set_postfix(loss=f"{loss.item() * grad_accum:.3f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            curve.append((step + 1, evaluate(model, held_out, seq, device=device)))
        if save_every and out and (step + 1) % save_every == 0:
            save_checkpoint(model, out)
    curve.append((steps, evaluate(model, held_out, seq, device=device)))
    if out:
        save_checkpoint(model, out)
    return curve


@torch.inference_mode()
def decode_tokens_per_second(model, new_tokens=64, batch_size=1, prompt=16, device="cpu"):
    """Greedy decoding with one flash_attn_ext KVCache per layer: tokens per second."""
    model.eval()
    tokens = torch.randint(0, 256, (batch_size, prompt), device=device)
    caches = [blk["attn"].make_cache(batch_size, prompt + new_tokens) for blk in model.layers]
    logits = model(tokens, 0, caches)
    start = time.perf_counter()
    for t in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(nxt, prompt + t, caches)
    return batch_size * new_tokens / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a (converted) checkpoint directory to continue training")
    src.add_argument("--init", choices=["mha"], help="start from a fresh MHA model instead")
    ap.add_argument("--out", required=True, help="where to save the trained checkpoint")
    ap.add_argument("--steps", type=int, required=True, help="the step budget (of the original training)")
    ap.add_argument("--alpha", type=float, default=1.0, help="fraction of --steps to train (the paper: 0.05)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    train_data, held_out = load_corpus()
    model = (
        TinyLM(new_config(seq=args.seq)).to(args.device) if args.init else load_checkpoint(args.checkpoint, args.device)
    )
    steps = max(1, round(args.alpha * args.steps))
    before = evaluate(model, held_out, args.seq, device=args.device)
    curve = train(
        model,
        train_data,
        held_out,
        steps,
        batch_size=args.batch_size,
        seq=args.seq,
        lr=args.lr,
        grad_accum=args.grad_accum,
        save_every=args.save_every,
        out=args.out,
        device=args.device,
    )
    print(f"held-out loss {before:.4f} -> {curve[-1][1]:.4f} nats/byte after {steps} steps; saved {args.out}")


if __name__ == "__main__":
    main()
