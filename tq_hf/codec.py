"""TurboQuant_mse codec in PyTorch: the executable spec every kernel is tested against.

A vector x of dimension d is stored as b-bit indices into a Lloyd-Max codebook plus one fp32 norm:

    y   = Pi (x / ||x||)                     rotated unit vector; each y_i ~ f_d (Beta-like)
    idx = argmin_j |y_i - c_j|               per coordinate
    x^  = n * Pi^T c[idx]                    n = ||x||  (or ||x|| / ||c[idx]|| with norm correction)

Codes are a little-endian bit stream per vector: code i occupies bits [i*b, i*b + b) of its row,
so a row is exactly d*b/8 bytes (3 bits cost 3 bits). At 3 bits the first 32 * (d // 32) codes are
stored in units of 32 codes (three 32-bit words) instead: code 8w + j of a unit (w < 3) is bits
[4j, 4j + 3) of word w, and bit k of code 24 + j is bit 4j + 3 of word k; after the units come the
remaining codes as a plain 3-bit stream. A word then holds eight codes in nibbles, the form the decode
kernel's byte-permute lookup needs, and the fourth group is put together from the words' spare bits
with a few shifts (`pack_codes`, `_bit_order`).

`TurboQuantizer(..., mode="prod")` is the paper's TurboQuant_prod, offered as a reference *estimator*
of inner products: (b-1)-bit mse codes plus a 1-bit QJL sign sketch of the residual,

    r   = x - x_mse                          x_mse: the (b-1)-bit TurboQuant_mse reconstruction
    qjl = sign(S r),  S ~ N(0, 1)^{d x d}    seeded, independent of Pi; plus ||r|| (fp32)
    <q, x>  ~=  <q, x_mse> + ||r|| * sqrt(pi/2) / d * <S q, qjl>     (unbiased over S)

The cache uses it for keys with `TurboQuantConfig(key_qjl=True)`; on the Triton backend the quantize
kernel writes it and the decode kernel reads it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = [
    "QUANTIZER_MODES",
    "SplitQuantizer",
    "TurboQuantizer",
    "codebook",
    "outlier_channel_count",
    "pack_codes",
    "packed_row_bytes",
    "qjl_matrix",
    "rotation_matrix",
    "unpack_codes",
]

QUANTIZER_MODES = ("mse", "prod")


def _check_dim_bits(dim: int, bits: int) -> None:
    if not isinstance(dim, int) or dim < 8 or dim % 8:
        raise ValueError(f"dim must be a multiple of 8 and >= 8 (head dims 64, 80, 96, 128, 256 ...), got {dim!r}")
    if isinstance(bits, bool) or bits not in range(1, 9):
        raise ValueError(f"bits must be one of [1, 2, 3, 4, 5, 6, 7, 8], got {bits!r}")


@functools.cache
def _codebook_np(dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    # Lloyd-Max on the exact marginal of one coordinate of a uniform unit vector in R^dim,
    # f(x) ∝ (1 - x^2)^((dim-3)/2) on [-1, 1], discretised on a fine grid. Mass beyond 12
    # standard deviations (1/sqrt(dim)) is below 1e-30, so the grid stops there.
    half = min(1.0, 12.0 / math.sqrt(dim))
    x = np.linspace(-half, half, 400_001)
    logw = 0.5 * (dim - 3) * np.log1p(-np.minimum(x * x, 1 - 1e-16))
    w = np.exp(logw - logw.max())
    w /= w.sum()
    cw, cwx = np.concatenate([[0.0], np.cumsum(w)]), np.concatenate([[0.0], np.cumsum(w * x)])
    levels = 1 << bits
    # Start from the high-resolution optimum, point density ∝ f^(1/3) (Panter-Dite): Lloyd then
    # converges in a few hundred iterations at any b. Starting from f's own quantiles stalls on the
    # grid far from the optimum at 7-8 bits (+4-7 % MSE at 8 bits, above the paper's bound).
    cdf = np.cumsum(np.cbrt(w))
    cdf /= cdf[-1]
    c = np.interp((np.arange(levels) + 0.5) / levels, cdf, x)
    for _ in range(10_000):
        bnd = 0.5 * (c[1:] + c[:-1])
        cut = np.concatenate([[0], np.searchsorted(x, bnd), [x.size]])
        mass = cw[cut[1:]] - cw[cut[:-1]]
        new = np.where(mass > 0, (cwx[cut[1:]] - cwx[cut[:-1]]) / np.maximum(mass, 1e-300), c)
        # f is even, so the optimum is symmetric; the grid point at 0 would otherwise tilt it (~3e-5).
        new = 0.5 * (new - new[::-1])
        if np.max(np.abs(new - c)) < 1e-12:
            c = new
            break
        c = new
    return c, 0.5 * (c[1:] + c[:-1])


def codebook(dim: int, bits: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd-Max centroids `[2**bits]` and decision boundaries `[2**bits - 1]` (fp32, sorted) for one
    coordinate of a rotated unit vector of dimension `dim`. Solved once per (dim, bits) and cached."""
    _check_dim_bits(dim, bits)
    c, b = _codebook_np(dim, bits)
    return (torch.tensor(c, dtype=torch.float32, device=device), torch.tensor(b, dtype=torch.float32, device=device))


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.cache
def _rotation_np(dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dim & (dim - 1) == 0:
        # Random sign flips then the normalised Walsh-Hadamard transform: Pi = H diag(s) / sqrt(d).
        signs = rng.choice([-1.0, 1.0], size=dim)
        return _hadamard(dim) * signs[None, :] / math.sqrt(dim)
    # Non-power-of-two head dims (80, 96, ...): a dense Haar-random orthogonal matrix.
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))[None, :]


