"""The converter on real transformers checkpoints: tiny random Llama, Mistral and Qwen2 models
built here (no downloads), saved with save_pretrained, converted, and loaded back by
transformers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flash_attn_ext import convert  # noqa: E402

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # k/v biases
}


def _tiny(arch, kv_heads=8):
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_heads_reproduces_logits_and_fewer_heads_load(tmp_path, arch):
    model = _tiny(arch)
    src = str(tmp_path / "mha")
    model.save_pretrained(src)
    tokens = torch.randint(0, 64, (2, 12))
    same = str(tmp_path / "same")
    convert.convert_checkpoint(src, same, 8, progress=False)
    reloaded = ARCHS[arch][1].from_pretrained(same).eval()
    torch.testing.assert_close(_logits(reloaded, tokens), _logits(model, tokens), rtol=0, atol=0)

    gqa = str(tmp_path / "gqa2")
    convert.convert_checkpoint(src, gqa, 2, progress=False)
    converted = ARCHS[arch][1].from_pretrained(gqa).eval()
    assert converted.config.num_key_value_heads == 2
    attn, old = converted.model.layers[1].self_attn, model.model.layers[1].self_attn
    torch.testing.assert_close(attn.k_proj.weight, old.k_proj.weight.view(2, 4, 8, 64).mean(1).reshape(16, 64))
    if attn.v_proj.bias is not None:
        torch.testing.assert_close(attn.v_proj.bias, old.v_proj.bias.view(2, 4, 8).mean(1).reshape(16))
    assert torch.isfinite(_logits(converted, tokens)).all()


def test_gqa_expanded_to_mha_converts_back_exactly(tmp_path):
    """A GQA-2 model whose K/V heads are repeated into an MHA checkpoint converts back to the
    same GQA-2 model: the groups are the contiguous heads repeat_interleave made."""
    gqa = _tiny("llama", kv_heads=2)
    mha = _tiny("llama", kv_heads=8)
    sd = gqa.state_dict()
    for name, t in list(sd.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            sd[name] = t.view(2, 8, 64).repeat_interleave(4, 0).reshape(64, 64)
    mha.load_state_dict(sd)
    src, dst = str(tmp_path / "expanded"), str(tmp_path / "back")
    mha.save_pretrained(src)
    convert.convert_checkpoint(src, dst, 2, progress=False)
    back = transformers.LlamaForCausalLM.from_pretrained(dst).eval()
    tokens = torch.randint(0, 64, (1, 10))
    torch.testing.assert_close(_logits(back, tokens), _logits(gqa, tokens), rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(back.state_dict().items(), gqa.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_dtype_sticks_when_transformers_loads_it(tmp_path):
    """--dtype bfloat16: transformers 5 loads the converted model in bfloat16 (it reads the
    config's `dtype`, which the input, saved in float32, states as float32)."""
    model = _tiny("llama")
    src, dst = str(tmp_path / "mha"), str(tmp_path / "gqa-bf16")
    model.save_pretrained(src)
    assert convert.main(["--input", src, "--output", dst, "--num-kv-heads", "2", "--dtype", "bfloat16"]) == 0
    loaded = transformers.LlamaForCausalLM.from_pretrained(dst)
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
