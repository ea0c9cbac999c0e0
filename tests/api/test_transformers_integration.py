"""attn_implementation="flash_attn_ext" and "fa_ext" in transformers
(flash_attn_ext.integrations.transformers): tiny random Llama, Mistral (sliding window), Qwen2,
Gemma-2 (softcap, alternating sliding / global layers) and gpt-oss (learned attention sinks)
models built here, against transformers' own sdpa / eager implementations: logits with and
without padding, greedy generate(), and the gradients of a training step."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flash_attn_ext.integrations.transformers  # noqa: E402,F401  (registers "fa_ext")

from flash_attn_ext.integrations.transformers import FLASH_NAME, NAME  # noqa: E402

IMPLS = [FLASH_NAME, NAME]
# Gemma-2: logit soft-capping (the queries are scaled up in _pair so the cap bends the scores),
# a sliding window on alternating layers; transformers serves it with eager attention (SDPA has no softcap).
GEMMA2 = {
    "attn_logit_softcapping": 1.5,
    "sliding_window": 4,
    "head_dim": 8,
    "query_pre_attn_scalar": 8,
    "final_logit_softcapping": 30.0,
    "num_hidden_layers": 4,
}
# gpt-oss: learned attention sinks (s_aux), alternating sliding / full layers, MoE MLPs.
GPT_OSS = {
    "head_dim": 8,
    "sliding_window": 4,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "num_local_experts": 2,
    "num_experts_per_tok": 1,
}
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, "sdpa"),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 5}, "sdpa"),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}, "sdpa"),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, GEMMA2, "eager"),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM, GPT_OSS, "eager"),
}
# The ops each implementation reaches: padded batches go through the varlen kernels (unpadded by
# transformers' flash path) with "flash_attn_ext", through a bool mask with "fa_ext".
PADDED_OP = {FLASH_NAME: "flash_attn_ext::attention_varlen_forward", NAME: "flash_attn_ext::attention_forward"}


def _pair(arch, impl=NAME, impl_ref=None):
    config_cls, model_cls, extra, default_ref = ARCHS[arch]
    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(extra)
    config = config_cls(**kw)
    torch.manual_seed(0)
    # one config each: transformers reads config._attn_implementation at every forward
    ours = model_cls._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    if arch == "gemma2":  # scores of a few units (a random init gives ~0.01), so the cap bends them
        with torch.no_grad():
            for layer in ours.model.layers:
                layer.self_attn.q_proj.weight.mul_(60.0)
    if arch == "gpt_oss":  # sinks of a few units (a random init gives ~0.02), so they take real mass
        with torch.no_grad():
            for layer in ours.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) * 2)
    ref = model_cls._from_config(copy.deepcopy(config), attn_implementation=impl_ref or default_ref).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _ops_run(fn):
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("flash_attn_ext::")}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_with_and_without_padding(arch, impl):
    ours, ref = _pair(arch, impl)
    assert ours.config._attn_implementation == impl
    ids = torch.randint(0, 96, (2, 14))
    logits, ran = _ops_run(lambda: ours(ids).logits)
    assert ran, "our ops ran"
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        mask = torch.ones(2, 14, dtype=torch.long)
        mask[1, :5] = 0  # left padding in the second sequence
        a, ran = _ops_run(lambda: ours(ids, attention_mask=mask).logits)
        assert PADDED_OP[impl] in ran, ran
        b = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a[1, 5:], b[1, 5:], rtol=1e-4, atol=1e-4)


def test_gemma2_softcap_changes_the_result():
    """The softcap really reaches the kernels: without it the logits differ (the match above
    with Gemma-2's eager attention is then meaningful)."""
    ours, _ = _pair("gemma2", FLASH_NAME)
    ids = torch.randint(0, 96, (1, 14))
    with torch.no_grad():
        capped = ours(ids).logits
        ours.config.attn_logit_softcapping = None
        for layer in ours.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = ours(ids).logits
    assert (capped - uncapped).abs().max() > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_gpt_oss_sinks_reach_the_kernels(impl):
    """The sinks change the logits (the matches with gpt-oss's eager attention are then
    meaningful) and reach the kernels as sinks: -inf sinks give the model without them."""
    ours, _ = _pair("gpt_oss", impl)
    ids = torch.randint(0, 96, (1, 14))
    with torch.no_grad():
        with_sinks = ours(ids).logits
        for layer in ours.model.layers:
            layer.self_attn.sinks.fill_(-float("inf"))
        without = ours(ids).logits
    assert (with_sinks - without).abs().max() > 1e-2
    assert torch.isfinite(without).all()


def test_packed_sequences_from_position_ids():
    """Padding-free training batches: several sequences concatenated in one row, position_ids
    restarting at 0; transformers' flash path passes cu_seqlens to flash_attn_varlen_func.
    Each sequence's logits equal those of the sequence run alone."""
    ours, ref = _pair("llama", FLASH_NAME)
    lengths = [5, 9, 3]
    ids = torch.randint(0, 96, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    packed, ran = _ops_run(lambda: ours(ids, position_ids=position_ids).logits)
    assert "flash_attn_ext::attention_varlen_forward" in ran, ran
    start = 0
    with torch.no_grad():
        for n in lengths:
            alone = ref(ids[:, start : start + n]).logits
            torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_sliding_window_off_by_one_against_eager():
    """transformers' window of W tokens (itself and the W - 1 before) is window_size=(W - 1, 0):
    a Mistral with W = 5 on 14 tokens matches eager attention, whose mask spells the window out,
    and the attention function itself matches the reference with (W - 1, 0), not (W, 0)."""
    from flash_attn_ext.integrations.transformers import flash_attn_ext_attention_forward
    from reference import reference_attention

    ours, eager = _pair("mistral", NAME, impl_ref="eager")
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_generate_same_tokens(arch, impl):
    ours, ref = _pair(arch, impl)
    prompt = torch.randint(0, 96, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gpt_oss"])
def test_training_step_gradients_match(arch, impl):
    ours, ref = _pair(arch, impl)
    ours.train(), ref.train()
    ids = torch.randint(0, 96, (2, 12))
    for model in (ours, ref):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