def rotation_matrix(dim: int, seed: int = 0, device=None) -> torch.Tensor:
    """The random orthogonal rotation Pi `[dim, dim]` (fp32): rotated = x @ Pi.T."""
    _check_dim_bits(dim, 1)
    return torch.tensor(_rotation_np(dim, seed), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _qjl_np(dim: int, seed: int) -> np.ndarray:
    # Its own stream (the seed sequence [seed, "QJL"]), so S is independent of the rotation Pi.
    return np.random.default_rng([seed, 0x514A4C]).standard_normal((dim, dim))


def qjl_matrix(dim: int, seed: int = 0, device=None) -> torch.Tensor:
    """The QJL projection S `[dim, dim]` (fp32, i.i.d. N(0, 1) entries) of TurboQuant_prod:
    sketch = sign(r @ S.T). Seeded; independent of `rotation_matrix(dim, seed)`."""
    _check_dim_bits(dim, 1)
    return torch.tensor(_qjl_np(dim, seed), dtype=torch.float32, device=device)


def packed_row_bytes(dim: int, bits: int) -> int:
    """Bytes one vector's codes take: exactly dim * bits / 8 (dim is a multiple of 8)."""
    return dim * bits // 8


@functools.cache
def _bit_order(dim: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(order, inverse) on `device`, or None where rows are the plain bit stream (every width but 3):
    `order[p]` is the stream index (bits * i + k: bit k of code i) of the bit stored at row bit p, `inverse`
    the other way. At 3 bits, units of 32 codes: code 8w + j (w < 3) at bits 32w + 4j + (0..2) of the unit,
    bit k of code 24 + j at bit 32k + 4j + 3 (module docstring)."""
    if bits != 3 or dim < 32:
        return None
    order = torch.arange(dim * 3)
    for u in range(dim // 32):
        for i in range(32):
            for k in range(3):
                w, j = divmod(i, 8)
                pos = 32 * w + 4 * j + k if w < 3 else 32 * k + 4 * j + 3
                order[96 * u + pos] = 3 * (32 * u + i) + k
    return order.to(device), torch.argsort(order).to(device)


def pack_codes(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes `[..., d]` (values < 2**bits) into uint8 rows `[..., d*bits/8]` (the bit stream;
    3-bit codes in units of 32, module docstring)."""
    d = idx.shape[-1]
    shifts = torch.arange(bits, device=idx.device)
    stream = ((idx.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*idx.shape[:-1], d * bits)
    perm = _bit_order(d, bits, idx.device)
    if perm is not None:
        stream = stream[..., perm[0]]
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=idx.device)
    return (stream.reshape(*idx.shape[:-1], d * bits // 8, 8) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 `[..., dim*bits/8]` -> int64 codes `[..., dim]`."""
    shifts = torch.arange(8, device=packed.device)
    stored = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], dim * bits)
    perm = _bit_order(dim, bits, packed.device)
    stream = stored if perm is None else stored[..., perm[1]]
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32, device=packed.device)
    return (stream.reshape(*packed.shape[:-1], dim, bits) * weights).sum(-1).long()


class TurboQuantizer:
    """TurboQuant for vectors of one dimension: rotation, Lloyd-Max codes, packing; `mode="prod"`
    adds the paper's QJL residual sketch as an unbiased inner-product estimator.

    Args:
        dim: vector dimension (multiple of 8).
        bits: bits per coordinate (1-8). In "prod" mode the total budget b (2-8): b-1 bits of mse
            codes plus 1 bit of QJL sketch per coordinate.
        seed: seed of the rotation (and, in "prod" mode, of the QJL matrix S).
        norm_correction: store ||x|| / ||c[idx]|| so the dequantized vector has exactly ||x||. Off by
            default (the paper's form, which is MSE-optimal: at 1 bit correction raises MSE to ~0.40).
        mode: "mse" (default): TurboQuant_mse. "prod": TurboQuant_prod (the cache uses it for keys
            with `key_qjl=True`; its Triton kernels take `mse_bits` codes plus the sketch planes).

    `quantize(x)` takes `[..., dim]` and returns a dict with `codes` (uint8 `[..., dim*mse_bits/8]`),
    `norms` (fp32 `[...]`) and `dtype`; in "prod" mode also `qjl` (uint8 `[..., dim/8]`: the packed
    signs of S r, bit 1 = positive) and `residual_norms` (fp32 `[...]`: ||r||, r = x - x_mse).
    `dequantize(codes)` gives back `[..., dim]` in x's dtype (in "prod" mode the mse part only).
    `inner_product(q, codes)` estimates <q, x>.
    """

    def __init__(self, dim: int, bits: int, seed: int = 0, norm_correction: bool = False, mode: str = "mse"):
        _check_dim_bits(dim, bits)
        if mode not in QUANTIZER_MODES:
            raise ValueError(f"mode must be one of {list(QUANTIZER_MODES)}, got {mode!r}")
        if mode == "prod" and bits < 2:
            raise ValueError(
                f"mode='prod' needs bits >= 2 (bits - 1 for the mse codes plus 1 for the QJL sketch), got {bits!r}"
            )
        self.dim, self.bits, self.seed, self.norm_correction = dim, bits, seed, norm_correction
        self.mode = mode
        # Bits of the Lloyd-Max codes: all of them for mse, one fewer for prod (the QJL bit).
        self.mse_bits = bits - 1 if mode == "prod" else bits
        self.row_bytes = packed_row_bytes(dim, self.mse_bits)  # bytes of one vector's (mse) codes
        # stored per vector: codes and one fp32 norm (+ in "prod" mode the sketch and the residual norm)
        self.vector_bytes = self.row_bytes + 4 + (dim // 8 + 4 if mode == "prod" else 0)
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._qjl_per_device: dict[torch.device, torch.Tensor] = {}
        self._qjl_rotated_per_device: dict[torch.device, torch.Tensor] = {}

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotation `[d, d]`, centroids `[2**b]`, boundaries `[2**b - 1]`), fp32, cached per device
        (b = `mse_bits`)."""
        device = torch.device(device)
        if device not in self._per_device:
            c, b = codebook(self.dim, self.mse_bits, device)
            self._per_device[device] = (rotation_matrix(self.dim, self.seed, device), c, b)
        return self._per_device[device]

    @property
    def code_layout(self) -> tuple[int, int, int]:
        """(bits of the first code set, bits of the second, byte where the second starts) of a code
        row, as the decode kernel reads it: one set here."""
        return self.mse_bits, self.mse_bits, 0

    def kernel_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotation `[d, d]`, centroids, centroids of the second code set: the same here) for the
        decode kernel."""
        rot, cent, _ = self.tensors(device)
        return rot, cent, cent

    def qjl_tensor(self, device) -> torch.Tensor:
        """The QJL matrix S `[d, d]` (fp32), cached per device ("prod" mode)."""
        device = torch.device(device)
        if device not in self._qjl_per_device:
            self._qjl_per_device[device] = qjl_matrix(self.dim, self.seed, device)
        return self._qjl_per_device[device]

    def qjl_rotated(self, device) -> torch.Tensor:
        """Rot @ S.T `[d, d]` (fp32, cached per device, "prod" mode): a residual r_rot in the rotated space
        (r = r_rot @ Rot) has the sketch sign(r_rot @ (Rot @ S.T)), which is how the quantize kernel
        computes it."""
        device = torch.device(device)
        if device not in self._qjl_rotated_per_device:
            rot, _, _ = self.tensors(device)
            self._qjl_rotated_per_device[device] = (rot.double() @ self.qjl_tensor(device).double().T).float()
        return self._qjl_rotated_per_device[device]

    def indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked codes (int64 `[..., d]`) and stored norms (fp32 `[...]`) of `x` `[..., d]`
        (the mse part in "prod" mode)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        rot, centroids, boundaries = self.tensors(x.device)
        x = x.float()
        norm = x.norm(dim=-1)
        # Zero vectors: any code works, the zero norm makes the dequantized vector exactly zero.
        y = (x / norm.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)) @ rot.T
        idx = torch.bucketize(y, boundaries)
        if self.norm_correction:
            norm = norm / centroids[idx].norm(dim=-1)
        return idx, norm

    def quantize(self, x: torch.Tensor) -> dict:
        idx, norms = self.indices(x)
        out = {"codes": pack_codes(idx, self.mse_bits), "norms": norms, "dtype": x.dtype}
        if self.mode == "prod":
            rot, centroids, _ = self.tensors(x.device)
            residual = x.float() - (centroids[idx] * norms.unsqueeze(-1)) @ rot
            sketch = residual @ self.qjl_tensor(x.device).T
            # sign(0) is taken as +1: any sign is unbiased when the projection is exactly zero.
            out["qjl"] = pack_codes((sketch >= 0).to(torch.int64), 1)
            out["residual_norms"] = residual.norm(dim=-1)
        return out

    def dequantize_rotated(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """n * c[idx] in the rotated space, fp32 `[..., d]` (what the kernels accumulate)."""
        _, centroids, _ = self.tensors(codes.device)
        return centroids[unpack_codes(codes, self.mse_bits, self.dim)] * norms.unsqueeze(-1)

    def dequantize(self, q: dict) -> torch.Tensor:
        """x_mse `[..., d]` in the input's dtype.

        In "prod" mode this is the (bits-1)-bit mse reconstruction only: the QJL term is never added
        back into a dequantized vector. Added back, it gives an unbiased but much noisier key
        (the variance that hurts softmax attention, DESIGN.md section 1); use `inner_product`."""
        rot, _, _ = self.tensors(q["codes"].device)
        return (self.dequantize_rotated(q["codes"], q["norms"]) @ rot).to(q["dtype"])

    def inner_product(self, query: torch.Tensor, q: dict) -> torch.Tensor:
        """Estimate <query, x> from the quantized `q = quantize(x)`, in fp32.

        "prod" mode: <query, x_mse> + ||r|| * sqrt(pi/2) / d * <S query, sign(S r)>, unbiased over
        the random S (Theorem 2 of the paper: for unit x its variance is at most
        sqrt(3) * pi^2 / d * 4^-b * ||query||^2). "mse" mode: <query, x_mse> (biased: E x_mse is a
        shrunk x).

        Args:
            query: `[..., d]`, any float dtype.
            q: the dict `quantize` returned for x `[..., d]`.
        Returns:
            fp32 `[...]`: the leading dims of `query` and of x broadcast against each other, so for
            query and x of one shape the result has shape `query.shape[:-1]`; for all pairs of
            queries `[m, d]` and vectors `[n, d]`, pass `query[:, None]` to get `[m, n]`.
        """
        if query.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(query.shape)}")
        rot, _, _ = self.tensors(q["codes"].device)
        qf = query.float()
        # <query, Pi^T y> = <Pi query, y>: rotate the query once instead of every vector.
        est = ((qf @ rot.T) * self.dequantize_rotated(q["codes"], q["norms"])).sum(-1)
        if self.mode == "prod":
            signs = unpack_codes(q["qjl"], 1, self.dim).float().mul_(2).sub_(1)
            sq = qf @ self.qjl_tensor(q["codes"].device).T
            est = est + q["residual_norms"] * (math.sqrt(math.pi / 2) / self.dim) * (sq * signs).sum(-1)
        return est


