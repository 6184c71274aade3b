"""Bad input and edge cases: each either works correctly or fails with a message that says what to do.

Covers: unknown presets / bits / backends, head dims the codec cannot take, a batch / dtype / device that
does not match the cache, crop beyond the length, zero, huge and tiny vectors (fp32 norms must neither
overflow nor underflow silently), NaN / Inf in K/V, empty prompts, and one cache reused across models.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, VOCAB, cache_kw, greedy_kwargs, left_padded_batch, make_model
from transformers import DynamicCache

from tq_hf import TurboQuantCache, TurboQuantizer, TurboQuantLayer
from tq_hf.cache import MAX_ABS

D = 64


def rand(T, b=1, h=2, d=D, seed=0, dtype=torch.float32):
    return torch.randn(b, h, T, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def layer_of(**kw):
    cache = TurboQuantCache(**{"backend": "torch", "residual_length": 0, **kw})
    return cache


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (("5bit",), {}, ValueError, r"unknown preset '5bit'; valid presets are \['2.5bit', '3.5bit', '3bit', '4bit', '8bit', 'k3v2', 'k4v3'\]"),
        ((), {"key_bits": 0}, ValueError, r"key_bits=0 is not supported; valid values are \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        ((), {"value_bits": 9}, ValueError, r"value_bits=9 .*valid values are \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        ((), {"key_bits": 3.5}, ValueError, r"key_bits=3.5 .*valid values"),
        ((), {"key_bits": True}, ValueError, r"key_bits=True .*valid values"),
        ((), {"backend": "cuda"}, ValueError, r"backend='cuda' is not valid; choose one of \['auto', 'torch', 'triton'\]"),
        ((), {"residual_length": -1}, ValueError, r"residual_length must be an int >= 0"),
        ((), {"skip_layers": (-1,)}, ValueError, r"model_config=model.config"),
        ((3,), {}, TypeError, r"TurboQuantConfig or a preset name"),
        ((), {"bits": 4}, TypeError, r"bits"),
        ((), {"key_bits": 4.0}, ValueError, r"key_bits=4.0 .*valid values"),
        ((), {"seed": -1}, ValueError, r"seed must be an int >= 0"),
        ((), {"seed": "x"}, ValueError, r"seed must be an int >= 0"),
        ((), {"skip_layers": 0}, ValueError, r"skip_layers must be a tuple of ints"),
        ((), {"key_mean_centering": "no"}, TypeError, r"key_mean_centering must be a bool"),
        ((), {"norm_correction": 1}, TypeError, r"norm_correction must be a bool"),
    ],
    ids=["preset", "key_bits0", "value_bits9", "float_bits", "bool_bits", "backend", "residual", "neg_skip",
         "config_type", "unknown_field", "float_int_bits", "neg_seed", "str_seed", "int_skip", "str_flag", "int_flag"],
)
def test_bad_configuration_names_valid_values(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TurboQuantCache(*args, **kwargs)


@pytest.mark.parametrize("head_dim", (36, 4))
@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_unsupported_head_dim_fails_at_first_update(head_dim, attn):
    model = make_model("llama", attn, head_dim=head_dim)
    ids, mask = left_padded_batch((6,))
    cache = TurboQuantCache()
    with pytest.raises(ValueError, match=rf"cannot quantize head_dim={head_dim}: dim must be a multiple of 8"):
        model.generate(ids, attention_mask=mask, **greedy_kwargs(2), **cache_kw(cache))
    assert cache.get_seq_length() == 0
    # Skipping every layer keeps such a model usable with the same API.
    cache = TurboQuantCache(skip_layers=(0, 1))
    out = model.generate(ids, attention_mask=mask, **greedy_kwargs(2), **cache_kw(cache))
    assert out.shape == (1, 8)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cache = TurboQuantCache(backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' on CPU tensors needs the Triton interpreter"):
        cache.update(rand(3), rand(3), 0)


# ------------------------------------------------------------------ mismatched batch / dtype / device
@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_new_batch_size_needs_reset(attn):
    model = make_model("llama", attn, seed=3)
    cache = TurboQuantCache(residual_length=2)
    ids, mask = left_padded_batch((9, 6))
    model.generate(ids, attention_mask=mask, **greedy_kwargs(3), **cache_kw(cache))
    n = cache.get_seq_length()
    ids3, mask3 = left_padded_batch((20, 19, 18), seed=5)  # longer than the cache, so generate feeds K/V
    with pytest.raises(ValueError, match=r"do not match the cache .*a cache serves one model and one batch .*reset"):
        model.generate(ids3, attention_mask=mask3, **greedy_kwargs(3), **cache_kw(cache))
    assert cache.get_seq_length() == n  # the failed call stored nothing
    cache.reset()
    out = model.generate(ids3, attention_mask=mask3, **greedy_kwargs(3), **cache_kw(cache))
    fresh = model.generate(ids3, attention_mask=mask3, **greedy_kwargs(3), **cache_kw(TurboQuantCache(residual_length=2)))
    assert torch.equal(out, fresh)


def test_model_dtype_change_is_refused():
    model = make_model("llama", "turboquant", seed=3)
    cache = TurboQuantCache(residual_length=2)
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        model(ids, **cache_kw(cache))
        model.to(torch.bfloat16)
        with pytest.raises(ValueError, match=r"states are torch.bfloat16, the cache holds torch.float32"):
            model(ids[:, :1], **cache_kw(cache))
    assert cache.get_seq_length() == 8


def test_device_mismatch_is_refused():
    """Tensors on another device than the cache's (here "meta" stands in for a second device on a CPU box)."""
    cache = layer_of()
    cache.update(rand(4), rand(4), 0)
    k = torch.empty(1, 2, 1, D, device="meta")
    with pytest.raises(ValueError, match=r"key states are on meta, the cache on cpu; .*reset"):
        cache.update(k, k, 0)
    assert cache.get_seq_length() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_asked_to_run_on_cpu():
    cache = TurboQuantCache(residual_length=0)
    cache.update(rand(4).cuda(), rand(4).cuda(), 0)
    with pytest.raises(ValueError, match=r"key states are on cpu, the cache on cuda:0"):
        cache.update(rand(1), rand(1), 0)
    assert cache.get_seq_length() == 4


