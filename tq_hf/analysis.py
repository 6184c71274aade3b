"""Measurements behind the notebooks and the demo; everything runs on the CPU (or a GPU if given one).

* Codec against the paper: `codec_distortion` (MSE per bit width, `PAPER_MSE`, `mse_bounds`) and
  `inner_product_error`.
* Attention on synthetic K/V with the structure of real models: `synthetic_qkv` (outlier
  channels, a Qwen-style per-channel key bias, RoPE, an attention-sink token; `KV_SCENARIOS`) and
  `attention_error`, which quantizes through a real `TurboQuantCache` layer.
* Models: `load_model` (the built-in tiny Llama or a local checkpoint), `generate_timed`,
  `compare_generate` (DynamicCache vs TurboQuantCache: text, bytes, ratio, tokens/s, greedy
  agreement; the demo's numbers) and `logit_agreement` (teacher-forced logits per preset).
* Memory and speed: `preset_table` (bytes per token and head from the codec's layout),
  `cache_memory` (`nbytes()` of real caches filled to given context lengths), `capacity` and
  `load_results` (benchmark JSON rows; the benchmarks themselves are in `tq_hf.bench`).

Plots of these results live in `tq_hf.plots`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
import warnings

import torch

from .cache import TurboQuantCache, TurboQuantLayer, make_quantizers
from .codec import TurboQuantizer
from .config import PRESETS, TurboQuantConfig

__all__ = [
    "KV_SCENARIOS",
    "PAPER_MSE",
    "ModelLoadError",
    "attention_error",
    "attention_error_table",
    "cache_memory",
    "cache_nbytes",
    "capacity",
    "codec_distortion",
    "common_prefix",
    "compare_generate",
    "comparison_rows",
    "format_table",
    "generate_timed",
    "inner_product_error",
    "load_model",
    "load_results",
    "logit_agreement",
    "mse_bounds",
    "preset_table",
    "random_unit_vectors",
    "resolve_device",
    "resolve_dtype",
    "synthetic_qkv",
]

# The paper's MSE distortion of TurboQuant_mse for unit vectors (arXiv 2504.19874, refined values).
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


def _as_config(config: TurboQuantConfig | str, **overrides) -> TurboQuantConfig:
    if isinstance(config, str):
        return TurboQuantConfig.from_preset(config, **overrides)
    return config.replace(**overrides) if overrides else config


# ============================================================================================ codec
def mse_bounds(bits: int) -> tuple[float, float]:
    """The paper's bounds on the MSE distortion of any b-bit quantizer of unit vectors: the lower
    bound 4^-b (no quantizer does better) and TurboQuant_mse's upper bound sqrt(3)*pi/2 * 4^-b."""
    return 4.0**-bits, math.sqrt(3) * math.pi / 2 * 4.0**-bits


