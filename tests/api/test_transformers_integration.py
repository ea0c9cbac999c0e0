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
from tiny_models import ARCHS, pair as _pair  # noqa: E402

IMPLS = [FLASH_NAME, NAME]
# The ops each implementation reaches: padded batches go through the varlen kernels (unpadded by
# transformers' flash path) with "flash_attn_ext"; with "fa_ext" left padding (inference) goes
# through cache_leftpad of the KV-cache op, no dense mask.
PADDED_OP = {FLASH_NAME: "flash_attn_ext::attention_varlen_forward", NAME: "flash_attn_ext::attention_kvcache"}


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


# T5: a learned relative-position bias reaches the attention as `position_bias` (issue 36: it was
# swallowed by **kwargs and the logits came out wrong without a word).
T5_CONFIG = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
    pad_token_id=0,
)


def _t5_pair(impl, family="T5"):
    """A tiny T5-family model (family: "T5", "UMT5") on `impl` and the same weights on eager."""
    config = getattr(transformers, f"{family}Config")(**T5_CONFIG)
    model_cls = getattr(transformers, f"{family}ForConditionalGeneration")
    torch.manual_seed(0)
    ours = model_cls._from_config(copy.deepcopy(config), attn_implementation=impl)
    ref = model_cls._from_config(copy.deepcopy(config), attn_implementation="eager")
    with torch.no_grad():  # relative-position biases of a few units (a random init gives ~0.05)
        for m in ours.modules():
            if getattr(m, "has_relative_attention_bias", False):
                m.relative_attention_bias.weight.mul_(40.0)
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def test_t5_position_bias_served():
    """Encoder (bidirectional, with padding), decoder (causal) and cross-attention of a T5 match
    eager attention on "fa_ext", and the bias matters (without it the logits move)."""
    ours, ref = _t5_pair(NAME)
    ids = torch.randint(1, 96, (2, 11))
    dec = torch.randint(1, 96, (2, 7))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    for am in (None, mask):
        logits, ran = _ops_run(lambda: ours(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits)
        assert "flash_attn_ext::attention_forward" in ran, ran
        with torch.no_grad():
            expected = ref(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for m in ours.modules():
            if getattr(m, "has_relative_attention_bias", False):
                m.relative_attention_bias.weight.zero_()
        unbiased = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (unbiased - expected).abs().max() > 1e-2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_t5_generate_same_tokens_and_scores(cache):
    """Greedy generation with a dynamic or a static cache (whose free slots must stay unseen):
    the same tokens and per-step scores as eager; no token repeats, so the tokens depend on the
    scores' order at every step."""
    ours, ref = _t5_pair(NAME)
    ids = torch.randint(1, 96, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, no_repeat_ngram_size=1)
    kw.update(return_dict_in_generate=True, output_scores=True, cache_implementation=cache)
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert len(set(a.sequences[0, 1:].tolist())) == 8
    for x, y in zip(a.scores, b.scores):
        finite = torch.isfinite(y)
        assert torch.equal(torch.isfinite(x), finite)
        torch.testing.assert_close(x[finite], y[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
def test_t5_training_gradients_match_eager(checkpointing):
    """Training T5 on "fa_ext": the loss and every parameter's gradient, the relative-position
    bias tables included (computed in the kernels from the tables), match eager attention, with
    padding in the encoder (dropout off: eval-mode dropout, train-mode loss); also under
    reentrant gradient checkpointing, which re-runs the layers on detached copies of the bias
    placeholder."""
    ours, ref = _t5_pair(NAME)
    if checkpointing:
        for model in (ours, ref):
            model.train()  # (checkpointing runs only in training mode) with every dropout off
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
                elif isinstance(getattr(m, "dropout", None), float):  # the attention's own rate
                    m.dropout = 0.0
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(1, 96, (2, 11))
    labels = torch.randint(1, 96, (2, 7))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    losses = []
    for model in (ours, ref):
        losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    tables = 0
    for (name, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-3, atol=1e-5, msg=name)
        if "relative_attention_bias" in name:
            tables += 1
            assert p.grad.abs().max() > 1e-4, name  # the tables do train
    assert tables == 2  # the encoder's and the decoder's


def test_t5_bias_computed_in_the_kernels(monkeypatch):
    """On "fa_ext" T5's bias never exists as a (1, H, L, S) tensor: compute_bias hands back a
    zero-stride placeholder (transformers' own bucket function, which builds the L x S bucket
    matrix, is never called) and the kernels read the table per distance; a model on "eager"
    keeps transformers' compute_bias."""
    ours, ref = _t5_pair(NAME)
    T5Attention = transformers.models.t5.modeling_t5.T5Attention
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        expected = ref(input_ids=ids, decoder_input_ids=ids).logits

    def refuse(*args, **kwargs):
        raise AssertionError("T5's (L, S) bucket matrix was built")

    monkeypatch.setattr(T5Attention, "_relative_position_bucket", staticmethod(refuse))
    with torch.no_grad():
        enc = ours.encoder(input_ids=ids)
        logits = ours(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    attn = ours.encoder.block[0].layer[0].SelfAttention
    bias = attn.compute_bias(9, 9)
    assert bias.shape == (1, 4, 9, 9) and bias.stride() == (0, 0, 0, 0)
    assert enc.last_hidden_state.shape == (2, 9, 32)
    # A detached view of the placeholder is recognised; a zero-stride bias that is none raises
    # instead of being read as zeros.
    from flash_attn_ext.integrations import _t5_bias

    assert _t5_bias.lookup(bias.detach()) == _t5_bias.lookup(bias) is not None
    with pytest.raises(RuntimeError, match="zero-stride tensor that is not T5's registered"):
        _t5_bias.lookup(torch.zeros(()).expand(1, 4, 9, 9))
    with pytest.raises(AssertionError, match="bucket matrix"):
        ref.encoder.block[0].layer[0].SelfAttention.compute_bias(9, 9)


def test_umt5_per_layer_tables_in_the_kernels():
    """UMT5 (a relative-position table per layer, unscaled scores): logits and every gradient,
    the tables' included, match eager, with its bias computed in the kernels."""
    ours, ref = _t5_pair(NAME, "UMT5")
    ids = torch.randint(1, 96, (2, 11))
    labels = torch.randint(1, 96, (2, 7))
    losses = [m(input_ids=ids, labels=labels).loss for m in (ours, ref)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-3, atol=1e-5, msg=name)
    attn = ours.encoder.block[1].layer[0].SelfAttention
    assert attn.compute_bias(5, 5).stride() == (0, 0, 0, 0)


def test_t5_on_the_flash_path_is_refused():
    """transformers' flash path has no place for an additive bias: "flash_attn_ext" refuses
    position_bias, naming it and "fa_ext", instead of running without it."""
    ours, _ = _t5_pair(FLASH_NAME)
    ids = torch.randint(1, 96, (2, 8))
    with torch.no_grad(), pytest.raises(TypeError, match="position_bias.*fa_ext"):
        ours(input_ids=ids, decoder_input_ids=ids)


@pytest.mark.parametrize("impl", IMPLS)
def test_static_cache_generate_same_tokens(impl):
    """An empty static cache's prefill has free slots after the queries: transformers leaves the
    mask out and relies on SDPA's top-left causal; the free slots must stay unseen."""
    ours, ref = _pair("llama", impl)
    prompt = torch.randint(0, 96, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


def _call(impl, *args, **kwargs):
    from flash_attn_ext.integrations import transformers as integ

    fn = integ.flash_attn_ext_attention_forward if impl == NAME else integ.flash_attn_ext_flash_forward
    module = torch.nn.Module()
    module.is_causal = True
    module.config = transformers.LlamaConfig()
    module.config._attn_implementation = impl
    module.layer_idx = 0
    module.add_module("proj", torch.nn.Linear(2, 2))  # (transformers' flash path reads a Linear's dtype)
    return fn(module, *args, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_keywords_served_neutral_or_refused(impl):
    """Every keyword transformers' models pass: the neutral ones change nothing, the refused ones
    (when set) and any unknown keyword raise a TypeError naming them."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    base, _ = _call(impl, q, k, v, None)
    neutral = dict(
        position_ids=torch.arange(6).expand(2, 6),
        cache_position=torch.arange(6),
        deterministic=True,
        output_attentions=False,
        use_cache=True,
        num_items_in_batch=3,
        indices=None,
        block_indices=None,
        encoder_hidden_states=None,
    )
    out, weights = _call(impl, q, k, v, None, **neutral)
    assert weights is None
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    refused = dict(
        output_attentions=True,
        indices=torch.zeros(2, 6, 2, dtype=torch.long),
        block_indices=torch.zeros(2, 2, dtype=torch.long),
        head_mask=torch.ones(4),
        some_new_keyword=1.0,
    )
    for key, value in refused.items():
        with pytest.raises(TypeError, match=key):
            _call(impl, q, k, v, None, **{key: value})
    with pytest.raises(TypeError, match="sinks"):  # per-token sinks (B, H, L, 1)
        _call(impl, q, k, v, None, sinks=torch.zeros(2, 4, 6, 1))
    sinks = torch.randn(4)
    a, _ = _call(impl, q, k, v, None, sinks=sinks)
    b, _ = _call(impl, q, k, v, None, s_aux=sinks)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - base).abs().max() > 1e-3


def test_fa_ext_cu_seq_lens_with_a_mask_or_bias_stays_per_sequence():
    """cu_seq_lens with a mask transformers built without the packing (it does not, with a
    cache), or with a bias: still no attention across the boundaries."""
    from reference import reference_attention

    torch.manual_seed(0)
    lengths = [5, 3, 6]
    q, k, v = (torch.randn(1, h, sum(lengths), 8, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    causal = torch.ones(14, 14, dtype=torch.bool).tril()[None, None]
    bias = torch.randn(1, 4, 14, 14, dtype=torch.float64)
    for kw in (dict(attention_mask=causal), dict(attention_mask=None, position_bias=bias)):
        mask = kw.pop("attention_mask")
        out, _ = _call(NAME, q, k, v, mask, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6, **kw)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            b = kw["position_bias"][..., s:e, s:e] if kw else None
            expected, _ = reference_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], window=(-1, 0), attn_mask=b)
            torch.testing.assert_close(out[:, s:e].transpose(1, 2), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="cu_seq_lens_q and cu_seq_lens_k together"):
        _call(NAME, q, k, v, None, cu_seq_lens_q=cu)


def test_fa_ext_cu_seq_lens_without_a_mask_stays_per_sequence():
    """Packed sequences given as cu_seq_lens (no mask): no attention across the boundaries."""
    from reference import reference_attention

    torch.manual_seed(0)
    lengths = [5, 3, 6]
    q, k, v = (torch.randn(1, h, sum(lengths), 8, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    out, _ = _call(NAME, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected, _ = reference_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], window=(-1, 0))
        torch.testing.assert_close(out[:, s:e].transpose(1, 2), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_model_reusing_another_models_attention_is_served(impl):
    """DPR runs BertModel under its own config: accepted (BERT calls the attention interface)."""
    config = transformers.DPRConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    ours = transformers.DPRQuestionEncoder._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    ref = transformers.DPRQuestionEncoder._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(1, 96, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    out, ran = _ops_run(lambda: ours(ids, attention_mask=mask).pooler_output)
    assert ran
    with torch.no_grad():
        torch.testing.assert_close(out, ref(ids, attention_mask=mask).pooler_output, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_model_with_its_own_attention_code_is_refused(impl):
    """BLOOM never calls the attention interface: it would add the kernels' mask to its own
    scores (a wrong answer without a word) — refused when the mask is made."""
    config = transformers.BloomConfig(vocab_size=96, hidden_size=32, n_layer=1, n_head=4)
    model = transformers.BloomForCausalLM._from_config(config, attn_implementation=impl).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="computes attention in its own code"):
        model(torch.randint(0, 96, (2, 6)), attention_mask=torch.ones(2, 6, dtype=torch.long))
