"""Model coverage: every family of the README's support matrix, end to end from a config (tests/_families.py).

For each supported family, under its dense reference attention ("sdpa"; "eager" for Gemma 2's softcap) and
under attn_implementation="turboquant":

* test_full_precision_cache_is_exact: every layer skipped (full precision) -> greedy tokens and logits
  equal to DynamicCache (softcap: the fp32 fallback attention, equal up to rounding);
* test_unquantized_window_matches_dynamic_cache: TurboQuant layers whose window holds every token, so the
  "turboquant" attention runs its own paths (prefill, decode from the layer, continuation prefill, beam
  reordering) on exact data -> the same greedy and beam tokens as DynamicCache, logits to fp32 rounding;
* test_default_preset_agreement: the default preset (4 bit) with most of the context quantized; prints top-1
  agreement and logit error against the dense model.

Unsupported models fail loudly (test_mla_*, test_linear_attention_*), or, for
linear-attention layers given model_config, fall back to transformers' own layers for those layers.
"""

from __future__ import annotations

import logging

import pytest
import torch
from _families import FAMILIES, UNSUPPORTED, build, family_model, reference_attn
from conftest import VOCAB, cache_kw, greedy_kwargs, left_padded_batch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

from tq_hf import TurboQuantCache, TurboQuantLayer

N_NEW = 6
NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def models():
    return {f: family_model(f) for f in NAMES}


def _generate(model, ids, mask, cache, n=N_NEW, **kw):
    return model.generate(ids, attention_mask=mask, **greedy_kwargs(n), **cache_kw(cache),
                          output_logits=True, return_dict_in_generate=True, **kw)


def _dense_fp32(model) -> bool:
    """The "turboquant" attention computes softcap (Gemma 2) and attention-sink (GPT-OSS) attention that is
    not read from codes as dense fp32 attention itself, not through the family's own function."""
    softcap = model.config.get_text_config().to_dict().get("attn_logit_softcapping")
    return bool(softcap) or any(hasattr(m, "sinks") for m in model.modules())