def random_unit_vectors(n: int, dim: int, seed: int = 0, device=None) -> torch.Tensor:
    """`[n, dim]` fp32 vectors drawn uniformly from the unit sphere (seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return (x / x.norm(dim=-1, keepdim=True)).to(device)


def codec_distortion(dim: int = 128, bits=(1, 2, 3, 4, 5, 6, 7, 8), n: int = 10_000, seed: int = 0,
                     norm_correction: bool = False) -> list[dict]:
    """Measured MSE distortion E||x - x^||^2 of `TurboQuantizer` on `n` random unit vectors.

    Returns one row per bit width: `bits`, `mse` and its standard error `mse_sem`, `paper` (the
    paper's value, None beyond 4 bits), `lower_bound` (4^-b), `upper_bound` (sqrt(3)*pi/2 * 4^-b).
    `norm_correction=False` is the paper's estimator; the cache's default (True) rescales every
    dequantized vector to its exact norm, which costs a little MSE.
    """
    x = random_unit_vectors(n, dim, seed)
    rows = []
    for b in bits:
        qz = TurboQuantizer(dim, b, seed=seed, norm_correction=norm_correction)
        err = (qz.dequantize(qz.quantize(x)) - x).pow(2).sum(-1)
        lo, hi = mse_bounds(b)
        rows.append({
            "dim": dim, "bits": b, "norm_correction": norm_correction, "mse": err.mean().item(),
            "mse_sem": err.std().item() / math.sqrt(n), "paper": PAPER_MSE.get(b),
            "lower_bound": lo, "upper_bound": hi,
        })
    return rows


def inner_product_error(dim: int = 128, bits=(1, 2, 3, 4, 5, 6, 7, 8), n: int = 10_000, seed: int = 0,
                        norm_correction: bool = False) -> list[dict]:
    """Error of the inner product <y, x^> against <y, x> for unit keys x and Gaussian queries y ~ N(0, I).

    <y, x> is then N(0, 1), so errors are in units of its standard deviation. Per bit width:
    `rms` (root-mean-square error), `slope` (least-squares slope of <y, x^> on <y, x>: 1 means
    unbiased; TurboQuant_mse shrinks inner products by about 1 - D_mse, norm correction by about
    sqrt(1 - D_mse)), `bias` (= slope - 1) and `mse` (the vectors' own distortion, for reference:
    E rms^2 = mse when y is independent of x).
    """
    x = random_unit_vectors(n, dim, seed)
    y = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 1))
    ip = (x * y).sum(-1)
    rows = []
    for b in bits:
        qz = TurboQuantizer(dim, b, seed=seed, norm_correction=norm_correction)
        xh = qz.dequantize(qz.quantize(x))
        ip_hat = (xh * y).sum(-1)
        slope = ((ip_hat * ip).sum() / (ip * ip).sum()).item()
        rows.append({
            "dim": dim, "bits": b, "norm_correction": norm_correction,
            "rms": (ip_hat - ip).pow(2).mean().sqrt().item(), "slope": slope, "bias": slope - 1,
            "mse": (xh - x).pow(2).sum(-1).mean().item(),
        })
    return rows


# ====================================================================================== synthetic K/V
# Cumulative scenarios: each adds one structure seen in real models' keys to the one before.
KV_SCENARIOS: dict[str, dict] = {
    "Gaussian": {},
    "+ outlier channels": {"outlier_channels": 8},
    "+ key bias (Qwen-like)": {"outlier_channels": 8, "key_bias": 12.0},
    "+ RoPE": {"outlier_channels": 8, "key_bias": 12.0, "rope": True},
    "+ attention sink": {"outlier_channels": 8, "key_bias": 12.0, "rope": True, "sink": True},
}


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # transformers' convention (rotate_half): channel i pairs with i + D/2 at frequency theta^(-2i/D).
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _low_frequency_channels(d: int, n: int) -> torch.Tensor:
    # The n channels of the n/2 slowest-rotating RoPE pairs: where real models' massive key and
    # query values sit, and where a bias survives RoPE as a near-constant offset.
    half = max(1, n // 2)
    i = torch.arange(d // 2 - half, d // 2)
    return torch.cat([i, i + d // 2])


def synthetic_qkv(n_tokens: int = 1024, n_queries: int = 16, head_dim: int = 128, n_kv_heads: int = 2,
                  group: int = 4, *, outlier_channels: int = 0, outlier_scale: float = 8.0,
                  key_bias: float = 0.0, rope: bool = False, rope_theta: float = 1e6, sink: bool = False,
                  sink_mass: float = 0.5, seed: int = 0, device=None):
    """Queries, keys and values with the structure of a real model's attention layer (fp32).

    Keys are Gaussian with log-normal per-channel scales; options add, in the unrotated space:
    `outlier_channels` low-frequency channels scaled by `outlier_scale`; a per-channel key bias of
    magnitude `key_bias` (in units of a typical channel's std, as Qwen models' k_proj bias puts in
    a few channels); `rope` (theta `rope_theta`) on queries and keys; `sink`: token 0 becomes an
    attention sink that every query gives about `sink_mass` of its attention to, with a near-zero
    value (as observed in LLMs). The queries are the last `n_queries` positions.

    Returns:
        q `[1, n_kv_heads * group, n_queries, head_dim]`, k and v `[1, n_kv_heads, n_tokens, head_dim]`.
    """
    if n_queries > n_tokens:
        raise ValueError(f"n_queries={n_queries} exceeds n_tokens={n_tokens}")
    g = torch.Generator().manual_seed(seed)
    H, T, D, nq = n_kv_heads, n_tokens, head_dim, n_queries

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    special = _low_frequency_channels(D, max(outlier_channels, 8))
    k_scale = torch.exp(0.3 * randn(H, 1, D))
    if outlier_channels:
        k_scale[..., _low_frequency_channels(D, outlier_channels)] *= outlier_scale
    k = randn(H, T, D) * k_scale
    bias = torch.zeros(H, 1, D)
    if key_bias:
        bias[..., special] = key_bias * torch.sign(randn(H, 1, special.numel()))
        k = k + bias
    q = randn(H * group, nq, D) * torch.exp(0.3 * randn(H * group, 1, D))
    v = randn(H, T, D) * torch.exp(0.3 * randn(H, 1, D))
    pos_k = torch.arange(T)
    pos_q = pos_k[T - nq:]
    if sink:
        # Every query shares a component along w (low-frequency channels: RoPE barely turns it) and
        # token 0's key is a multiple of w, sized so that it draws `sink_mass` of the attention.
        w = torch.zeros(H, D)
        w[:, special] = randn(H, special.numel())
        w = w / w.norm(dim=-1, keepdim=True)
        wq = w.repeat_interleave(group, 0)[:, None, :]
        q = q + 4.0 * wq
        k[:, 0] = 0.0
        v[:, 0] *= 0.05
    if rope:
        q, k = _rope(q, pos_q, rope_theta), _rope(k, pos_k, rope_theta)
    if sink:
        # Scores of the other tokens (causal), then the sink logit that gives it `sink_mass`.
        s = torch.einsum("hgqd,hkd->hgqk", q.view(H, group, nq, D), k) / math.sqrt(D)
        s = s.masked_fill(pos_k[None, None, None, :] > pos_q[None, None, :, None], float("-inf"))
        s[..., 0] = float("-inf")
        target = torch.logsumexp(s, -1) + math.log(sink_mass / (1 - sink_mass))  # [H, G, nq]
        qh = q.view(H, group, nq, D)
        qw = torch.einsum("hgqd,hd->hgq", qh, w)
        qb = torch.einsum("hgqd,hd->hgq", qh, bias[:, 0])
        # The sink's key carries the bias like every key (k_proj adds it), plus beta * w; one beta per
        # head, the median of what each query needs (position 0: RoPE is the identity).
        beta = ((target * math.sqrt(D) - qb) / qw).flatten(1).median(dim=1).values
        k[:, 0] = bias[:, 0] + beta[:, None] * w
    return q[None].to(device), k[None].to(device), v[None].to(device)


def _causal_attention(q, k, v, scaling):
    # q [B, Hq, nq, D] at the last nq positions; k, v [B, Hkv, T, D]. fp32 out and probabilities.
    B, Hq, nq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = torch.einsum("bhgqd,bhkd->bhgqk", q.float().view(B, Hkv, G, nq, D), k.float()) * scaling
    pos_q = torch.arange(T - nq, T, device=q.device)
    s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > pos_q[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    o = torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
    return o.reshape(B, Hq, nq, D), p.reshape(B, Hq, nq, T), s.reshape(B, Hq, nq, T)


def attention_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: TurboQuantConfig | str = "4bit",
                    scaling: float | None = None, **overrides) -> dict:
    """Error of attention over K/V stored in a `TurboQuantCache` layer, against exact fp32 attention.

    All of `k`, `v` is quantized (`residual_length=0`); the queries `q` `[B, Hq, nq, D]` sit at the
    last nq positions and attend causally. `config` is a preset name or a `TurboQuantConfig`;
    keyword overrides apply on top (e.g. `key_mean_centering=False`).

    Returns a dict: `rel_err` (||o^ - o|| / ||o||, all outputs), `score_rms` (RMS error of the
    scaled attention logits, nats), `kl` (mean KL(p || p^) of the attention distributions, nats),
    `sink_mass` (mean attention on token 0, exact) and `sink_mass_err` (mean |p^_0 - p_0|).
    """
    cfg = _as_config(config, **overrides).replace(residual_length=0)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    cache = TurboQuantCache(cfg)
    cache.update(k, v, 0)
    k_hat, v_hat = cache.layers[0].dequantize_range(0, k.shape[2])
    o, p, s = _causal_attention(q, k, v, scaling)
    o_hat, p_hat, s_hat = _causal_attention(q, k_hat, v_hat, scaling)
    valid = torch.isfinite(s)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - p_hat.clamp_min(1e-30).log()), 0.0).sum(-1)
    return {
        "key_bits": cfg.key_bits, "value_bits": cfg.value_bits, "key_mean_centering": cfg.key_mean_centering,
        "rel_err": ((o_hat - o).norm() / o.norm()).item(),
        "score_rms": (s_hat - s)[valid].pow(2).mean().sqrt().item(),
        "kl": kl.mean().item(),
        "sink_mass": p[..., 0].mean().item(),
        "sink_mass_err": (p_hat[..., 0] - p[..., 0]).abs().mean().item(),
    }


def attention_error_table(scenarios: dict[str, dict] | None = None, bits=(2, 3, 4), centring=(True, False),
                          n_tokens: int = 1024, n_queries: int = 16, head_dim: int = 128, seed: int = 0) -> list[dict]:
    """`attention_error` for every scenario (default `KV_SCENARIOS`), bit width (keys and values
    alike) and key mean-centring setting; each row adds `scenario` to `attention_error`'s dict."""
    scenarios = KV_SCENARIOS if scenarios is None else scenarios
    rows = []
    for name, kw in scenarios.items():
        q, k, v = synthetic_qkv(n_tokens, n_queries, head_dim, seed=seed, **kw)
        for b in bits:
            for c in centring:
                cfg = TurboQuantConfig(key_bits=b, value_bits=b, key_mean_centering=c)
                rows.append({"scenario": name, **attention_error(q, k, v, cfg)})
    return rows


def format_table(rows: list[dict], columns=None, floatfmt: str = ".4g") -> str:
    """A plain-text table of `rows` (list of dicts), one line per row, for printing in notebooks."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[str(c) for c in columns]] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ============================================================================================ models
class ModelLoadError(ValueError):
    """A model cannot be loaded or served (missing path, no config/tokenizer, unsupported type)."""


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" without a GPU raises `ModelLoadError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r}: no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(name)


def resolve_dtype(name, device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA (what models run in there), float32 on CPU (fast and exact there)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def load_model(path: str | None = None, device="auto", dtype="auto", attn_implementation: str = "turboquant",
               seed: int = 0):
    """A model, its tokenizer and a display name.

    Args:
        path: a local checkpoint folder (config, weights, tokenizer; nothing is downloaded); None for
            `tq_hf.models.tiny_llama(seed)` (random weights, byte-level tokenizer); or "reference" for
            the small trained model shipped with tq_hf (`tq_hf.models.reference_model`), where present.
        device, dtype: "auto" or explicit (see `resolve_device`, `resolve_dtype`).
    Returns:
        `(model, tokenizer, name)`, the model in eval mode on `device`.
    Raises:
        ModelLoadError: with a one-line reason for a missing path, a folder without a loadable
            config, weights or tokenizer, or a model that is not a decoder-only causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dtype = resolve_dtype(dtype, device)
    if path is None:
        from .models import tiny_llama

        model, tokenizer = tiny_llama(seed=seed, attn_implementation=attn_implementation, dtype=dtype)
        return model.to(device), tokenizer, f"built-in tiny Llama (random weights, seed {seed})"
    if path == "reference":
        from . import models

        if not hasattr(models, "reference_model"):
            raise ModelLoadError("this tq_hf has no trained reference model (tq_hf.models.reference_model)")
        try:
            model, tokenizer = models.reference_model(attn_implementation=attn_implementation, dtype=dtype)
        except (FileNotFoundError, OSError) as e:
            raise ModelLoadError(f"the trained reference model cannot be loaded: {e}") from None
        text = model.config.get_text_config(decoder=True)
        return model.to(device), tokenizer, f"trained reference model ({text.num_hidden_layers}-layer byte-level Llama)"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path!r} does not exist (only local checkpoints are loaded, "
                             "nothing is downloaded)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"model path {path!r} has no loadable transformers config: {e}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"model path {path!r} is an encoder-decoder model ({config.model_type}); "
                             "TurboQuantCache serves decoder-only causal language models")
    if getattr(config, "is_decoder", None) is False:
        # BERT-style encoders map to a *LMHeadModel in AutoModelForCausalLM but attend bidirectionally.
        raise ModelLoadError(f"model path {path!r} is an encoder ({config.model_type}, is_decoder=False); "
                             "TurboQuantCache serves decoder-only causal language models")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     attn_implementation=attn_implementation, dtype=dtype)
    except ValueError as e:
        raise ModelLoadError(f"model path {path!r} ({config.model_type}) cannot be loaded as a decoder-only causal "
                             f"LM with attn_implementation={attn_implementation!r}: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"model path {path!r}: the weights cannot be loaded: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"model path {path!r}: no tokenizer could be loaded from the folder: {e}") from None
    name = f"{os.path.basename(os.path.normpath(path))} ({config.model_type})"
    return model.to(device).eval(), tokenizer, name


