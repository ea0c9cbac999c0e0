"""How much error 8-bit KV caches (int8, fp8 e4m3) add, measured two ways. Nothing is asserted:
the script measures and reports.

1. Kernel level: attention_with_kvcache for a decode step (L=1 query) and a chunk (L=16, causal,
   bottom-right aligned) against a cache of S positions (B=2, Hq/Hkv=32/8, D=128, bf16 queries),
   the cache holding the keys/values in float32 (float32 queries), bf16, int8 or fp8
   (quantize_kv_cache: one float32 scale per (position, head)), against the float64 exact
   attention on the unquantized float values. Keys are random normal, or "outlier-channel" keys
   (a few channels scaled up, as real models' keys have), which per-row scales handle worst.
   Reported: max abs error and relative RMS error ||out - ref|| / ||ref||, and the K / V
   dequantization error itself.
2. A model: examples/uptrain.py's byte-level TinyLM, trained briefly as MHA on the standard
   library's source, converted to GQA / MQA with flash_attn_ext.convert (mean pooling, a few
   uptraining steps), then teacher-forced incremental decoding of held-out text through
   flash_attn_ext.nn.Attention's KV cache (a prompt prefill, then one byte at a time) with the
   cache in float32 (the reference), bf16, int8 and fp8. The model runs in float32 throughout;
   only the cache's storage changes (a bf16 cache needs bf16 q/k/v, so that row casts q/k/v to
   bf16 around the cache and the output back to float32). Reported per (model, cache): held-out
   next-byte loss over the decoded positions, its difference from the float32 cache's, the mean
   KL(p_float32 || p_cache) of the next-byte distributions, and top-1 agreement with float32.

    python benchmarks/kv_quant_quality.py [--steps 400] [--seq-len 1024] [--out benchmarks/results/kv_quant_quality]

Writes <out>.txt (both tables) and <out>.csv. About 1.5 minutes on 2 idle cores at the defaults (more when
they are shared), most of it training the model.
"""

import argparse
import csv
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import uptrain  # noqa: E402

import flash_attn_ext  # noqa: E402
from flash_attn_ext import convert  # noqa: E402
from flash_attn_ext.config import cpu_description  # noqa: E402

CACHE_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def exact_attention(q, k, v, scale):
    """float64 reference, flash-attn layout: q (B, L, Hq, D), k / v (B, S, Hkv, D); causal,
    bottom-right aligned (query i sits at position S - L + i); GQA by head groups."""
    q, k, v = q.double(), k.double(), v.double()
    B, L, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("blhd,bshd->bhls", q, k) * scale
    pos_q = torch.arange(S - L, S).unsqueeze(1)
    s = s.masked_fill(torch.arange(S).unsqueeze(0) > pos_q, float("-inf"))
    return torch.einsum("bhls,bshd->blhd", torch.softmax(s, dim=-1), v)


