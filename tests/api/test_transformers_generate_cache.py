"""generate() on FlashAttnExtCache (flash_attn_ext.integrations.transformers_cache): the same
tokens as transformers' own attention with its own cache, on tiny random Llama, Mistral (sliding
window), Qwen2, Gemma-2 (softcap, alternating layers) and gpt-oss (sinks): single prompts,
left-padded batches, beam search, sampling, prompts longer than the window; what runs (one
KV-cache call per layer per step, no dense mask); the Cache contract; 8-bit storage."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flash_attn_ext.integrations import _compact_mask  # noqa: E402
from flash_attn_ext.integrations.transformers import FLASH_NAME, NAME, FlashAttnExtCache  # noqa: E402
from flash_attn_ext.integrations.transformers_cache import FlashAttnExtRollingLayer  # noqa: E402
from tiny_models import ARCHS, pair  # noqa: E402

IMPLS = [NAME, FLASH_NAME]
VOCAB = 96


def _prompts(lengths, seed=1):
    """A left-padded batch: ids (B, max) and its 2-D attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, T - n :] = 1
    return ids, mask


SCENARIOS = {
    "single": (dict(lengths=[7]), dict()),
    "left_padded": (dict(lengths=[9, 5, 2]), dict()),
    "beams": (dict(lengths=[8, 3]), dict(num_beams=2)),
    "sampling": (dict(lengths=[6, 4]), dict(do_sample=True, top_k=20, temperature=1.3)),
    "past_window": (dict(lengths=[14, 11]), dict()),  # every sliding window here is 4 or 5 tokens
}


def _generate(model, ids, mask, **kw):
    torch.manual_seed(1234)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, return_dict_in_generate=True, **kw
    )
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_same_tokens_as_transformers(arch, impl, scenario):
    prompt_kw, gen_kw = SCENARIOS[scenario]
    ours, ref = pair(arch, impl)
    ids, mask = _prompts(**prompt_kw)
    a = _generate(ours, ids, mask, **gen_kw)
    assert isinstance(a.cache, FlashAttnExtCache)
    b = _generate(ref, ids, mask, **gen_kw)
    assert not isinstance(b.cache, FlashAttnExtCache)
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)


def _op_counts(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    counts = {}
    for e in prof.events():
        if e.name.startswith("flash_attn_ext::"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return result, counts


@pytest.mark.parametrize("impl", IMPLS)
def test_one_kvcache_call_per_layer_per_step_and_no_dense_mask(impl, monkeypatch):
    """Llama (full layers), unpadded: the prefill and every decode step are one attention_kvcache
    call per layer that appends and attends; nothing else runs, no mask is made dense."""
    dense = []
    real = transformers.masking_utils.sdpa_mask
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", lambda *a, **k: dense.append(1) or real(*a, **k))
    ours, _ = pair("llama", impl)
    ids, mask = _prompts([6, 6])
    steps = 5
    _, counts = _op_counts(
        lambda: ours.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    )
    layers = ours.config.num_hidden_layers
    # (the last token is sampled from the logits of the step before: steps forwards in all)
    assert counts == {"flash_attn_ext::attention_kvcache": layers * steps}, counts
    assert not dense


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_sliding_window_runs_without_a_dense_mask(impl, monkeypatch):
    """Mistral, a left-padded batch with prompts past the window: no dense mask at any step; the
    pad tokens are skipped through cache_leftpad (the tokens test checks the result)."""
    dense = []
    real = transformers.masking_utils.sdpa_mask
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", lambda *a, **k: dense.append(1) or real(*a, **k))
    ours, ref = pair("mistral", impl)
    ids, mask = _prompts([12, 3])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    _, counts = _op_counts(lambda: ours.generate(ids, attention_mask=mask, **kw))
    assert not dense
    assert "flash_attn_ext::attention_forward" not in counts, counts
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", real)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss", "llama"])
def test_chunked_prefill_through_the_cache(arch, impl):
    """A left-padded prompt fed in chunks of 2, 7 and 1 (shorter and longer than the windows of 4
    and 5, the padding inside the first ones): the logits of every chunk equal transformers'
    for the whole prompt at once."""
    ours, ref = pair(arch, impl)
    ids, mask = _prompts([10, 4])
    cache = FlashAttnExtCache(ours.config)
    with torch.no_grad():
        whole = ref(ids, attention_mask=mask).logits
        start = 0
        for n in (2, 7, 1):
            end = start + n
            part = ours(ids[:, start:end], attention_mask=mask[:, :end], cache=cache).logits
            real = mask[:, start:end].bool()  # (a pad query's output is not defined)
            torch.testing.assert_close(part[real], whole[:, start:end][real], rtol=1e-4, atol=1e-4)
            start = end


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_in_the_middle_is_served_by_the_general_path(impl):
    """A mask the compact form cannot say (a hole in the middle): the cache hands over its K/V in
    order (the pending ones written first) and the call takes the general path (a dense mask for
    "fa_ext", transformers' unpadding for "flash_attn_ext"): the same tokens."""
    ours, ref = pair("mistral", impl)
    ids, mask = _prompts([8, 8])
    mask[1, 3] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_prompt_lookup_decoding_crops_the_cache(arch):
    """Prompt-lookup decoding (assisted generation against n-grams of the prompt) crops the main
    model's cache after each rejected draft: the same tokens as transformers'. A model with
    sliding-window layers keeps transformers' cache there (a rolling layer past its window
    cannot be cropped by several tokens)."""
    ours, ref = pair(arch, NAME)
    ids = torch.tensor([[5, 6, 7, 5, 6, 8, 5, 6, 7, 9]])  # (longer than Mistral's window of 5)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    out = ours.generate(ids, return_dict_in_generate=True, **kw)
    assert isinstance(out.cache, transformers.DynamicCache if arch == "mistral" else FlashAttnExtCache)
    assert torch.equal(out.sequences, ref.generate(ids, **kw))


