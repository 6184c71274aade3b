"""tq_hf.analysis: the measurements behind the notebooks and the demo (CPU, small sizes)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import BertConfig, LlamaConfig, T5Config

from tq_hf import PRESETS, TurboQuantCache, TurboQuantConfig, TurboQuantLayer, analysis
from tq_hf.attention import reference_attention

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


# ============================================================================================ codec
def test_mse_bounds_bracket_the_papers_table():
    for b, v in analysis.PAPER_MSE.items():
        lo, hi = analysis.mse_bounds(b)
        assert lo == 4.0**-b
        assert lo < v < hi


def test_random_unit_vectors():
    x = analysis.random_unit_vectors(100, 64, seed=3)
    assert x.shape == (100, 64)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(100))
    assert torch.equal(x, analysis.random_unit_vectors(100, 64, seed=3))


@pytest.mark.parametrize("norm_correction", [False, True])
def test_codec_distortion_follows_the_paper(norm_correction):
    rows = analysis.codec_distortion(128, bits=(1, 2, 3, 4, 6), n=2000, norm_correction=norm_correction)
    assert [r["bits"] for r in rows] == [1, 2, 3, 4, 6]
    for r in rows:
        assert r["lower_bound"] <= r["mse"] <= r["upper_bound"], r
        if r["paper"] is not None:
            # d = 128 and the exact marginal: 0.361, 0.116, 0.034, 0.0093 vs the paper's rounded values;
            # norm correction costs ~11 % at 1 bit.
            assert abs(r["mse"] / r["paper"] - 1) < (0.2 if norm_correction and r["bits"] == 1 else 0.15), r
        assert r["mse_sem"] < 0.05 * r["mse"]
    assert rows[-1]["paper"] is None


def test_inner_product_error_matches_theory():
    plain = analysis.inner_product_error(128, bits=(1, 2, 4), n=4000)
    corrected = analysis.inner_product_error(128, bits=(1, 2, 4), n=4000, norm_correction=True)
    for p, c in zip(plain, corrected):
        # y independent of x: E (<y, x^ - x>)^2 = ||x^ - x||^2.
        assert p["rms"] == pytest.approx(math.sqrt(p["mse"]), rel=0.06)
        # Lloyd-Max centroid condition: <x, x^> = ||x^||^2 = 1 - MSE, so inner products shrink by 1 - MSE.
        assert p["slope"] == pytest.approx(1 - p["mse"], abs=0.03)
        assert p["bias"] == pytest.approx(p["slope"] - 1)
        # Norm correction rescales x^ to unit norm: slope sqrt(1 - MSE), closer to 1.
        assert p["slope"] < c["slope"] <= 1.01
    assert plain[0]["slope"] == pytest.approx(2 / math.pi, abs=0.03)


# ====================================================================================== synthetic K/V
def test_synthetic_qkv_shapes_and_determinism():
    q, k, v = analysis.synthetic_qkv(64, 4, head_dim=32, n_kv_heads=2, group=3, seed=1)
    assert q.shape == (1, 6, 4, 32) and k.shape == v.shape == (1, 2, 64, 32)
    q2, k2, v2 = analysis.synthetic_qkv(64, 4, head_dim=32, n_kv_heads=2, group=3, seed=1)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match="n_queries"):
        analysis.synthetic_qkv(4, 8)


def test_synthetic_qkv_structures():
    kw = {"n_tokens": 512, "n_queries": 16, "head_dim": 64}
    _, k_plain, _ = analysis.synthetic_qkv(**kw)
    _, k_out, _ = analysis.synthetic_qkv(**kw, outlier_channels=8)
    special = analysis._low_frequency_channels(64, 8)
    # Outlier channels: 8x the scale in the low-frequency channels only.
    ratio = k_out[..., special].std() / k_plain[..., special].std()
    assert 6 < ratio < 10
    # Key bias: a large constant offset in those channels, still there after RoPE (low frequency).
    _, k_bias, _ = analysis.synthetic_qkv(**kw, outlier_channels=8, key_bias=12.0, rope=True)
    mean = k_bias[0].mean(dim=1)  # [H, D]
    assert mean[:, special].abs().min() > 8
    other = torch.ones(64, dtype=torch.bool)
    other[special] = False
    assert mean[:, other].abs().max() < 1
    # RoPE rotates pairs: per-token norms unchanged.
    _, k_norope, _ = analysis.synthetic_qkv(**kw, outlier_channels=8, key_bias=12.0)
    torch.testing.assert_close(k_bias.norm(dim=-1), k_norope.norm(dim=-1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(k_bias, k_norope)


def test_synthetic_sink_draws_about_half_the_attention():
    q, k, v = analysis.synthetic_qkv(512, 16, head_dim=64, **analysis.KV_SCENARIOS["+ attention sink"])
    r = analysis.attention_error(q, k, v, "8bit")
    assert 0.3 < r["sink_mass"] < 0.7
    assert v[0, :, 0].norm(dim=-1).max() < 0.2 * v[0, :, 1:].norm(dim=-1).mean()


# ======================================================================================== attention
def test_attention_error_measures_the_cache_attention():
    """The dequantized attention of `attention_error` is what the cache's reference attention
    computes for a decode query (q = 1 at the last position)."""
    q, k, v = analysis.synthetic_qkv(200, 1, head_dim=64, outlier_channels=8, key_bias=5.0)
    cfg = TurboQuantConfig(key_bits=3, value_bits=3, residual_length=0, backend="torch")
    cache = TurboQuantCache(cfg)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    k_hat, v_hat = layer.dequantize_range(0, 200)
    ours, _, _ = analysis._causal_attention(q, k_hat, v_hat, 64**-0.5)
    ref = reference_attention(q, layer, 200, scaling=64**-0.5)  # [B, q, Hq, D]
    torch.testing.assert_close(ours.transpose(1, 2), ref, rtol=1e-4, atol=1e-5)


def test_attention_error_orders_bits_and_centring():
    q, k, v = analysis.synthetic_qkv(256, 8, head_dim=64, **analysis.KV_SCENARIOS["+ RoPE"])
    r8 = analysis.attention_error(q, k, v, "8bit")
    r4 = analysis.attention_error(q, k, v, "4bit")
    r3 = analysis.attention_error(q, k, v, "3bit")
    assert r8["rel_err"] < 0.03 and r8["kl"] < 1e-3
    assert r8["rel_err"] < r4["rel_err"] < r3["rel_err"]
    off = analysis.attention_error(q, k, v, "3bit", key_mean_centering=False)
    assert off["key_mean_centering"] is False and r3["key_mean_centering"] is True
    # The key bias inflates score errors unless keys are centred.
    assert off["score_rms"] > 1.3 * r3["score_rms"]


def test_attention_error_table_rows():
    rows = analysis.attention_error_table({"a": {}, "b": {"key_bias": 4.0}}, bits=(3, 4), n_tokens=64,
                                          n_queries=4, head_dim=32)
    assert len(rows) == 2 * 2 * 2
    assert {r["scenario"] for r in rows} == {"a", "b"}
    assert {(r["key_bits"], r["key_mean_centering"]) for r in rows} == {(3, True), (3, False), (4, True), (4, False)}


# ============================================================================================ models
def _tiny(**kw):
    return analysis.load_model(None, device="cpu", dtype="float32", **kw)


def test_resolve_device_and_dtype():
    assert analysis.resolve_device("cpu") == torch.device("cpu")
    assert analysis.resolve_dtype("auto", "cpu") == torch.float32
    assert analysis.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert analysis.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        analysis.resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(analysis.ModelLoadError, match="no CUDA device"):
            analysis.resolve_device("cuda")


def test_load_model_builtin():
    model, _tok, name = _tiny()
    assert "tiny Llama" in name and model.config._attn_implementation == "turboquant"
    assert model.dtype == torch.float32


def test_load_model_errors(tmp_path):
    with pytest.raises(analysis.ModelLoadError, match="does not exist"):
        analysis.load_model(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(analysis.ModelLoadError, match="no loadable transformers config"):
        analysis.load_model(str(empty))
    enc = tmp_path / "bert"
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(enc)
    with pytest.raises(analysis.ModelLoadError, match="is an encoder"):
        analysis.load_model(str(enc))
    t5 = tmp_path / "t5"
    T5Config(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(t5)
    with pytest.raises(analysis.ModelLoadError, match="encoder-decoder"):
        analysis.load_model(str(t5))


def save_local_checkpoint(folder) -> None:
    """A tiny Llama and a character-level fast tokenizer written to `folder` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)}
    vocab["<unk>"] = 127
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def test_load_model_local_checkpoint(tmp_path):
    save_local_checkpoint(tmp_path)
    model, tok, name = analysis.load_model(str(tmp_path), device="cpu", dtype="float32")
    assert name == f"{tmp_path.name} (llama)"
    assert model.config._attn_implementation == "turboquant"
    res = analysis.compare_generate(model, tok, "hello world " * 8, "4bit", max_new_tokens=3, warmup=0)
    assert len(res["turboquant"]["ids"]) == 3


