"""MHA -> GQA / MQA checkpoint conversion (Ainslie et al. 2023, "GQA"), SPEC.md section 4.

The key and value projections of each group of heads are pooled into one head: group g holds
the contiguous heads [g*r, (g+1)*r), r = old_kv_heads / num_kv_heads, and its new projection
is their mean (weights and biases; the paper's choice), their first head, or one chosen at
random (seeded), for the paper's ablation. Query and output projections are unchanged, so
num_kv_heads == old_kv_heads reproduces the input exactly; an already-GQA checkpoint converts
to fewer groups. Uptraining (the paper's second step) is not part of this module yet.

    python -m flash_attn_ext.convert --input llama-dir --output llama-gqa4 --num-kv-heads 4
    flash-attn-ext-convert --input ... --output ... --num-kv-heads 1 --method first --dtype bfloat16

Library: `convert_state_dict` (tensors in memory) and `convert_checkpoint` (a HuggingFace
directory: config.json with safetensors, single file or sharded with
model.safetensors.index.json, or pytorch_model.bin read-only). The directory conversion
validates everything before writing, never modifies the input, streams one shard at a time,
writes into a temporary directory beside the output and renames it into place at the end.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, Iterable, Optional, Tuple

import torch

METHODS = ("mean", "first", "random")
# Architectures with separate k_proj / v_proj and num_key_value_heads (this package's
# flash_attn_ext.nn.Attention uses the same names).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "flash_attn_ext")
# Fused QKV projections: pooling would need the split, which is not implemented.
FUSED_QKV_MODEL_TYPES = ("gpt2", "gpt_neox", "gptj", "bloom", "falcon", "phi", "mpt", "codegen")
_KV_KEY = re.compile(r"(^|\.)(k_proj|v_proj)\.(weight|bias)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; raised before anything is written."""