def outlier_channel_count(dim: int, fraction: float) -> int:
    """Channels of a `dim`-wide head that get the extra bit at `fraction`: `dim * fraction` rounded
    half up to a multiple of 8 (so each part's codes fill whole bytes), at least 8 on each side."""
    n = 8 * math.floor(dim * fraction / 8 + 0.5)
    if not 8 <= n <= dim - 8:
        raise ValueError(f"outlier_fraction={fraction} leaves {n} of {dim} channels as outliers; each set needs "
                         "at least 8 channels")
    return n


class SplitQuantizer:
    """The paper's mixed-precision scheme: the channels of a vector are split into an outlier set
    and a normal set, and each set is quantized by its own `TurboQuantizer` (own rotation, own
    codebook, own norm), the outlier set with one more bit.

    The caller orders the channels, outliers first (`TurboQuantLayer` chooses them per layer and
    KV head); this class sees `[..., dim]` vectors already in that order.

    Args:
        dim: vector dimension; n_outlier: size of the outlier set (see `outlier_channel_count`);
        bits: bits of the normal set (the outlier set gets bits + 1, at most 8); seed, norm_correction:
            as for `TurboQuantizer` (the normal set's rotation uses seed + 1).

    `quantize(x)` returns `codes` (uint8 `[..., row_bytes]`: the outlier set's packed codes, then the
    normal set's) and `norms` (fp32 `[..., 2]`: outlier, normal); `dequantize` inverts it.
    At d = 128 with 64 outliers, bits 2 is 2.5 bits per coordinate of codes and bits 3 is 3.5
    (32 outliers at bits 2 would be 2.25).
    """

    def __init__(self, dim: int, n_outlier: int, bits: int, seed: int = 0, norm_correction: bool = False):
        if bits + 1 > 8:
            raise ValueError(f"the outlier set takes bits + 1 <= 8 bits, got bits={bits}")
        self.dim, self.n_outlier, self.bits = dim, n_outlier, bits
        self.outlier = TurboQuantizer(n_outlier, bits + 1, seed, norm_correction)
        self.normal = TurboQuantizer(dim - n_outlier, bits, seed + 1, norm_correction)
        self.split_byte = packed_row_bytes(n_outlier, bits + 1)
        self.row_bytes = self.split_byte + packed_row_bytes(dim - n_outlier, bits)
        self.vector_bytes = self.row_bytes + 8  # stored per vector: codes and two fp32 norms
        self.bits_per_coordinate = self.row_bytes * 8 / dim
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def kernel_readable(self) -> bool:
        """Whether the Triton decode kernel reads these codes: half/half splits of a power-of-two
        dim >= 64 (both sets then fill whole, 4-byte aligned tiles)."""
        return self.dim >= 64 and self.dim & (self.dim - 1) == 0 and 2 * self.n_outlier == self.dim

    @property
    def code_layout(self) -> tuple[int, int, int]:
        """(outlier bits, normal bits, byte where the normal set's codes start) of a code row."""
        return self.bits + 1, self.bits, self.split_byte

    def kernel_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block-diagonal rotation `[d, d]` of the two sets, outlier centroids, normal centroids),
        fp32, cached per device, for the decode kernel."""
        device = torch.device(device)
        if device not in self._per_device:
            (ra, ca, _), (rb, cb, _) = self.outlier.tensors(device), self.normal.tensors(device)
            self._per_device[device] = (torch.block_diag(ra, rb), ca, cb)
        return self._per_device[device]

    def quantize(self, x: torch.Tensor) -> dict:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        a = self.outlier.quantize(x[..., : self.n_outlier])
        b = self.normal.quantize(x[..., self.n_outlier :])
        return {"codes": torch.cat([a["codes"], b["codes"]], -1), "norms": torch.stack([a["norms"], b["norms"]], -1),
                "dtype": x.dtype}

    def dequantize(self, q: dict) -> torch.Tensor:
        """`[..., dim]` in the input's dtype, channels in the order they were given."""
        parts = [
            qz.dequantize({"codes": q["codes"][..., sl], "norms": q["norms"][..., i], "dtype": q["dtype"]})
            for i, (qz, sl) in enumerate(((self.outlier, slice(None, self.split_byte)),
                                          (self.normal, slice(self.split_byte, None))))
        ]
        return torch.cat(parts, -1)
