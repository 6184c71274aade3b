"""Property test (hypothesis, stateful): one TurboQuantLayer against a dense reference model of it.

Random sequences of update (0-6 tokens) / crop (negative, positive legacy, beyond the length) /
reorder_cache / batch_select_indices / batch_repeat_interleave / reset, over random presets-like configs
(bits 1-8, window 0-5, key mean-centring on/off, head dims 16/24/64 - 24 takes the dense rotation), in fp32
and bf16. The reference keeps every token in full precision and applies the documented window rule itself:
the window fills to `residual_length` tokens, then the window and the new chunk are quantized (separately,
oldest first) with `TurboQuantizer` directly; the key mean is the first quantized group's; a crop into the
codes leaves what remains quantized. After every step:

* `get_seq_length()`, `n_quant`, `n_window` equal the reference's;
* window tokens read back bit-exact; quantized tokens read back as quantizing them directly gives
  (codes and norms bit-exact, dequantized values to matmul rounding);
* any sub-range `dequantize_range(a, b)` equals the same slice of the full read-out.

TQ_PROPERTY_EXAMPLES raises the number of generated programs (default 40, derandomized for CI).
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tq_hf import TurboQuantConfig, TurboQuantizer, TurboQuantLayer

H = 2
EXAMPLES = int(os.environ.get("TQ_PROPERTY_EXAMPLES", "40"))


class DenseReference:
    """Every token in full precision plus, for quantized ones, what TurboQuantizer makes of them."""

    def __init__(self, cfg: TurboQuantConfig, dim: int, dtype):
        self.cfg, self.dim, self.dtype = cfg, dim, dtype
        self.kq = TurboQuantizer(dim, cfg.key_bits, cfg.seed, cfg.norm_correction)
        self.vq = TurboQuantizer(dim, cfg.value_bits, cfg.seed + 1, cfg.norm_correction)
        self.reset()

    def reset(self):
        self.k = self.v = None  # [B, H, N, D] model dtype: exact (window) or dequantized (codes) values
        self.kc = self.vc = self.kn = self.vn = None  # codes / norms of the n_quant quantized tokens
        self.n_quant = self.n_window = 0
        self.mean = None

    @property
    def length(self):
        return self.n_quant + self.n_window

    def _quantize(self, k, v):
        if k.shape[2] == 0:
            return
        if self.mean is None:
            self.mean = k.float().mean(dim=(0, 2)) if self.cfg.key_mean_centering else torch.zeros(H, self.dim)
        qk = self.kq.quantize(k.float() - self.mean[None, :, None, :])
        qv = self.vq.quantize(v.float())
        qk["dtype"] = qv["dtype"] = torch.float32
        khat = (self.kq.dequantize(qk) + self.mean[None, :, None, :]).to(self.dtype)
        vhat = self.vq.dequantize(qv).to(self.dtype)
        cat = lambda a, b: b if a is None else torch.cat([a, b], 2)
        self.kc, self.vc = cat(self.kc, qk["codes"]), cat(self.vc, qv["codes"])
        self.kn, self.vn = cat(self.kn, qk["norms"]), cat(self.vn, qv["norms"])
        n = self.n_quant
        self.k = torch.cat([self.k[:, :, :n], khat], 2)
        self.v = torch.cat([self.v[:, :, :n], vhat], 2)
        self.n_quant += k.shape[2]

    def update(self, k, v):
        if self.k is None:
            self.k, self.v = k[:, :, :0], v[:, :, :0]
        R, W, T = self.cfg.residual_length, self.n_window, k.shape[2]
        if W + T < R:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.n_window += T
            return
        # The window reaches R: quantize it (its exact values), then the chunk, as two groups.
        self._quantize(self.k[:, :, self.n_quant :], self.v[:, :, self.n_quant :])
        self._quantize(k, v)
        self.n_window = 0

    def crop(self, n):
        if n > 0:
            new = min(n, self.length)
        else:
            new = self.length + n
        if new >= self.n_quant:
            self.n_window = new - self.n_quant
        else:
            self.n_quant, self.n_window = new, 0
        self.k, self.v = self.k[:, :, :new], self.v[:, :, :new]
        if self.kc is not None:
            self.kc, self.vc = self.kc[:, :, : self.n_quant], self.vc[:, :, : self.n_quant]
            self.kn, self.vn = self.kn[:, :, : self.n_quant], self.vn[:, :, : self.n_quant]

    def index_batch(self, fn):
        for name in ("k", "v", "kc", "vc", "kn", "vn"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


class LayerMachine(RuleBasedStateMachine):
    @initialize(
        key_bits=st.integers(1, 8), value_bits=st.integers(1, 8), R=st.integers(0, 5), mc=st.booleans(),
        dim=st.sampled_from((16, 24, 64)), dtype=st.sampled_from((torch.float32, torch.bfloat16)),
        batch=st.integers(1, 3),
    )
    def setup(self, key_bits, value_bits, R, mc, dim, dtype, batch):
        self.cfg = TurboQuantConfig(key_bits=key_bits, value_bits=value_bits, residual_length=R,
                                    key_mean_centering=mc, backend="torch", seed=5)
        self.dim, self.dtype, self.batch = dim, dtype, batch
        self.layer = TurboQuantLayer(self.cfg, layer_idx=0)
        self.ref = DenseReference(self.cfg, dim, dtype)
        self.gen = torch.Generator().manual_seed(key_bits * 1000 + value_bits * 100 + R * 10 + dim)

    def _rand(self, T):
        bias = torch.linspace(-2, 2, self.dim)  # a channel bias, what mean-centring is for
        return (torch.randn(self.batch, H, T, self.dim, generator=self.gen) + bias).to(self.dtype)

    @rule(T=st.integers(0, 6))
    def update(self, T):
        k, v = self._rand(T), self._rand(T)
        self.layer.update(k, v)
        self.ref.update(k, v)

    @precondition(lambda self: self.ref.length > 0)
    @rule(data=st.data())
    def crop_negative(self, data):
        n = data.draw(st.integers(0, self.ref.length + 1))
        if n > self.ref.length:
            with pytest.raises(ValueError, match="cannot remove"):
                self.layer.crop(-n)
            return
        self.layer.crop(-n)
        self.ref.crop(-n)

    @precondition(lambda self: self.ref.length > 0)
    @rule(data=st.data())
    def crop_legacy_positive(self, data):
        n = data.draw(st.integers(1, self.ref.length + 2))
        self.layer.crop(n)
        self.ref.crop(n)

    @precondition(lambda self: self.ref.k is not None)
    @rule(data=st.data())
    def reorder(self, data):
        idx = torch.tensor(data.draw(st.lists(st.integers(0, self.batch - 1), min_size=self.batch,
                                              max_size=self.batch)))
        self.layer.reorder_cache(idx)
        self.ref.index_batch(lambda t: t.index_select(0, idx))

    @precondition(lambda self: self.ref.k is not None)
    @rule(data=st.data())
    def select(self, data):
        idx = torch.tensor(data.draw(st.lists(st.integers(0, self.batch - 1), min_size=1, max_size=3)))
        self.layer.batch_select_indices(idx)
        self.ref.index_batch(lambda t: t[idx])
        self.batch = len(idx)

    @precondition(lambda self: self.ref.k is not None and self.batch <= 2)
    @rule()
    def repeat(self):
        self.layer.batch_repeat_interleave(2)
        self.ref.index_batch(lambda t: t.repeat_interleave(2, dim=0))
        self.batch *= 2

    @rule(batch=st.integers(1, 3))
    def reset(self, batch):
        self.layer.reset()
        self.ref.reset()
        self.batch = batch  # a new sequence may have another batch size
        assert self.layer.nbytes() == 0

    @invariant()
    def matches_reference(self):
        if not hasattr(self, "layer"):
            return
        layer, ref = self.layer, self.ref
        assert layer.get_seq_length() == ref.length
        assert (layer.n_quant, layer.n_window) == (ref.n_quant, ref.n_window)
        assert type(layer.n_quant) is int and type(layer.n_window) is int
        n, q = ref.length, ref.n_quant
        if n == 0:
            return
        kk, vv = layer.dequantize_range(0, n)
        assert kk.shape == ref.k.shape and kk.dtype == self.dtype
        # Window tokens: bit-exact.
        assert torch.equal(kk[:, :, q:], ref.k[:, :, q:]) and torch.equal(vv[:, :, q:], ref.v[:, :, q:])
        if q:
            # Quantized tokens: the codes and norms TurboQuantizer gives for them, bit for bit ...
            assert torch.equal(layer.k_codes[:, :, :q], ref.kc) and torch.equal(layer.v_codes[:, :, :q], ref.vc)
            assert torch.equal(layer.k_norms[:, :, :q], ref.kn) and torch.equal(layer.v_norms[:, :, :q], ref.vn)
            # ... and their dequantization, to matmul rounding (one bf16 ulp in bf16).
            tol = {"rtol": 1e-5, "atol": 1e-5} if self.dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
            torch.testing.assert_close(kk[:, :, :q], ref.k[:, :, :q], **tol)
            torch.testing.assert_close(vv[:, :, :q], ref.v[:, :, :q], **tol)
        # A sub-range reads the same values as the whole.
        a, b = n // 3, n - n // 4
        ks, vs = layer.dequantize_range(a, b)
        torch.testing.assert_close(ks, kk[:, :, a:b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vs, vv[:, :, a:b], rtol=1e-5, atol=1e-5)


LayerMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=25, deadline=None,
                                          derandomize=True, database=None)
TestTurboQuantLayerAgainstDenseReference = LayerMachine.TestCase
