"""Mixed precision (the 2.5bit / 3.5bit presets): outlier channels chosen per layer and KV head,
each channel set quantized by its own TurboQuantizer, the outliers with one more bit."""

from __future__ import annotations

import pytest
import torch
from conftest import cache_kw, decode_on_both_backends, make_model
from transformers import DynamicCache

from tq_hf import TurboQuantCache, TurboQuantConfig
from tq_hf.codec import SplitQuantizer, TurboQuantizer, outlier_channel_count

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # backend="triton" on CPU runs under the interpreter


def test_presets_are_2_5_and_3_5_bits_per_coordinate():
    for name, bits in (("2.5bit", 2.5), ("3.5bit", 3.5)):
        cfg = TurboQuantConfig.from_preset(name)
        n = outlier_channel_count(128, cfg.outlier_fraction)
        assert SplitQuantizer(128, n, cfg.key_bits).bits_per_coordinate == bits
    assert outlier_channel_count(80, 0.25) == 24  # 20 rounded half up to a multiple of 8


def test_split_config_errors():
    with pytest.raises(ValueError, match="outlier_fraction must be"):
        TurboQuantConfig(outlier_fraction=1.0)
    with pytest.raises(ValueError, match="<= 7"):
        TurboQuantConfig(key_bits=8, outlier_fraction=0.5)
    cache = TurboQuantCache("2.5bit", backend="triton", outlier_fraction=0.25)
    with pytest.raises(ValueError, match="reads split codes only for outlier_fraction=0.5"):
        cache.update(torch.randn(1, 1, 4, 128, device=DEV), torch.randn(1, 1, 4, 128, device=DEV), 0)
    with pytest.raises(ValueError, match="at least 8"):
        outlier_channel_count(64, 0.01)


def test_split_quantizer_is_two_independent_quantizers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 128, generator=g)
    qz = SplitQuantizer(128, 64, 3, seed=5)
    q = qz.quantize(x)
    assert q["codes"].shape == (500, 64 * 4 // 8 + 64 * 3 // 8) and q["norms"].shape == (500, 2)
    a, b = TurboQuantizer(64, 4, seed=5), TurboQuantizer(64, 3, seed=6)
    expected = torch.cat([a.dequantize(a.quantize(x[:, :64])), b.dequantize(b.quantize(x[:, 64:]))], -1)
    torch.testing.assert_close(qz.dequantize(q), expected, rtol=0, atol=0)
    # each part's distortion is its own bit width's (paper: 0.0093 at 4 bits, 0.034 at 3, per unit norm)
    err = (qz.dequantize(q) - x).square().sum(-1)
    parts = x[:, :64].square().sum(-1) * 0.0093 + x[:, 64:].square().sum(-1) * 0.034
    assert 0.8 < (err.mean() / parts.mean()).item() < 1.25


def test_outlier_channels_are_chosen_per_head_from_the_first_chunk():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 40, 64)
    v = torch.randn(2, 3, 40, 64)
    big = [[1, 9, 33], [2, 40, 63], [0, 7, 8]]  # three loud channels, different in each head
    for h, chans in enumerate(big):
        k[:, h, :, chans] *= 20
        v[:, h, :, chans] *= 20
    cache = TurboQuantCache("3.5bit", residual_length=0)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    n_out = layer.key_quantizer.n_outlier
    for h, chans in enumerate(big):
        for perm in (layer.k_perm[h], layer.v_perm[h]):
            assert set(chans) <= set(perm[:n_out].tolist())
            assert sorted(perm.tolist()) == list(range(64))
            assert perm[:n_out].tolist() == sorted(perm[:n_out].tolist())
    # the loud channels got the extra bit: their error is smaller than in a plain 3-bit cache
    k_hat, _ = layer.dequantize_range(0, 40)
    plain = TurboQuantCache("3bit", residual_length=0)
    plain.update(k, v, 0)
    k_plain, _ = plain.layers[0].dequantize_range(0, 40)
    assert (k_hat - k).norm() < 0.8 * (k_plain - k).norm()


def test_split_cache_through_window_crop_and_reorder():
    torch.manual_seed(2)
    cache = TurboQuantCache("2.5bit", residual_length=8)
    k, v = torch.randn(3, 2, 21, 64), torch.randn(3, 2, 21, 64)
    cache.update(k[:, :, :13], v[:, :, :13], 0)
    for t in range(13, 21):
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
    layer = cache.layers[0]
    assert layer.n_quant + layer.n_window == 21 and layer.k_norms.shape[-1] == 2
    full_k, full_v = layer.dequantize_range(0, 21)
    assert torch.equal(full_k[:, :, layer.n_quant :], k[:, :, layer.n_quant :])  # the window is exact
    assert ((full_v - v).norm() / v.norm()).item() < 0.35
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    rk, _ = layer.dequantize_range(0, 21)
    torch.testing.assert_close(rk, full_k[[2, 0, 1]], rtol=0, atol=0)
    layer.crop(-5)
    ck, _ = layer.dequantize_range(0, 16)
    torch.testing.assert_close(ck, rk[:, :, :16], rtol=0, atol=0)
    assert layer.nbytes() > 0 and TurboQuantCache("2.5bit").get_seq_length() == 0