def _cache_kwarg(model) -> str:
    # transformers >= 5.24 names the argument `cache` (`past_key_values` still works with a
    # FutureWarning); 5.17 knows only `past_key_values`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_nbytes(cache) -> int:
    """Bytes of every tensor a cache holds: `TurboQuantCache.nbytes()`, or the keys and values of a
    transformers cache (DynamicCache, ...)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    )


def common_prefix(a, b) -> int:
    """Length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _new_cache(model, cache):
    if cache is None or cache == "dynamic":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    if isinstance(cache, (str, TurboQuantConfig)):
        return TurboQuantCache(cache, model_config=model.config)
    return cache


def generate_timed(model, inputs: dict, cache=None, max_new_tokens: int = 32, progress=None):
    """Greedy `generate` of one prompt with `cache` (a cache object, a preset name or
    `TurboQuantConfig`, or None/"dynamic" for a `DynamicCache`).

    Args:
        inputs: `input_ids` `[1, n]` (and optionally `attention_mask`) on the model's device.
        progress: None, or a tqdm-like bar advanced by one per generated token (closed at the end).
    Returns:
        `(new_ids, seconds, cache)`: the generated token ids (list), wall time of `generate` (CUDA
        synchronised), the cache object after generation.
    """
    cache = _new_cache(model, cache)
    kwargs = dict(inputs, max_new_tokens=max_new_tokens, do_sample=False, **{_cache_kwarg(model): cache})
    if progress is not None:
        kwargs["streamer"] = _ProgressStreamer(progress)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**kwargs)
        sync()
        seconds = time.perf_counter() - start
    return out[0, inputs["input_ids"].shape[1]:].tolist(), seconds, cache