def dequantize(t_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return t_q.to(torch.float64) * scale.double().unsqueeze(-1)


@torch.inference_mode()
def kernel_error(args):
    """Part 1: rows of attention_with_kvcache's error against the float64 exact attention."""
    gen = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = args.batch, args.seq_len, args.heads, args.kv_heads_kernel, args.head_dim
    scale = 1.0 / math.sqrt(D)
    rows = []
    for keys in ("normal", "outlier"):
        k = torch.randn(B, S, Hkv, D, generator=gen)
        if keys == "outlier":
            channels = torch.randperm(D, generator=gen)[: args.outlier_channels]
            k[..., channels] *= args.outlier_scale
        v = torch.randn(B, S, Hkv, D, generator=gen)
        caches = {"float32": (k, v, {}), "bf16": (k.bfloat16(), v.bfloat16(), {})}
        kv_err = {"float32": (0.0, 0.0), "bf16": (rel_rms(k.bfloat16(), k), rel_rms(v.bfloat16(), v))}
        for name in ("int8", "fp8"):
            k_q, v_q, k_s, v_s = flash_attn_ext.quantize_kv_cache(k, v, CACHE_DTYPES[name])
            caches[name] = (k_q, v_q, dict(k_cache_scale=k_s, v_cache_scale=v_s))
            kv_err[name] = (rel_rms(dequantize(k_q, k_s), k), rel_rms(dequantize(v_q, v_s), v))
        for L in (1, args.chunk):
            q = torch.randn(B, L, Hq, D, generator=gen).bfloat16()
            ref = exact_attention(q, k, v, scale)  # the bf16 queries' exact values, unquantized K / V
            floor = ref.bfloat16().double()
            rows.append(
                dict(
                    keys=keys,
                    L=L,
                    cache="(exact, rounded to bf16)",
                    max_abs_err=(floor - ref).abs().max().item(),
                    rel_rms_err=rel_rms(floor, ref),
                    k_rel_rms=0.0,
                    v_rel_rms=0.0,
                )
            )
            for name, (kc, vc, scales) in caches.items():
                qq = q.float() if name == "float32" else q
                out = flash_attn_ext.attention_with_kvcache(
                    qq, kc, vc, cache_seqlens=S, causal=True, softmax_scale=scale, **scales
                )
                err = out.double() - ref
                rows.append(
                    dict(
                        keys=keys,
                        L=L,
                        cache=name + (" (q float32)" if name == "float32" else ""),
                        max_abs_err=err.abs().max().item(),
                        rel_rms_err=(err.norm() / ref.norm()).item(),
                        k_rel_rms=kv_err[name][0],
                        v_rel_rms=kv_err[name][1],
                    )
                )
    return rows


class CastingCache:
    """A bf16 KVCache behind a float32 attention module: q / k / v are cast to the cache's dtype
    (a float cache's op needs them in its dtype) and the output back to the queries' dtype."""

    def __init__(self, cache: flash_attn_ext.KVCache):
        self.cache = cache

    def attend(self, q, k=None, v=None, **kw):
        dt = self.cache.k.dtype
        out = self.cache.attend(q.to(dt), None if k is None else k.to(dt), None if v is None else v.to(dt), **kw)
        return out.to(q.dtype)


@torch.inference_mode()
def decode_logits(model, x, prompt, cache_dtype):
    """Teacher-forced incremental decoding of x (B, T): prefill x[:, :prompt] through one KV cache
    per layer, then one byte at a time; the logits (B, T, vocab) of every position and the caches."""
    model.eval()
    B, T = x.shape
    raw = [blk["attn"].make_cache(B, T, dtype=cache_dtype) for blk in model.layers]
    caches = [CastingCache(c) if cache_dtype == torch.bfloat16 else c for c in raw]
    out = [model(x[:, :prompt], 0, caches)]
    for t in range(prompt, T):
        out.append(model(x[:, t : t + 1], t, caches))
    return torch.cat(out, dim=1).float(), raw


def cache_values(caches):
    """Every layer's cached K and V as float64 (dequantized for an 8-bit cache), concatenated."""
    ks, vs = [], []
    for c in caches:
        ks.append(dequantize(c.k, c.k_scale) if c.quantized else c.k.double())
        vs.append(dequantize(c.v, c.v_scale) if c.quantized else c.v.double())
    return torch.cat(ks), torch.cat(vs)


def key_outliers(k: torch.Tensor, n_layers: int) -> str:
    """How outlier-heavy the model's cached keys are: the mean row max |k| / row RMS, and the mean
    over (layer, head) of the largest channel RMS over the median channel RMS."""
    row = (k.abs().amax(-1) / k.pow(2).mean(-1).sqrt().clamp_min(1e-30)).mean().item()
    channel_rms = k.reshape(n_layers, -1, *k.shape[2:]).pow(2).mean(1).sqrt()  # (layers, heads, D)
    channel = (channel_rms.amax(-1) / channel_rms.median(-1).values).mean().item()
    return (
        f"cached keys (head_dim {k.shape[-1]}): row max|k| / row RMS {row:.2f} on average; "
        f"largest / median channel RMS {channel:.2f} on average over (layer, head)"
    )


def model_quality(args, log):
    """Part 2: per (model, cache dtype) loss / KL / top-1 of cached decoding against float32."""
    torch.manual_seed(args.seed)
    train_data, held_out = uptrain.load_corpus()
    T = args.prompt + args.decode
    work = tempfile.mkdtemp(prefix="kv-quant-quality-")
    mha_dir = os.path.join(work, "mha")
    model = uptrain.TinyLM(uptrain.new_config(seq=T))
    n_heads = model.config["num_attention_heads"]
    log(
        f"training MHA TinyLM ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {n_heads} heads) "
        f"for {args.steps} steps of {args.train_batch} x {T} bytes"
    )
    t0 = time.perf_counter()
    curve = uptrain.train(
        model, train_data, held_out, args.steps, batch_size=args.train_batch, seq=T, out=mha_dir, progress=False
    )
    log(f"  trained in {time.perf_counter() - t0:.0f} s; held-out loss (full forward) {curve[-1][1]:.4f} nats/byte")
    models = [("MHA", n_heads, model, curve[-1][1])]
    for kv in args.kv_heads:
        name = "MQA" if kv == 1 else f"GQA-{kv}"
        out_dir = os.path.join(work, name)
        convert.convert_checkpoint(mha_dir, out_dir, kv, method="mean", progress=False)
        m = uptrain.load_checkpoint(out_dir)
        loss = uptrain.evaluate(m, held_out, T)
        if args.uptrain_steps:
            loss = uptrain.train(
                m,
                train_data,
                held_out,
                args.uptrain_steps,
                batch_size=args.train_batch,
                seq=T,
                progress=False,
                warmup=1,
                lr=5e-4,
            )[-1][1]
        log(f"  {name}: {kv} K/V heads (mean pooling, {args.uptrain_steps} uptraining steps); held-out {loss:.4f}")
        models.append((name, kv, m, loss))

    gen = torch.Generator().manual_seed(1234)
    x, y = uptrain.batch(held_out, args.eval_batch, T, gen, "cpu")
    P = args.prompt
    rows, checks = [], []
    for name, kv, m, full_loss in models:
        with torch.inference_mode():
            full = m.eval()(x).float()
        logits, cached = {}, {}
        for cname in args.caches:
            t0 = time.perf_counter()
            lg, caches = decode_logits(m, x, P, CACHE_DTYPES[cname])
            logits[cname], cached[cname] = lg[:, P:], cache_values(caches)
            log(f"  {name} {cname:7} cache: decoded in {time.perf_counter() - t0:.1f} s")
        ref_name = "float32" if "float32" in logits else args.caches[0]
        ref, (ref_k, ref_v) = logits[ref_name], cached[ref_name]
        checks.append((name, key_outliers(ref_k, len(m.layers))))
        checks.append(
            (
                name,
                f"{ref_name}-cache logits vs the full (uncached) forward: max abs diff "
                f"{(logits[ref_name] - full[:, P:]).abs().max().item():.2e}",
            )
        )
        ref_logp = F.log_softmax(ref, dim=-1)
        ref_loss = F.cross_entropy(ref.reshape(-1, ref.shape[-1]), y[:, P:].reshape(-1)).item()
        for cname, lg in logits.items():
            logp = F.log_softmax(lg, dim=-1)
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y[:, P:].reshape(-1)).item()
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            rows.append(
                dict(
                    model=name,
                    kv_heads=kv,
                    cache=cname,
                    loss=loss,
                    loss_delta=loss - ref_loss,
                    kl_mean=kl.mean().item(),
                    kl_max=kl.max().item(),
                    top1_agreement=(lg.argmax(-1) == ref.argmax(-1)).double().mean().item(),
                    max_abs_dlogit=(lg - ref).abs().max().item(),
                    k_rel_rms=rel_rms(cached[cname][0], ref_k),
                    v_rel_rms=rel_rms(cached[cname][1], ref_v),
                    heldout_loss_full_forward_eval=full_loss,
                )
            )
    return rows, checks, T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    k = ap.add_argument_group("part 1: kernel-level error")
    k.add_argument("--seq-len", type=int, default=1024, help="cached positions S")
    k.add_argument("--batch", type=int, default=2)
    k.add_argument("--heads", type=int, default=32, help="query heads")
    k.add_argument("--kv-heads-kernel", type=int, default=8, help="K/V heads of the cache")
    k.add_argument("--head-dim", type=int, default=128)
    k.add_argument("--chunk", type=int, default=16, help="query length of the chunk case (the other is 1)")
    k.add_argument("--outlier-channels", type=int, default=4, help="key channels scaled up in the outlier case")
    k.add_argument("--outlier-scale", type=float, default=20.0)
    m = ap.add_argument_group("part 2: a model decoding through the cache")
    m.add_argument("--steps", type=int, default=400, help="MHA training steps")
    m.add_argument("--train-batch", type=int, default=8, help="sequences per training step (of prompt + decode bytes)")
    m.add_argument("--kv-heads", type=int, nargs="*", default=[2, 1], help="GQA / MQA K/V head counts to convert to")
    m.add_argument("--uptrain-steps", type=int, default=20, help="uptraining steps after each conversion (0: none)")
    m.add_argument("--prompt", type=int, default=32, help="bytes prefilled in one chunk")
    m.add_argument("--decode", type=int, default=224, help="bytes decoded one at a time (the scored positions)")
    m.add_argument("--eval-batch", type=int, default=4, help="held-out sequences decoded")
    m.add_argument("--caches", nargs="*", default=list(CACHE_DTYPES), choices=list(CACHE_DTYPES))
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--skip-model", action="store_true", help="part 1 only")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kv_quant_quality"))
    args = ap.parse_args()

    lines = []

    def log(s=""):
        print(s, flush=True)

    start = time.perf_counter()
    cpu = cpu_description()
    log(f"CPU: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    krows = kernel_error(args)
    lines += [
        f"KV cache quantization quality on {cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "",
        f"1. attention_with_kvcache output error vs float64 exact attention on the unquantized K/V: "
        f"B={args.batch}, S={args.seq_len}, Hq/Hkv={args.heads}/{args.kv_heads_kernel}, D={args.head_dim}, "
        f"bf16 queries (float32 for the float32 cache), causal, bottom-right aligned; keys random normal or "
        f"'outlier' ({args.outlier_channels} of {args.head_dim} channels x{args.outlier_scale:g}), values random "
        f"normal. K/V rel RMS: the dequantized cache's own error. '(exact, rounded to bf16)': the floor a bf16 "
        f"output has anyway.",
        "",
        "| keys | L | cache | max abs err | rel RMS err | K rel RMS | V rel RMS |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['keys']} | {r['L']} | {r['cache']} | {r['max_abs_err']:.2e} | {r['rel_rms_err']:.2e} | "
        f"{r['k_rel_rms']:.2e} | {r['v_rel_rms']:.2e} |"
        for r in krows
    ]
    log("\n".join(lines))
    mrows = []
    if not args.skip_model:
        mrows, checks, T = model_quality(args, log)
        table = [
            "",
            f"2. TinyLM (byte-level, examples/uptrain.py) trained {args.steps} steps as MHA, converted with mean "
            f"pooling (+{args.uptrain_steps} uptraining steps); teacher-forced decoding of {args.eval_batch} held-out "
            f"sequences through the KV cache: {args.prompt}-byte prefill, then {args.decode} bytes one at a time "
            f"(scored: the {args.eval_batch * args.decode} decoded positions). Model in float32; only the cache "
            f"dtype changes (bf16: q/k/v cast to bf16 around the cache, output back to float32). loss: next-byte "
            f"cross-entropy (nats/byte); KL(p_float32 || p_cache) per position (nats); top-1: argmax agreement "
            f"with the float32 cache; K/V rel RMS: every layer's cached K/V against the float32 cache's.",
            "",
            "| model | K/V heads | cache | loss | loss - float32 | mean KL | max KL | top-1 agree | max abs dlogit "
            "| K rel RMS | V rel RMS |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        table += [
            f"| {r['model']} | {r['kv_heads']} | {r['cache']} | {r['loss']:.4f} | {r['loss_delta']:+.2e} | "
            f"{r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1_agreement'] * 100:.2f}% | "
            f"{r['max_abs_dlogit']:.2e} | {r['k_rel_rms']:.2e} | {r['v_rel_rms']:.2e} |"
            for r in mrows
        ]
        table += [""] + [f"{name}: {text}" for name, text in checks]
        log("\n".join(table))
        lines += table
    elapsed = time.perf_counter() - start
    lines += ["", f"total runtime {elapsed:.0f} s"]
    log(f"\ntotal runtime {elapsed:.0f} s")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    rows = [dict(part="kernel", **r) for r in krows] + [dict(part="model", **r) for r in mrows]
    fields = []
    for r in rows:
        fields += [key for key in r if key not in fields]
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {args.out}.txt and {args.out}.csv")


if __name__ == "__main__":
    main()