def test_rolling_layer_refuses_a_crop_it_cannot_undo():
    ours, _ = pair("mistral", NAME)
    cache = FlashAttnExtCache(ours.config)
    ids, _ = _prompts([9])
    with torch.no_grad():
        ours(ids, cache=cache)
    cache.crop(-1)  # one token: its slot held a position no later query needs
    assert cache.get_seq_length() == 8
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-2)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_other_attention_implementation_on_the_cache(arch):
    """The cache written by "fa_ext" for the prompt, then decoded by transformers' own attention
    (the cache appends at once and returns the K/V in order, as DynamicCache would): the same
    logits as transformers' attention on its own cache throughout."""
    ours, ref = pair(arch, NAME)
    ids, mask = _prompts([9, 6])
    cache, ref_cache = FlashAttnExtCache(ours.config), transformers.DynamicCache(config=ref.config)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, cache=cache).logits[:, -1]
        b = ref(ids, attention_mask=mask, cache=ref_cache).logits[:, -1]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        ours.set_attn_implementation(ref.config._attn_implementation)
        for _ in range(6):
            nxt = b.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            a = ours(nxt, attention_mask=mask, cache=cache).logits[:, -1]
            b = ref(nxt, attention_mask=mask, cache=ref_cache).logits[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2"])
def test_store_then_decode_equals_prefill(arch):
    """K/V stored from another cache (DynamicCache after transformers' prefill; a sliding layer
    of it keeps the last W - 1 positions, stored with their first position), then decoded: the
    logits of a cache prefilled by the model itself."""
    ours, ref = pair(arch, NAME)
    ids, _ = _prompts([9, 9])
    dynamic = transformers.DynamicCache(config=ref.config)
    stored, prefilled = FlashAttnExtCache(ours.config), FlashAttnExtCache(ours.config)
    with torch.no_grad():
        ref(ids, cache=dynamic)
        ours(ids, cache=prefilled)
        for i, layer in enumerate(dynamic.layers):
            stored.store(i, layer.keys, layer.values, first_position=9 - layer.keys.shape[-2])
        assert stored.get_seq_length() == 9
        nxt = torch.tensor([[3], [4]])
        a = ours(nxt, cache=stored).logits
        torch.testing.assert_close(a, ours(nxt, cache=prefilled).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="first_position"):
        FlashAttnExtCache(ours.config).store(0, layer.keys[:, :, -2:], layer.values[:, :, -2:], first_position=7)


def test_sliding_layers_grow_up_to_their_window():
    """A sliding layer with a huge window (Phi-3.5-mini's 262144) holds the positions it has
    seen, not W slots up front; a full layer holds what generate() asked for."""
    ours, _ = pair("mistral", NAME, sliding_window=1_000_000, layer_types=["sliding_attention", "full_attention"])
    ids, mask = _prompts([7, 5])
    out = _generate(ours, ids, mask)
    sliding, full = out.cache.layers
    assert (
        sliding.keys.shape[1] <= 32 and full.keys.shape[1] == out.sequences.shape[1] - 1
    )  # (the last token is not cached)


def test_cross_attention_models_keep_transformers_cache():
    config = transformers.MllamaConfig()
    assert not FlashAttnExtCache.serves(config)
    with pytest.raises(ValueError, match="cross-attention"):
        FlashAttnExtCache(config)


def test_unattended_keys_are_refused_at_the_next_update():
    """K/V that never reached the attention call as update() returned them: after the first
    forward (they were all of the sequence) the cache writes them and stops deferring; later the
    next update raises, since that call saw the new positions only."""
    ours, _ = pair("llama", NAME)
    cache = FlashAttnExtCache(ours.config)
    k = torch.randn(1, 2, 3, 8)
    cache.update(k, k.clone(), 0)
    cache.update(k, k.clone(), 0)  # (the first forward's: written now)
    assert not cache.defers() and cache.get_seq_length(0) == 6
    cache = FlashAttnExtCache(ours.config)
    with torch.no_grad():
        ours(torch.tensor([[1, 2, 3]]), cache=cache)
    cache.update(k, k.clone(), 0)
    with pytest.raises(RuntimeError, match="never reached the attention call"):
        cache.update(k, k.clone(), 0)


def test_model_that_changes_its_values_is_served_right(monkeypatch):
    """A model that hands its attention call other values than update() returned (DiffLlama
    splits them): at the first forward the cache writes the K/V, the call is served on what it
    passes and the cache stops deferring; the same tokens as on a DynamicCache."""
    from flash_attn_ext.integrations import transformers as fx

    ours, _ = pair("llama", NAME)
    real = fx.flash_attn_ext_attention_forward
    halved = lambda module, query, key, value, *a, **kw: real(module, query, key, value * 0.5, *a, **kw)  # noqa: E731
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, NAME, halved)
    ids, mask = _prompts([7, 4])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    out = ours.generate(ids, **kw)
    assert isinstance(out.cache, FlashAttnExtCache) and not out.cache.defers()
    assert torch.equal(out.sequences, ours.generate(ids, cache_implementation="dynamic", **kw).sequences)