class _ProgressStreamer:
    """A `generate` streamer that advances a tqdm bar by one per generated token."""

    def __init__(self, bar):
        self.bar, self._prompt_seen = bar, False

    def put(self, value):
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        self.bar.update(1)

    def end(self):
        self.bar.close()


def compare_generate(model, tokenizer, prompt: str, preset: TurboQuantConfig | str = "4bit",
                     max_new_tokens: int = 32, warmup: int | None = None, progress: bool = False) -> dict:
    """Generate `prompt` greedily with a `DynamicCache` and with `TurboQuantCache(preset)`; compare.

    Args:
        warmup: tokens of an untimed run of each cache first (codebooks solved, kernels compiled);
            default: all of them on CUDA, 2 on the CPU.
        progress: show a tqdm bar per timed run.
    Returns:
        a dict with `prompt_tokens`, `agreement` (leading generated tokens that are identical),
        `ratio` (dense bytes per cached token / TurboQuant bytes per cached token), and per cache
        (`"dense"`, `"turboquant"`): `ids`, `text`, `seconds`, `tokens_per_s`, `nbytes`, `cache`.
    """
    encoded = tokenizer(prompt, return_tensors="pt")
    inputs = {k: encoded[k].to(model.device) for k in ("input_ids", "attention_mask") if k in encoded}
    n_prompt = inputs["input_ids"].shape[1]
    config = _as_config(preset)
    if warmup is None:
        warmup = max_new_tokens if model.device.type == "cuda" else 2
    if warmup:
        generate_timed(model, inputs, "dynamic", warmup)
        generate_timed(model, inputs, config, warmup)
    runs = {}
    for key, cache, desc in (("dense", "dynamic", "DynamicCache"), ("turboquant", config, "TurboQuant")):
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", leave=False)
        ids, seconds, cache_obj = generate_timed(model, inputs, cache, max_new_tokens, progress=bar)
        runs[key] = {
            "ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True), "seconds": seconds,
            "tokens_per_s": len(ids) / seconds if seconds > 0 else float("nan"),
            "nbytes": cache_nbytes(cache_obj), "cache": cache_obj,
        }
    dense, tq = runs["dense"], runs["turboquant"]
    # Both caches hold the prompt plus all but the last generated token.
    dense_tok, tq_tok = n_prompt + len(dense["ids"]) - 1, n_prompt + len(tq["ids"]) - 1
    ratio = ((dense["nbytes"] / dense_tok) / (tq["nbytes"] / tq_tok)
             if tq["nbytes"] and dense_tok > 0 and tq_tok > 0 else float("nan"))
    return {"prompt_tokens": n_prompt, "agreement": common_prefix(dense["ids"], tq["ids"]), "ratio": ratio,
            "preset": preset if isinstance(preset, str) else "", "dense": dense, "turboquant": tq}


