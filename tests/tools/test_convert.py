"""MHA -> GQA/MQA checkpoint conversion (flash_attn_ext.convert, SPEC.md section 4)."""

import hashlib
import json
import os

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from flash_attn_ext import convert  # noqa: E402
from flash_attn_ext.nn import Attention  # noqa: E402

CONFIG = dict(
    model_type="llama",
    num_attention_heads=8,
    num_key_value_heads=8,
    hidden_size=64,
    num_hidden_layers=2,
    torch_dtype="float32",
)


def _state_dict(config=CONFIG, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, Hkv, dim = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    hd = dim // H
    sd = {"model.embed_tokens.weight": torch.randn(32, dim, generator=g)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        sd[p + "q_proj.weight"] = torch.randn(H * hd, dim, generator=g)
        sd[p + "k_proj.weight"] = torch.randn(Hkv * hd, dim, generator=g)
        sd[p + "v_proj.weight"] = torch.randn(Hkv * hd, dim, generator=g)
        sd[p + "o_proj.weight"] = torch.randn(dim, H * hd, generator=g)
        if bias:
            sd[p + "k_proj.bias"] = torch.randn(Hkv * hd, generator=g)
            sd[p + "v_proj.bias"] = torch.randn(Hkv * hd, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * dim, dim, generator=g)
    return sd


def _write_checkpoint(path, sd, config=CONFIG, shards=1):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write('{"tokenizer": true}')
    names = sorted(sd)
    if shards == 1:
        safetensors_torch.save_file(sd, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        part = {k: sd[k] for k in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_torch.save_file(part, os.path.join(path, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_pool_heads_methods():
    w = torch.randn(8 * 4, 16)  # 8 heads of dim 4
    heads = w.view(8, 4, 16)
    mean = convert.pool_heads(w, 8, 2, "mean").view(2, 4, 16)
    torch.testing.assert_close(mean, heads.view(2, 4, 4, 16).mean(1))  # groups of 4 contiguous heads
    first = convert.pool_heads(w, 8, 2, "first").view(2, 4, 16)
    assert torch.equal(first, heads[[0, 4]])
    a = convert.pool_heads(w, 8, 2, "random", torch.Generator().manual_seed(3)).view(2, 4, 16)
    b = convert.pool_heads(w, 8, 2, "random", torch.Generator().manual_seed(3)).view(2, 4, 16)
    assert torch.equal(a, b)
    assert any(torch.equal(a[0], heads[h]) for h in range(4)) and any(torch.equal(a[1], heads[h]) for h in range(4, 8))
    # random, not a fixed choice: over 20 seeds every group's pick varies (a method that always
    # took the group's first head, or the same one, fails here; 4^-19 odds by chance)
    for group in range(2):
        picked = set()
        for seed in range(20):
            r = convert.pool_heads(w, 8, 2, "random", torch.Generator().manual_seed(seed)).view(2, 4, 16)
            picked |= {h for h in range(4 * group, 4 * group + 4) if torch.equal(r[group], heads[h])}
        assert len(picked) > 1, f"group {group}: 'random' always picked head {picked}"
    bias = torch.randn(8 * 4)
    torch.testing.assert_close(convert.pool_heads(bias, 8, 1, "mean"), bias.view(8, 4).mean(0))


def test_same_head_count_reproduces_the_model_exactly():
    sd = _state_dict(bias=True)
    new, cfg = convert.convert_state_dict(sd, CONFIG, 8)
    assert cfg["num_key_value_heads"] == 8 and all(torch.equal(new[k], sd[k]) for k in sd)


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_gqa_module_equals_mha_with_pooled_heads_repeated(groups):
    """The converted GQA layer computes exactly what the MHA layer computes once each group's
    K/V projections are replaced by their mean: pooling follows SPEC's contiguous groups."""
    torch.manual_seed(groups)
    mha = Attention(64, 8, 8, bias=True, dtype=torch.float64)
    sd = {f"self_attn.{k}": v for k, v in mha.state_dict().items()}
    cfg = dict(CONFIG, model_type="flash_attn_ext")
    new, new_cfg = convert.convert_state_dict(sd, cfg, groups)
    gqa = Attention(64, 8, new_cfg["num_key_value_heads"], bias=True, dtype=torch.float64)
    gqa.load_state_dict({k.removeprefix("self_attn."): v for k, v in new.items()})
    r = 8 // groups
    ref = Attention(64, 8, 8, bias=True, dtype=torch.float64)
    ref.load_state_dict(mha.state_dict())
    with torch.no_grad():
        for proj in (ref.k_proj, ref.v_proj):
            proj.weight.copy_(
                proj.weight.view(groups, r, 8, 64).mean(1, keepdim=True).expand(groups, r, 8, 64).reshape(64, 64)
            )
            proj.bias.copy_(proj.bias.view(groups, r, 8).mean(1, keepdim=True).expand(groups, r, 8).reshape(64))
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_directory(tmp_path, shards, capsys):
    src, dst = str(tmp_path / "mha"), str(tmp_path / "gqa")
    sd = _state_dict(dict(CONFIG, model_type="qwen2"), bias=True)
    _write_checkpoint(src, sd, dict(CONFIG, model_type="qwen2"), shards)
    before = _digest(src)
    cfg = convert.convert_checkpoint(src, dst, 2, progress=False)
    assert _digest(src) == before, "the input checkpoint was modified"
    assert cfg["num_key_value_heads"] == 2
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["num_key_value_heads"] == 2
    assert open(os.path.join(dst, "tokenizer.json")).read() == '{"tokenizer": true}'
    if shards > 1:
        with open(os.path.join(dst, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        assert len(files) == shards
        out = {}
        for fname in files:
            out.update(safetensors_torch.load_file(os.path.join(dst, fname)))
    else:
        out = safetensors_torch.load_file(os.path.join(dst, "model.safetensors"))
    assert set(out) == set(sd)
    k = "model.layers.1.self_attn.k_proj.weight"
    torch.testing.assert_close(out[k], sd[k].view(2, 4, 8, 64).mean(1).reshape(16, 64))
    b = "model.layers.0.self_attn.v_proj.bias"
    torch.testing.assert_close(out[b], sd[b].view(2, 4, 8).mean(1).reshape(16))
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"])
    # 2 layers x (K, V) x 8 heads x dim 8 x 4 bytes = 1 KiB per token before, a quarter after
    assert "KV cache per token 1.0 KiB -> 256 B (4.0x smaller)" in capsys.readouterr().out
    assert [p for p in os.listdir(tmp_path) if p.startswith(".convert-")] == []


def test_dtype_cast_and_cli(tmp_path):
    src, dst = str(tmp_path / "mha"), str(tmp_path / "mqa")
    _write_checkpoint(src, _state_dict())
    assert (
        convert.main(
            [
                "--input",
                src,
                "--output",
                dst,
                "--num-kv-heads",
                "1",
                "--method",
                "first",
                "--dtype",
                "bfloat16",
                "--no-progress",
            ]
        )
        == 0
    )
    out = safetensors_torch.load_file(os.path.join(dst, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert out["model.layers.0.self_attn.k_proj.weight"].shape == (8, 64)


def test_pytorch_model_bin_input(tmp_path):
    src, dst = tmp_path / "bin", str(tmp_path / "out")
    os.makedirs(src)
    sd = _state_dict()
    torch.save(sd, src / "pytorch_model.bin")
    with open(src / "config.json", "w") as f:
        json.dump(CONFIG, f)
    convert.convert_checkpoint(str(src), dst, 4, progress=False)
    out = safetensors_torch.load_file(os.path.join(dst, "model.safetensors"))
    assert out["model.layers.0.self_attn.v_proj.weight"].shape == (32, 64)
    assert not os.path.exists(os.path.join(dst, "pytorch_model.bin"))


@pytest.mark.parametrize(
    "edit,num_kv,match",
    [
        (lambda c: c, 3, "must divide"),
        (lambda c: dict(c, model_type="gpt2"), 2, "fused QKV"),
        (lambda c: dict(c, model_type="t5"), 2, "unknown model_type"),
        (lambda c: dict(c, num_key_value_heads=3), 1, "inconsistent"),
        (lambda c: dict(c, num_key_value_heads=4), 2, "rows; the config declares 4"),  # config lies about heads
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path, edit, num_kv, match, capsys):
    src, dst = str(tmp_path / "mha"), str(tmp_path / "out")
    _write_checkpoint(src, _state_dict(), edit(dict(CONFIG)))
    assert convert.main(["--input", src, "--output", dst, "--num-kv-heads", str(num_kv), "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(dst)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".convert-")] == []


@pytest.mark.parametrize("drop", ["model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.k_proj.weight"])
def test_missing_tensors_are_refused(tmp_path, drop):
    src = str(tmp_path / "mha")
    sd = _state_dict()
    del sd[drop]
    _write_checkpoint(src, sd)
    with pytest.raises(convert.ConversionError, match="missing tensors"):
        convert.convert_checkpoint(src, str(tmp_path / "out"), 2, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_missing_shard_and_existing_output(tmp_path):
    src = str(tmp_path / "mha")
    _write_checkpoint(src, _state_dict(), shards=2)
    os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))
    with pytest.raises(convert.ConversionError, match="missing"):
        convert.convert_checkpoint(src, str(tmp_path / "out"), 2, progress=False)
    os.makedirs(tmp_path / "exists")
    with pytest.raises(convert.ConversionError, match="already exists"):
        convert.convert_checkpoint(src, str(tmp_path / "exists"), 2, progress=False)
    with pytest.raises(convert.ConversionError, match="must not be inside the input"):
        convert.convert_checkpoint(src, os.path.join(src, "gqa"), 2, progress=False)


def test_force_replaces_existing_output_only_when_done(tmp_path):
    src, dst = str(tmp_path / "mha"), str(tmp_path / "out")
    _write_checkpoint(src, _state_dict())
    os.makedirs(dst)
    with open(os.path.join(dst, "stale.txt"), "w") as f:
        f.write("old")
    convert.convert_checkpoint(src, dst, 2, progress=False, force=True)
    assert not os.path.exists(os.path.join(dst, "stale.txt"))
    assert os.path.exists(os.path.join(dst, "model.safetensors"))


def test_dtype_is_written_as_transformers_5_reads_it(tmp_path, capsys):
    """--dtype bfloat16 states bfloat16 under `dtype` (what transformers 5 reads) and
    `torch_dtype` (4.x), replacing the input's float32 under both; the KV-cache line reads the
    input's dtype from either key; convert_state_dict takes the same names or torch dtypes."""
    src, dst = str(tmp_path / "mha"), str(tmp_path / "gqa")
    _write_checkpoint(src, _state_dict(), dict(CONFIG, dtype="float32"))
    assert convert.main(["--input", src, "--output", dst, "--num-kv-heads", "2", "--dtype", "bfloat16"]) == 0
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    assert config["dtype"] == "bfloat16" and config["torch_dtype"] == "bfloat16"
    # float32 with 8 heads: 1 KiB per token before; bfloat16 with 2 heads: 128 B after
    assert "KV cache per token 1.0 KiB -> 128 B (8.0x smaller)" in capsys.readouterr().out

    bf16 = {k: v for k, v in CONFIG.items() if k != "torch_dtype"}
    bf16["dtype"] = "bfloat16"  # a transformers 5 checkpoint: no torch_dtype at all
    src2 = str(tmp_path / "bf16")
    _write_checkpoint(src2, {k: v.bfloat16() for k, v in _state_dict().items()}, bf16)
    convert.convert_checkpoint(src2, str(tmp_path / "bf16-gqa"), 4, progress=False)
    assert "KV cache per token 512 B -> 256 B (2.0x smaller)" in capsys.readouterr().out
    convert.convert_checkpoint(src2, str(tmp_path / "bf16-same"), 8, progress=False)
    assert "KV cache per token 512 B -> 512 B (unchanged)" in capsys.readouterr().out
    convert.convert_checkpoint(src2, str(tmp_path / "bf16-f32"), 8, dtype="float32", progress=False)
    assert "KV cache per token 512 B -> 1.0 KiB (2.0x larger)" in capsys.readouterr().out

    for dtype in (torch.float16, "float16"):
        sd, cfg = convert.convert_state_dict(_state_dict(), CONFIG, 2, dtype=dtype)
        assert all(t.dtype == torch.float16 for t in sd.values())
        assert cfg["dtype"] == cfg["torch_dtype"] == "float16"
    with pytest.raises(convert.ConversionError, match="dtype must be one of"):
        convert.convert_state_dict(_state_dict(), CONFIG, 2, dtype=torch.int8)
    with pytest.raises(convert.ConversionError, match="dtype must be one of"):
        convert.convert_checkpoint(src, str(tmp_path / "x"), 2, dtype="int8", progress=False)


def test_output_directory_mode_follows_the_umask(tmp_path):
    src = str(tmp_path / "mha")
    _write_checkpoint(src, _state_dict())
    old = os.umask(0o022)
    try:
        convert.convert_checkpoint(src, str(tmp_path / "out"), 2, progress=False)
        os.umask(0o077)
        convert.convert_checkpoint(src, str(tmp_path / "private"), 2, progress=False)
    finally:
        os.umask(old)
    for name, dir_mode, file_mode in (("out", 0o755, 0o644), ("private", 0o700, 0o600)):
        assert os.stat(tmp_path / name).st_mode & 0o777 == dir_mode
        for f in ("config.json", "model.safetensors"):  # (safetensors writes 0600 whatever the umask;
            # copied files such as the tokenizer keep the input's modes)
            assert os.stat(tmp_path / name / f).st_mode & 0o777 == file_mode, f


def test_runs_without_tqdm(tmp_path, monkeypatch):
    """tqdm only draws the progress bar: without it the conversion runs, with progress on."""
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    src, dst = str(tmp_path / "mha"), str(tmp_path / "gqa")
    _write_checkpoint(src, _state_dict(), shards=2)
    convert.convert_checkpoint(src, dst, 2, progress=True)
    assert os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
