"""`--method similarity` (heads grouped by the closeness of their keys/values on calibration
text, q/k/v/o permuted together, then mean-pooled) and sharded pytorch_model.bin input."""

import hashlib
import json
import os

import pytest
import torch

from flash_attn_ext import convert, head_similarity

transformers = pytest.importorskip("transformers")

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v biases
}


def _tiny(arch="llama", heads=8, kv_heads=8, seed=0):
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _dir_hash(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_group_heads_recovers_planted_groups():
    torch.manual_seed(0)
    tokens, heads, dim, groups = 64, 8, 16, 4
    base_k, base_v = torch.randn(groups, tokens, dim), torch.randn(groups, tokens, dim)
    owner = [2, 0, 3, 1, 0, 2, 1, 3]  # head -> planted group, interleaved so contiguous pooling is wrong
    k = torch.stack([base_k[g] + 0.05 * torch.randn(tokens, dim) for g in owner], dim=1).reshape(tokens, -1)
    v = torch.stack([base_v[g] + 0.05 * torch.randn(tokens, dim) for g in owner], dim=1).reshape(tokens, -1)
    order = head_similarity.group_heads(k, v, groups, heads)
    assert sorted(order) == list(range(heads))
    found = [sorted(order[i : i + 2]) for i in range(0, heads, 2)]
    planted = sorted(sorted(h for h in range(heads) if owner[h] == g) for g in range(groups))
    assert sorted(found) == planted
    assert head_similarity.grouping_spread(k, v, heads, order, groups) < 0.01 * head_similarity.grouping_spread(
        k, v, heads, list(range(heads)), groups
    )


@pytest.mark.parametrize("arch,heads,kv_heads", [("llama", 8, 8), ("llama", 8, 4), ("qwen2", 8, 4)])
def test_head_permutation_leaves_the_model_unchanged(arch, heads, kv_heads):
    """Moving K/V heads with their query heads (q/k/v rows, o columns, biases) is the same model."""
    model = _tiny(arch, heads, kv_heads)
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    perms = {f"model.layers.{i}.self_attn": torch.randperm(kv_heads, generator=gen).tolist() for i in range(2)}
    permuted = {name: head_similarity.permute_tensor(name, t, perms, heads, kv_heads, 8) for name, t in sd.items()}
    assert any(not torch.equal(permuted[n], sd[n]) for n in sd if "q_proj" in n)
    other = _tiny(arch, heads, kv_heads, seed=5)
    other.load_state_dict(permuted)
    tokens = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(_logits(other, tokens), _logits(model, tokens), rtol=1e-5, atol=1e-5)


def _model_with_duplicate_heads():
    """MHA model whose K/V heads 4..7 copy heads 0..3 in shuffled order (per layer): pooled in
    the right pairs, nothing is lost; contiguous pairs mix unrelated heads."""
    model = _tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.k_proj, attn.v_proj):
                w = proj.weight.view(8, 8, 64)
                for dst, src in zip((4, 5, 6, 7), (2, 0, 3, 1)):
                    w[dst] = w[src]
            # the query heads of a duplicate pair attend identically, so pairing them is exact
    return model


def test_similarity_pools_duplicate_heads_exactly_and_beats_contiguous_mean(tmp_path):
    model = _model_with_duplicate_heads()
    src = str(tmp_path / "mha")
    model.save_pretrained(src)
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    before = _dir_hash(src)
    tokens = torch.randint(0, 64, (2, 16))

    import logging
    from unittest import mock

    # (transformers says "`torch_dtype` is deprecated" through Logger.warning_once, which it
    # adds to logging.Logger: watch its calls)
    with mock.patch.object(logging.Logger, "warning_once", create=True) as warned:
        code = convert.main(
            [
                "--input",
                src,
                "--output",
                str(tmp_path / "sim"),
                "--num-kv-heads",
                "4",
                "--method",
                "similarity",
                "--calibration",
                str(text),
                "--no-progress",
            ]
        )
    assert code == 0
    assert not [c for c in warned.call_args_list if "torch_dtype" in str(c)], warned.call_args_list
    sim = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "sim")).eval()
    assert sim.config.num_key_value_heads == 4
    torch.testing.assert_close(_logits(sim, tokens), _logits(model, tokens), rtol=1e-4, atol=1e-4)

    convert.convert_checkpoint(src, str(tmp_path / "mean"), 4, progress=False)
    mean = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "mean")).eval()
    assert (_logits(mean, tokens) - _logits(model, tokens)).abs().max() > 1e-2
    assert _dir_hash(src) == before