def test_load_model_reference():
    """"reference" is the trained model shipped with tq_hf where present, else a clear error."""
    try:
        model, _tok, name = analysis.load_model("reference", device="cpu", dtype="float32")
    except analysis.ModelLoadError as e:
        assert "reference model" in str(e)
    else:
        assert "reference" in name and model.config._attn_implementation == "turboquant"


def test_cache_nbytes_and_common_prefix():
    from transformers import DynamicCache

    c = DynamicCache()
    k = torch.zeros(1, 2, 5, 8)
    c.update(k, k, 0)
    assert analysis.cache_nbytes(c) == 2 * k.numel() * 4
    t = TurboQuantCache("4bit")
    t.update(torch.randn(1, 2, 80, 64), torch.randn(1, 2, 80, 64), 0)
    assert analysis.cache_nbytes(t) == t.nbytes()
    assert analysis.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert analysis.common_prefix([], [1]) == 0
    assert analysis.common_prefix([1, 2], [1, 2]) == 2


def test_generate_timed_and_compare_generate():
    model, tok, _ = _tiny(seed=0)
    inputs = tok("x" * 100, return_tensors="pt")
    ids, seconds, cache = analysis.generate_timed(model, inputs, "4bit", 4)
    assert len(ids) == 4 and seconds > 0 and isinstance(cache, TurboQuantCache)
    assert cache.get_seq_length() == 101 + 3

    class Bar:
        n = 0
        closed = False

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    bar = Bar()
    analysis.generate_timed(model, inputs, None, 3, progress=bar)
    assert bar.n == 3 and bar.closed

    res = analysis.compare_generate(model, tok, "x" * 100, "8bit", max_new_tokens=4, warmup=1)
    dense, tq = res["dense"], res["turboquant"]
    assert res["prompt_tokens"] == 101 and res["preset"] == "8bit"
    assert 0 <= res["agreement"] <= 4 and len(dense["ids"]) == len(tq["ids"]) == 4
    # fp32 dense K/V (2 * 4 B per element) vs 8-bit codes + window: smaller, but not 4x on 104 tokens.
    assert 1 < res["ratio"] < 4
    assert dense["nbytes"] == 2 * 6 * 1 * 104 * 128 * 4
    assert tq["nbytes"] == tq["cache"].nbytes()
    rows = analysis.comparison_rows(res)
    assert [r["cache"] for r in rows] == ["DynamicCache", "TurboQuant 8bit"]
    assert rows[1]["greedy agreement"].startswith(f"first {res['agreement']}/4")