def comparison_rows(result: dict) -> list[dict]:
    """`compare_generate`'s result as two table rows (DynamicCache, TurboQuant) for `format_table`."""
    dense, tq = result["dense"], result["turboquant"]
    n = len(dense["ids"])
    return [
        {"cache": "DynamicCache", "bytes held": f"{dense['nbytes']:,}", "vs dense": "1.00x",
         "tokens/s": f"{dense['tokens_per_s']:.1f}", "greedy agreement": "(reference)"},
        {"cache": f"TurboQuant {result.get('preset', '')}".strip(), "bytes held": f"{tq['nbytes']:,}",
         "vs dense": f"{result['ratio']:.2f}x", "tokens/s": f"{tq['tokens_per_s']:.1f}",
         "greedy agreement": f"first {result['agreement']}/{n} tokens identical"},
    ]


def _teacher_forced_logits(model, input_ids, cache, tokens):
    # Prefill, then feed `tokens` one at a time: logits [len(tokens), vocab] after each fed token.
    kw = _cache_kwarg(model)
    out = []
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)
        model(input_ids=input_ids, **{kw: cache})
        for t in tokens:
            step = torch.tensor([[t]], device=input_ids.device)
            out.append(model(input_ids=step, **{kw: cache}).logits[0, -1].float())
    return torch.stack(out)