def test_similarity_refusals_write_nothing(tmp_path):
    model = _tiny("llama")
    src = str(tmp_path / "mha")
    model.save_pretrained(src)
    out = tmp_path / "out"
    with pytest.raises(convert.ConversionError, match="calibration"):
        convert.convert_checkpoint(src, str(out), 4, method="similarity", progress=False)
    with pytest.raises(convert.ConversionError, match="does not exist"):
        convert.convert_checkpoint(
            src, str(out), 4, method="similarity", calibration=str(tmp_path / "nope.txt"), progress=False
        )
    acts = {"model.layers.0.self_attn": (torch.randn(10, 64), torch.randn(10, 64))}  # layer 1 missing
    with pytest.raises(convert.ConversionError, match="no calibration activations"):
        convert.convert_checkpoint(src, str(out), 4, method="similarity", kv_activations=acts, progress=False)
    acts["model.layers.1.self_attn"] = (torch.randn(10, 32), torch.randn(10, 32))  # wrong width
    with pytest.raises(convert.ConversionError, match="features"):
        convert.convert_checkpoint(src, str(out), 4, method="similarity", kv_activations=acts, progress=False)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]


def test_similarity_on_the_package_attention_via_kv_activations():
    """The library path for models transformers cannot load: activations from hooks on any
    module tree with k_proj / v_proj, then convert_state_dict."""
    from flash_attn_ext.nn import Attention

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 32)
            self.attn = Attention(32, num_heads=4, num_kv_heads=4, bias=False)

        def forward(self, ids):
            return self.attn(self.emb(ids))

    torch.manual_seed(0)
    block = Block().double()
    with torch.no_grad():  # heads 2, 3 duplicate heads 1, 0
        for proj in (block.attn.k_proj, block.attn.v_proj):
            w = proj.weight.view(4, 8, 32)
            w[2], w[3] = w[1].clone(), w[0].clone()
    ids = torch.randint(0, 32, (2, 10))
    acts = head_similarity.collect_kv_activations(block, [ids])
    assert set(acts) == {"attn"}
    config = {"model_type": "flash_attn_ext", "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8}
    sd, new_config = convert.convert_state_dict(block.state_dict(), config, 2, method="similarity", kv_activations=acts)
    assert new_config["num_key_value_heads"] == 2
    small = Block().double()
    small.attn = Attention(32, num_heads=4, num_kv_heads=2, bias=False).double()
    small.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(small(ids), block(ids), rtol=1e-10, atol=1e-10)


def test_sharded_pytorch_model_bin_input(tmp_path):
    model = _tiny("llama")
    src = tmp_path / "bin"
    src.mkdir()
    model.config.save_pretrained(str(src))
    sd = model.state_dict()
    names = sorted(sd)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for shard, keys in shards.items():
        torch.save({k: sd[k].clone() for k in keys}, str(src / shard))
    with open(src / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}, f)
    before = _dir_hash(str(src))
    convert.convert_checkpoint(str(src), str(tmp_path / "out"), 8, progress=False)
    out = tmp_path / "out"
    assert sorted(p for p in os.listdir(out) if p.endswith(".safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(_logits(reloaded, tokens), _logits(model, tokens), rtol=0, atol=0)
    assert _dir_hash(str(src)) == before
