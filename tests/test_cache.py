"""TurboQuantCache API on the PyTorch backend, driven by direct `cache.update(k, v, layer_idx)` calls.

No attention function claims the layers here, so after the first call `update` returns dequantized
full K/V: that is what the known-value checks compare with an independent reference built from
`TurboQuantizer` (keys: quantize(k - mean) then + mean; values: quantize(v); window tokens exact).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import model_config
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tq_hf import PRESETS, TurboQuantCache, TurboQuantConfig, TurboQuantizer, TurboQuantLayer
from tq_hf.cache import tagged_layer

B, H, D = 2, 3, 64


def rand(T, b=B, h=H, d=D, dtype=torch.float32, seed=None, bias=0.0):
    g = torch.Generator().manual_seed(seed if seed is not None else T * 7919 + b * 31 + d)
    return (torch.randn(b, h, T, d, generator=g) + bias).to(dtype)


def make_cache(**kw):
    kw = {"backend": "torch", **kw}
    return TurboQuantCache("4bit", **kw)


class Reference:
    """Independent model of one layer: every token's quantized K/V (from TurboQuantizer directly) plus
    the exact tokens, with the window rule "the window fills to R tokens, then all of it is quantized"
    (with the chunk that fills it, as one chunk when the chunk completes it exactly)."""

    def __init__(self, cfg: TurboQuantConfig):
        self.cfg = cfg
        self.kq = TurboQuantizer(D, cfg.key_bits, cfg.seed, cfg.norm_correction)
        self.vq = TurboQuantizer(D, cfg.value_bits, cfg.seed + 1, cfg.norm_correction)
        self.exact_k, self.exact_v = [], []  # per token chunk, in order
        self.n_quant = 0
        self.mean = None
        self.k_codes, self.v_codes, self.k_hat, self.v_hat = [], [], [], []

    def _quantize(self, k, v):
        if k.shape[2] == 0:
            return
        if self.mean is None:
            self.mean = k.float().mean(dim=(0, 2)) if self.cfg.key_mean_centering else torch.zeros(H, D)
        kc = k.float() - self.mean[None, :, None, :]
        qk, qv = self.kq.quantize(kc), self.vq.quantize(v)
        self.k_codes.append(qk["codes"])
        self.v_codes.append(qv["codes"])
        qk["dtype"] = qv["dtype"] = torch.float32
        self.k_hat.append(self.kq.dequantize(qk) + self.mean[None, :, None, :])
        self.v_hat.append(self.vq.dequantize(qv))
        self.n_quant += k.shape[2]

    def update(self, k, v):
        win_k = torch.cat(self.exact_k, 2) if self.exact_k else k[:, :, :0]
        win_v = torch.cat(self.exact_v, 2) if self.exact_v else v[:, :, :0]
        if win_k.shape[2] + k.shape[2] < self.cfg.residual_length:
            self.exact_k.append(k)
            self.exact_v.append(v)
            return
        if win_k.shape[2] and win_k.shape[2] + k.shape[2] == self.cfg.residual_length:
            # a chunk that completes the window exactly (decode's flush) is quantized with it: one mean
            self._quantize(torch.cat([win_k, k], 2), torch.cat([win_v, v], 2))
        else:
            self._quantize(win_k, win_v)
            self._quantize(k, v)
        self.exact_k, self.exact_v = [], []

    @property
    def n_window(self):
        return sum(t.shape[2] for t in self.exact_k)

    def full(self, dtype=torch.float32):
        ks = [t.to(dtype) for t in self.k_hat] + list(self.exact_k)
        vs = [t.to(dtype) for t in self.v_hat] + list(self.exact_v)
        return torch.cat(ks, 2), torch.cat(vs, 2)


def dense(layer):
    return layer.dequantize_range(0, layer.get_seq_length())


# ------------------------------------------------------------------ known values
@pytest.mark.parametrize("R", (0, 1, 4, 8))
@pytest.mark.parametrize("mean_centering", (True, False))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_known_values(R, mean_centering, dtype):
    cfg = TurboQuantConfig(key_bits=4, value_bits=3, residual_length=R, key_mean_centering=mean_centering,
                           backend="torch", seed=3)
    cache = TurboQuantCache(cfg)
    ref = Reference(cfg)
    chunks = [6, 2, 1, 1, 1, 5, 1, 9, 1]
    # fp32: equal up to matmul rounding; bf16: the same fp32 values rounded once to bf16 (1 ulp).
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    for step, T in enumerate(chunks):
        # A channel bias on keys (Qwen-style): what mean-centring removes.
        k, v = rand(T, seed=100 + step, bias=3.0, dtype=dtype), rand(T, seed=200 + step, dtype=dtype)
        ok, ov = cache.update(k, v, 0)
        ref.update(k, v)
        layer = cache.layers[0]
        assert isinstance(layer, TurboQuantLayer)
        assert (layer.n_quant, layer.n_window) == (ref.n_quant, ref.n_window), step
        assert cache.get_seq_length() == ref.n_quant + ref.n_window == sum(chunks[: step + 1])
        if step == 0:
            # First prefill: the chunk itself, tagged with its layer (what "turboquant" attention claims).
            assert ok is k and ov is v
            assert tagged_layer(ok) is layer and tagged_layer(ov) is layer
            assert not layer.fast_path
            continue
        # Not claimed: dequantized history + exact window, [B, H, seq, D] in the model dtype.
        rk, rv = ref.full(dtype)
        assert ok.shape == rk.shape and ok.dtype == dtype
        torch.testing.assert_close(ok, rk, **tol)
        torch.testing.assert_close(ov, rv, **tol)
        # Window tokens are bit-exact.
        nq = layer.n_quant
        assert torch.equal(ok[:, :, nq:], rk[:, :, nq:])
        assert torch.equal(ov[:, :, nq:], rv[:, :, nq:])
    # The packed codes themselves equal the reference's, chunk by chunk.
    layer = cache.layers[0]
    assert torch.equal(layer.k_codes[:, :, : layer.n_quant], torch.cat(ref.k_codes, 2))
    assert torch.equal(layer.v_codes[:, :, : layer.n_quant], torch.cat(ref.v_codes, 2))
    torch.testing.assert_close(layer.k_mean, ref.mean)
    if not mean_centering:
        assert torch.equal(layer.k_mean, torch.zeros(H, D))


def test_mean_centering_is_first_quantized_chunks_mean():
    cache = make_cache(residual_length=0)
    k = rand(10, bias=2.0)
    cache.update(k, rand(10, seed=5), 0)
    torch.testing.assert_close(cache.layers[0].k_mean, k.mean(dim=(0, 2)))
    # Later chunks do not move the mean (codes written earlier depend on it).
    cache.update(rand(4, bias=-5.0), rand(4, seed=6), 0)
    torch.testing.assert_close(cache.layers[0].k_mean, k.mean(dim=(0, 2)))


def test_mean_centering_reduces_key_error_with_channel_bias():
    k = rand(64, seed=1) + torch.linspace(-8, 8, D)  # strong per-channel bias
    v = rand(64, seed=2)
    errs = {}
    for mc in (True, False):
        c = make_cache(residual_length=0, key_mean_centering=mc)
        c.update(k, v, 0)
        kh, _ = dense(c.layers[0])
        errs[mc] = ((kh - k) ** 2).sum() / (k**2).sum()
    assert errs[True] < 0.5 * errs[False]


# ------------------------------------------------------------------ window transitions
_TRANSITIONS = [
    (R, delta, prefill)
    for R in (1, 2, 4, 8)
    for delta in (-1, 0, 1)
    for prefill in ("empty", "partial")
    if R + delta > 0 and not (prefill == "partial" and (R - 1) // 2 == 0)
]


@pytest.mark.parametrize("R, delta, prefill", _TRANSITIONS)
def test_window_transitions(R, delta, prefill):
    """A chunk that makes the window R-1, R or R+1 tokens long, after a partly filled or an empty window."""
    cache = make_cache(residual_length=R)
    w0 = (R - 1) // 2 if prefill == "partial" else 0  # tokens already in the window
    k0, v0 = rand(w0, seed=1), rand(w0, seed=2)
    if w0:
        cache.update(k0, v0, 0)
        assert (cache.layers[0].n_quant, cache.layers[0].n_window) == (0, w0)
    T = R + delta - w0
    k1, v1 = rand(T, seed=3), rand(T, seed=4)
    ok, ov = cache.update(k1, v1, 0)
    layer = cache.layers[0]
    kk, vv = dense(layer)
    if w0:
        assert torch.equal(ok, kk) and torch.equal(ov, vv)  # not claimed: the dequantized full K/V
    else:
        assert ok is k1 and ov is v1  # first prefill: the chunk itself
    k_all, v_all = torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)
    if delta < 0:
        # Window still short of R: nothing quantized, every token exact.
        assert (layer.n_quant, layer.n_window) == (0, R - 1)
        assert torch.equal(kk, k_all) and torch.equal(vv, v_all)
        assert layer.k_codes is None  # nothing allocated for codes yet
    else:
        # The window reached R: all of it and the chunk are quantized, the window is empty.
        assert (layer.n_quant, layer.n_window) == (R + delta, 0)
        assert kk.shape == k_all.shape
        assert not torch.equal(kk, k_all) and not torch.equal(vv, v_all)  # lossy, so truly quantized
        assert ((kk - k_all) ** 2).sum() / (k_all**2).sum() < 0.03  # 4-bit: ~1 % relative MSE
        assert ((vv - v_all) ** 2).sum() / (v_all**2).sum() < 0.03
    assert layer.keys.shape[2] == layer.n_window  # `keys`/`values` expose the exact window
    # One more token: from R-1 it fills the window, which is quantized whole; otherwise it starts a
    # fresh window and is exact (R=1 quantizes every token at once).
    k2, v2 = rand(1, seed=5), rand(1, seed=6)
    ok, ov = cache.update(k2, v2, 0)
    assert cache.get_seq_length() == R + delta + 1
    if delta == -1 or R == 1:
        assert (layer.n_quant, layer.n_window) == (R + delta + 1, 0)
        assert not torch.equal(ok[:, :, -1:], k2)
    else:
        assert (layer.n_quant, layer.n_window) == (R + delta, 1)
        assert torch.equal(ok[:, :, -1:], k2) and torch.equal(ov[:, :, -1:], v2)
    # Earlier tokens read back the same as before the extra token (codes are never rewritten),
    # except the window tokens that were quantized just now.
    n_stable = layer.n_quant if delta >= 0 else 0
    keep = min(n_stable, kk.shape[2])
    assert torch.equal(ok[:, :, :keep], kk[:, :, :keep])


def test_decode_flush_quantizes_the_window_in_one_write(monkeypatch):
    """The token that completes the window is quantized with it in one write (one quantize launch per K/V on
    the Triton backend), not as the window and then the token; a chunk that overfills it takes two."""
    R = 8
    cache = make_cache(residual_length=R)
    cache.update(rand(R - 1, seed=1), rand(R - 1, seed=2), 0)
    layer = cache.layers[0]
    writes = []
    real = layer.write_codes
    monkeypatch.setattr(layer, "write_codes", lambda k, v, start: writes.append((k.shape[2], start)) or real(k, v, start))
    cache.update(rand(1, seed=3), rand(1, seed=4), 0)
    assert writes == [(R, 0)] and (layer.n_quant, layer.n_window) == (R, 0)
    cache.update(rand(R - 2, seed=5), rand(R - 2, seed=6), 0)
    cache.update(rand(3, seed=7), rand(3, seed=8), 0)
    assert writes == [(R, 0), (R - 2, R), (3, 2 * R - 2)] and (layer.n_quant, layer.n_window) == (2 * R + 1, 0)


def test_residual_length_zero_quantizes_everything():
    cache = make_cache(residual_length=0)
    for T in (5, 1, 1, 3):
        k, v = rand(T), rand(T, seed=T + 50)
        ok, _ = cache.update(k, v, 0)
        layer = cache.layers[0]
        assert layer.n_window == 0
        assert layer.k_win is None and layer.v_win is None
    assert layer.n_quant == cache.get_seq_length() == 10
    assert not torch.equal(ok[:, :, -3:], k)  # even the newest chunk was quantized


def test_long_window_never_quantizes_short_sequences():
    cache = make_cache(residual_length=64)
    ks = [rand(T, seed=T) for T in (20, 1, 1, 1)]
    for k in ks:
        ok, ov = cache.update(k, k * 2, 0)
    assert cache.layers[0].n_quant == 0 and cache.layers[0].n_window == 23
    assert torch.equal(ok, torch.cat(ks, 2)) and torch.equal(ov, 2 * torch.cat(ks, 2))


# ------------------------------------------------------------------ lengths and mask sizes
def test_seq_length_and_mask_sizes():
    cache = make_cache(residual_length=4)
    assert cache.get_seq_length() == 0
    total = 0
    for T in (7, 1, 2, 1, 1, 1):
        for layer_idx in (0, 1):
            cache.update(rand(T), rand(T), layer_idx)
        total += T
        for layer_idx in (0, 1):
            assert cache.get_seq_length(layer_idx) == total
            assert cache.get_mask_sizes(1, layer_idx) == (total + 1, 0)
            assert cache.get_mask_sizes(5, layer_idx) == (total + 5, 0)
            assert cache.layers[layer_idx].get_max_length() == -1
    assert len(cache) == 2
    assert not cache.is_compileable
    assert cache.is_sliding == [False, False]


# ------------------------------------------------------------------ crop
def _filled(R=4, chunks=(10, 1, 1)):
    cache = make_cache(residual_length=R)
    ks, vs = [], []
    for i, T in enumerate(chunks):
        k, v = rand(T, seed=10 + i), rand(T, seed=20 + i)
        cache.update(k, v, 0)
        ks.append(k)
        vs.append(v)
    return cache, torch.cat(ks, 2), torch.cat(vs, 2)


def test_crop_negative_within_window():
    cache, _k, _v = _filled()
    layer = cache.layers[0]
    assert (layer.n_quant, layer.n_window) == (10, 2)
    before_k, before_v = dense(layer)
    cache.crop(-1)
    assert cache.get_seq_length() == 11 and (layer.n_quant, layer.n_window) == (10, 1)
    kk, vv = dense(layer)
    assert torch.equal(kk, before_k[:, :, :11]) and torch.equal(vv, before_v[:, :, :11])
    # Appending after a crop overwrites the dropped slot.
    k2, v2 = rand(1, seed=99), rand(1, seed=98)
    ok, ov = cache.update(k2, v2, 0)
    assert ok.shape[2] == 12
    assert torch.equal(ok[:, :, :11], before_k[:, :, :11]) and torch.equal(ok[:, :, 11:], k2)
    assert torch.equal(ov[:, :, :11], before_v[:, :, :11]) and torch.equal(ov[:, :, 11:], v2)


def test_crop_into_quantized_region():
    cache, _k, _v = _filled()
    layer = cache.layers[0]
    before_k, before_v = dense(layer)
    cache.crop(-5)
    assert cache.get_seq_length() == 7 and (layer.n_quant, layer.n_window) == (7, 0)
    kk, vv = dense(layer)
    assert torch.equal(kk, before_k[:, :, :7]) and torch.equal(vv, before_v[:, :, :7])
    # The cache keeps working: new tokens go to the window after the kept codes.
    k2, v2 = rand(2, seed=77), rand(2, seed=78)
    ok, ov = cache.update(k2, v2, 0)
    assert ok.shape[2] == 9 and (layer.n_quant, layer.n_window) == (7, 2)
    assert torch.equal(ok[:, :, :7], before_k[:, :, :7]) and torch.equal(ok[:, :, 7:], k2)
    assert torch.equal(ov[:, :, :7], before_v[:, :, :7]) and torch.equal(ov[:, :, 7:], v2)


def test_crop_legacy_positive_keeps_first_tokens():
    cache, _, _ = _filled()
    before_k, _ = dense(cache.layers[0])
    cache.crop(11)  # transformers 5.17's legacy form: keep the first 11 tokens
    assert cache.get_seq_length() == 11
    assert torch.equal(dense(cache.layers[0])[0], before_k[:, :, :11])
    cache.crop(50)  # larger than the length: nothing to do
    assert cache.get_seq_length() == 11
    cache.crop(0)  # no-op
    assert cache.get_seq_length() == 11


def test_crop_beyond_length_raises():
    cache, _, _ = _filled()
    with pytest.raises(ValueError, match="cannot remove"):
        cache.crop(-13)
    assert cache.get_seq_length() == 12
    cache.crop(-12)
    assert cache.get_seq_length() == 0


# ------------------------------------------------------------------ batch reindexing
def _two_layer_cache(R=4):
    cache = make_cache(residual_length=R)
    for i, T in enumerate((9, 1, 1)):
        for layer_idx in (0, 1):
            cache.update(rand(T, b=3, seed=i * 10 + layer_idx), rand(T, b=3, seed=i * 10 + 5 + layer_idx), layer_idx)
    return cache


@pytest.mark.parametrize(
    "op, dense_op",
    [
        (lambda c: c.reorder_cache(torch.tensor([2, 0, 0])), lambda t: t[[2, 0, 0]]),
        (lambda c: c.batch_select_indices(torch.tensor([2, 0])), lambda t: t[[2, 0]]),
        (lambda c: c.batch_select_indices([1]), lambda t: t[[1]]),
        (lambda c: c.batch_repeat_interleave(2), lambda t: t.repeat_interleave(2, dim=0)),
    ],
    ids=["reorder_cache", "batch_select_indices", "batch_select_list", "batch_repeat_interleave"],
)
def test_batch_reindexing_matches_dense(op, dense_op):
    cache = _two_layer_cache()
    before = [dense(layer) for layer in cache.layers]
    op(cache)
    for layer, (k, v) in zip(cache.layers, before):
        kk, vv = dense(layer)
        assert torch.equal(kk, dense_op(k)) and torch.equal(vv, dense_op(v))
        assert layer.batch_size == kk.shape[0]
    # Decoding continues with the new batch size, and new tokens land in the right rows.
    b = before[0][0].shape[0]
    nb = dense_op(torch.zeros(b)).shape[0]
    k_new, v_new = rand(1, b=nb, seed=1234), rand(1, b=nb, seed=4321)
    ok, ov = cache.update(k_new, v_new, 0)
    assert ok.shape[0] == nb and torch.equal(ok[:, :, -1:], k_new) and torch.equal(ov[:, :, -1:], v_new)
    assert torch.equal(ok[:, :, :-1], dense_op(before[0][0])) and torch.equal(ov[:, :, :-1], dense_op(before[0][1]))
    with pytest.raises(ValueError, match="do not match"):
        cache.update(rand(1, b=b + 5), rand(1, b=b + 5), 0)


# ------------------------------------------------------------------ reset and copies
def test_reset_then_reuse():
    cache = _two_layer_cache()
    cache.layers[0].claim()  # as the "turboquant" attention would have: reset must forget it
    cache.reset()
    assert cache.get_seq_length() == 0
    for layer in cache.layers:
        assert layer.k_codes is None and layer.k_win is None and layer.k_mean is None
        assert layer.nbytes() == 0
    assert cache.nbytes() == 0
    assert not any(layer.fast_path for layer in cache.layers)
    # A new sequence, even with another batch size and dtype, starts from scratch.
    k, v = rand(6, b=1, dtype=torch.float16, seed=7), rand(6, b=1, dtype=torch.float16, seed=8)
    ok, _ov = cache.update(k, v, 0)
    assert ok is k and cache.get_seq_length() == 6
    ref = make_cache(residual_length=4)
    ref.update(k, v, 0)
    ok, _ = cache.update(k[:, :, :1], v[:, :, :1], 0)
    rk, _ = ref.update(k[:, :, :1], v[:, :, :1], 0)
    assert ok.dtype == torch.float16 and torch.equal(ok, rk)
    torch.testing.assert_close(cache.layers[0].k_mean, k.float().mean(dim=(0, 2)))


def test_deepcopy_is_independent():
    cache = _two_layer_cache()
    clone = copy.deepcopy(cache)
    k0, v0 = dense(cache.layers[0])
    assert torch.equal(dense(clone.layers[0])[0], k0)
    for name in ("k_codes", "k_norms", "v_codes", "k_win", "k_mean"):
        assert getattr(clone.layers[0], name).data_ptr() != getattr(cache.layers[0], name).data_ptr()
    assert clone.layers[0].keys.data_ptr() == clone.layers[0].k_win.data_ptr()  # views re-made on the copy
    # Updating / cropping / reordering the clone leaves the original untouched, and vice versa.
    clone.update(rand(3, b=3, seed=55), rand(3, b=3, seed=56), 0)
    clone.reorder_cache(torch.tensor([1, 1, 0]))
    assert cache.get_seq_length(0) == 11 and clone.get_seq_length(0) == 14
    k1, v1 = dense(cache.layers[0])
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    cache.crop(-4)
    assert clone.get_seq_length(0) == 14


# ------------------------------------------------------------------ storage
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_something_is_actually_packed(preset):
    cache = TurboQuantCache(preset, backend="torch", residual_length=0, skip_layers=())
    cache.update(rand(16, dtype=torch.bfloat16), rand(16, dtype=torch.bfloat16), 0)
    layer = cache.layers[0]
    cfg = cache.config
    assert layer.k_codes.dtype == torch.uint8 and layer.v_codes.dtype == torch.uint8
    n_out = D // 2 if cfg.outlier_fraction else 0  # split codes: that many channels get one more bit
    assert layer.k_codes.shape == (B, H, layer.capacity, (D * cfg.key_bits + n_out) // 8)
    assert layer.v_codes.shape == (B, H, layer.capacity, (D * cfg.value_bits + n_out) // 8)
    norms = (B, H, layer.capacity) + ((2,) if cfg.outlier_fraction else ())
    assert layer.k_norms.dtype == torch.float32 and layer.k_norms.shape == norms
    assert layer.capacity >= 16
    # No full-precision copy is kept for quantized tokens.
    assert layer.n_window == 0 and layer.keys is None


def test_capacity_grows_geometrically():
    cache = make_cache(residual_length=0)
    caps = []
    for _ in range(300):
        cache.update(rand(1), rand(1), 0)
        caps.append(cache.layers[0].capacity)
    assert len(set(caps)) <= 12  # O(log n) re-allocations, not one per token
    assert caps[-1] < 1.6 * 300


def test_default_preset_memory_at_2048_tokens():
    cache = TurboQuantCache(backend="torch")  # default preset
    b, h, d, T = 1, 2, 128, 2048
    k = torch.randn(b, h, T, d, dtype=torch.bfloat16)
    v = torch.randn(b, h, T, d, dtype=torch.bfloat16)
    cache.update(k, v, 0)
    ratio = cache.nbytes() / cache.dense_nbytes()
    print(f"default preset ({cache.config.key_bits}/{cache.config.value_bits} bits, head_dim {d}, {T} tokens): "
          f"{cache.nbytes()} B vs bf16 {cache.dense_nbytes()} B = {ratio:.3f}")
    assert cache.dense_nbytes() == 2 * b * h * T * d * 2
    assert ratio <= 0.30


@pytest.mark.parametrize("d", (64, 128))
def test_bytes_per_token_per_head(d):
    T = 1024
    print()
    for name in sorted(PRESETS):
        cfg = PRESETS[name]
        cache = TurboQuantCache(name, backend="torch", skip_layers=())
        cache.update(torch.randn(1, 1, T, d, dtype=torch.bfloat16), torch.randn(1, 1, T, d, dtype=torch.bfloat16), 0)
        layer = cache.layers[0]
        codes_norms = sum(getattr(layer, n)[:, :, :T].numel() * getattr(layer, n).element_size()
                          for n in ("k_codes", "k_norms", "v_codes", "v_norms"))
        per_token = codes_norms / T
        # packed bits + one fp32 norm per vector; split presets: half the channels 1 bit more, 2 norms
        extra_bits, norms = (d, 4) if cfg.outlier_fraction else (0, 2)
        ideal = (d * (cfg.key_bits + cfg.value_bits) + extra_bits) / 8 + norms * 4
        print(f"  {name:>5} d={d}: {per_token:.1f} B/token/head (ideal {ideal:.1f}, bf16 {4 * d}), "
              f"all buffers {cache.nbytes() / T:.1f} B/token/head")
        assert per_token == ideal  # 3 bits cost 3 bits
        # + window, key mean, and the split presets' channel orders (2 x d int64)
        assert cache.nbytes() / T <= ideal * 1.1 + 2 * cfg.residual_length * d * 2 / T + 4 * d / T + 16 * d / T


# ------------------------------------------------------------------ validation
def test_mismatched_updates_raise():
    cache = make_cache(residual_length=4)
    cache.update(rand(5), rand(5), 0)
    with pytest.raises(ValueError, match="do not match"):
        cache.update(rand(1, b=B + 1), rand(1, b=B + 1), 0)
    with pytest.raises(ValueError, match="do not match"):
        cache.update(rand(1, d=2 * D), rand(1, d=2 * D), 0)
    with pytest.raises(ValueError, match="do not match"):
        cache.update(rand(1, h=H + 1), rand(1, h=H + 1), 0)
    with pytest.raises(ValueError, match="float16"):
        cache.update(rand(1, dtype=torch.float16), rand(1, dtype=torch.float16), 0)
    with pytest.raises(ValueError, match="do not match"):
        cache.update(rand(1), rand(1, d=2 * D), 0)
    assert cache.get_seq_length() == 5  # nothing was stored by the failed calls
    # A fresh cache refuses K/V of different shapes, non-float dtypes and unsupported head dims.
    with pytest.raises(ValueError):
        make_cache().update(rand(2), rand(2, d=32), 0)
    with pytest.raises(ValueError, match="float"):
        make_cache().update(torch.ones(1, 1, 2, 64, dtype=torch.long), torch.ones(1, 1, 2, 64, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="head_dim"):
        make_cache().update(rand(2, d=36), rand(2, d=36), 0)


@pytest.mark.parametrize("where", ("key", "value", "inf"))
def test_non_finite_raises(where):
    cache = make_cache(residual_length=0)
    cache.update(rand(4), rand(4), 0)
    k, v = rand(2, seed=1), rand(2, seed=2)
    if where == "key":
        k[0, 1, 1, 3] = float("nan")
    elif where == "value":
        v[1, 0, 0, 0] = float("nan")
    else:
        k[1, 2, 0, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.update(k, v, 0)
    assert cache.get_seq_length() == 4
    # Also for a one-token decode step on the torch backend.
    bad = {"key": (k[:, :, 1:], v[:, :, 1:]), "value": (k[:, :, :1], v[:, :, :1]), "inf": (k[:, :, :1], v[:, :, :1])}
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.update(*bad[where], 0)
    assert cache.get_seq_length() == 4


def test_negative_skip_layers_need_model_config():
    with pytest.raises(ValueError, match="model_config"):
        TurboQuantCache(skip_layers=(-1,))
    with pytest.raises(ValueError, match="model_config"):
        TurboQuantCache("k3v2")  # its preset skips (0, 1, -2, -1)
    # Positive indices work without it.
    cache = TurboQuantCache(skip_layers=(1,), backend="torch")
    for i in range(3):
        cache.update(rand(3), rand(3), i)
    assert [type(layer) for layer in cache.layers] == [TurboQuantLayer, DynamicLayer, TurboQuantLayer]


# ------------------------------------------------------------------ layer types from the model config
def test_model_config_llama_all_turboquant_and_negative_skip():
    cfg = model_config("llama", num_hidden_layers=4)
    cache = TurboQuantCache(model_config=cfg)
    assert [type(layer) for layer in cache.layers] == [TurboQuantLayer] * 4
    cache = TurboQuantCache("k3v2", model_config=cfg)  # skips (0, 1, -2, -1) = all four
    assert [type(layer) for layer in cache.layers] == [DynamicLayer] * 4
    cache = TurboQuantCache(model_config=cfg, skip_layers=(-1, 0))
    assert [type(layer) for layer in cache.layers] == [DynamicLayer, TurboQuantLayer, TurboQuantLayer, DynamicLayer]


def test_model_config_gemma2_sliding_layers_stay_full_precision():
    cfg = model_config("gemma2", num_hidden_layers=4)
    cache = TurboQuantCache(model_config=cfg)
    types = [type(layer) for layer in cache.layers]
    assert types == [DynamicSlidingWindowLayer, TurboQuantLayer, DynamicSlidingWindowLayer, TurboQuantLayer]
    assert all(layer.sliding_window == cfg.sliding_window for layer in cache.layers[::2])
    assert cache.is_sliding == [True, False, True, False]
    cache = TurboQuantCache(model_config=cfg, skip_layers=(-1,))
    assert type(cache.layers[3]) is DynamicLayer and type(cache.layers[1]) is TurboQuantLayer
    # Mask sizes of a sliding layer follow transformers' DynamicSlidingWindowLayer.
    for i in range(4):
        cache.update(rand(30, d=64), rand(30, d=64), i)
    assert cache.get_mask_sizes(1, 0) == (cfg.sliding_window, 30 - cfg.sliding_window + 1)
    assert cache.get_mask_sizes(1, 1) == (31, 0)


def test_model_config_mistral_every_layer_is_sliding():
    # Mistral has a config-wide sliding_window and no layer_types: transformers' DynamicCache makes
    # every layer a sliding-window layer, and so does TurboQuantCache.
    cfg = model_config("mistral", num_hidden_layers=3)
    assert getattr(cfg, "layer_types", None) is None
    cache = TurboQuantCache(model_config=cfg)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer] * 3
    assert all(layer.sliding_window == cfg.sliding_window for layer in cache.layers)
    cache = TurboQuantCache(model_config=cfg, skip_layers=(1,))
    assert type(cache.layers[1]) is DynamicSlidingWindowLayer  # sliding wins: it is full precision anyway
    # Without a window, Mistral layers are full attention and get quantized.
    cache = TurboQuantCache(model_config=model_config("mistral", sliding_window=None))
    assert [type(layer) for layer in cache.layers] == [TurboQuantLayer] * 2


def test_without_model_config_every_layer_is_turboquant():
    cache = TurboQuantCache(backend="torch")
    for i in range(2):
        cache.update(rand(3), rand(3), i)
    assert all(type(layer) is TurboQuantLayer for layer in cache.layers)


def test_repr_and_nbytes_of_mixed_layers():
    cache = TurboQuantCache(skip_layers=(0,), backend="torch", residual_length=0)
    for i in range(2):
        cache.update(rand(8, dtype=torch.bfloat16), rand(8, dtype=torch.bfloat16), i)
    assert "TurboQuantCache" in repr(cache)
    dense_layer = 2 * B * H * 8 * D * 2
    assert cache.dense_nbytes() == 2 * dense_layer
    assert cache.layers[0].keys.numel() * 2 * 2 == dense_layer  # the skipped layer holds bf16 K/V
    assert dense_layer < cache.nbytes() < 2 * dense_layer


def test_workspace_is_keyed_per_device():
    """One workspace per device (multi-GPU with device_map keeps one per GPU); 'cpu' and
    torch.device('cpu') are the same key, and another device gets its own buffers."""
    from tq_hf.workspace import get_workspace, workspaces

    cpu = get_workspace("cpu")
    assert get_workspace(torch.device("cpu")) is cpu
    meta = get_workspace("meta")
    assert meta is not cpu and meta.device.type == "meta"
    buf = meta.get("probe", (4, 8), torch.float32)
    assert buf.device.type == "meta" and buf.shape == (4, 8)
    assert set(workspaces()) >= {torch.device("cpu"), torch.device("meta")}


def test_workspace_views_reused_until_the_buffer_grows():
    """A repeated request returns the same view (no tensor made per call); a request that grows the buffer
    moves every later view to the new buffer."""
    from tq_hf.workspace import Workspace

    ws = Workspace(torch.device("cpu"))
    a = ws.get("x", (2, 3), torch.float32)
    assert ws.get("x", [2, 3], torch.float32) is a
    b = ws.get("x", (3, 2), torch.float32)  # another shape of the same bytes
    assert b.shape == (3, 2) and b.data_ptr() == a.data_ptr() and ws.grow_count == 1
    c = ws.get("x", (100,), torch.float32)  # grows
    again = ws.get("x", (2, 3), torch.float32)
    assert ws.grow_count == 2 and again.data_ptr() == c.data_ptr() != a.data_ptr() and again.shape == (2, 3)
    assert ws.get("x", (2, 3), torch.float16).dtype == torch.float16
    ws.clear()
    assert ws.get("x", (2, 3), torch.float32) is not again


def test_workspace_zeroed_buffers():
    """A zeroed buffer is zero-filled at every allocation, growth included; a name keeps the kind it was made
    with (a counter buffer first made uninitialized would start from garbage)."""
    from tq_hf.workspace import Workspace

    ws = Workspace(torch.device("cpu"))
    assert not ws.get("n", (4,), torch.int32, zeroed=True).any()
    assert not ws.get("n", (1000,), torch.int32, zeroed=True).any()  # grown
    with pytest.raises(ValueError, match="zeroed=True"):
        ws.get("n", (4,), torch.int32)
    ws.get("e", (4,), torch.int32)
    with pytest.raises(ValueError, match="zeroed=False"):
        ws.get("e", (4,), torch.int32, zeroed=True)