def head_counts(config: dict) -> Tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from a HuggingFace-style config."""
    try:
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise ConversionError("config.json has no integer num_attention_heads") from None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim") or (int(config["hidden_size"]) // heads if "hidden_size" in config else None)
    if head_dim is None:
        raise ConversionError("config.json has neither head_dim nor hidden_size")
    return heads, kv_heads, int(head_dim)


def check_conversion(config: dict, num_kv_heads: int, method: str) -> None:
    """Raises ConversionError when config cannot become num_kv_heads groups with method."""
    model_type = config.get("model_type", "")
    if model_type in FUSED_QKV_MODEL_TYPES:
        raise ConversionError(f"model_type {model_type!r} uses a fused QKV projection; only architectures with "
                              f"separate k_proj/v_proj are supported ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if method not in METHODS:
        raise ConversionError(f"method must be one of {METHODS}, got {method!r}")
    heads, kv_heads, _ = head_counts(config)
    if heads % kv_heads:
        raise ConversionError(f"the config is inconsistent: num_attention_heads ({heads}) is not a multiple of "
                              f"num_key_value_heads ({kv_heads})")
    if num_kv_heads <= 0 or kv_heads % num_kv_heads:
        raise ConversionError(f"num_kv_heads ({num_kv_heads}) must divide the checkpoint's key/value heads "
                              f"({kv_heads}; query heads {heads})")


def pool_heads(t: torch.Tensor, old_kv_heads: int, num_kv_heads: int, method: str,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pools a k/v projection weight (old_kv_heads * head_dim, hidden) or bias
    (old_kv_heads * head_dim,) to num_kv_heads heads: contiguous groups of r heads each."""
    r = old_kv_heads // num_kv_heads
    grouped = t.reshape(num_kv_heads, r, t.shape[0] // old_kv_heads, *t.shape[1:])
    if method == "mean":
        # 16-bit weights are averaged in float32; float32/float64 in their own precision.
        pooled = grouped.to(torch.promote_types(t.dtype, torch.float32)).mean(dim=1).to(t.dtype)
    elif method == "first":
        pooled = grouped[:, 0]
    else:  # random: one head per group, seeded
        pick = torch.randint(0, r, (num_kv_heads,), generator=generator)
        pooled = grouped[torch.arange(num_kv_heads), pick]
    return pooled.reshape(num_kv_heads * grouped.shape[2], *t.shape[1:]).contiguous()


def _convert_tensors(items: Iterable[Tuple[str, torch.Tensor]], old_kv_heads: int, num_kv_heads: int, method: str,
                     generator: torch.Generator, dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, t in items:
        if _KV_KEY.search(name):
            if t.shape[0] % old_kv_heads:
                raise ConversionError(f"{name} has {t.shape[0]} rows, not a multiple of the {old_kv_heads} "
                                      f"key/value heads the config declares")
            t = pool_heads(t, old_kv_heads, num_kv_heads, method, generator)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t
    return out


def convert_state_dict(state_dict: Dict[str, torch.Tensor], config: dict, num_kv_heads: int, *,
                       method: str = "mean", seed: int = 0,
                       dtype: Optional[torch.dtype] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Returns (new state dict, new config) with num_kv_heads key/value heads. Every tensor
    whose name ends in k_proj/v_proj .weight/.bias is pooled; the rest is copied (cast to dtype
    if given). The inputs are not modified."""
    check_conversion(config, num_kv_heads, method)
    _, old_kv_heads, _ = head_counts(config)
    if not any(_KV_KEY.search(k) for k in state_dict):
        raise ConversionError("no k_proj/v_proj tensors found in the state dict")
    generator = torch.Generator().manual_seed(seed)
    new_sd = _convert_tensors(sorted(state_dict.items()), old_kv_heads, num_kv_heads, method, generator, dtype)
    new_config = dict(config, num_key_value_heads=num_kv_heads)
    if dtype is not None:
        new_config["torch_dtype"] = str(dtype).replace("torch.", "")
    return new_sd, new_config


def _weight_files(input_dir: str) -> Tuple[str, list]:
    """('safetensors' | 'bin', [shard file names]) of a HuggingFace checkpoint directory."""
    index = os.path.join(input_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return "safetensors", sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(input_dir, "model.safetensors")):
        return "safetensors", ["model.safetensors"]
    if os.path.exists(os.path.join(input_dir, "pytorch_model.bin")):
        return "bin", ["pytorch_model.bin"]
    raise ConversionError(f"{input_dir} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def kv_cache_bytes_per_token(config: dict, kv_heads: int, dtype_bytes: int) -> int:
    """K and V of one token over every layer."""
    _, _, head_dim = head_counts(config)
    return 2 * int(config.get("num_hidden_layers", 1)) * kv_heads * head_dim * dtype_bytes


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024 or unit == "MiB":
            return f"{nbytes} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def convert_checkpoint(input_dir: str, output_dir: str, num_kv_heads: int, *, method: str = "mean", seed: int = 0,
                       dtype: Optional[str] = None, progress: bool = True, force: bool = False) -> dict:
    """Converts a HuggingFace-format checkpoint directory; returns the new config. See the
    module docstring for what is validated and how the output is written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise ConversionError(f"output directory {output_dir} must not be inside the input {input_dir} (or contain it)")
    if os.path.exists(output_dir) and not force:
        raise ConversionError(f"output directory {output_dir} already exists; choose a new path or pass --force")
    config_path = os.path.join(input_dir, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{input_dir} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    check_conversion(config, num_kv_heads, method)
    heads, old_kv_heads, head_dim = head_counts(config)
    kind, shards = _weight_files(input_dir)

    # Validate every shard's k/v shapes before writing anything (safetensors: headers only).
    n_kv, kv_names = 0, set()
    for shard in shards:
        path = os.path.join(input_dir, shard)
        if not os.path.exists(path):
            raise ConversionError(f"shard {shard} listed in the index is missing")
        if kind == "safetensors":
            with safe_open(path, framework="pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        else:
            shapes = {k: list(v.shape) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
        for name, shape in shapes.items():
            if _KV_KEY.search(name):
                n_kv += 1
                kv_names.add(name)
                if shape[0] != old_kv_heads * head_dim:
                    raise ConversionError(f"{name} has {shape[0]} rows; the config declares {old_kv_heads} key/value "
                                          f"heads of dim {head_dim} ({old_kv_heads * head_dim} rows)")
    if n_kv == 0:
        raise ConversionError("no k_proj/v_proj tensors found in the checkpoint")
    for name in sorted(kv_names):  # every k projection has its v projection, and vice versa
        partner = name.replace("k_proj.", "v_proj.") if ".k_proj." in f".{name}" else name.replace("v_proj.", "k_proj.")
        if partner not in kv_names:
            raise ConversionError(f"{name} has no matching {partner}: the checkpoint is missing tensors")
    layers = config.get("num_hidden_layers")
    n_k = sum(1 for n in kv_names if n.endswith("k_proj.weight"))
    if layers is not None and n_k != int(layers):
        raise ConversionError(f"the checkpoint has {n_k} k_proj weights but the config declares {layers} layers: "
                              f"missing tensors")

    parent = os.path.dirname(os.path.abspath(output_dir))
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        generator = torch.Generator().manual_seed(seed)
        target = _DTYPES.get(dtype) if dtype else None
        weight_map = {}
        iterator = shards
        if progress:
            from tqdm import tqdm
            iterator = tqdm(shards, desc="converting shards", unit="shard")
        for shard in iterator:  # one shard in memory at a time
            path = os.path.join(input_dir, shard)
            if kind == "safetensors":
                with safe_open(path, framework="pt") as f:
                    metadata = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
            else:
                metadata, tensors = {}, torch.load(path, map_location="cpu", weights_only=True)
            converted = _convert_tensors(sorted(tensors.items()), old_kv_heads, num_kv_heads, method, generator, target)
            out_name = shard if kind == "safetensors" else "model.safetensors"
            save_file(converted, os.path.join(tmp, out_name), metadata={**metadata, "format": "pt"})
            weight_map.update({k: out_name for k in converted})
            del tensors, converted
        if len(shards) > 1:
            with open(os.path.join(input_dir, "model.safetensors.index.json")) as f:
                index = json.load(f)
            total = sum(os.path.getsize(os.path.join(tmp, s)) for s in set(weight_map.values()))
            index["metadata"] = dict(index.get("metadata", {}), total_size=total)
            index["weight_map"] = weight_map
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        new_config = dict(config, num_key_value_heads=num_kv_heads)
        if dtype is not None:
            new_config["torch_dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(new_config, f, indent=2)
        # Everything else (tokenizer, generation config, ...) is copied as is.
        skip = set(shards) | {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
        for name in os.listdir(input_dir):
            src = os.path.join(input_dir, name)
            if name not in skip and os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, name))
        if os.path.exists(output_dir):  # --force: replaced only now, once the new one is complete
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial output, even on Ctrl-C
        raise

    nbytes = _DTYPES[dtype].itemsize if dtype else {"float32": 4, "float16": 2, "bfloat16": 2}.get(
        str(config.get("torch_dtype", "float32")), 4)
    before = kv_cache_bytes_per_token(config, old_kv_heads, nbytes)
    after = kv_cache_bytes_per_token(config, num_kv_heads, nbytes)
    print(f"converted {input_dir} -> {output_dir}: {heads} query heads, key/value heads {old_kv_heads} -> "
          f"{num_kv_heads} ({method}); KV cache per token {_human(before)} -> {_human(after)} "
          f"({before / after:.1f}x smaller)")
    return new_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flash-attn-ext-convert",
                                 description="Convert a multi-head (or GQA) HuggingFace checkpoint to fewer "
                                             "key/value heads by pooling them, as in the GQA paper.")
    ap.add_argument("--input", required=True, help="checkpoint directory (config.json + safetensors or .bin)")
    ap.add_argument("--output", required=True, help="new directory (must not exist)")
    ap.add_argument("--num-kv-heads", type=int, required=True, help="key/value heads after conversion")
    ap.add_argument("--method", choices=METHODS, default="mean", help="how a group's heads become one")
    ap.add_argument("--seed", type=int, default=0, help="for --method random")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating tensors (default: keep)")
    ap.add_argument("--force", action="store_true", help="replace an existing output directory (once done)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        convert_checkpoint(args.input, args.output, args.num_kv_heads, method=args.method, seed=args.seed,
                           dtype=args.dtype, progress=not args.no_progress, force=args.force)
    except ConversionError as e:
        print(f"flash-attn-ext-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
