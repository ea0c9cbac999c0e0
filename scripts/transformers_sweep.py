#!/usr/bin/env python3
"""Every causal-LM architecture the installed transformers has, tiny and random, through
attn_implementation="fa_ext" and "flash_attn_ext" against "eager": logits of a left-padded
batch (the padded positions left out). A check of the integration against code none of us wrote,
too slow for the test suite (about 10 minutes on 2 cores for ~200 architectures).

    python scripts/transformers_sweep.py                  # every architecture
    python scripts/transformers_sweep.py llama t5gemma     # some
    python scripts/transformers_sweep.py --generate 6      # and greedy generate() of 6 tokens

Each line: the model type, then per implementation the largest difference from eager, or the
error it raised (a refusal naming an argument or the model is a loud failure, which is fine; a
large difference is a silent wrong answer, which is not: the script exits 1 on any above
--tolerance). "setup" means the tiny config did not build or run under eager itself (the sweep's
limit, not the integration's); "timeout" a model slower than --timeout seconds."""

import argparse
import copy
import logging
import signal
import sys
import warnings

import torch

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    n_routed_experts=4,
    num_experts_per_tok=2,
    num_local_experts=4,
    num_experts=4,
    moe_intermediate_size=32,
    pad_token_id=0,
)


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _tiny(config_type):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(config_type)
    for k, v in SMALL.items():
        try:
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        except Exception:  # (read-only properties of some configs)
            pass
    return cfg


def _generated(model, ids, mask, steps):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.sequences, type(cache).__name__


def sweep_one(model_type, cls, tolerance, generate=0):
    """The line for one architecture, and whether it is a silent wrong answer. generate > 0:
    also greedy generate() of that many tokens against eager's (with transformers' own cache),
    the cache each implementation got named."""
    cfg = _tiny(model_type)
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ids = torch.randint(1, 96, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
    expected_tokens = _generated(ref, ids, mask, generate)[0] if generate else None
    parts, wrong = [], False
    for impl in ("fa_ext", "flash_attn_ext"):
        try:
            model = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
            model.load_state_dict(ref.state_dict())
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).logits
            diff = max((got[0] - expected[0]).abs().max().item(), (got[1, 3:] - expected[1, 3:]).abs().max().item())
            wrong |= not diff <= tolerance
            parts.append(f"{impl}={diff:.1e}")
            if generate:
                tokens, cache = _generated(model, ids, mask, generate)
                same = torch.equal(tokens, expected_tokens)
                wrong |= not same
                parts[-1] += f" generate {'same' if same else 'DIFFERENT'} on {cache}"
        except _Timeout:
            raise
        except Exception as e:
            parts.append(f"{impl}=error {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}")
    return f"{model_type:28s} " + " | ".join(parts), wrong


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*", help="model types (default: every causal-LM architecture)")
    ap.add_argument("--timeout", type=int, default=20, help="seconds per architecture")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest difference from eager taken as equal")
    ap.add_argument(
        "--generate", type=int, default=0, help="also greedy generate() this many tokens and compare them with eager's"
    )
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import flash_attn_ext.integrations.transformers  # noqa: F401  (registers both names)

    transformers.logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _alarm)
    counts = dict(matched=0, wrong=0, setup=0, timeout=0)
    for model_type in args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
        if cls is None:
            print(f"{model_type:28s} not a causal-LM architecture of transformers {transformers.__version__}")
            continue
        signal.alarm(args.timeout)
        try:
            line, wrong = sweep_one(model_type, cls, args.tolerance, args.generate)
            counts["wrong" if wrong else "matched"] += 1
            print(line + ("   <-- WRONG" if wrong else ""), flush=True)
        except _Timeout:
            counts["timeout"] += 1
            print(f"{model_type:28s} timeout", flush=True)
        except Exception as e:
            counts["setup"] += 1
            print(f"{model_type:28s} setup ({type(e).__name__})", flush=True)
        finally:
            signal.alarm(0)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {counts}")
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