def _auto_pair(model_type, **overrides):
    """A tiny random model of any causal-LM type (transformers' defaults, made small) on "fa_ext",
    and its twin on eager with the same weights."""
    import copy

    config = transformers.AutoConfig.for_model(model_type)
    small = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        num_local_experts=4,
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    for k, v in {**small, **overrides}.items():
        if hasattr(config, k) or k in overrides:
            setattr(config, k, v)
    cls = getattr(transformers, transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation=NAME).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("model_type", ["diffllama", "doge"])
def test_models_that_use_their_kv_beyond_attention(model_type):
    """Real models that do more with what the cache's update() returned than attend it:
    DiffLlama splits its values, Doge builds its attention mask from them. Both are noticed at
    the first forward (the cache then stops deferring) and generate the same tokens as eager."""
    ours, ref = _auto_pair(model_type)
    ids, mask = _prompts([8, 5])
    a, b = _generate(ours, ids, mask), _generate(ref, ids, mask)
    assert isinstance(a.cache, FlashAttnExtCache) and not a.cache.defers()
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
        ("phimoe", dict(sliding_window=4)),
    ],
)
def test_window_given_by_the_mask_only(model_type, overrides):
    """Models whose mask carries a sliding window their attention call does not pass (Qwen2-MoE,
    Phi-3.5-MoE): the window is the mask's, on the cache and without it."""
    ours, ref = _auto_pair(model_type, **overrides)
    ids, mask = _prompts([9, 6])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, use_cache=False).logits
        b = ref(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-4, atol=1e-4)
    out = _generate(ours, ids, mask)
    assert isinstance(out.cache, FlashAttnExtCache)
    assert torch.equal(out.sequences, _generate(ref, ids, mask).sequences)


