"""A small replication of the GQA paper's conversion ablation (Ainslie et al. 2023, Table 1 /
Figure 4): train a byte-level decoder from scratch as MHA on the Python standard library's
source (offline), convert it to GQA-4, GQA-2 and MQA with mean, first and random pooling
(flash_attn_ext.convert) and with similarity grouping (heads whose keys/values are close on 512
training bytes share a group, then mean), uptrain each for alpha = 0.05 of the original steps
(examples/uptrain.py), and report held-out loss before and after uptraining with decode
tokens/s through the KV cache. MHA continued for the same steps is the baseline.

    python benchmarks/gqa_uptraining.py [--steps 400] [--out benchmarks/results/gqa_uptraining]

Writes <out>.txt (the table), <out>.csv and <out>.png (held-out loss during uptraining).
About 7 minutes on 2 cores at the defaults.
"""

import argparse
import csv
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import uptrain  # noqa: E402
from flash_attn_ext import convert, head_similarity  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="MHA pre-training steps")
    ap.add_argument("--alpha", type=float, default=0.05, help="uptraining steps as a fraction of --steps")
    ap.add_argument("--groups", type=int, nargs="*", default=[4, 2, 1])
    ap.add_argument("--methods", nargs="*", default=list(convert.METHODS))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gqa_uptraining"))
    args = ap.parse_args()
    torch.manual_seed(0)
    train_data, held_out = uptrain.load_corpus()
    up_steps = max(1, round(args.alpha * args.steps))
    eval_every = max(1, up_steps // 5)
    work = tempfile.mkdtemp(prefix="gqa-uptraining-")
    mha_dir = os.path.join(work, "mha")
    model = uptrain.TinyLM(uptrain.new_config())
    print(
        f"pre-training MHA ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) for "
        f"{args.steps} steps on {len(train_data) / 1e6:.1f} MB of stdlib source"
    )
    uptrain.train(model, train_data, held_out, args.steps, out=mha_dir)
    # Calibration for --method similarity: 4 x 128 training bytes through the trained MHA model.
    gen = torch.Generator().manual_seed(1)
    kv_activations = head_similarity.collect_kv_activations(
        model, [uptrain.batch(train_data, 4, 128, gen, "cpu")[0]], max_tokens=512
    )

    rows, curves = [], {}
    variants = [("MHA", 8, "-")] + [(f"GQA-{g}" if g > 1 else "MQA", g, m) for g in args.groups for m in args.methods]
    for name, groups, method in variants:
        src = mha_dir
        if groups != 8:
            src = os.path.join(work, f"{name}-{method}")
            convert.convert_checkpoint(
                mha_dir,
                src,
                groups,
                method=method,
                progress=False,
                kv_activations=kv_activations if method == "similarity" else None,
            )
        model = uptrain.load_checkpoint(src)
        before = uptrain.evaluate(model, held_out, 128)
        curve = [(0, before)] + uptrain.train(
            model, train_data, held_out, up_steps, eval_every=eval_every, progress=False, warmup=1, lr=5e-4
        )
        tps = uptrain.decode_tokens_per_second(model)
        rows.append(
            dict(
                model=name,
                kv_heads=groups,
                method=method,
                loss_converted=before,
                loss_uptrained=curve[-1][1],
                decode_tokens_per_s=tps,
            )
        )
        curves[f"{name} {method}"] = curve
        print(
            f"{name:6} {method:6} held-out {before:.4f} -> {curve[-1][1]:.4f} after {up_steps} steps; "
            f"decode {tps:.0f} tok/s",
            flush=True,
        )

    lines = [
        f"GQA conversion + uptraining: MHA pre-trained {args.steps} steps, uptraining alpha={args.alpha} "
        f"({up_steps} steps); held-out next-byte loss (nats), lower is better",
        "",
        "| model | K/V heads | method | loss after conversion | loss after uptraining | decode tok/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['kv_heads']} | {r['method']} | {r['loss_converted']:.4f} | "
        f"{r['loss_uptrained']:.4f} | {r['decode_tokens_per_s']:.0f} |"
        for r in rows
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write(text + "\n")
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, curve in curves.items():
            ax.plot(*zip(*curve), marker="o", markersize=3, label=label)
        ax.set_xlabel("uptraining step")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