def test_logit_agreement_rows():
    model, tok, _ = _tiny(seed=0)
    ids = torch.tensor([tok.encode("TurboQuant " * 9)])
    rows = analysis.logit_agreement(model, ids, presets=("8bit", "3bit"), n_steps=3)
    assert [r["preset"] for r in rows] == ["bf16 K/V", "8bit", "3bit"]
    bf16, r8, r3 = rows
    assert r8["rel_logit_err"] < r3["rel_logit_err"]
    assert r8["rel_logit_err"] < 0.02 and r8["kl"] < 1e-4
    assert bf16["rel_logit_err"] < 0.02
    for r in rows:
        assert 0 <= r["top1"] <= 1 and 0 <= r["greedy_prefix"] <= r["n_steps"] == 4
    # A bf16 model has no separate bf16 baseline.
    model_bf16, _, _ = analysis.load_model(None, device="cpu", dtype="bfloat16")
    rows = analysis.logit_agreement(model_bf16, ids, presets=("8bit",), n_steps=2)
    assert [r["preset"] for r in rows] == ["8bit"]


# ==================================================================================== memory, speed
def test_preset_table_matches_readme():
    rows = {r["preset"]: r for r in analysis.preset_table(128)}
    assert set(rows) == set(PRESETS)
    assert {n: r["bytes_per_token_head"] for n, r in rows.items()} == {
        "4bit": 136, "k4v3": 120, "3bit": 104, "k3v2": 88, "8bit": 264, "2.5bit": 96, "3.5bit": 128}
    assert rows["4bit"]["vs_bf16"] == pytest.approx(512 / 136)
    assert rows["k3v2"]["skip_layers"] == (0, 1, -2, -1)


