"""generate()-shaped benchmark: prefill and per-token decode of a Llama-shaped bf16 decoder with
random weights, on transformers' SDPA with its caches against attn_implementation="fa_ext" on
FlashAttnExtCache (bf16, int8).

    python benchmarks/bench_generate.py [--prompts 512 4096 16384] [--batch 1 4] [--steps 8]
                                        [--reps 3] [--prefill-max 4096] [--csv out.csv] [--plot out.png]

Model: hidden 1024, 6 layers, 16 query / 4 KV heads of 64, MLP 2816, vocab 32000 (about 130 M
parameters), bf16. What runs per decode step is what generate() runs: the model's forward on one
token per row, with the 2-D attention mask and the cache (the logits processing of generate()
is left out: the same for every row).

- Decode: the caches are filled with random K/V of the prompt's length (`update` / `store`, not
  timed: a 16k prefill of every configuration would take most of an hour on 2 cores), then
  `--steps` tokens are decoded and timed; repeated `--reps` times, the configurations interleaved
  in each repetition; the best repetition per configuration is reported.
- Prefill: one forward over the prompt into an empty cache (prompts up to --prefill-max).
- Configurations: "sdpa+dynamic" (transformers' default), "sdpa+static" (StaticCache sized to the
  prompt and the new tokens), "sdpa+quantized-fp8" (QuantizedCache's fp8 back end, per tensor),
  "fa_ext" (FlashAttnExtCache, the model's bf16), "fa_ext+int8" (FlashAttnExtCache(dtype=
  torch.int8)); "sdpa+quantized-quanto4" (QuantizedCache on optimum-quanto, 4 bits) only when
  named in --configs and installed (8.2 s per token at a 512 prompt on the 2-core Zen 4).
- Columns: ms per decoded token, tokens/s over all rows, decode speed over sdpa+dynamic's
  ("x dyn", > 1 is faster), prefill ms, and the cache's bytes. The machine's copy bandwidth and
  bf16 matmul FLOP/s are measured in the same run.
"""

import argparse
import time

import torch
import transformers
from transformers import DynamicCache, QuantizedCache, StaticCache

import flash_attn_ext.integrations.transformers  # noqa: F401  (registers "fa_ext")
from bench_attention import write_csv  # the script's directory is on sys.path
from bench_decode import machine_header
from flash_attn_ext.config import cpu_description
from flash_attn_ext.integrations.transformers import FlashAttnExtCache

CONFIG = dict(
    hidden_size=1024,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    vocab_size=32000,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)


