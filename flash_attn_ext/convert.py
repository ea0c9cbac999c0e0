"""MHA -> GQA / MQA checkpoint conversion (Ainslie et al. 2023, "GQA"), SPEC.md section 4.

The key and value projections of each group of heads are pooled into one head: group g holds
the contiguous heads [g*r, (g+1)*r), r = old_kv_heads / num_kv_heads, and its new projection
is their mean (weights and biases; the paper's choice), their first head, or one chosen at
random (seeded), for the paper's ablation. Query and output projections are unchanged, so
num_kv_heads == old_kv_heads reproduces the input exactly; an already-GQA checkpoint converts
to fewer groups. `similarity` (beyond the paper, flash_attn_ext/head_similarity.py) first
reorders each layer's heads so that heads whose keys and values are close on calibration text
share a group (q/k/v/o projections permuted together: the model is unchanged), then pools by
mean. Uptraining (the paper's second step) is examples/uptrain.py.

    python -m flash_attn_ext.convert --input llama-dir --output llama-gqa4 --num-kv-heads 4
    python -m flash_attn_ext.convert --input llama-dir --output llama-gqa4s --num-kv-heads 4 \
        --method similarity --calibration some.txt
    flash-attn-ext-convert --input ... --output ... --num-kv-heads 1 --method first --dtype bfloat16

Library: `convert_state_dict` (tensors in memory) and `convert_checkpoint` (a HuggingFace
directory: config.json with safetensors, single file or sharded with
model.safetensors.index.json, or pytorch_model.bin, single or sharded with
pytorch_model.bin.index.json, read-only; the output is safetensors). The directory conversion
validates everything before writing, never modifies the input, streams one shard at a time,
writes into a temporary directory beside the output and renames it into place at the end.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from . import head_similarity

METHODS = ("mean", "first", "random", "similarity")
# Architectures with separate k_proj / v_proj and num_key_value_heads (this package's
# flash_attn_ext.nn.Attention uses the same names).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "flash_attn_ext")
# Fused QKV projections: pooling would need the split, which is not implemented.
FUSED_QKV_MODEL_TYPES = ("gpt2", "gpt_neox", "gptj", "bloom", "falcon", "phi", "mpt", "codegen")
_KV_KEY = re.compile(r"(^|\.)(k_proj|v_proj)\.(weight|bias)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _dtype_name(dtype) -> Optional[str]:
    """'bfloat16' for torch.bfloat16 or 'bfloat16' (None stays None); anything else raises."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype
    if name not in _DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(_DTYPES)} (or the torch dtype), got {dtype!r}")
    return name


def _config_dtype(config: dict) -> Optional[str]:
    """The checkpoint's dtype as its config states it: `dtype` (transformers 5) or
    `torch_dtype` (earlier versions)."""
    return config.get("dtype") or config.get("torch_dtype")


