"""attn_implementation="fa_ext" in transformers (flash_attn_ext.integrations.transformers):
tiny random Llama, Mistral (sliding window) and Qwen2 models built here, against transformers'
own sdpa / eager implementations: logits with and without padding, greedy generate(), and the
gradients of a training step."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flash_attn_ext.integrations.transformers  # noqa: E402,F401  (registers "fa_ext")

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 5}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
}


def _pair(arch, impl_ref="sdpa"):
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    # one config each: transformers reads config._attn_implementation at every forward
    ours = model_cls._from_config(copy.deepcopy(config), attn_implementation="fa_ext").eval()
    ref = model_cls._from_config(copy.deepcopy(config), attn_implementation=impl_ref).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_with_and_without_padding(arch):
    ours, ref = _pair(arch)
    assert ours.config._attn_implementation == "fa_ext"
    ids = torch.randint(0, 96, (2, 14))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = ours(ids).logits
    assert any("flash_attn_ext::attention_forward" in e.name for e in prof.events())  # our op ran
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        mask = torch.ones(2, 14, dtype=torch.long)
        mask[1, :5] = 0  # left padding in the second sequence
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a[1, 5:], b[1, 5:], rtol=1e-4, atol=1e-4)


def test_sliding_window_off_by_one_against_eager():
    """transformers' window of W tokens (itself and the W - 1 before) is window_size=(W - 1, 0):
    a Mistral with W = 5 on 14 tokens matches eager attention, whose mask spells the window out,
    and the attention function itself matches the reference with (W - 1, 0), not (W, 0)."""
    from flash_attn_ext.integrations.transformers import flash_attn_ext_attention_forward
    from reference import reference_attention
    ours, eager = _pair("mistral", impl_ref="eager")
    assert ours.config._attn_implementation == "fa_ext" and eager.config._attn_implementation == "eager"
    ids = torch.randint(0, 96, (1, 14))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)
    q, k, v = (torch.randn(1, 2, 14, 8, dtype=torch.float64) for _ in range(3))
    out, _ = flash_attn_ext_attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.5, sliding_window=5)
    right, _ = reference_attention(q, k, v, scale=0.5, window=(4, 0))
    wrong, _ = reference_attention(q, k, v, scale=0.5, window=(5, 0))
    torch.testing.assert_close(out.transpose(1, 2), right, rtol=1e-10, atol=1e-10)
    assert (out.transpose(1, 2) - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_generate_same_tokens(arch):
    ours, ref = _pair(arch)
    prompt = torch.randint(0, 96, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_training_step_gradients_match():
    ours, ref = _pair("qwen2")
    ours.train(), ref.train()
    ids = torch.randint(0, 96, (2, 12))
    for model in (ours, ref):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_softcap_is_refused():
    from flash_attn_ext.integrations.transformers import flash_attn_ext_attention_forward
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="softcap"):
        flash_attn_ext_attention_forward(torch.nn.Module(), q, q, q, None, softcap=50.0)