def _bf16_cache_class():
    from transformers import DynamicCache

    class BF16RoundedCache(DynamicCache):
        """A DynamicCache whose keys and values are rounded to bf16 (kept in the model's dtype)."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k = key_states.to(torch.bfloat16).to(key_states.dtype)
            v = value_states.to(torch.bfloat16).to(value_states.dtype)
            return super().update(k, v, layer_idx, *args, **kwargs)

    return BF16RoundedCache


def _bf16_rounded_cache(config):
    return _bf16_cache_class()(config=config)


def logit_agreement(model, input_ids: torch.Tensor, presets=tuple(PRESETS), n_steps: int = 16,
                    bf16_baseline: bool = True) -> list[dict]:
    """Decode-step logits of `TurboQuantCache(preset)` against a `DynamicCache` in the model's dtype.

    The reference generates `n_steps + 1` tokens greedily after the prompt `input_ids` `[1, n]`; each
    preset's cache is then fed the same tokens (teacher forcing) and its logits after each of the
    first `n_steps` are compared with the reference's. (TurboQuant's prefill itself is exact.)
    With `bf16_baseline` and a model that is not in bf16, a first row "bf16 K/V" does the same for a
    `DynamicCache` that rounds keys and values to bf16: the error of storing the cache in bf16, for scale.

    Returns one row per preset: `top1` (fraction of steps whose argmax matches), `kl` (mean
    KL(p_ref || p_tq), nats), `rel_logit_err` (||l_tq - l_ref|| / ||l_ref - mean(l_ref)||, all steps),
    `greedy_prefix` (leading tokens a free-running greedy generation shares with the reference's)
    and `n_steps`.
    """
    input_ids = input_ids.to(model.device)
    ref_ids, _, _ = generate_timed(model, {"input_ids": input_ids}, "dynamic", n_steps + 1)
    from transformers import DynamicCache

    fed = ref_ids[:n_steps]
    ref = _teacher_forced_logits(model, input_ids, DynamicCache(config=model.config), fed)
    ref_logp = ref.log_softmax(-1)
    centred = ref - ref.mean(-1, keepdim=True)
    systems = []
    if bf16_baseline and model.dtype != torch.bfloat16:
        systems.append(("bf16 K/V", 16, 16, lambda: _bf16_rounded_cache(model.config)))
    for preset in presets:
        cfg = _as_config(preset)
        systems.append((preset if isinstance(preset, str) else repr(preset), cfg.key_bits, cfg.value_bits,
                        lambda cfg=cfg: TurboQuantCache(cfg, model_config=model.config)))
    rows = []
    for label, kb, vb, make in systems:
        got = _teacher_forced_logits(model, input_ids, make(), fed)
        gen, _, _ = generate_timed(model, {"input_ids": input_ids}, make(), n_steps + 1)
        rows.append({
            "preset": label, "key_bits": kb, "value_bits": vb,
            "top1": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "kl": (ref_logp.exp() * (ref_logp - got.log_softmax(-1))).sum(-1).mean().item(),
            "rel_logit_err": ((got - ref).norm() / centred.norm()).item(),
            "greedy_prefix": common_prefix(gen, ref_ids), "n_steps": n_steps + 1,
        })
    return rows


# ==================================================================================== memory, speed
def preset_table(head_dim: int = 128, presets=tuple(PRESETS)) -> list[dict]:
    """Steady-state bytes per token and KV head of each preset, from the codec's storage layout
    (packed codes plus one fp32 norm per vector, two for split presets, for K and V), against the
    512 B (at head_dim 128) of a bf16 cache. Layers in `skip_layers` are not counted."""
    rows = []
    dense = 2 * head_dim * 2
    for name in presets:
        cfg = _as_config(name)
        kq, vq = make_quantizers(cfg, head_dim)
        per = kq.vector_bytes + vq.vector_bytes
        rows.append({
            "preset": name, "key_bits": cfg.key_bits, "value_bits": cfg.value_bits,
            "residual_length": cfg.residual_length, "skip_layers": cfg.skip_layers,
            "bytes_per_token_head": per, "vs_bf16": dense / per,
        })
    return rows


def _kv_shape(model_config):
    text = model_config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return text.num_hidden_layers, kv_heads, head_dim


def cache_memory(model_config, presets=tuple(PRESETS), contexts=(256, 1024, 4096), batch: int = 1,
                 dtype: torch.dtype = torch.bfloat16, chunk: int = 512, device="cpu", seed: int = 0,
                 include_dense: bool = True) -> list[dict]:
    """Bytes that real caches hold for a model of `model_config`'s shape, filled to each context length.

    For each preset a `TurboQuantCache(preset, model_config=...)` is built (and, first, a `DynamicCache`
    labelled e.g. "bf16 DynamicCache"), so which layers are quantized, skipped or sliding comes from the
    cache itself. Random K/V go in by chunks of `chunk` tokens, as in a chunked prefill, and the bytes
    every layer allocates are read at each length in `contexts`: codes, norms, the full-precision
    window, capacity headroom, key means, full-precision layers. No model runs, so any shape fits on
    a CPU. Two exact shortcuts keep an 8B shape fast: layers of one kind and config hold identical
    bytes, so one representative layer per kind is filled and counted for all of its kind; and every
    tensor a layer holds is linear in the number of KV heads, so one head is filled and its bytes are
    multiplied by the model's KV-head count (tests/test_analysis.py checks both against a full fill).

    Returns rows: `preset`, `context`, `nbytes` (whole model), `bytes_per_token`,
    `ideal_bytes_per_token` (codes + norms of quantized layers + model-dtype K/V of the others), and
    the shape (`batch`, `layers`, `kv_heads`, `head_dim`).
    """
    from transformers import DynamicCache

    n_layers, kv_heads, head_dim = _kv_shape(model_config)
    contexts = sorted(contexts)
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(batch, 1, chunk, head_dim, generator=g).to(dtype=dtype, device=device)
    esize = block.element_size()
    systems = [("dense", None)] if include_dense else []
    systems += [(p, _as_config(p)) for p in presets]
    rows = []
    for name, cfg in systems:
        if cfg is None:
            cache = DynamicCache(config=model_config)
            label = f"{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16')} DynamicCache"
        else:
            cache = TurboQuantCache(cfg, model_config=model_config)
            label = name if isinstance(name, str) else repr(name)
        if len(cache.layers) != n_layers:
            raise ValueError(f"the cache built {len(cache.layers)} layers for a {n_layers}-layer config")
        kinds = [_layer_kind(layer) for layer in cache.layers]
        reps = {kind: kinds.index(kind) for kind in kinds}  # first layer of each kind
        filled = 0
        for ctx in contexts:
            while filled < ctx:
                n = min(chunk, ctx - filled)
                for idx in reps.values():
                    cache.update(block[:, :, :n], block[:, :, :n], idx)
                    layer = cache.layers[idx]
                    if isinstance(layer, TurboQuantLayer):
                        # Act as the "turboquant" attention does: it reads the codes itself, so the
                        # next update returns only the new chunk (no dequantized copy is built).
                        layer.claim()
                filled += n
            per_kind = {kind: _layer_nbytes(cache.layers[idx]) * kv_heads for kind, idx in reps.items()}
            nbytes = sum(per_kind[kind] for kind in kinds)
            ideal = 0
            for layer in cache.layers:
                if isinstance(layer, TurboQuantLayer):
                    kq, vq = make_quantizers(layer.config, head_dim)  # layers not filled here have none yet
                    ideal += batch * kv_heads * (kq.vector_bytes + vq.vector_bytes)
                else:
                    window = getattr(layer, "sliding_window", None) or ctx
                    ideal += batch * kv_heads * 2 * head_dim * esize * min(ctx, window) / ctx
            rows.append({"preset": label, "context": ctx, "nbytes": nbytes, "bytes_per_token": nbytes / ctx,
                         "ideal_bytes_per_token": ideal, "batch": batch, "layers": n_layers,
                         "kv_heads": kv_heads, "head_dim": head_dim})
    return rows


def _layer_kind(layer):
    return (type(layer).__name__, getattr(layer, "config", None), getattr(layer, "sliding_window", None))


def _layer_nbytes(layer) -> int:
    if isinstance(layer, TurboQuantLayer):
        return layer.nbytes()
    return sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if t is not None)


def capacity(rows: list[dict], budget_bytes: float) -> list[dict]:
    """Tokens that fit in `budget_bytes` of KV memory for each preset of `cache_memory` rows, at the
    bytes per token measured at the longest context: `preset`, `tokens`, `bytes_per_token`,
    `vs_first` (capacity relative to the first preset in `rows`, the dense cache by default)."""
    longest = {}
    for r in rows:
        if r["preset"] not in longest or r["context"] > longest[r["preset"]]["context"]:
            longest[r["preset"]] = r
    out = []
    for name, r in longest.items():
        out.append({"preset": name, "context": r["context"], "bytes_per_token": r["bytes_per_token"],
                    "tokens": int(budget_bytes // r["bytes_per_token"])})
    base = out[0]["tokens"] if out else 0
    for r in out:
        r["vs_first"] = r["tokens"] / base if base else float("nan")
    return out


_RESULT_KEYS = ("gpu", "torch", "triton", "transformers", "date", "system", "batch", "context", "us")


def load_results(path) -> list[dict]:
    """Benchmark rows from a JSON file written by `tq_hf.bench.save` (a list of dicts). Every row must
    carry the environment (gpu, torch, triton, transformers, date) and `system`, `batch`, `context`,
    `us`; a file without them raises ValueError naming the missing keys."""
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of benchmark rows")
    for i, r in enumerate(rows):
        missing = [k for k in _RESULT_KEYS if k not in r]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}")
    return rows