def _with_dtype(config: dict, dtype: Optional[str]) -> dict:
    """config with its dtype set to dtype, under both keys transformers has read: `dtype` (5.x)
    and `torch_dtype` (4.x), so that every version loads the weights as they were written."""
    if dtype is None:
        return config
    return dict(config, dtype=dtype, torch_dtype=dtype)


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
        raise ConversionError(
            f"model_type {model_type!r} uses a fused QKV projection; only architectures with "
            f"separate k_proj/v_proj are supported ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if method not in METHODS:
        raise ConversionError(f"method must be one of {METHODS}, got {method!r}")
    heads, kv_heads, _ = head_counts(config)
    if heads % kv_heads:
        raise ConversionError(
            f"the config is inconsistent: num_attention_heads ({heads}) is not a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    if num_kv_heads <= 0 or kv_heads % num_kv_heads:
        raise ConversionError(
            f"num_kv_heads ({num_kv_heads}) must divide the checkpoint's key/value heads "
            f"({kv_heads}; query heads {heads})"
        )


def pool_heads(
    t: torch.Tensor, old_kv_heads: int, num_kv_heads: int, method: str, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
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


def _convert_tensors(
    items: Iterable[Tuple[str, torch.Tensor]],
    old_kv_heads: int,
    num_kv_heads: int,
    method: str,
    generator: torch.Generator,
    dtype: Optional[torch.dtype],
    perms: Optional[Dict[str, List[int]]] = None,
    config: Optional[dict] = None,
) -> Dict[str, torch.Tensor]:
    out = {}
    for name, t in items:
        if perms:
            heads, _, head_dim = head_counts(config)
            t = head_similarity.permute_tensor(name, t, perms, heads, old_kv_heads, head_dim)
        if _KV_KEY.search(name):
            if t.shape[0] % old_kv_heads:
                raise ConversionError(
                    f"{name} has {t.shape[0]} rows, not a multiple of the {old_kv_heads} "
                    f"key/value heads the config declares"
                )
            t = pool_heads(t, old_kv_heads, num_kv_heads, "mean" if method == "similarity" else method, generator)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t
    return out


def similarity_orders(
    kv_activations: Dict[str, Tuple[torch.Tensor, torch.Tensor]], config: dict, num_kv_heads: int
) -> Dict[str, List[int]]:
    """The K/V head order of every attention module (by state-dict prefix) that puts heads with
    close keys and values in the same group; kv_activations from
    head_similarity.collect_kv_activations."""
    _, old_kv_heads, head_dim = head_counts(config)
    orders = {}
    for prefix, (k, v) in kv_activations.items():
        if k.shape[-1] != old_kv_heads * head_dim or v.shape[-1] != old_kv_heads * head_dim:
            raise ConversionError(
                f"calibration activations of {prefix} have {k.shape[-1]} / {v.shape[-1]} features; "
                f"the config declares {old_kv_heads} key/value heads of dim {head_dim}"
            )
        orders[prefix] = head_similarity.group_heads(k, v, num_kv_heads, old_kv_heads)
    return orders


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
    config: dict,
    num_kv_heads: int,
    *,
    method: str = "mean",
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    kv_activations: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Returns (new state dict, new config) with num_kv_heads key/value heads. Every tensor
    whose name ends in k_proj/v_proj .weight/.bias is pooled; the rest is copied (floating
    tensors cast to dtype if given: torch.float32 / float16 / bfloat16 or its name, as in
    convert_checkpoint). method "similarity" needs kv_activations
    (head_similarity.collect_kv_activations on calibration tokens) and also reorders q_proj /
    o_proj. The inputs are not modified."""
    dtype_name = _dtype_name(dtype)
    check_conversion(config, num_kv_heads, method)
    _, old_kv_heads, _ = head_counts(config)
    if not any(_KV_KEY.search(k) for k in state_dict):
        raise ConversionError("no k_proj/v_proj tensors found in the state dict")
    perms = None
    if method == "similarity":
        if not kv_activations:
            raise ConversionError("method 'similarity' needs kv_activations (calibration outputs of k_proj/v_proj)")
        perms = similarity_orders(kv_activations, config, num_kv_heads)
        missing = sorted({m.group("prefix") for k in state_dict if (m := head_similarity._PROJ.match(k))} - set(perms))
        if missing:
            raise ConversionError(f"no calibration activations for attention modules {missing}")
    generator = torch.Generator().manual_seed(seed)
    target = _DTYPES[dtype_name] if dtype_name else None
    new_sd = _convert_tensors(
        sorted(state_dict.items()), old_kv_heads, num_kv_heads, method, generator, target, perms, config
    )
    return new_sd, _with_dtype(dict(config, num_key_value_heads=num_kv_heads), dtype_name)


def _weight_files(input_dir: str) -> Tuple[str, list]:
    """('safetensors' | 'bin', [shard file names]) of a HuggingFace checkpoint directory:
    sharded (an index) or single file, safetensors preferred."""
    for kind, single in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        index = os.path.join(input_dir, single + ".index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    return kind, sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON or no weight_map
                raise ConversionError(f"{index} is not a valid checkpoint index ({type(e).__name__}: {e})") from None
        if os.path.exists(os.path.join(input_dir, single)):
            return kind, [single]
    raise ConversionError(f"{input_dir} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


@contextlib.contextmanager
def _reading(shard: str):
    """A shard that cannot be read (truncated, corrupt, not a checkpoint) raises a
    ConversionError naming it."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError (zip), OSError, ...
        raise ConversionError(f"cannot read shard {shard} (truncated or corrupt?): {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _writing(name: str, output_dir: str):
    """A write that fails (a full disk, no permission) raises a ConversionError naming the file;
    the caller then removes the temporary directory, so output_dir is never left half-written."""
    try:
        yield
    except OSError as e:
        raise ConversionError(f"writing {name} failed ({e.strerror or e}); nothing was written to {output_dir}") from e


def _safetensors_name(bin_shard: str, n_shards: int) -> str:
    """Output name of a .bin shard: pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors."""
    if n_shards == 1:
        return "model.safetensors"
    stem = bin_shard[: -len(".bin")] if bin_shard.endswith(".bin") else bin_shard
    return (stem[len("pytorch_") :] if stem.startswith("pytorch_") else stem) + ".safetensors"


def kv_cache_bytes_per_token(config: dict, kv_heads: int, dtype_bytes: int) -> int:
    """K and V of one token over every layer."""
    _, _, head_dim = head_counts(config)
    return 2 * int(config.get("num_hidden_layers", 1)) * kv_heads * head_dim * dtype_bytes


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024 or unit == "MiB":
            return f"{nbytes} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _calibration_activations(input_dir: str, config: dict, text_path: str, max_tokens: int):
    """k_proj / v_proj outputs of the input model (loaded with transformers) on the first
    max_tokens tokens of a text file: tokenized with the checkpoint's tokenizer when it has one,
    else read as bytes (ids = byte % vocab_size)."""
    if config.get("model_type") == "flash_attn_ext":
        raise ConversionError(
            "--calibration runs the model with transformers, which cannot load model_type "
            "'flash_attn_ext'; use convert_state_dict / convert_checkpoint with kv_activations "
            "(flash_attn_ext.head_similarity.collect_kv_activations) instead"
        )
    if not os.path.isfile(text_path):
        raise ConversionError(f"calibration text {text_path} does not exist")
    try:
        import transformers
    except ImportError:
        raise ConversionError(
            "--method similarity needs transformers (pip install 'flash_attn_ext[convert]')"
        ) from None
    with open(text_path, "rb") as f:
        raw = f.read(16 * max_tokens)
    if not raw:
        raise ConversionError(f"calibration text {text_path} is empty")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if any(os.path.exists(os.path.join(input_dir, n)) for n in tokenizer_files):
        tok = transformers.AutoTokenizer.from_pretrained(input_dir)
        ids = tok(raw.decode("utf-8", errors="replace"), return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.tensor(list(raw), dtype=torch.long) % int(config["vocab_size"])
    ids = ids[:max_tokens]
    seq = min(512, int(config.get("max_position_embeddings", 512)))
    batches = [ids[i : i + seq].unsqueeze(0) for i in range(0, len(ids), seq)]
    model = transformers.AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32)
    acts = head_similarity.collect_kv_activations(model, batches, max_tokens=max_tokens)
    del model
    return acts


def convert_checkpoint(
    input_dir: str,
    output_dir: str,
    num_kv_heads: int,
    *,
    method: str = "mean",
    seed: int = 0,
    dtype=None,
    progress: bool = True,
    force: bool = False,
    calibration: Optional[str] = None,
    calibration_tokens: int = 2048,
    kv_activations: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> dict:
    """Converts a HuggingFace-format checkpoint directory; returns the new config. See the
    module docstring for what is validated and how the output is written. method "similarity"
    needs calibration (a text file; the model is run with transformers, so the whole model is
    in memory once) or precomputed kv_activations. dtype: "float32" / "float16" / "bfloat16" or
    the torch dtype; the config then states it as `dtype` and `torch_dtype`. progress draws a
    bar when tqdm is installed."""
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
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    dtype = _dtype_name(dtype)
    check_conversion(config, num_kv_heads, method)
    heads, old_kv_heads, head_dim = head_counts(config)
    kind, shards = _weight_files(input_dir)

    # Validate every shard's k/v shapes before writing anything (safetensors: headers only).
    n_kv, kv_names = 0, set()
    for shard in shards:
        path = os.path.join(input_dir, shard)
        if not os.path.exists(path):
            raise ConversionError(f"shard {shard} listed in the index is missing")
        with _reading(shard):
            if kind == "safetensors":
                with safe_open(path, framework="pt") as f:
                    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            else:
                shapes = {k: list(v.shape) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
        for name, shape in shapes.items():
            m = head_similarity._PROJ.match(name)
            if method == "similarity" and m and m["kind"] == "weight" and m["proj"] in ("q_proj", "o_proj"):
                dim = 0 if m["proj"] == "q_proj" else 1
                if len(shape) != 2 or shape[dim] != heads * head_dim:
                    raise ConversionError(
                        f"{name} has shape {list(shape)}; the config declares {heads} query heads "
                        f"of dim {head_dim} ({heads * head_dim} {'rows' if dim == 0 else 'columns'})"
                    )
            if _KV_KEY.search(name):
                n_kv += 1
                kv_names.add(name)
                if shape[0] != old_kv_heads * head_dim:
                    raise ConversionError(
                        f"{name} has {shape[0]} rows; the config declares {old_kv_heads} key/value "
                        f"heads of dim {head_dim} ({old_kv_heads * head_dim} rows)"
                    )
    if n_kv == 0:
        raise ConversionError("no k_proj/v_proj tensors found in the checkpoint")
    for name in sorted(kv_names):  # every k projection has its v projection, and vice versa
        partner = name.replace("k_proj.", "v_proj.") if ".k_proj." in f".{name}" else name.replace("v_proj.", "k_proj.")
        if partner not in kv_names:
            raise ConversionError(f"{name} has no matching {partner}: the checkpoint is missing tensors")
    layers = config.get("num_hidden_layers")
    n_k = sum(1 for n in kv_names if n.endswith("k_proj.weight"))
    if layers is not None and n_k != int(layers):
        raise ConversionError(
            f"the checkpoint has {n_k} k_proj weights but the config declares {layers} layers: missing tensors"
        )

    perms, spread = None, None
    if method == "similarity":
        if kv_activations is None:
            if calibration is None:
                raise ConversionError("method 'similarity' needs --calibration TEXT_FILE (or kv_activations)")
            kv_activations = _calibration_activations(input_dir, config, calibration, calibration_tokens)
        perms = similarity_orders(kv_activations, config, num_kv_heads)
        modules = {_KV_KEY.split(n)[0].rstrip(".") for n in kv_names}
        if modules - set(perms):
            raise ConversionError(f"no calibration activations for attention modules {sorted(modules - set(perms))}")
        contiguous = list(range(old_kv_heads))
        spread = [
            head_similarity.grouping_spread(k, v, old_kv_heads, perms[p], num_kv_heads)
            / max(head_similarity.grouping_spread(k, v, old_kv_heads, contiguous, num_kv_heads), 1e-30)
            for p, (k, v) in kv_activations.items()
            if p in modules
        ]

    parent = os.path.dirname(os.path.abspath(output_dir))
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        # mkdtemp makes it 0700 and safetensors writes its files 0600; the output gets the modes
        # any new directory and file get (readable by a serving account under the usual umask).
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)
        generator = torch.Generator().manual_seed(seed)
        target = _DTYPES.get(dtype) if dtype else None
        weight_map = {}
        iterator = shards
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is all it draws
                pass
            else:
                iterator = tqdm(shards, desc="converting shards", unit="shard")
        for shard in iterator:  # one shard in memory at a time
            path = os.path.join(input_dir, shard)
            with _reading(shard):
                if kind == "safetensors":
                    with safe_open(path, framework="pt") as f:
                        metadata = f.metadata() or {}
                        tensors = {k: f.get_tensor(k) for k in f.keys()}
                else:
                    metadata, tensors = {}, torch.load(path, map_location="cpu", weights_only=True)
            converted = _convert_tensors(
                sorted(tensors.items()), old_kv_heads, num_kv_heads, method, generator, target, perms, config
            )
            out_name = shard if kind == "safetensors" else _safetensors_name(shard, len(shards))
            with _writing(out_name, output_dir):
                save_file(converted, os.path.join(tmp, out_name), metadata={**metadata, "format": "pt"})
                os.chmod(os.path.join(tmp, out_name), 0o666 & ~umask)
            weight_map.update({k: out_name for k in converted})
            del tensors, converted
        if len(shards) > 1:
            index_name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
            with open(os.path.join(input_dir, index_name)) as f:
                index = json.load(f)
            total = sum(os.path.getsize(os.path.join(tmp, s)) for s in set(weight_map.values()))
            index["metadata"] = dict(index.get("metadata", {}), total_size=total)
            index["weight_map"] = weight_map
            with (
                _writing("model.safetensors.index.json", output_dir),
                open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f,
            ):
                json.dump(index, f, indent=2)
        new_config = _with_dtype(dict(config, num_key_value_heads=num_kv_heads), dtype)
        with _writing("config.json", output_dir), open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(new_config, f, indent=2)
        # Everything else (tokenizer, generation config, ...) is copied as is.
        skip = set(shards) | {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
        for name in os.listdir(input_dir):
            src = os.path.join(input_dir, name)
            if name not in skip and os.path.isfile(src):
                with _writing(name, output_dir):
                    shutil.copy2(src, os.path.join(tmp, name))
        if os.path.exists(output_dir):  # --force: replaced only now, once the new one is complete
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial output, even on Ctrl-C
        raise

    # The cache holds K/V in the dtype the model runs in: the one written (float32 when unstated).
    before = kv_cache_bytes_per_token(config, old_kv_heads, _DTYPE_BYTES.get(str(_config_dtype(config)), 4))
    after = kv_cache_bytes_per_token(new_config, num_kv_heads, _DTYPE_BYTES.get(str(_config_dtype(new_config)), 4))
    if before == after:
        change = "unchanged"
    else:
        change = f"{before / after:.1f}x smaller" if after < before else f"{after / before:.1f}x larger"
    print(
        f"converted {input_dir} -> {output_dir}: {heads} query heads, key/value heads {old_kv_heads} -> "
        f"{num_kv_heads} ({method}); KV cache per token {_human(before)} -> {_human(after)} ({change})"
    )
    if spread:
        print(
            f"similarity grouping: within-group K/V spread {100 * sum(spread) / len(spread):.0f}% of the contiguous "
            f"grouping's (mean over {len(spread)} layers; lower loses less when pooled)"
        )
    return new_config


def _umask() -> int:
    """The process's umask (read without changing it where /proc says it; else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="flash-attn-ext-convert",
        description="Convert a multi-head (or GQA) HuggingFace checkpoint to fewer "
        "key/value heads by pooling them, as in the GQA paper.",
    )
    ap.add_argument("--input", required=True, help="checkpoint directory (config.json + safetensors or .bin)")
    ap.add_argument("--output", required=True, help="new directory (must not exist)")
    ap.add_argument("--num-kv-heads", type=int, required=True, help="key/value heads after conversion")
    ap.add_argument("--method", choices=METHODS, default="mean", help="how a group's heads become one")
    ap.add_argument("--seed", type=int, default=0, help="for --method random")
    ap.add_argument("--calibration", help="text file for --method similarity (the model runs on it with transformers)")
    ap.add_argument("--calibration-tokens", type=int, default=2048, help="tokens of --calibration to use")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating tensors (default: keep)")
    ap.add_argument("--force", action="store_true", help="replace an existing output directory (once done)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        convert_checkpoint(
            args.input,
            args.output,
            args.num_kv_heads,
            method=args.method,
            seed=args.seed,
            dtype=args.dtype,
            progress=not args.no_progress,
            force=args.force,
            calibration=args.calibration,
            calibration_tokens=args.calibration_tokens,
        )
    except ConversionError as e:
        print(f"flash-attn-ext-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
