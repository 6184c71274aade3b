"""`TurboQuantCache`: a transformers `Cache` whose layers keep K/V as packed TurboQuant codes.

Per layer, structure-of-arrays storage (B batch, H kv heads, D head dim, C capacity):

    k_codes [B, H, C, D*kb/8] uint8    k_norms [B, H, C] fp32
    v_codes [B, H, C, D*vb/8] uint8    v_norms [B, H, C] fp32
    k_win, v_win [B, H, R, D]  model dtype: the newest tokens, exact (R = residual_length)
    k_mean [H, D] fp32                 channel mean removed from keys before quantizing

With `outlier_fraction > 0` (the 2.5bit / 3.5bit presets) a code row holds two sets of codes
(outlier channels, then the others), the norms planes get a trailing dim of 2, and
`k_perm`, `v_perm` [H, D] int64 give each head's channel order (outliers first).
With `key_qjl`, k_codes hold key_bits - 1 bits and two planes more keep the QJL sketch:
k_qjl [B, H, C, D/8] uint8 (signs of S r) and k_rnorm [B, H, C] fp32 (||r||).

Positions [0, n_quant) live in the codes, [n_quant, n_quant + n_window) in the window. The
capacity C grows geometrically; tokens are written in place (no per-step `torch.cat`).

How attention reads it: `update` tags the tensors it returns with the layer (`_tq_layer`).
The "turboquant" attention function (tq_hf.attention) recognises the tag on the first prefill,
claims the layer, and from then on the layer returns only the new chunk and the attention reads
the packed codes itself. Any other attention implementation never claims the layer, which then
returns dequantized full-precision K/V (correct, slow, warned once).
"""

from __future__ import annotations

import copy
import math
import os
import weakref

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)
from transformers.utils import logging

from .codec import SplitQuantizer, TurboQuantizer, outlier_channel_count, unpack_codes
from .config import DEFAULT_PRESET, TurboQuantConfig

logger = logging.get_logger(__name__)

__all__ = ["TurboQuantCache", "TurboQuantLayer"]

_GROWTH = 1.25  # capacity headroom: O(log n) re-allocations, at most 25 % unused bytes
_ALIGN = 64  # tokens
# Largest |K|, |V| element accepted: beyond it an fp32 norm (<= |x|max * 2 * sqrt(head_dim) with key
# mean-centring) could overflow. 1e36 keeps head dims up to 4096 safe; real activations are < 1e5.
MAX_ABS = 1e36
# Vectors per slice where a whole chunk is processed on PyTorch (the key mean, the outlier channels, the
# reference codec): its fp32 temporaries stay ~tens of MB instead of GBs for a long prefill.
_SLICE_VECTORS = 1 << 16


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton, or use backend='torch'/'auto'."
        )
    return backend


def _exponent(amax: torch.Tensor) -> torch.Tensor:
    """Exponents e (int32, same shape) with amax / 2**e in [0.5, 1); 0 for zeros. Clamped so 2**±e is a
    normal fp32 number."""
    return torch.frexp(amax).exponent.clamp_(-125, 125)


def make_quantizers(config: TurboQuantConfig, head_dim: int):
    """(key quantizer, value quantizer) of a layer of `head_dim`: `TurboQuantizer`s, or
    `SplitQuantizer`s when `config.outlier_fraction` > 0. Raises ValueError for unsupported dims."""
    cfg = config
    if cfg.outlier_fraction:
        n_out = outlier_channel_count(head_dim, cfg.outlier_fraction)
        return (SplitQuantizer(head_dim, n_out, cfg.key_bits, cfg.seed, cfg.norm_correction),
                SplitQuantizer(head_dim, n_out, cfg.value_bits, cfg.seed + 2, cfg.norm_correction))
    return (TurboQuantizer(head_dim, cfg.key_bits, cfg.seed, cfg.norm_correction, "prod" if cfg.key_qjl else "mse"),
            TurboQuantizer(head_dim, cfg.value_bits, cfg.seed + 1, cfg.norm_correction))