def _fill_by_hand(cache, n_layers, heads, chunks, d=64):
    block = torch.randn(1, heads, max(chunks), d).to(torch.bfloat16)
    for n in chunks:
        for layer in range(n_layers):
            cache.update(block[:, :, :n], block[:, :, :n], layer)
            if isinstance(cache.layers[layer], TurboQuantLayer):
                cache.layers[layer].claim()
    return analysis.cache_nbytes(cache)


def test_cache_memory_counts_real_bytes():
    from transformers import DynamicCache

    cfg = LlamaConfig(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
                      vocab_size=64)  # head_dim 64
    rows = analysis.cache_memory(cfg, presets=("4bit", "k3v2"), contexts=(100, 400), chunk=128)
    by = {(r["preset"], r["context"]): r for r in rows}
    assert set(by) == {(p, c) for p in ("bf16 DynamicCache", "4bit", "k3v2") for c in (100, 400)}
    # bf16 dense: 2 (K, V) * layers * heads * head_dim * 2 bytes per token, exactly.
    assert by["bf16 DynamicCache", 400]["bytes_per_token"] == 2 * 5 * 2 * 64 * 2
    # 4bit at d=64: 32 B of codes + 4 B of norm for K and V per layer and head.
    r = by["4bit", 400]
    assert r["ideal_bytes_per_token"] == 5 * 2 * (2 * 36)
    # Measured = codes/norms with headroom (< 25 % + alignment) + the 64-token bf16 window + key means.
    window, means = 5 * 2 * 2 * 64 * 64 * 2, 5 * 2 * 64 * 4
    headroom = 1.25 * 400 + 64
    assert r["ideal_bytes_per_token"] * 400 < r["nbytes"] <= r["ideal_bytes_per_token"] * headroom + window + means
    # One representative layer per kind and one head, scaled, equal a full fill of every layer and head
    # with the same chunks (100, then 128, 128, 44).
    chunks = (100, 128, 128, 44)
    assert _fill_by_hand(TurboQuantCache("4bit", model_config=cfg), 5, 2, chunks) == r["nbytes"]
    k = by["k3v2", 400]
    assert _fill_by_hand(TurboQuantCache("k3v2", model_config=cfg), 5, 2, chunks) == k["nbytes"]
    assert _fill_by_hand(DynamicCache(config=cfg), 5, 2, chunks) == by["bf16 DynamicCache", 400]["nbytes"]
    assert _fill_by_hand(TurboQuantCache("4bit", model_config=cfg), 5, 2, (100,)) == by["4bit", 100]["nbytes"]
    # k3v2 keeps layers 0, 1, 3, 4 in bf16 (5 layers): one quantized layer.
    assert k["ideal_bytes_per_token"] == 2 * (4 * 2 * 64 * 2 + (24 + 4 + 16 + 4))


def test_capacity():
    rows = [
        {"preset": "dense", "context": 10, "bytes_per_token": 100.0},
        {"preset": "dense", "context": 20, "bytes_per_token": 100.0},
        {"preset": "q", "context": 10, "bytes_per_token": 50.0},
        {"preset": "q", "context": 20, "bytes_per_token": 25.0},
    ]
    cap = analysis.capacity(rows, 1000)
    assert cap == [
        {"preset": "dense", "context": 20, "bytes_per_token": 100.0, "tokens": 10, "vs_first": 1.0},
        {"preset": "q", "context": 20, "bytes_per_token": 25.0, "tokens": 40, "vs_first": 4.0},
    ]


def test_load_results(tmp_path):
    rows = analysis.load_results(os.path.join(NOTEBOOKS, "results", "kernels_h200.json"))
    assert {r["system"] for r in rows} == ({"bf16 SDPA", "bf16 SDPA flash", "bf16 SDPA cudnn"}
                                          | {f"turboquant {p}" for p in ("4bit", "3bit", "3.5bit", "2.5bit", "k4v3")})
    assert all(r["gpu"] == "NVIDIA H200" for r in rows)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"system": "x"}]))
    with pytest.raises(ValueError, match="lacks"):
        analysis.load_results(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        analysis.load_results(bad)


def test_format_table():
    text = analysis.format_table([{"a": 1, "b": 0.123456}, {"a": 22, "b": "x"}], floatfmt=".2f")
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b"] and set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["1", "0.12"] and lines[3].split() == ["22", "x"]
    assert analysis.format_table([]) == "(no rows)"
