"""Tiny random transformers models for the integration tests: Llama, Mistral (sliding window),
Qwen2, Gemma-2 (softcap, alternating sliding / global layers) and gpt-oss (learned attention
sinks), each with a twin on a reference attention implementation and the same weights."""

import copy

import torch
import transformers

from flash_attn_ext.integrations.transformers import NAME

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


def pair(arch, impl=NAME, impl_ref=None, **overrides):
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
    kw.update(overrides)
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