# ------------------------------------------------------------------ crop
def test_crop_beyond_length_and_no_ops():
    cache = TurboQuantCache(residual_length=4, backend="torch")
    cache.update(rand(10), rand(10), 0)
    cache.update(rand(2, seed=1), rand(2, seed=2), 0)
    before = cache.layers[0].dequantize_range(0, 12)
    with pytest.raises(ValueError, match=r"cannot remove 13 tokens from a cache holding 12"):
        cache.crop(-13)
    with pytest.raises(ValueError, match=r"cannot remove 13 tokens"):
        cache.crop(torch.tensor(-13))
    cache.crop(0)
    cache.crop(50)  # legacy positive form: keep the first 50 = everything
    assert cache.get_seq_length() == 12
    after = cache.layers[0].dequantize_range(0, 12)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------ zero, huge and tiny vectors
def test_zero_vectors_round_trip_to_zero():
    k, v = rand(6), rand(6, seed=1)
    k[:, 0, 2] = 0.0
    v[:, 1, :3] = 0.0
    cache = layer_of(key_mean_centering=False)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    assert layer.k_norms[0, 0, 2] == 0 and (layer.v_norms[0, 1, :3] == 0).all()
    kk, vv = layer.dequantize_range(0, 6)
    assert torch.equal(kk[:, 0, 2], torch.zeros(1, D)) and torch.equal(vv[:, 1, :3], torch.zeros(1, 3, D))
    assert torch.isfinite(kk).all() and torch.isfinite(vv).all()
    # An all-zero chunk with key mean-centring: the mean is zero and so is everything read back.
    cache = layer_of()
    cache.update(torch.zeros(1, 2, 5, D), torch.zeros(1, 2, 5, D), 0)
    kk, vv = cache.layers[0].dequantize_range(0, 5)
    assert torch.equal(kk, torch.zeros_like(kk)) and torch.equal(vv, torch.zeros_like(vv))