def test_keys_attended_twice_after_the_first_forward_raise(monkeypatch):
    """A second attention call on keys a call has already appended (after the first forward,
    they are the new positions only) raises instead of attending them alone."""
    from flash_attn_ext.integrations import transformers as fx

    ours, _ = pair("llama", NAME)
    real = fx.flash_attn_ext_attention_forward

    def twice(module, query, key, value, *args, **kwargs):
        real(module, query, key, value, *args, **kwargs)
        return real(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, NAME, twice)
    ids, mask = _prompts([7, 4])
    cache = FlashAttnExtCache(ours.config)
    with torch.no_grad():
        ours(ids, attention_mask=mask, cache=cache)  # (the first forward: its keys are all of them)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        with pytest.raises(RuntimeError, match="attended a second time"):
            ours(torch.tensor([[1], [2]]), attention_mask=mask, cache=cache)


def test_reset_and_batch_operations():
    ours, _ = pair("llama", NAME)
    ids, mask = _prompts([7, 5, 6])
    cache = FlashAttnExtCache(ours.config)
    with torch.no_grad():
        first = ours(ids, attention_mask=mask, cache=cache).logits
        assert cache.get_seq_length() == 7
        cache.reset()
        assert cache.get_seq_length() == 0
        torch.testing.assert_close(ours(ids, attention_mask=mask, cache=cache).logits, first)
        cache.reset()  # (then another batch size: new storage)
        torch.testing.assert_close(ours(ids[:2], attention_mask=mask[:2], cache=cache).logits, first[:2])
        cache.reset()
        ours(ids, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[3], [4], [5]])
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        full = ours(nxt, attention_mask=mask2, cache=cache).logits
        # selecting rows, or repeating them, gives the rows' own continuation
        for op, rows in (("batch_select_indices", torch.tensor([2, 0])), ("batch_repeat_interleave", 2)):
            c = FlashAttnExtCache(ours.config)
            ours(ids, attention_mask=mask, cache=c)
            getattr(c, op)(rows)
            index = rows if op == "batch_select_indices" else torch.arange(3).repeat_interleave(2)
            out = ours(nxt[index], attention_mask=mask2[index], cache=c).logits
            torch.testing.assert_close(out, full[index])


def test_memory_is_what_the_dtype_says():
    """An int8 cache holds int8 K/V and one float32 scale per (position, head): no float copy."""
    ours, _ = pair("mistral", NAME, layer_types=["sliding_attention", "full_attention"])
    ids, mask = _prompts([6, 4])
    cache = FlashAttnExtCache(ours.config, max_cache_len=32, dtype=torch.int8)
    ours.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    B, H, D = 2, ours.config.num_key_value_heads, ours.config.head_dim
    for layer in cache.layers:
        slots = layer.window if isinstance(layer, FlashAttnExtRollingLayer) else 32
        tensors = {n: t for n, t in vars(layer).items() if isinstance(t, torch.Tensor) and t.numel() > B}
        assert set(tensors) == {"keys", "values", "k_scale", "v_scale"}, set(tensors)
        assert layer.keys.dtype == layer.values.dtype == torch.int8
        assert layer.keys.shape == layer.values.shape == (B, slots, H, D)
        assert layer.k_scale.dtype == torch.float32 and layer.k_scale.shape == (B, slots, H)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_cache_logits_near_the_float_cache(dtype):
    """8-bit storage, teacher-forced: the logits stay near the float cache's (a bound of reason,
    not of exactness: K/V rounded to 8 bits change them), and each step attends the rounded
    values (they differ from the float cache's at all)."""
    ours, _ = pair("llama", NAME)
    ids, mask = _prompts([10, 7])
    caches = FlashAttnExtCache(ours.config), FlashAttnExtCache(ours.config, dtype=dtype)
    with torch.no_grad():
        outs = [ours(ids, attention_mask=mask, cache=c).logits[:, -1] for c in caches]
        for step in range(4):
            nxt = outs[0].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            outs = [ours(nxt, attention_mask=mask, cache=c).logits[:, -1] for c in caches]
            err = (outs[1] - outs[0]).abs().max() / outs[0].std()
            # (measured here: int8 0.007-0.008, fp8 0.035-0.042 of the logits' spread)
            assert 0 < err < (0.02 if dtype == torch.int8 else 0.1), (step, float(err))


