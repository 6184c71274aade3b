"""TurboQuant_prod for keys in the cache (`key_qjl=True`): (key_bits - 1)-bit codes plus a QJL sketch, and
the "turboquant" attention adds the sketch's estimate of <q, residual> to every score of a quantized key."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cache_kw, decode_on_both_backends, make_model
from transformers import DynamicCache

from tq_hf import TurboQuantCache, TurboQuantConfig
from tq_hf.attention import reference_attention
from tq_hf.codec import TurboQuantizer

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # backend="triton" on CPU runs under the interpreter


def test_qjl_config_errors():
    for kw in ({"key_bits": 1}, {"outlier_fraction": 0.5}):
        with pytest.raises(ValueError, match="key_qjl needs"):
            TurboQuantConfig(key_qjl=True, **kw)


def test_cache_scores_are_the_codecs_unbiased_estimator():
    torch.manual_seed(0)
    T, D = 4000, 64
    k = torch.randn(1, 1, T, D) * 3
    q = torch.randn(1, 1, 1, 1, D)
    cache = TurboQuantCache(residual_length=0, key_bits=3, key_qjl=True, key_mean_centering=False)
    cache.update(k, k, 0)
    layer = cache.layers[0]
    assert layer.k_codes.shape[-1] == D * 2 // 8 and layer.k_qjl.shape[-1] == D // 8  # 2 mse bits + 1 sketch bit
    k_mse, _ = layer.dequantize_range(0, T)
    est = (torch.einsum("bhgqd,bhnd->bhgqn", q, k_mse.float()) + layer.qjl_scores(q, 0, T)).view(T)
    qz = TurboQuantizer(D, 3, seed=0, norm_correction=True, mode="prod")
    torch.testing.assert_close(est, qz.inner_product(q.view(1, D), qz.quantize(k.view(T, D))), rtol=1e-5, atol=1e-4)
    err = est - (q.view(1, D) * k.view(T, D)).sum(-1)
    assert abs(err.mean()) < 4 * err.std() / math.sqrt(T)  # unbiased
    with pytest.raises(ValueError, match="outside"):
        layer.qjl_scores(q, 0, T + 1)


def test_attention_adds_the_estimate_to_quantized_keys_only():
    torch.manual_seed(1)
    B, H, G, T, R, D = 2, 2, 2, 150, 16, 64
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    cache = TurboQuantCache(residual_length=R, key_qjl=True)
    cache.update(k[:, :, :140], v[:, :, :140], 0)  # quantized at once
    for t in range(140, T):  # ten decode steps into the exact window
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
    layer = cache.layers[0]
    q = torch.randn(B, H * G, 1, D)
    out = reference_attention(q, layer, T)
    # by hand: mse keys (+ mean) dot q, plus the sketch for the quantized part; exact window keys
    kd, vd = layer.dequantize_range(0, T)
    qv = q.view(B, H, G, 1, D)
    s = torch.einsum("bhgqd,bhnd->bhgqn", qv, kd.float())
    s[..., : layer.n_quant] += layer.qjl_scores(qv, 0, layer.n_quant)
    p = torch.softmax(s * D**-0.5, -1)
    expected = torch.einsum("bhgqn,bhnd->bhgqd", p, vd.float()).reshape(B, H * G, 1, D).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert 0 < layer.n_quant < T


def test_qjl_cache_generates_and_keeps_its_planes_through_reorder_and_crop():
    model = make_model("llama", "turboquant")
    ids = torch.randint(3, 256, (2, 80), generator=torch.Generator().manual_seed(5))
    cache = TurboQuantCache(key_qjl=True)
    with torch.no_grad():
        ref = model(ids, **cache_kw(DynamicCache(config=model.config))).logits[:, -1]
        out = model(ids[:, :-1], **cache_kw(cache))
        out = model(ids[:, -1:], **cache_kw(out.past_key_values)).logits[:, -1]
    assert ((out - ref).norm() / ref.norm()).item() < 0.2
    layer = cache.layers[0]
    assert layer.backend == "torch" and layer.k_qjl.shape[:3] == layer.k_codes.shape[:3]
    qv = torch.randn(2, 2, 1, 1, 32)
    before = layer.qjl_scores(qv, 0, layer.n_quant)
    assert layer.nbytes() >= layer.k_qjl.numel() + 4 * layer.k_rnorm.numel()
    layer.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(layer.qjl_scores(qv[[1, 0]], 0, layer.n_quant), before[[1, 0]], rtol=0, atol=0)
    layer.crop(layer.n_quant - 5)  # keep the first n_quant - 5 tokens: quantized ones are dropped
    # (same bits; a shorter einsum may sum in another order: 1 ulp)
    torch.testing.assert_close(layer.qjl_scores(qv[[1, 0]], 0, layer.n_quant), before[[1, 0], ..., : layer.n_quant],
                               rtol=1e-6, atol=1e-6)


def test_vector_bytes_count_the_sketch():
    from tq_hf.analysis import preset_table

    cache = TurboQuantCache(residual_length=0, key_qjl=True)
    cache.update(torch.randn(1, 1, 64, 128), torch.randn(1, 1, 64, 128), 0)
    layer = cache.layers[0]
    held = sum(getattr(layer, n)[:, :, :64].numel() * getattr(layer, n).element_size()
               for n in ("k_codes", "k_norms", "k_qjl", "k_rnorm", "v_codes", "v_norms")) / 64
    assert layer.key_quantizer.vector_bytes + layer.value_quantizer.vector_bytes == held == 140
    assert preset_table(128, [TurboQuantConfig(key_qjl=True)])[0]["bytes_per_token_head"] == 140


def test_qjl_keys_generate_through_the_triton_kernel(monkeypatch):
    """The "turboquant" attention decodes QJL keys with the kernel (Triton interpreter on CPU), giving
    the reference path's logits; backend="auto" picks the kernel on CUDA and the reference on CPU."""
    scores, calls, layers = decode_on_both_backends(monkeypatch, 5, key_qjl=True)
    assert len(calls) == 5 * layers  # every decode step of every layer
    torch.testing.assert_close(scores["triton"], scores["torch"], rtol=0, atol=1e-3)
    cache = TurboQuantCache(key_qjl=True)
    cache.update(torch.randn(1, 1, 4, 64, device=DEV), torch.randn(1, 1, 4, 64, device=DEV), 0)
    assert cache.layers[0].backend == ("triton" if DEV == "cuda" else "torch")


def test_qjl_keys_are_quantized_by_the_kernel_at_every_head_dim(monkeypatch):
    """backend="triton": the quantize kernel writes the QJL sketch and residual norm of keys, head_dim
    64 to 256 (the kernel's own match against the reference: tests/test_kernels.py)."""
    import tq_hf.kernels.quantize as tk  # the launcher's own module: patching the lazy package would
                                          # leave a plain attribute behind that hides later spies

    launches = []
    real = tk.quantize_pack
    monkeypatch.setattr(tk, "quantize_pack", lambda *a, **kw: launches.append(kw.get("qjl")) or real(*a, **kw))
    for head_dim in (64, 256):
        launches.clear()
        cache = TurboQuantCache(backend="triton", residual_length=0, key_qjl=True)
        k = torch.randn(1, 1, 5, head_dim, device=DEV)
        cache.update(k, k, 0)
        layer = cache.layers[0]
        assert len(launches) == 2 and launches[0] is not None and launches[1] is None  # keys with QJL planes, values
        assert layer.k_rnorm[0, 0, :5].gt(0).all() and layer.k_qjl[0, 0, :5].ne(0).any()