@pytest.mark.parametrize("preset", ["2.5bit", "3.5bit"])
def test_split_presets_generate_close_to_dynamic_cache(preset):
    model = make_model("llama", "turboquant")
    ids = torch.randint(3, 256, (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids, **cache_kw(DynamicCache(config=model.config))).logits[:, -1]
        cache = TurboQuantCache(preset)
        out = model(ids[:, :-1], **cache_kw(cache))
        out = model(ids[:, -1:], **cache_kw(out.past_key_values)).logits[:, -1]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.1, rel
    assert all(layer.backend == "torch" and layer.k_perm is not None for layer in cache.layers)


def test_auto_backend_of_split_codes(monkeypatch):
    """`backend="auto"` gives split presets the kernels where "auto" means Triton (CUDA; stubbed here, so
    the rule is checked on the CPU too) if the decode kernel reads them (half/half, a power-of-two
    head_dim), and the reference path otherwise; QJL keys (no split) get the kernels. The decode kernel
    itself refuses splits it cannot read."""
    from tq_hf.kernels import decode_attention

    from tq_hf import cache as cache_module

    monkeypatch.setattr(cache_module, "_resolve_backend", lambda backend, device: "triton")
    for preset, options, head_dim, kernel in (("2.5bit", {}, 64, True), ("2.5bit", {}, 80, False),
                                              ("2.5bit", {"outlier_fraction": 0.25}, 64, False),
                                              ("4bit", {"key_qjl": True}, 64, True)):
        cache = TurboQuantCache(preset, residual_length=0, **options)
        cache.update(torch.randn(1, 1, 16, head_dim, device=DEV), torch.randn(1, 1, 16, head_dim, device=DEV), 0)
        assert cache.layers[0].backend == ("triton" if kernel else "torch"), (preset, options, head_dim)
    monkeypatch.undo()
    cache = TurboQuantCache("2.5bit", residual_length=0, outlier_fraction=0.25)
    cache.update(torch.randn(1, 1, 16, 64, device=DEV), torch.randn(1, 1, 16, 64, device=DEV), 0)
    with pytest.raises(ValueError, match="half/half splits"):
        decode_attention(torch.randn(1, 2, 1, 64, device=DEV), cache.layers[0])


def test_split_preset_generates_through_the_triton_kernel(monkeypatch):
    """backend="triton": the "turboquant" attention decodes split codes with the kernel (Triton interpreter on
    CPU), giving the reference path's logits."""
    scores, calls, layers = decode_on_both_backends(monkeypatch, 4, "3.5bit")
    assert len(calls) == 5 * layers  # every decode step of every layer
    torch.testing.assert_close(scores["triton"], scores["torch"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_outlier_channels_do_not_depend_on_the_scale(scale):
    """Squares of |x| > 1e19 overflow and of |x| < 1e-19 underflow in fp32: channels are ranked at a
    power-of-two scale, so extreme K/V pick the same outliers as ordinary ones."""
    torch.manual_seed(0)
    k = torch.randn(1, 2, 30, 64)
    k[:, :, :, [3, 17, 40]] *= 20
    perms = []
    for s in (1.0, scale):
        cache = TurboQuantCache("3.5bit", residual_length=0)
        cache.update(k * s, k * s, 0)
        perms.append(cache.layers[0].k_perm)
    assert torch.equal(perms[0], perms[1])


@pytest.mark.parametrize("preset,options", [("3.5bit", {}), ("4bit", {}), ("4bit", {"key_qjl": True})])
def test_reference_quantize_in_slices_is_the_same(monkeypatch, preset, options):
    """A long chunk is processed on PyTorch a slice of tokens at a time (bounded temporaries): the outlier
    channels are the same, the key mean the same up to summation order, and with a fixed (zero) mean the
    planes, QJL sketch and residual norms included, are bit-identical to one piece."""
    from tq_hf import cache as cache_module

    k, v = torch.randn(2, 3, 50, 64) + 0.5, torch.randn(2, 3, 50, 64)
    names = ("k_codes", "k_norms", "v_codes", "v_norms") + (("k_qjl", "k_rnorm") if options else ())
    layers = {}
    for vectors in (1 << 16, 7 * 6):  # one piece; slices of 7 tokens (B * H = 6)
        monkeypatch.setattr(cache_module, "_SLICE_VECTORS", vectors)
        for centring in (True, False):
            c = TurboQuantCache(preset, residual_length=0, backend="torch", key_mean_centering=centring, **options)
            c.update(k, v, 0)
            layers[vectors, centring] = c.layers[0]
    whole, sliced = layers[1 << 16, True], layers[42, True]
    torch.testing.assert_close(sliced.k_mean, whole.k_mean, rtol=1e-6, atol=1e-7)
    if whole.k_perm is not None:
        assert torch.equal(sliced.k_perm, whole.k_perm) and torch.equal(sliced.v_perm, whole.v_perm)
    whole, sliced = layers[1 << 16, False], layers[42, False]
    for n in names:
        assert torch.equal(getattr(sliced, n)[:, :, :50], getattr(whole, n)[:, :, :50]), n

