"""TurboQuant cache configuration: a frozen dataclass plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
VALID_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class TurboQuantConfig:
    """How a `TurboQuantCache` compresses keys and values.

    Args:
        key_bits / value_bits: bits per coordinate of the Lloyd-Max codes (1-8).
        residual_length: newest tokens kept in full precision (KIVI-style window). The window
            fills up to `residual_length` tokens and is then quantized as a whole, so between 0 and
            `residual_length - 1` of the newest tokens are exact at any time. 0 quantizes at once.
        key_mean_centering: subtract a per-(layer, kv-head) channel mean from keys before
            quantizing. Softmax is shift-invariant per query, so attention is unchanged while the
            channel bias (Qwen-style keys) no longer eats the codebook's range.
        norm_correction: store ||x|| / ||c[idx]|| instead of ||x|| so dequantized vectors keep
            their exact norm.
        skip_layers: indices of layers kept in full precision (negative counts from the end; they
            are resolved once the model's layer count is known).
        seed: seed of the random rotation and of nothing else.
        outlier_fraction: the paper's mixed precision. 0 (default): every channel gets key_bits /
            value_bits. Otherwise this fraction of each head's channels (rounded to a multiple of 8)
            are outliers: the channels of largest mean square in the first quantized chunk, chosen
            per layer and KV head, separately for keys (after mean-centring) and values. Outliers
            and the other channels are quantized as two vectors (own rotation, codebook and norm),
            the outliers with one more bit. On CUDA (`backend="auto"`) the Triton kernels quantize and
            decode half/half splits of a power-of-two head dim >= 64; other splits take the PyTorch
            path.
        key_qjl: TurboQuant_prod for keys (opt-in): key_bits - 1 bits of Lloyd-Max codes plus a 1-bit
            QJL sign sketch of the residual and the residual's norm, and the "turboquant" attention adds
            the sketch's unbiased estimate of <q, residual> to every score of a quantized key (never to
            a dequantized key). Unbiased scores, more variance than key_bits of mse codes. Quantized and
            decoded by the Triton kernels on the Triton backend (`backend="auto"` on CUDA).
            Other attention implementations and `output_attentions` see the mse keys alone.
        backend: "auto" (Triton on CUDA tensors, PyTorch reference elsewhere), "torch" or "triton".
    """

    key_bits: int = 4
    value_bits: int = 4
    residual_length: int = 64
    key_mean_centering: bool = True
    norm_correction: bool = True
    skip_layers: tuple[int, ...] = ()
    seed: int = 0
    outlier_fraction: float = 0.0
    key_qjl: bool = False
    backend: str = "auto"

    def __post_init__(self):
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if type(bits) is not int or bits not in VALID_BITS:  # not 4.0 or True
                raise ValueError(f"{name}={bits!r} is not supported; valid values are {list(VALID_BITS)}")
        if isinstance(self.residual_length, bool) or not isinstance(self.residual_length, int) or (
            self.residual_length < 0
        ):
            raise ValueError(f"residual_length must be an int >= 0, got {self.residual_length!r}")
        if isinstance(self.outlier_fraction, bool) or not isinstance(self.outlier_fraction, (int, float)) or not (
            0 <= self.outlier_fraction < 1
        ):
            raise ValueError(f"outlier_fraction must be a number in [0, 1), got {self.outlier_fraction!r}")
        if self.outlier_fraction and max(self.key_bits, self.value_bits) == 8:
            raise ValueError("outlier channels take one more bit than the others: key_bits and value_bits must be "
                             "<= 7 with outlier_fraction > 0")
        for name in ("key_mean_centering", "norm_correction", "key_qjl"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if type(self.seed) is not int or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.key_qjl and (self.key_bits < 2 or self.outlier_fraction):
            raise ValueError("key_qjl needs key_bits >= 2 (one bit is the QJL sketch) and no outlier_fraction; got "
                             f"key_bits={self.key_bits}, outlier_fraction={self.outlier_fraction}")
        if self.backend not in VALID_BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not valid; choose one of {list(VALID_BACKENDS)}")
        if not isinstance(self.skip_layers, (tuple, list)) or not all(type(i) is int for i in self.skip_layers):
            raise ValueError(f"skip_layers must be a tuple of ints, got {self.skip_layers!r}")
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TurboQuantConfig:
        """The named preset, with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> TurboQuantConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, TurboQuantConfig] = {
    # 4-bit keys and values: the default; 136 B per token and head at d=128 (bf16: 512 B).
    "4bit": TurboQuantConfig(key_bits=4, value_bits=4),
    # Keys carry the softmax's sharpness, values average out: spend the bits on keys.
    "k4v3": TurboQuantConfig(key_bits=4, value_bits=3),
    "3bit": TurboQuantConfig(key_bits=3, value_bits=3),
    # Aggressive: protect the first and last two layers as vLLM does.
    "k3v2": TurboQuantConfig(key_bits=3, value_bits=2, skip_layers=(0, 1, -2, -1)),
    # The paper's mixed precision (see `outlier_fraction`): the half of each head's channels with the
    # largest mean square at 3 bits, the other half at 2: 2.5 bits per coordinate of codes (64 x 3 +
    # 64 x 2 at d=128), plus two fp32 norms per vector: 96 B per token and head.
    "2.5bit": TurboQuantConfig(key_bits=2, value_bits=2, outlier_fraction=0.5),
    # Half at 4 bits, half at 3: 3.5 bits per coordinate, 128 B per token and head (the second norm
    # costs 8 B, so it is barely smaller than 4bit's 136 B).
    "3.5bit": TurboQuantConfig(key_bits=3, value_bits=3, outlier_fraction=0.5),
    # Near-lossless reference point (2x compression).
    "8bit": TurboQuantConfig(key_bits=8, value_bits=8),
}
DEFAULT_PRESET = "4bit"