def test_bf16_and_int8_caches_reported_against_float32(capsys):
    """bf16 model (bf16 cache) and an int8 cache against float32 greedy tokens: reported; only the
    first tokens are asserted (a tiny random model's logits are close to ties later)."""
    ours, _ = pair("qwen2", NAME)
    ids, mask = _prompts([10, 6])
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    f32 = ours.generate(ids, **kw)
    q8 = ours.generate(ids, cache=FlashAttnExtCache(ours.config, dtype=torch.int8), **kw)
    bf16 = ours.to(torch.bfloat16).generate(ids, **kw)
    T = ids.shape[1]
    for name, toks in (("int8", q8), ("bf16", bf16)):
        agree = (toks[:, T:] == f32[:, T:]).float().mean().item()
        print(f"{name} cache: {agree:.0%} of greedy tokens equal to float32's")
        assert torch.equal(toks[:, T : T + 2], f32[:, T : T + 2])


def test_cache_refuses_what_it_cannot_hold():
    config = transformers.LlamaConfig(
        num_hidden_layers=2, layer_types=["chunked_attention", "full_attention"], attention_chunk_size=4
    )
    assert not FlashAttnExtCache.serves(config)
    with pytest.raises(ValueError, match="chunked_attention"):
        FlashAttnExtCache(config)
    with pytest.raises(ValueError, match="dtype"):
        FlashAttnExtCache(transformers.LlamaConfig(num_hidden_layers=1), dtype=torch.int32)
    ours, _ = pair("llama", NAME)
    with pytest.raises(TypeError, match="model's dtype"):
        ours.generate(torch.tensor([[1, 2]]), cache=FlashAttnExtCache(ours.config, dtype=torch.float16))


def test_explicit_dynamic_cache_is_kept():
    """cache_implementation="dynamic" asks for transformers' DynamicCache: it gets it (with the
    compact mask: no dense mask either)."""
    ours, ref = pair("mistral", NAME)
    ids, mask = _prompts([9, 4])
    out = _generate(ours, ids, mask, cache_implementation="dynamic")
    assert type(out.cache) is transformers.DynamicCache
    assert torch.equal(out.sequences, _generate(ref, ids, mask).sequences)


def test_compact_mask_recognises_only_causal_and_window():
    mu = transformers.masking_utils
    assert _compact_mask._window_of(mu.causal_mask_function) == 0
    assert _compact_mask._window_of(mu.sliding_window_causal_mask_function(7)) == 7
    assert _compact_mask._window_of(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))) is None
    assert _compact_mask._window_of(mu.and_masks(mu.causal_mask_function, mu.causal_mask_function)) is None
    assert _compact_mask._window_of(mu.bidirectional_mask_function) is None
    # what the compact form stands for is transformers' own dense mask
    for window in (0, 3):
        fn = mu.sliding_window_causal_mask_function(window) if window else mu.causal_mask_function
        pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]).bool()
        compact = _compact_mask.mask_function(2, 3, 7, q_offset=4, kv_offset=0, mask_function=fn, attention_mask=pad)
        spec = _compact_mask.compact(compact, window)
        dense = mu.sdpa_mask(2, 3, 7, q_offset=4, mask_function=fn, attention_mask=pad, allow_is_causal_skip=False)
        assert torch.equal(_compact_mask.dense_from(spec, 3, 7, "cpu").expand_as(dense), dense)