def matmul_tflops(dtype=torch.bfloat16, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def _quanto_available():
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def _tensors(obj, depth=0):
    """The tensors an object holds (in attributes, tuples, quanto's quantized tensors)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 3 and hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for x in vars(obj).values():
            yield from _tensors(x, depth + 1)


def _cache_bytes(cache):
    seen, total = set(), 0
    for layer in cache.layers:
        for t in _tensors(layer):
            if t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def configurations(with_quanto):
    """name -> (attn_implementation, make_cache(config, capacity)); quanto only when asked for
    (--configs): on this CPU it took 8.2 s per token at a 512-token prompt."""
    out = {
        "sdpa+dynamic": ("sdpa", lambda c, n: DynamicCache(config=c)),
        "sdpa+static": ("sdpa", lambda c, n: StaticCache(config=c, max_cache_len=n)),
        "sdpa+quantized-fp8": ("sdpa", lambda c, n: QuantizedCache(backend="fp8", config=c)),
    }
    if with_quanto:
        out["sdpa+quantized-quanto4"] = ("sdpa", lambda c, n: QuantizedCache(backend="quanto", config=c, nbits=4))
    out["fa_ext"] = ("fa_ext", lambda c, n: FlashAttnExtCache(c, max_cache_len=n))
    out["fa_ext+int8"] = ("fa_ext", lambda c, n: FlashAttnExtCache(c, max_cache_len=n, dtype=torch.int8))
    return out


def filled(model, make, B, S, capacity, seed=0):
    """A cache holding S random positions per layer (what a prefill would leave)."""
    cfg = model.config
    cache = make(cfg, capacity)
    g = torch.Generator().manual_seed(seed)
    D = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(B, cfg.num_key_value_heads, S, D, generator=g).to(torch.bfloat16)
        v = torch.randn(B, cfg.num_key_value_heads, S, D, generator=g).to(torch.bfloat16)
        if isinstance(cache, FlashAttnExtCache):
            cache.store(i, k, v)
        else:
            cache.update(k, v, i)
    return cache


@torch.inference_mode()
def decode_time(model, cache, B, S, steps):
    tok = torch.randint(0, model.config.vocab_size, (B, 1))
    t0 = time.perf_counter()
    for t in range(steps):
        mask = torch.ones(B, S + t + 1, dtype=torch.long)
        logits = model(tok, attention_mask=mask, cache=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps


@torch.inference_mode()
def prefill_time(model, cache, B, S):
    ids = torch.randint(0, model.config.vocab_size, (B, S))
    t0 = time.perf_counter()
    model(ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 4096, 16384])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-max", type=int, default=4096)
    ap.add_argument("--configs", nargs="+", default=None, help="a subset of the configurations")
    ap.add_argument("--csv")
    ap.add_argument("--plot")
    args = ap.parse_args()

    ceiling, _ = machine_header("cpu")
    print(f"bf16 matmul {matmul_tflops():.2f} TFLOP/s; transformers {transformers.__version__}")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama-shaped, {params / 1e6:.0f} M parameters, bf16, random weights: {CONFIG}")
    confs = configurations(_quanto_available())
    if args.configs:
        confs = {k: v for k, v in confs.items() if k in args.configs}
    else:
        confs.pop("sdpa+quantized-quanto4", None)

    rows = []
    print(f"{'prompt':>7} {'B':>2} {'config':<24} {'ms/token':>9} {'tok/s':>8} {'x dyn':>6} ", end="")
    print(f"{'prefill ms':>11} {'cache MB':>9}")
    for S in args.prompts:
        for B in args.batch:
            capacity = S + args.steps + 1
            best = {name: float("inf") for name in confs}
            sizes = {}
            for rep in range(args.reps):
                for name, (impl, make) in confs.items():  # interleaved
                    model.set_attn_implementation(impl)
                    cache = filled(model, make, B, S, capacity)
                    best[name] = min(best[name], decode_time(model, cache, B, S, args.steps))
                    sizes[name] = _cache_bytes(cache)
                    del cache
            prefill = {}
            if S <= args.prefill_max:
                for name, (impl, make) in confs.items():
                    model.set_attn_implementation(impl)
                    prefill[name] = prefill_time(model, make(model.config, capacity), B, S)
            ref = best.get("sdpa+dynamic")
            for name in confs:
                t = best[name]
                row = dict(
                    cpu=machine_cpu(),
                    prompt=S,
                    batch=B,
                    config=name,
                    ms_per_token=round(t * 1e3, 3),
                    tokens_per_s=round(B / t, 2),
                    speedup_vs_dynamic=round(ref / t, 3) if ref else "",
                    prefill_ms=round(prefill[name] * 1e3, 1) if name in prefill else "",
                    cache_mb=round(sizes[name] / 2**20, 1),
                    copy_gbs=round(ceiling, 1),
                )
                rows.append(row)
                print(
                    f"{S:>7} {B:>2} {name:<24} {row['ms_per_token']:>9.2f} {row['tokens_per_s']:>8.1f} "
                    f"{row['speedup_vs_dynamic'] if ref else '':>6} {row['prefill_ms']!s:>11} {row['cache_mb']:>9}"
                )
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot(rows, args.plot)


def machine_cpu():
    return cpu_description().split(";")[0]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["prompt"], r["batch"]) for r in rows})
    names = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [
            next(r["tokens_per_s"] for r in rows if (r["prompt"], r["batch"]) == k and r["config"] == name)
            for k in keys
        ]
        ax.bar([j + i * width for j in range(len(keys))], ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"S={s} B={b}" for s, b in keys])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"generate() decode, Llama-shaped 130M bf16 ({machine_cpu()})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