@pytest.mark.parametrize("attn", ("reference", "turboquant"))
@pytest.mark.parametrize("family", NAMES)
def test_full_precision_cache_is_exact(model_of, family, attn):
    ids, mask = left_padded_batch((11, 7))
    ref_model = model_of(family, reference_attn(family))
    ref = _generate(ref_model, ids, mask, DynamicCache())
    model = model_of(family, reference_attn(family) if attn == "reference" else "turboquant")
    cache = TurboQuantCache(skip_layers=tuple(range(model.config.num_hidden_layers)))
    out = _generate(model, ids, mask, cache)
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        if attn == "turboquant" and _dense_fp32(model):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("attn", ("reference", "turboquant"))
@pytest.mark.parametrize("family", NAMES)
def test_unquantized_window_matches_dynamic_cache(model_of, family, attn, monkeypatch):
    """TurboQuant layers with a window longer than the sequence: nothing is quantized, so any difference from
    DynamicCache is a plumbing bug (mask, GQA, scaling, softcap, sliding window, reordering, continuation)."""
    ids, mask = left_padded_batch((11, 7))
    turn2 = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    ref_model = model_of(family, reference_attn(family))
    attn_name = reference_attn(family) if attn == "reference" else "turboquant"

    def run(model, cache_factory):
        cache = cache_factory()
        first = _generate(model, ids, mask, cache)
        ids2 = torch.cat([first.sequences, turn2], 1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        second = _generate(model, ids2, mask2, cache)  # continuation prefill from the returned cache
        beams = model.generate(ids, attention_mask=mask, num_beams=2, num_return_sequences=2, do_sample=False,
                               max_new_tokens=N_NEW, min_new_tokens=N_NEW, **cache_kw(cache_factory()))
        return first, second, beams, cache

    r1, r2, rb, _ = run(ref_model, DynamicCache)
    model = model_of(family, attn_name)
    o1, o2, ob, cache = run(model, lambda: TurboQuantCache(residual_length=1000))
    assert all(isinstance(layer, TurboQuantLayer) for layer in cache.layers)
    assert all(layer.n_quant == 0 for layer in cache.layers)
    assert all(layer.fast_path == (attn == "turboquant") for layer in cache.layers)
    assert torch.equal(o1.sequences, r1.sequences)
    assert torch.equal(o2.sequences, r2.sequences)
    assert torch.equal(ob, rb)
    for a, b in zip(o1.logits + o2.logits, r1.logits + r2.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _teacher_forced(model, seq, cache, prefill):
    with torch.no_grad():
        out = [model(seq[:, :prefill], **cache_kw(cache)).logits[:, -1:]]
        for t in range(prefill, seq.shape[1]):
            out.append(model(seq[:, t : t + 1], **cache_kw(cache)).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("attn", ("reference", "turboquant"))
@pytest.mark.parametrize("family", NAMES)
def test_default_preset_agreement(model_of, family, attn):
    """Default preset, no model_config (every layer quantized, sliding ones too): a 72-token prompt is
    quantized at once (window 64), then 8 decode steps. Logits against the dense model."""
    seq = torch.randint(3, VOCAB, (2, 80), generator=torch.Generator().manual_seed(7))
    prefill = 72
    model = model_of(family, reference_attn(family))
    with torch.no_grad():
        dense = model(seq).logits[:, prefill - 1 :]
    model = model_of(family, reference_attn(family) if attn == "reference" else "turboquant")
    cache = TurboQuantCache()
    tq = _teacher_forced(model, seq, cache, prefill)
    assert all(layer.n_quant == prefill for layer in cache.layers)
    agree = (dense.argmax(-1) == tq.argmax(-1)).float().mean().item()
    rel = ((dense - tq).norm() / dense.norm()).item()
    print(f"\n{family:>10} {attn:>10}: 4bit top-1 agreement {agree:.3f}, max |dlogit| "
          f"{(dense - tq).abs().max().item():.3e} (logit std {dense.std().item():.3f}), relative L2 {rel:.3e}")
    assert agree >= 0.75
    assert rel < 0.15


# ------------------------------------------------------------------ models the cache cannot serve
@pytest.mark.parametrize("attn", ("eager", "turboquant"))
@pytest.mark.parametrize("family", ("deepseek_v3", "deepseek_v2"))
def test_mla_raises_clear_error_at_first_update(family, attn):
    model = build(UNSUPPORTED[family](), attn)
    ids, mask = left_padded_batch((6,))
    for cache in (TurboQuantCache(), TurboQuantCache(model_config=model.config)):
        with pytest.raises(ValueError, match=r"layer 0: .*multi-head latent attention \(MLA"):
            model.generate(ids, attention_mask=mask, **greedy_kwargs(2), **cache_kw(cache))
        assert cache.get_seq_length() == 0


@pytest.mark.parametrize("family", ("qwen3_next", "lfm2"))
def test_linear_attention_without_model_config_raises(family):
    model = build(UNSUPPORTED[family](), "turboquant")
    ids, mask = left_padded_batch((6,))
    with pytest.raises(ValueError, match=r"layer 0 .*linear-attention / convolution.*model_config=model.config"):
        model.generate(ids, attention_mask=mask, **greedy_kwargs(2), **cache_kw(TurboQuantCache()))


@pytest.mark.parametrize("attn", ("eager", "turboquant"))
@pytest.mark.parametrize("family", ("qwen3_next", "lfm2"))
def test_linear_attention_with_model_config_falls_back(family, attn):
    """With model_config, linear-attention / conv layers keep transformers' own layer (constant-size state,
    nothing to compress) and the full-attention layers are TurboQuant layers."""
    model = build(UNSUPPORTED[family](), attn)
    ids, mask = left_padded_batch((9, 6))
    ref = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(DynamicCache(config=model.config)))
    cache = TurboQuantCache(residual_length=1000, model_config=model.config)
    assert isinstance(cache.layers[0], LinearAttentionCacheLayerMixin)
    assert type(cache.layers[1]) is TurboQuantLayer
    out = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(cache))
    assert torch.equal(out, ref)  # nothing quantized: the same tokens
    assert cache.layers[1].fast_path == (attn == "turboquant")
    assert cache.nbytes() > 0
    cache = TurboQuantCache("8bit", residual_length=2, model_config=model.config)
    out = model.generate(ids, attention_mask=mask, **greedy_kwargs(N_NEW), **cache_kw(cache))
    assert out.shape == ref.shape and cache.layers[1].n_quant > 0


def test_model_config_warns_for_attention_layers_kept_in_full_precision(caplog):
    """Layer kinds with attention K/V that TurboQuantCache does not replace (here a hybrid linear+attention
    layer) keep transformers' layer, and the user is told once."""
    from transformers import FalconH1Config

    logging.Logger.warning_once.cache_clear() if hasattr(logging.Logger, "warning_once") else None
    cfg = FalconH1Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1)
    with caplog.at_level(logging.WARNING):
        cache = TurboQuantCache(model_config=cfg)
    assert not any(type(layer) is TurboQuantLayer for layer in cache.layers)
    assert any("full precision" in r.getMessage() for r in caplog.records)