def _token_slices(x: torch.Tensor) -> list[slice]:
    """Slices of the token axis of `x` `[B, H, T, D]`, each holding at most `_SLICE_VECTORS` vectors."""
    step = max(1, _SLICE_VECTORS // (x.shape[0] * x.shape[1]))
    return [slice(t0, t0 + step) for t0 in range(0, x.shape[2], step)]


def _outliers_first(x: torch.Tensor, n_outlier: int, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Per head, the channel order `[H, D]` (int64) with the `n_outlier` channels of largest mean
    square over `x - mean` (`x` `[B, H, T, D]`, `mean` `[H, D]` or None) first; each set in ascending
    channel order. Computed a slice of tokens at a time."""
    def part(s):
        xs = x[:, :, s].float()
        return xs - mean[None, :, None, :] if mean is not None else xs

    slices = _token_slices(x)
    # Ranked at a power-of-two scale (exact): squares of |x| > ~1e19 would overflow to inf, of
    # |x| < ~1e-19 underflow to 0, and topk would then pick arbitrary channels.
    e = _exponent(torch.stack([part(s).abs().amax() for s in slices]).amax())
    energy = sum(torch.ldexp(part(s), -e).square().sum(dim=(0, 2)) for s in slices)
    top = energy.topk(n_outlier, dim=-1).indices
    is_out = torch.zeros_like(energy, dtype=torch.bool).scatter_(-1, top, True)
    # a stable sort on "not an outlier" keeps each set in channel order
    return (~is_out).to(torch.int8).argsort(dim=-1, stable=True)


def in_split_order(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """`x` `[B, H, T, D]` in a split layer's channel order `perm` `[H, D]` (outliers first: column c
    is the model's channel `perm[h, c]`). `in_model_order` undoes it."""
    return x.gather(-1, perm[None, :, None, :].expand(x.shape))


def in_model_order(x: torch.Tensor, perm: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`x` `[B, H, T, D]` whose channels are in a split layer's order `perm` `[H, D]` (outliers
    first; `x[..., c]` is channel `perm[h, c]`), back in the model's channel order (into `out` if given)."""
    out = torch.empty_like(x) if out is None else out
    return out.scatter_(-1, perm[None, :, None, :].expand(x.shape), x)


def tagged_layer(t: torch.Tensor):
    """The `TurboQuantLayer` that returned `t` from `update`, or None."""
    return getattr(t, "_tq_layer", None)


class TurboQuantLayer(CacheLayerMixin):
    """One attention layer's TurboQuant cache. See the module docstring for the layout."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, config: TurboQuantConfig | None = None, layer_idx: int | None = None):
        super().__init__()
        self.config = config or TurboQuantConfig.from_preset(DEFAULT_PRESET)
        self.layer_idx = layer_idx
        self.fast_path = False  # claimed by the "turboquant" attention function
        self._awaiting_attention = False
        self._owner = None  # weakref to the attention module that claimed the layer
        self._clear()

    def _clear(self):
        self.n_quant = self.n_window = self.capacity = 0
        self.last_update_len = 0
        self.k_codes = self.k_norms = self.v_codes = self.v_norms = None
        self.k_win = self.v_win = self.k_mean = None
        self.k_perm = self.v_perm = None
        self._k_set_means = None  # split codes: k_mean of each channel set, in the sets' channel order
        self.k_qjl = self.k_rnorm = None
        self.keys = self.values = None
        self.is_initialized = False

    # ------------------------------------------------------------------ set-up
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                f"layer {self.layer_idx}: TurboQuantCache expects key and value states of one shape [batch, kv_heads, "
                f"seq, head_dim]; got {tuple(key_states.shape)} and {tuple(value_states.shape)}. Attention whose keys "
                "and values differ in width, such as multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi-K2), "
                "is not supported: use transformers' DynamicCache for this model"
            )
        if not key_states.is_floating_point() or key_states.dtype != value_states.dtype:
            raise ValueError(
                f"layer {self.layer_idx}: key/value states must share a float dtype, got {key_states.dtype}, "
                f"{value_states.dtype}"
            )
        cfg = self.config
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        try:
            self.key_quantizer, self.value_quantizer = make_quantizers(cfg, self.head_dim)
        except ValueError as e:
            raise ValueError(
                f"layer {self.layer_idx}: TurboQuantCache cannot quantize head_dim={self.head_dim}: {e}"
            ) from None
        # "auto" keeps the reference path for split codes other than half/half at a power-of-two head_dim.
        no_kernel = cfg.outlier_fraction and not self.key_quantizer.kernel_readable
        self.backend = "torch" if no_kernel and cfg.backend == "auto" else _resolve_backend(cfg.backend, self.device)
        if self.backend == "triton" and no_kernel:
            raise ValueError(
                f"layer {self.layer_idx}: backend='triton' reads split codes only for outlier_fraction=0.5 and a "
                f"power-of-two head_dim >= 64 (got {cfg.outlier_fraction}, {self.head_dim}); use backend='auto'"
            )
        shape = (self.batch_size, self.num_heads, cfg.residual_length, self.head_dim)
        if cfg.residual_length:
            self.k_win = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.v_win = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (self.batch_size, self.num_heads, self.head_dim)
        for name, t in (("key", key_states), ("value", value_states)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != expected:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} states of shape {tuple(t.shape)} do not match the cache "
                    f"(batch, kv_heads, head_dim) = {expected}; a cache serves one model and one batch "
                    "(call cache.reset() or make a new cache)"
                )
            if t.dtype != self.dtype:
                raise ValueError(f"layer {self.layer_idx}: {name} states are {t.dtype}, the cache holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} states are on {t.device}, the cache on {self.device}; a cache "
                    "stays on the device of its first update (call cache.reset() or make a new cache)"
                )

    def _check_values(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # A non-finite value would poison its whole code row, one beyond MAX_ABS its fp32 norm: refuse
        # them. On the GPU the check is a host sync, so decode steps skip it there (a NaN then shows in
        # that step's output).
        if (self.backend == "torch" or key_states.shape[2] > 1) and key_states.shape[2] > 0:
            amax = float(torch.maximum(key_states.abs().amax().float(), value_states.abs().amax().float()))
            if not math.isfinite(amax):
                raise ValueError(f"layer {self.layer_idx}: key/value states contain NaN or Inf; not caching them")
            if amax > MAX_ABS:
                raise ValueError(
                    f"layer {self.layer_idx}: key/value states reach |x| = {amax:.3e}; beyond {MAX_ABS:.0e} their "
                    "fp32 norms could overflow; not caching them"
                )

    def _code_sets(self, which: str) -> list:
        """`(quantizer, channel slice, codes [B, H, C, bytes], norms [B, H, C], mean [H, d] or None)` of
        each code set of the keys ("k") or values ("v"): the whole vector, or for split codes the outliers
        then the other channels (slices of the permuted vector), each a plain TurboQuant vector of its own
        quantizer. Keys are centred on `mean`, values are not."""
        qz = self.key_quantizer if which == "k" else self.value_quantizer
        codes, norms = (self.k_codes, self.k_norms) if which == "k" else (self.v_codes, self.v_norms)
        if not self.config.outlier_fraction:
            return [(qz, slice(None), codes, norms, self.k_mean if which == "k" else None)]
        n, sb = qz.n_outlier, qz.split_byte
        means = self._k_set_means if which == "k" else (None, None)
        return [(qz.outlier, slice(None, n), codes[..., :sb], norms[..., 0], means[0]),
                (qz.normal, slice(n, None), codes[..., sb:], norms[..., 1], means[1])]

    # ------------------------------------------------------------------ writing
    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, int(self.capacity * _GROWTH))
        cap = -(-cap // _ALIGN) * _ALIGN if self.capacity else needed
        B, H = self.batch_size, self.num_heads
        kb, vb = self.key_quantizer.row_bytes, self.value_quantizer.row_bytes
        norms = (B, H, cap) + ((2,) if self.config.outlier_fraction else ())  # split codes: 2 norms per vector
        new = {
            "k_codes": torch.empty(B, H, cap, kb, dtype=torch.uint8, device=self.device),
            "v_codes": torch.empty(B, H, cap, vb, dtype=torch.uint8, device=self.device),
            "k_norms": torch.empty(norms, dtype=torch.float32, device=self.device),
            "v_norms": torch.empty(norms, dtype=torch.float32, device=self.device),
        }
        if self.config.key_qjl:
            new["k_qjl"] = torch.empty(B, H, cap, self.head_dim // 8, dtype=torch.uint8, device=self.device)
            new["k_rnorm"] = torch.empty(B, H, cap, dtype=torch.float32, device=self.device)
        for name, buf in new.items():
            old = getattr(self, name)
            if old is not None and self.n_quant:
                buf[:, :, : self.n_quant].copy_(old[:, :, : self.n_quant])
            setattr(self, name, buf)
        self.capacity = cap

    def _quantize_into(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize `k`, `v` `[B, H, T, D]` and write them at positions [n_quant, n_quant + T)."""
        T = k.shape[2]
        if T == 0:
            return
        if self.k_mean is None:
            # Any mean keeps attention exact (shift invariance); the first chunk's is a good one.
            if self.config.key_mean_centering:
                # Summed at a power-of-two scale (exact; the sum cannot overflow), a slice at a time.
                e = _exponent(torch.maximum(k.amax().abs(), k.amin().abs()).float())
                total = sum(torch.ldexp(k[:, :, s].float(), -e).sum(dim=(0, 2)) for s in _token_slices(k))
                self.k_mean = torch.ldexp(total / (k.shape[0] * k.shape[2]), e)
            else:
                self.k_mean = torch.zeros(self.num_heads, self.head_dim, device=self.device)
        if self.config.outlier_fraction and self.k_perm is None:
            self.k_perm = _outliers_first(k, self.key_quantizer.n_outlier, self.k_mean)
            self.v_perm = _outliers_first(v, self.value_quantizer.n_outlier)
            mean, n = self.k_mean.gather(-1, self.k_perm), self.key_quantizer.n_outlier
            self._k_set_means = (mean[:, :n].contiguous(), mean[:, n:].contiguous())
        self._reserve(self.n_quant + T)
        self.write_codes(k, v, self.n_quant)
        self.n_quant += T

    def write_codes(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Quantize `k`, `v` `[B, H, T, D]` into positions [start, start + T) of the code planes (the
        kernels on the Triton backend, else the PyTorch path). No bookkeeping or checks: `update` reserves
        the capacity and calls it (and `bench kernels` times it)."""
        if self.backend == "triton":
            from .kernels import quantize  # the submodule: see attention.py's decode call

            for x, which, perm in ((k, "k", self.k_perm), (v, "v", self.v_perm)):
                if perm is not None:  # split codes: the sets are channel ranges of the permuted vector
                    x = in_split_order(x, perm)
                qjl = (self.k_qjl, self.k_rnorm) if which == "k" and self.config.key_qjl else None
                for qz, ch, codes, norms, mean in self._code_sets(which):
                    quantize.quantize_pack(x[..., ch], qz, codes, norms, start, mean=mean, qjl=qjl)
        else:
            # The reference codec's temporaries take ~KBs per vector (one-hot bit streams, distances to
            # every centroid): a long prefill is quantized a slice of tokens at a time.
            for s in _token_slices(k):
                self._quantize_slice(k[:, :, s], v[:, :, s], start + s.start)

    def _quantize_slice(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """PyTorch path: quantize `k`, `v` `[B, H, T, D]` into positions [start, start + T) of the planes."""
        s = slice(start, start + k.shape[2])
        for x, qz, codes, norms, mean, perm in (
            (k, self.key_quantizer, self.k_codes, self.k_norms, self.k_mean, self.k_perm),
            (v, self.value_quantizer, self.v_codes, self.v_norms, None, self.v_perm),
        ):
            x = x.float() - mean[None, :, None, :] if mean is not None else x.float()
            if perm is not None:
                x = in_split_order(x, perm)
            # ||x|| in fp32 overflows once |x_i| passes ~1e19 (and underflows below ~1e-19). Scaling
            # each vector by a power of two first is exact: ordinary vectors get the same codes and
            # norm bits, huge and tiny ones stay finite.
            e = _exponent(x.abs().amax(dim=-1, keepdim=True))
            q = qz.quantize(torch.ldexp(x, -e))
            codes[:, :, s] = q["codes"]
            # split codes keep two norms per vector, [..., 2]: e [..., 1] broadcasts over them
            norms[:, :, s] = torch.ldexp(q["norms"], e if q["norms"].dim() == e.dim() else e.squeeze(-1))
            if "qjl" in q:  # key_qjl: the residual's sketch and norm (the residual scales with x)
                self.k_qjl[:, :, s] = q["qjl"]
                self.k_rnorm[:, :, s] = torch.ldexp(q["residual_norms"], e.squeeze(-1))

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        R, W, T = self.config.residual_length, self.n_window, k.shape[2]
        if W + T < R:
            self.k_win[:, :, W : W + T] = k
            self.v_win[:, :, W : W + T] = v
            self.n_window = W + T
            return
        # The window would reach R tokens: quantize it and the new chunk, oldest first.
        if W and W + T == R:
            # The new tokens complete the window (decode's flush, T = 1): one quantize launch per K/V for all
            # R tokens instead of one for the window and one for the new token (each launch costs ~12 us of
            # device time even for a single token on an H200: `bench kernels`' quant column, K + V).
            self.k_win[:, :, W:] = k
            self.v_win[:, :, W:] = v
            k, v = self.k_win, self.v_win
        elif W:
            self._quantize_into(self.k_win[:, :, :W], self.v_win[:, :, :W])
        self._quantize_into(k, v)
        self.n_window = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `key_states`/`value_states` `[B, H, T, D]`; return what attention should read.

        Returns the new chunk itself (tagged with this layer) on the first prefill and on the fast
        path; otherwise dequantized history + window + chunk `[B, H, seq, D]` in the model dtype.
        """
        fresh = not self.is_initialized
        if fresh:
            self.lazy_initialization(key_states, value_states)
        try:
            self._check(key_states, value_states)
            self._check_values(key_states, value_states)
        except ValueError:
            if fresh:  # a refused first update leaves no buffers and no shape behind
                self._clear()
            raise
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            # The model that claimed the layer may switch attention implementations between steps: another one
            # needs the full K/V from this update on (it would otherwise get the bare new chunk), "turboquant"
            # reads the codes again.
            impl = getattr(getattr(owner, "config", None), "_attn_implementation", "turboquant")
            self.fast_path = impl == "turboquant"
            self._awaiting_attention = False
        if self.fast_path and self._awaiting_attention:
            raise RuntimeError(
                f"layer {self.layer_idx} of this TurboQuantCache is read by the 'turboquant' attention, but its "
                "last update was not: the attention implementation changed under the cache. Keep "
                "attn_implementation='turboquant' or start a new cache."
            )
        first = self.get_seq_length() == 0
        self._append(key_states, value_states)
        self.last_update_len = key_states.shape[2]
        self._refresh_views()
        if first or self.fast_path:
            self._awaiting_attention = self.fast_path
            key_states._tq_layer = self
            value_states._tq_layer = self
            return key_states, value_states
        logger.warning_once(
            "TurboQuantCache is used with an attention implementation other than 'turboquant': every step "
            "dequantizes the whole cache (correct but slow). Load the model with attn_implementation='turboquant'."
        )
        n = self.get_seq_length()
        return self.dequantize_range(0, n)

    def claim(self, module: torch.nn.Module | None = None) -> None:
        """Called by the "turboquant" attention: from now on it reads this layer's codes itself.

        `module` is the attention module reading the layer. A layer serves one module until `reset()`:
        another module (a second model reusing the cache) raises instead of reading foreign keys. KV-shared
        layers (Gemma 3n / 4: `is_kv_shared_layer`) attend over the keys and values an earlier layer
        stored: they read the layer without owning it."""
        if module is not None and not getattr(module, "is_kv_shared_layer", False):
            if self._owner is None:
                self._owner = weakref.ref(module)
            elif self._owner() is not module:
                raise RuntimeError(
                    f"layer {self.layer_idx} of this TurboQuantCache holds keys and values written for another "
                    f"attention module than this {type(module).__name__}: a cache serves one model. Call "
                    "cache.reset() or make a new cache for each model."
                )
        self.fast_path = True
        self._awaiting_attention = False

    def _refresh_views(self) -> None:
        # `keys`/`values` expose the exact window, as transformers' layers expose their tensors.
        if self.k_win is not None:
            self.keys, self.values = self.k_win[:, :, : self.n_window], self.v_win[:, :, : self.n_window]

    # ------------------------------------------------------------------ reading
    def dequantize_range(self, start: int, end: int, out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Full-precision K, V `[B, H, end - start, D]` (model dtype) of positions [start, end)."""
        if not 0 <= start <= end <= self.get_seq_length():
            raise ValueError(f"range [{start}, {end}) is outside the cached {self.get_seq_length()} tokens")
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        if out is None:
            out = tuple(torch.empty(B, H, end - start, D, dtype=self.dtype, device=self.device) for _ in range(2))
        k_out, v_out = out
        q_end = min(end, self.n_quant)
        if start < q_end:
            n = q_end - start
            if self.backend == "triton":
                from .kernels import dequantize

                for which, dst, perm in (("k", k_out[:, :, :n], self.k_perm), ("v", v_out[:, :, :n], self.v_perm)):
                    tmp = dst if perm is None else torch.empty_like(dst)  # split codes: permuted channels
                    for qz, ch, codes, norms, mean in self._code_sets(which):
                        dequantize(codes, norms, qz, start, tmp[..., ch], mean=mean)
                    if perm is not None:
                        in_model_order(tmp, perm, out=dst)
            else:
                s = slice(start, q_end)
                k = self.key_quantizer.dequantize(
                    {"codes": self.k_codes[:, :, s], "norms": self.k_norms[:, :, s], "dtype": torch.float32})
                v = self.value_quantizer.dequantize(
                    {"codes": self.v_codes[:, :, s], "norms": self.v_norms[:, :, s], "dtype": torch.float32})
                if self.k_perm is not None:
                    k, v = in_model_order(k, self.k_perm), in_model_order(v, self.v_perm)
                k_out[:, :, :n] = k.add_(self.k_mean[None, :, None, :])
                v_out[:, :, :n] = v
        w0, w1 = max(start, self.n_quant) - self.n_quant, end - self.n_quant
        if w1 > w0:
            k_out[:, :, w0 + self.n_quant - start :] = self.k_win[:, :, w0:w1]
            v_out[:, :, w0 + self.n_quant - start :] = self.v_win[:, :, w0:w1]
        return k_out, v_out

    def qjl_scores(self, query: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """With `key_qjl`: the QJL estimate of <q, r> (r = k - k_mse, the residual the codes miss) for
        quantized positions [start, end), unscaled fp32 `[B, Hkv, G, q, end - start]`, from `query`
        `[B, Hkv, G, q, D]`: ||r|| sqrt(pi/2) / D <S q, sign(S r)> (unbiased, TurboQuant_prod)."""
        if not 0 <= start <= end <= self.n_quant:
            raise ValueError(f"range [{start}, {end}) is outside the {self.n_quant} quantized tokens")
        S = self.key_quantizer.qjl_tensor(self.device)
        signs = unpack_codes(self.k_qjl[:, :, start:end], 1, self.head_dim).float().mul_(2).sub_(1)
        est = torch.einsum("bhgqd,bhnd->bhgqn", query.float() @ S.T, signs)
        return est * (self.k_rnorm[:, :, None, None, start:end] * (math.sqrt(math.pi / 2) / self.head_dim))

    # ------------------------------------------------------------------ Cache API
    def get_seq_length(self) -> int:
        return self.n_quant + self.n_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop every stored token (buffers are freed; the next update starts a new sequence)."""
        self._clear()
        # The new sequence may run under another attention implementation (or model): it claims anew.
        self.fast_path = False
        self._awaiting_attention = False
        self._owner = None

    def crop(self, tokens_to_remove: int) -> None:
        """Remove `-tokens_to_remove` newest tokens (negative argument), or keep the first
        `tokens_to_remove` tokens (positive, the legacy form transformers 5.17 still uses)."""
        # transformers 5.17's assisted decoding passes 0-d tensors: keep the lengths Python ints.
        tokens_to_remove = int(tokens_to_remove)
        n = self.get_seq_length()
        if tokens_to_remove > 0:
            new_len = min(tokens_to_remove, n)
        else:
            if -tokens_to_remove > n:
                raise ValueError(f"cannot remove {-tokens_to_remove} tokens from a cache holding {n}")
            new_len = n + tokens_to_remove
        if new_len >= self.n_quant:
            self.n_window = new_len - self.n_quant
        else:
            # Quantized tokens cannot go back to the window: what remains stays quantized.
            self.n_quant, self.n_window = new_len, 0
        self._refresh_views()

    def _index_batch(self, fn) -> None:
        for name in ("k_codes", "k_norms", "v_codes", "v_norms", "k_win", "v_win", "k_qjl", "k_rnorm"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        # From the index itself: a layer may hold no buffer yet (no window, nothing quantized).
        self.batch_size = fn(torch.empty(self.batch_size, 0, device=self.device)).shape[0]
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._index_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def offload(self):
        raise NotImplementedError("TurboQuantCache does not offload to CPU: its point is to fit on the GPU")

    def prefetch(self):
        pass

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (allocated capacity included)."""
        names = ("k_codes", "k_norms", "v_codes", "v_norms", "k_win", "v_win", "k_mean", "k_perm", "v_perm", "k_qjl",
                 "k_rnorm")
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in names) if t is not None)

    def dense_nbytes(self) -> int:
        """Bytes a bf16 DynamicCache layer would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        return 2 * self.batch_size * self.num_heads * self.get_seq_length() * self.head_dim * 2

    def __getstate__(self):
        # torch.save / pickle: the weak reference to the owning module cannot be pickled; a loaded layer is
        # claimed again by the first attention module that reads it.
        return {**self.__dict__, "_owner": None}

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, copy.deepcopy(v, memo))
        new._refresh_views()
        return new


def _dense_nbytes(layer) -> int:
    if isinstance(layer, TurboQuantLayer):
        return layer.dense_nbytes()
    if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
        return 0
    return 2 * layer.keys.numel() * 2


def _layer_nbytes(layer) -> int:
    if isinstance(layer, TurboQuantLayer):
        return layer.nbytes()
    tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
    for states in ("conv_states", "recurrent_states"):  # linear-attention layers
        tensors += list((getattr(layer, states, None) or {}).values())
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class TurboQuantCache(Cache):
    """A KV cache that stores keys and values as TurboQuant codes (arXiv 2504.19874).

    Args:
        config: a `TurboQuantConfig`, a preset name (see `tq_hf.config.PRESETS`), or None for the
            default preset. Keyword overrides (`key_bits=3`, `residual_length=128`, ...) apply on top.
        model_config: optional model config. With it the cache starts from the layers transformers'
            `DynamicCache(config=model_config)` would build and replaces only its plain full-attention
            layers (`DynamicLayer`) by TurboQuant layers. Sliding-window layers stay full precision
            (`DynamicSlidingWindowLayer`), linear-attention / convolution layers (Qwen3-Next, LFM2, ...)
            and layers without a cache of their own keep transformers' layer, and negative `skip_layers`
            resolve against the layer count. Without it every layer is a TurboQuant layer, which stays
            correct for sliding-window models (the mask hides old tokens); models with linear-attention
            layers then need `model_config`.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="turboquant")
        >>> out = model.generate(**inputs, past_key_values=TurboQuantCache(), max_new_tokens=64)
    """

    def __init__(self, config: TurboQuantConfig | str | None = None, *, model_config=None, **overrides):
        if config is None:
            config = TurboQuantConfig.from_preset(DEFAULT_PRESET)
        elif isinstance(config, str):
            config = TurboQuantConfig.from_preset(config)
        elif not isinstance(config, TurboQuantConfig):
            raise TypeError(f"config must be a TurboQuantConfig or a preset name, got {type(config).__name__}")
        self.config = config.replace(**overrides) if overrides else config
        self._num_layers = None
        layers = []
        self._model_config = model_config
        if model_config is not None:
            self._num_layers = n = model_config.get_text_config(decoder=True).num_hidden_layers
            if any(not -n <= i < n for i in self.config.skip_layers):
                raise ValueError(f"skip_layers={self.config.skip_layers}: this model has {n} layers (-{n} to {n - 1})")
            # transformers' own choice per layer (full, sliding/chunked, linear attention, shared KV, ...).
            reference = DynamicCache(config=model_config).layers
            layers = [self._from_reference(i, layer) for i, layer in enumerate(reference)]
            kept = sorted({type(layer).__name__ for layer in layers if isinstance(layer, CacheLayerMixin)
                           and type(layer) not in (TurboQuantLayer, DynamicLayer, DynamicSlidingWindowLayer)})
            if kept:
                logger.warning_once(
                    f"TurboQuantCache keeps the keys and values of this model's {', '.join(kept)} layers in full "
                    "precision (transformers' own layers); only full-attention layers are quantized."
                )
        elif any(i < 0 for i in self.config.skip_layers):
            raise ValueError(
                f"skip_layers={self.config.skip_layers} counts from the end: pass model_config=model.config so "
                "the number of layers is known"
            )
        super().__init__(layers=layers)

    def _skipped(self, idx: int) -> bool:
        return idx in {i % self._num_layers if self._num_layers else i for i in self.config.skip_layers}

    def _from_reference(self, idx: int, layer):
        if type(layer) is DynamicLayer:  # plain full attention: the layers TurboQuant compresses
            return DynamicLayer() if self._skipped(idx) else TurboQuantLayer(self.config, layer_idx=idx)
        return layer

    def _new_layer(self, idx: int):
        if self._num_layers is not None:
            raise ValueError(
                f"layer_idx={idx}, but this TurboQuantCache was built for a model of {self._num_layers} layers "
                "(model_config): a cache serves one model. Make a new cache for this model."
            )
        return DynamicLayer() if self._skipped(idx) else TurboQuantLayer(self.config, layer_idx=idx)

    def reset(self) -> None:
        """Empty every layer: the cache is then as good as a new one. transformers' own layers (skipped
        layers, sliding-window or linear-attention layers kept from `model_config`) are rebuilt, as 5.17's
        `DynamicLayer.reset()` zeroes its tensors but keeps their length."""
        fresh = DynamicCache(config=self._model_config).layers if self._model_config is not None else None
        for i, layer in enumerate(self.layers):
            if isinstance(layer, TurboQuantLayer):
                layer.reset()
            else:
                self.layers[i] = self._from_reference(i, fresh[i]) if fresh is not None else DynamicLayer()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def _require_linear_layer(self, layer_idx: int, what: str) -> None:
        if layer_idx >= len(self.layers) or not isinstance(self.layers[layer_idx], LinearAttentionCacheLayerMixin):
            raise ValueError(
                f"layer {layer_idx} called {what}: it is a linear-attention / convolution (state-space) layer, which "
                "has no per-token keys and values. Build the cache with TurboQuantCache(..., "
                "model_config=model.config): such layers then keep transformers' own state and only the "
                "attention layers are quantized."
            )

    def get_conv_state(self, layer_idx: int, *args, **kwargs):
        self._require_linear_layer(layer_idx, "get_conv_state")
        return super().get_conv_state(layer_idx, *args, **kwargs)

    def get_recurrent_state(self, layer_idx: int, *args, **kwargs):
        self._require_linear_layer(layer_idx, "get_recurrent_state")
        return super().get_recurrent_state(layer_idx, *args, **kwargs)

    def update_conv_state(self, conv_states, layer_idx: int, *args, **kwargs):
        self._require_linear_layer(layer_idx, "update_conv_state")
        return super().update_conv_state(conv_states, layer_idx, *args, **kwargs)

    def update_recurrent_state(self, recurrent_states, layer_idx: int, *args, **kwargs):
        self._require_linear_layer(layer_idx, "update_recurrent_state")
        return super().update_recurrent_state(recurrent_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds right now (codes, norms, window, means)."""
        return sum(_layer_nbytes(layer) for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a bf16 `DynamicCache` would hold for the same tokens."""
        return sum(_dense_nbytes(layer) for layer in self.layers)

    def __repr__(self):
        return f"TurboQuantCache(config={self.config}, layers={len(self.layers)})"