@pytest.mark.parametrize("exponent", (100, -100, 60, -60))
def test_huge_and_tiny_vectors_are_exact_rescalings(exponent):
    """|x| ~ 2**±100 (~1e±30) in fp32: ||x||**2 over- or underflows fp32, yet the codes equal those of the
    unscaled vector and the norms are exactly rescaled (the cache scales by powers of two before the norm)."""
    k, v = rand(8), rand(8, seed=1)
    base = layer_of()
    base.update(k, v, 0)
    scaled = layer_of()
    scaled.update(torch.ldexp(k, torch.tensor(exponent)), torch.ldexp(v, torch.tensor(exponent)), 0)
    a, b = base.layers[0], scaled.layers[0]
    assert torch.equal(a.k_codes, b.k_codes) and torch.equal(a.v_codes, b.v_codes)
    assert torch.equal(torch.ldexp(a.k_norms, torch.tensor(exponent)), b.k_norms)
    assert torch.equal(torch.ldexp(a.v_norms, torch.tensor(exponent)), b.v_norms)
    assert torch.equal(torch.ldexp(a.k_mean, torch.tensor(exponent)), b.k_mean)
    kk, vv = b.dequantize_range(0, 8)
    assert torch.isfinite(kk).all() and torch.isfinite(vv).all()
    ka, va = a.dequantize_range(0, 8)
    torch.testing.assert_close(kk, torch.ldexp(ka, torch.tensor(exponent)), rtol=1e-5, atol=0)
    torch.testing.assert_close(vv, torch.ldexp(va, torch.tensor(exponent)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_1e30_vectors_keep_4bit_accuracy(dtype):
    k, v = rand(16, dtype=dtype) * 1e30, rand(16, seed=1, dtype=dtype) * 1e30
    cache = layer_of()
    cache.update(k, v, 0)
    kk, vv = cache.layers[0].dequantize_range(0, 16)
    for x, xh in ((k, kk), (v, vv)):
        x, xh = x.double(), xh.double()
        assert torch.isfinite(xh).all()
        assert ((xh - x) ** 2).sum() / (x**2).sum() < 0.03  # 4 bit: ~1 % relative MSE, as at unit scale


def test_key_mean_of_a_long_huge_chunk_does_not_overflow():
    """4096 keys of 1e35: their fp32 sum (4e38) overflows; the mean itself does not."""
    k = torch.full((1, 1, 4096, 8), 1e35) * (1 + 0.01 * rand(4096, h=1, d=8))
    cache = layer_of()
    cache.update(k, k, 0)
    assert torch.isfinite(cache.layers[0].k_mean).all()
    torch.testing.assert_close(cache.layers[0].k_mean.double(), k.double().mean(dim=(0, 2)), rtol=1e-5, atol=0)
    kk, _ = cache.layers[0].dequantize_range(0, 4096)
    assert torch.isfinite(kk).all()


def test_values_beyond_fp32_norm_range_are_refused():
    cache = layer_of()
    cache.update(rand(3), rand(3), 0)
    k = rand(2) * 1e37
    with pytest.raises(ValueError, match=r"reach \|x\| = .*e\+37; beyond 1e\+36 their fp32 norms could overflow"):
        cache.update(k, rand(2), 0)
    assert cache.get_seq_length() == 3
    assert MAX_ABS == 1e36


# ------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_nan_in_model_activations_is_refused_not_cached(attn):
    model = make_model("llama", attn, seed=3)
    bad_token = 50
    row = model.model.embed_tokens.weight[bad_token].detach().clone()
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = float("nan")
    ids, mask = left_padded_batch((9, 6))
    cache = TurboQuantCache(residual_length=2)
    bad = ids.clone()
    bad[0, -1] = bad_token
    with pytest.raises(ValueError, match=r"layer 0: key/value states contain NaN or Inf; not caching them"):
        model.generate(bad, attention_mask=mask, **greedy_kwargs(3), **cache_kw(cache))
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = row
    out = model.generate(ids, attention_mask=mask, **greedy_kwargs(3), **cache_kw(cache))
    fresh = model.generate(ids, attention_mask=mask, **greedy_kwargs(3), **cache_kw(TurboQuantCache(residual_length=2)))
    assert torch.equal(out, fresh)


# ------------------------------------------------------------------ empty prompts and empty updates
@pytest.mark.parametrize("attn", ("sdpa", "turboquant"))
def test_empty_prompt_does_not_corrupt_the_cache(attn):
    model = make_model("llama", attn, seed=3)
    empty = torch.empty(1, 0, dtype=torch.long)
    outcome = {}
    for name, cache in (("dynamic", DynamicCache()), ("turboquant", TurboQuantCache(residual_length=2))):
        try:
            outcome[name] = model.generate(empty, **greedy_kwargs(3), **cache_kw(cache))
        except Exception as e:  # noqa: BLE001  (whatever transformers does with a 0-token prompt, we do too)
            outcome[name] = type(e)
        if name == "turboquant":
            tq_cache = cache
    if isinstance(outcome["dynamic"], type):
        assert outcome["turboquant"] is outcome["dynamic"]
    else:
        assert torch.equal(outcome["turboquant"], outcome["dynamic"])
    # The cache is still usable and holds nothing from the failed / empty call.
    tq_cache.reset() if not isinstance(outcome["dynamic"], type) else None
    assert tq_cache.get_seq_length() == 0
    ids, mask = left_padded_batch((7,))
    out = model.generate(ids, attention_mask=mask, **greedy_kwargs(4), **cache_kw(tq_cache))
    fresh = model.generate(ids, attention_mask=mask, **greedy_kwargs(4), **cache_kw(TurboQuantCache(residual_length=2)))
    assert torch.equal(out, fresh)
    # No prompt at all: generate starts from BOS, as with DynamicCache.
    ref = model.generate(**greedy_kwargs(4), **cache_kw(DynamicCache()))
    assert torch.equal(model.generate(**greedy_kwargs(4), **cache_kw(TurboQuantCache(residual_length=2))), ref)


@pytest.mark.parametrize("R", (0, 3))
def test_empty_updates_change_nothing(R):
    ks = [rand(T, seed=T) for T in (0, 5, 0, 1, 0, 2)]
    vs = [rand(T, seed=T + 10) for T in (0, 5, 0, 1, 0, 2)]
    cache, ref = layer_of(residual_length=R), layer_of(residual_length=R)
    for k, v in zip(ks, vs):
        cache.update(k, v, 0)
        if k.shape[2]:
            ref.update(k, v, 0)
    assert cache.get_seq_length() == ref.get_seq_length() == 8
    a, b = cache.layers[0], ref.layers[0]
    assert (a.n_quant, a.n_window) == (b.n_quant, b.n_window)
    assert all(torch.equal(x, y) for x, y in zip(a.dequantize_range(0, 8), b.dequantize_range(0, 8)))
    assert torch.equal(a.k_mean, b.k_mean)


# ------------------------------------------------------------------ one cache, two models
def test_cache_reused_by_a_model_of_other_shape():
    cache = TurboQuantCache(residual_length=2)
    ids, mask = left_padded_batch((9,))
    make_model("llama", "turboquant").generate(ids, attention_mask=mask, **greedy_kwargs(2), **cache_kw(cache))
    other = make_model("llama", "turboquant", head_dim=64)  # same batch, other head dim
    ids2, mask2 = left_padded_batch((20,), seed=4)
    with pytest.raises(ValueError, match=r"do not match the cache .*a cache serves one model"):
        other.generate(ids2, attention_mask=mask2, **greedy_kwargs(2), **cache_kw(cache))


def test_cache_reused_by_a_model_of_same_shape_under_turboquant():
    """Two models of one architecture: shapes cannot tell them apart, the attention module can."""
    a = make_model("llama", "turboquant", seed=1)
    b = make_model("llama", "turboquant", seed=2)
    cache = TurboQuantCache(residual_length=2)
    ids, mask = left_padded_batch((9,))
    a.generate(ids, attention_mask=mask, **greedy_kwargs(2), **cache_kw(cache))
    ids2, mask2 = left_padded_batch((20,), seed=4)
    with pytest.raises(RuntimeError, match=r"another attention module .*a cache serves one model.*reset"):
        b.generate(ids2, attention_mask=mask2, **greedy_kwargs(2), **cache_kw(cache))
    cache.reset()  # after a reset the cache serves whichever model comes next
    out = b.generate(ids2, attention_mask=mask2, **greedy_kwargs(2), **cache_kw(cache))
    assert torch.equal(out, b.generate(ids2, attention_mask=mask2, **greedy_kwargs(2),
                                       **cache_kw(TurboQuantCache(residual_length=2))))


def test_cache_built_for_fewer_layers():
    small = make_model("llama", "turboquant")
    big = make_model("llama", "turboquant", num_hidden_layers=3)
    cache = TurboQuantCache(model_config=small.config)
    ids, mask = left_padded_batch((9,))
    with pytest.raises(ValueError, match=r"layer_idx=2, but this TurboQuantCache was built for a model of 2 layers"):
        big.generate(ids, attention_mask=mask, **greedy_kwargs(2), **cache_kw(cache))


def test_quantizer_rejects_bad_dims_directly():
    with pytest.raises(ValueError, match=r"multiple of 8"):
        TurboQuantizer(36, 4)
    with pytest.raises(ValueError, match=r"bits must be one of"):
        TurboQuantizer(64, 0)
    assert PAD == 0  # conftest's padding id, used by greedy_kwargs above


# ------------------------------------------------------------------ reset, switching, saving, shared KV
@pytest.mark.parametrize("family, kwargs", [("llama3", {"skip_layers": (0,)}), ("gemma3", {"model_config": True})])
def test_reset_rebuilds_transformers_layers(family, kwargs):
    """A cache holding transformers' own layers (a skipped layer; sliding layers kept from model_config) is as
    good as new after reset(): transformers 5.17's DynamicLayer.reset() zeroes its tensors but keeps their length."""
    from _families import family_model

    model = family_model(family, "turboquant")
    ids, mask = left_padded_batch((9, 6))
    kw = {**kwargs, "model_config": model.config} if kwargs.get("model_config") else kwargs

    def run(cache):
        return model.generate(ids, attention_mask=mask, **greedy_kwargs(4), **cache_kw(cache))

    cache = TurboQuantCache("8bit", residual_length=2, **kw)
    run(cache)
    assert any(not isinstance(layer, TurboQuantLayer) for layer in cache.layers)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.equal(run(cache), run(TurboQuantCache("8bit", residual_length=2, **kw)))


def test_attention_switched_away_from_turboquant_mid_cache():
    """Prefill under "turboquant", then one forward under SDPA: the cache hands SDPA the full keys and values
    (nothing quantized here, so the logits equal DynamicCache's), and switching back works too."""
    model = make_model("llama", "turboquant", seed=3)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(3, VOCAB, (1, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = DynamicCache()
        model(ids, **cache_kw(dense))
        ref = [model(nxt[:, i : i + 1], **cache_kw(dense)).logits for i in range(2)]
        cache = TurboQuantCache(residual_length=1000)
        model(ids, **cache_kw(cache))
        model.set_attn_implementation("sdpa")
        out = [model(nxt[:, :1], **cache_kw(cache)).logits]
        model.set_attn_implementation("turboquant")
        out.append(model(nxt[:, 1:], **cache_kw(cache)).logits)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(layer.fast_path for layer in cache.layers)


def test_used_cache_saves_and_loads(tmp_path):
    """torch.save / torch.load of a cache the "turboquant" attention has read (its weak reference to the module
    is dropped) continues exactly as the original."""
    model = make_model("llama", "turboquant", seed=3)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = TurboQuantCache(residual_length=4)
    with torch.no_grad():
        model(ids, **cache_kw(cache))
        torch.save(cache, tmp_path / "cache.pt")
        loaded = torch.load(tmp_path / "cache.pt", weights_only=False)
        nxt = ids[:, :1]
        torch.testing.assert_close(model(nxt, **cache_kw(loaded)).logits, model(nxt, **cache_kw(cache)).logits,
                                   rtol=0, atol=0)


def test_skip_layers_beyond_the_model():
    cfg = make_model("llama").config
    with pytest.raises(ValueError, match=r"skip_layers=\(2,\): this model has 2 layers \(-2 to 1\)"):
        TurboQuantCache(skip_layers=(2,), model_config=cfg)
    assert len(TurboQuantCache(skip_layers=(-2, 1), model_config=cfg).layers) == 2


def test_kv_shared_layers_read_the_layer_they_share():
    """Gemma 4's KV-shared layers attend over the keys and values an earlier layer stored: the "turboquant"
    attention reads that layer's codes for them (no owner conflict), with the tokens SDPA gets from the cache."""
    import transformers

    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4")
    cfg = transformers.Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, global_head_dim=32, sliding_window=8, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=16, pad_token_id=PAD, tie_word_embeddings=True)
    from _families import build

    model = build(cfg, "sdpa")
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(0))
    for make in (lambda: TurboQuantCache(residual_length=1000), lambda: TurboQuantCache("8bit", residual_length=2)):
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, **greedy_kwargs(8), **cache_kw(make()))
        model.set_attn_implementation("turboquant")
        cache = make()
        assert torch.equal(model.generate(ids, **greedy_kwargs(8), **cache_kw(cache)), ref)
        assert any(layer.n_quant for layer in cache.layers) == (cache.config.residual_length == 2)
