"""Benchmarks: `bench_kernels` (decode attention alone) and `bench_generate` (a whole decoder).

bench_kernels (GPU): decode attention from the packed cache against bf16 SDPA on the same shapes.
Timings are `triton.testing.do_bench` medians after warm-up, on random data, rotating through enough
copies of the inputs that the working set exceeds L2, so they measure memory, not cache.

bench_generate (GPU; also runs on CPU at tiny sizes): a decoder built from a config (default: the
Llama-3-8B shape with random bf16 weights) run as a plain prefill + decode forward loop with each
cache system: bf16 `DynamicCache` + SDPA, HF `QuantizedCache` (when a backend is installed) and
`TurboQuantCache` + `attn_implementation="turboquant"` per preset. Per (system, batch, context) it
records TTFT, decode tokens/s, peak memory, cache bytes and the attention share of a step, then
derives capacity (largest batch x context in a memory budget) from the measured numbers.

Every row records the GPU, library versions and date. Command line: `python -m tq_hf.bench kernels
...` / `python -m tq_hf.bench generate ...` (and, once wired, `python -m tq_hf bench ...`), see
`add_generate_arguments` / `run_generate` and `add_kernels_arguments` / `run_kernels`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .cache import TurboQuantCache
from .config import TurboQuantConfig

__all__ = [
    "add_generate_arguments",
    "add_kernels_arguments",
    "bench_generate",
    "bench_kernels",
    "build_model",
    "capacity",
    "environment",
    "main_generate",
    "main_kernels",
    "plot_generate",
    "print_generate",
    "run_generate",
    "run_kernels",
    "sdpa_backend_calls",
]

_ROTATE_BYTES = 512 << 20  # > 10x the H100/H200 L2 (50-60 MB)


def environment() -> dict:
    import transformers
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _median_us(fn_list, warmup=25, rep=200) -> float:
    import triton.testing

    it = iter(range(1 << 62))
    n = len(fn_list)
    return 1e3 * triton.testing.do_bench(lambda: fn_list[next(it) % n](), warmup=warmup, rep=rep,
                                         return_mode="median")


def _graph_median_us(fn_list) -> float:
    """Like `_median_us`, but each fn is captured once in a CUDA graph and its replays are timed: the
    device time of the kernels without the host's launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fn_list:  # warm-up outside the capture: compiles, sizes the workspace
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for fn in fn_list:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)
    return _median_us([g.replay for g in graphs])


def copy_bandwidth(nbytes=2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = _median_us([lambda: b.copy_(a)]) * 1e-6
    return 2 * a.numel() / t


def _tq_layer(cfg, B, Hkv, ctx, D, dtype):
    cache = TurboQuantCache(cfg.replace(residual_length=0, backend="triton"))
    k = torch.randn(B, Hkv, ctx, D, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    layer.claim()
    return layer


# SDPA's fused backends, each timed forced beside SDPA's own choice: FlashAttention's decode is the usual
# baseline, and which backends a shape can use depends on the GPU and the torch build.
_SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def sdpa_backend_calls(qs, kvs, log=print) -> dict:
    """{"flash" | "cudnn" | "efficient": [calls]}: SDPA decode (enable_gqa) of the query `qs[i]` `[B, Hq, 1, D]`
    over `kvs[i]` = (K, V) `[B, Hkv, n, D]`, forced to each fused backend that this torch has and that
    accepts these inputs (tried once; `log` says which could not run and why)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls = {}
    for name in _SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue

        def call(q, kv, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True)

        try:
            call(qs[0], kvs[0])
        except RuntimeError as e:
            log(f"SDPA backend {name} cannot run {tuple(qs[0].shape)} x {tuple(kvs[0][0].shape)}: {str(e)[:120]}")
            continue
        calls[name.split("_")[0].lower()] = [lambda q=q, kv=kv, call=call: call(q, kv) for q, kv in zip(qs, kvs)]
    return calls


def bench_kernels(batches=(1, 8, 32), contexts=(1024, 4096, 16384, 65536), presets=("4bit", "3bit"),
                  hq=32, hkv=8, d=128, dtype=torch.bfloat16, progress=True) -> list[dict]:
    """Decode-attention time of each preset vs bf16 SDPA (enable_gqa) on the same shape, SDPA also forced
    to each fused backend that can run the shape ("bf16 SDPA flash" etc., `sdpa_backend_calls`).

    "us" is an eager call (host launch cost included), "kernel_us" the same call replayed from a CUDA
    graph (device time only); speedup (against SDPA's own choice) and GB/s use kernel_us. Buffers rotate
    beyond the L2. Small problems decode in one launch when eager and in two when captured
    (`decode_attention`'s `one_launch`): each column times the form that call would take."""
    from tqdm.auto import tqdm

    from .kernels import decode_attention

    env = environment()
    rows = []
    combos = [(b, c) for b in batches for c in contexts]
    for B, ctx in tqdm(combos, disable=not progress, desc="bench kernels"):
        dense_bytes = 2 * B * hkv * ctx * d * 2
        copies = max(1, min(16, -(-_ROTATE_BYTES // dense_bytes)))
        try:
            qs = [torch.randn(B, hq, 1, d, dtype=dtype, device="cuda") for _ in range(copies)]
            kvs = [(torch.randn(B, hkv, ctx, d, dtype=dtype, device="cuda"),
                    torch.randn(B, hkv, ctx, d, dtype=dtype, device="cuda")) for _ in range(copies)]
        except torch.OutOfMemoryError:
            continue
        sdpa = [lambda q=q, kv=kv: F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True)
                for q, kv in zip(qs, kvs)]
        t_sdpa, k_sdpa = _median_us(sdpa), _graph_median_us(sdpa)
        rows.append({**env, "system": "bf16 SDPA", "batch": B, "context": ctx, "us": t_sdpa, "kernel_us": k_sdpa,
                     "bytes": dense_bytes, "GBps": dense_bytes / k_sdpa / 1e3, "speedup": 1.0})
        for name, fns in sdpa_backend_calls(qs, kvs, log=tqdm.write).items():
            t, tk = _median_us(fns), _graph_median_us(fns)
            rows.append({**env, "system": f"bf16 SDPA {name}", "batch": B, "context": ctx, "us": t, "kernel_us": tk,
                         "bytes": dense_bytes, "GBps": dense_bytes / tk / 1e3, "speedup": k_sdpa / tk})
        del kvs, sdpa
        for preset in presets:
            cfg = TurboQuantConfig.from_preset(preset)
            layer0 = _tq_layer(cfg, B, hkv, ctx, d, dtype)
            n = layer0.n_quant  # bytes the kernel reads: the filled rows, not the planes' headroom
            read = sum(t[:, :, :n].numel() * t.element_size() for t in (layer0.k_codes, layer0.k_norms,
                                                                         layer0.v_codes, layer0.v_norms))
            n_copies = max(1, min(16, -(-_ROTATE_BYTES // read)))
            layers = [layer0] + [_tq_layer(cfg, B, hkv, ctx, d, dtype) for _ in range(n_copies - 1)]
            fns = [lambda q=q, layer=layer: decode_attention(q, layer, None, d**-0.5)
                   for q, layer in zip(qs * n_copies, layers)]
            t, tk = _median_us(fns), _graph_median_us(fns)
            # quantize-on-update cost of one new token (K and V) for all heads of the batch, as the cache
            # writes it (split codes: two launches per K/V plus the channel gather)
            k1, v1 = (torch.randn(B, hkv, 1, d, dtype=dtype, device="cuda") for _ in range(2))
            quant = [lambda L=layer0, k1=k1, v1=v1: L.write_codes(k1, v1, 0)]
            qt, qk = _median_us(quant), _graph_median_us(quant)
            # What decode really pays: the cache quantizes once every R = residual_length steps, when the new
            # token completes the window (`TurboQuantLayer._append`: all R tokens in one write), so a step's
            # share is the flush's time / R over the attention time.
            R = cfg.residual_length
            kw, vw = (torch.randn(B, hkv, max(R, 1), d, dtype=dtype, device="cuda") for _ in range(2))
            fk = _graph_median_us([lambda L=layer0, kw=kw, vw=vw: L.write_codes(kw, vw, 0)])
            rows.append({**env, "system": f"turboquant {preset}", "batch": B, "context": ctx, "us": t,
                         "kernel_us": tk, "bytes": read, "GBps": read / tk / 1e3, "speedup": k_sdpa / tk,
                         "quantize_token_us": qt, "quantize_token_kernel_us": qk, "residual_length": R,
                         "quantize_flush_kernel_us": fk, "quantize_share": fk / max(R, 1) / tk})
            del layers, layer0, fns
        del qs
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'system':<18} {'B':>3} {'ctx':>6} {'eager us':>9} {'kernel us':>9} {'GB/s':>7} {'x bf16':>7} "
          f"{'quant us':>8} {'flush us':>8} {'quant %':>7}")
    for r in rows:
        print(f"{r['system']:<18} {r['batch']:>3} {r['context']:>6} {r['us']:>9.1f} {r['kernel_us']:>9.1f} "
              f"{r['GBps']:>7.0f} {r['speedup']:>7.2f} {r.get('quantize_token_kernel_us', float('nan')):>8.1f} "
              f"{r.get('quantize_flush_kernel_us', float('nan')):>8.1f} {100 * r.get('quantize_share', float('nan')):>7.2f}")


def save(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


# ================================================================================ generate benchmark
# The Llama-3-8B shape (random weights): what issue 4's targets are stated for.
LLAMA3_8B_SHAPE = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
}
DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536)
DEFAULT_BATCHES = (1, 8)
DEFAULT_PRESETS = ("4bit", "3bit")
HF_QUANT_BACKENDS = ("quanto", "hqq", "fp8")  # tried in this order by --hf-backend auto
_GIB = 1 << 30
_MIB = 1 << 20


class _SkipRow(Exception):
    """A row that is not measured, with the status to record."""


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _size(text: str) -> int:
    """'4K' / '16k' / '4096' -> tokens (K = 1024)."""
    t = text.strip().lower()
    try:
        if t.endswith("k"):
            return int(float(t[:-1]) * 1024)
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096 or 4K)") from None


def _fmt_ctx(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of memory held by the tensors in `obj` (tensors, tensor subclasses such as quanto's
    QTensor, and lists / tuples / dicts of them): each storage counts once, whole, however many
    views of it appear."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) not in (torch.Tensor, torch.nn.Parameter):
            names = flatten()[0]
            return sum(_tensor_bytes(getattr(obj, n), seen) for n in names)
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    return 0


def _cache_nbytes(cache) -> int:
    """Bytes the cache holds: `nbytes()` for TurboQuantCache; the tensors of each layer otherwise
    (DynamicCache: keys/values; HF QuantizedCache: quantized states + scales + residual window)."""
    if isinstance(cache, TurboQuantCache):
        return cache.nbytes()
    seen: set = set()
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            total += _tensor_bytes(getattr(layer, name, None), seen)
    return total


def _model_bytes(model) -> int:
    return _tensor_bytes(list(model.parameters()) + list(model.buffers()))


def _cache_kwarg(model) -> str:
    # transformers >= 5.24 names the argument `cache` (the old name warns); 5.17 knows `past_key_values`.
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _System:
    """One cache system of the benchmark: a name, the attention it runs with, and a cache factory."""

    def __init__(self, name, attn, make_cache=None, unavailable=None, kind="dense", preset=None, sdpa_backend=None):
        self.name, self.attn, self.make_cache = name, attn, make_cache
        self.unavailable, self.kind, self.preset = unavailable, kind, preset
        self.sdpa_backend = sdpa_backend  # an SDPBackend name SDPA is forced to while this system runs

    def context(self):
        if self.sdpa_backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, self.sdpa_backend))


def _installed(backend: str) -> bool:
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    return is_optimum_quanto_available() if backend == "quanto" else is_hqq_available()


def _hf_quantized_system(model, backend: str, nbits: int) -> _System:
    """HF `QuantizedCache` with the first backend of `backend` ('auto' tries quanto, hqq, fp8) that
    constructs here, or an unavailable system saying why each failed."""
    try:
        from transformers import QuantizedCache
    except ImportError as e:  # pragma: no cover - every supported transformers has it
        return _System("HF QuantizedCache", "sdpa", unavailable=f"transformers has no QuantizedCache ({e})",
                       kind="hf")
    backends = HF_QUANT_BACKENDS if backend == "auto" else (backend,)
    reasons = []
    for b in backends:
        kwargs = {} if b == "fp8" else {"nbits": nbits}
        try:
            QuantizedCache(b, model.config, **kwargs)
        except (ImportError, ValueError, TypeError, RuntimeError) as e:
            first = " ".join(str(e).split())
            if b in ("quanto", "hqq") and isinstance(e, ImportError) and not _installed(b):
                first = f"{'optimum-quanto' if b == 'quanto' else 'hqq'} is not installed"
            elif b == "fp8" and "Unknown quantization backend" in str(e):
                import transformers

                first = f"transformers {transformers.__version__} has no fp8 backend (added in a later 5.x)"
            reasons.append(f"{b}: {first[:160]}")
            continue
        label = f"HF QuantizedCache {b}" + ("" if b == "fp8" else f" int{nbits}")
        return _System(label, "sdpa", lambda b=b, kw=kwargs: QuantizedCache(b, model.config, **kw), kind="hf")
    return _System("HF QuantizedCache", "sdpa", unavailable="unavailable: " + "; ".join(reasons), kind="hf")


def _systems(model, presets, hf_backend, hf_nbits, tq_backend, dtype) -> list[_System]:
    from transformers import DynamicCache

    def dense():
        return DynamicCache(config=model.config)

    # SDPA as transformers calls it (torch picks the backend), and forced to FlashAttention: on an H200 with
    # torch 2.11 SDPA's own choice for decode is cuDNN attention, whose host side takes milliseconds per
    # call (it plans per shape, and every decode step has a new length), so the flash row is the baseline
    # for the attention arithmetic. Where FlashAttention cannot run a shape (fp32, a padding mask, a sliding
    # window past its length) the flash row records the error and the TurboQuant row has no ratio to it.
    systems = [_System(f"DynamicCache {_dtype_name(dtype)} + SDPA", "sdpa", dense),
               _System(f"DynamicCache {_dtype_name(dtype)} + SDPA flash", "sdpa", dense,
                       sdpa_backend="FLASH_ATTENTION")]
    if hf_backend != "none":
        systems.append(_hf_quantized_system(model, hf_backend, hf_nbits))
    for preset in presets:
        def make(preset=preset):
            return TurboQuantCache(preset, model_config=model.config, backend=tq_backend)

        systems.append(_System(f"TurboQuant {preset}", "turboquant", make, kind="turboquant", preset=preset))
    return systems


def build_model(model_path: str | None = None, layers: int | None = None, device="cpu",
                dtype: torch.dtype = torch.bfloat16, seed: int = 0, max_positions: int = 131072, gpus: int = 1,
                **shape):
    """The benchmark's decoder and a description of it.

    Without `model_path`: a `LlamaForCausalLM` of the Llama-3-8B shape (`LLAMA3_8B_SHAPE`, with any
    field overridden by `shape`, e.g. `hidden_size=256`), random weights from `seed`, created directly
    on `device`. With `model_path`: a local checkpoint (`local_files_only=True`); `layers` keeps its
    first N layers. `gpus` > 1: built on `device` (cuda:0), then split over cuda:0 .. cuda:gpus-1 by
    `split_over_gpus`. Returns `(model, info)`; the model is in eval mode with attn "sdpa".
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import tq_hf  # noqa: F401  (registers the "turboquant" attention)

    device = torch.device(device)
    if gpus > 1 and (device.type != "cuda" or torch.cuda.device_count() < gpus):
        raise ValueError(f"gpus={gpus} needs {gpus} CUDA devices; {torch.cuda.device_count()} visible "
                         f"(device {device})")
    if model_path is not None:
        if not os.path.isdir(model_path):
            raise ValueError(f"--model {model_path!r} is not a folder (only local checkpoints are loaded)")
        overrides = {"num_hidden_layers": layers} if layers else {}
        config = AutoConfig.from_pretrained(model_path, local_files_only=True, **overrides)
        kwargs = {"local_files_only": True, "dtype": dtype, "attn_implementation": "sdpa", "config": config}
        try:
            import accelerate  # noqa: F401

            model = AutoModelForCausalLM.from_pretrained(model_path, device_map=str(device), **kwargs)
        except ImportError:
            model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs).to(device)
        name = f"{os.path.basename(os.path.normpath(model_path))} ({config.model_type})"
    else:
        fields = {**LLAMA3_8B_SHAPE, **{k: v for k, v in shape.items() if v is not None}}
        if layers:
            fields["num_hidden_layers"] = layers
        config = LlamaConfig(**fields, max_position_embeddings=max(8192, max_positions), tie_word_embeddings=False)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            # Created on the device: initialising 8B parameters on the CPU first would take minutes.
            with torch.device(device):
                model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
        default = all(fields[k] == v for k, v in LLAMA3_8B_SHAPE.items())
        name = "Llama-3-8B shape, random weights" if default else "Llama shape from flags, random weights"
    model.eval()
    if gpus > 1:
        model = split_over_gpus(model, gpus)
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    info = {
        "model": name,
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "q_heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": head_dim,
        "intermediate": getattr(text, "intermediate_size", None),
        "vocab": text.vocab_size,
        "dtype": _dtype_name(dtype),
        "weights_bytes": _model_bytes(model),
        "gpus": gpus,
    }
    if gpus > 1:
        info["device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
    return model, info


def split_over_gpus(model, gpus: int):
    """Dispatch `model` over cuda:0 .. cuda:gpus-1 with accelerate, as `from_pretrained(device_map=
    "balanced")` does: whole decoder layers per GPU, about equal weight bytes on each, hooks that move
    activations between GPUs. The KV cache follows its layer, so it splits the same way. `build_model`
    creates the model on cuda:0 first, so its weights must fit one GPU (the 8B default does): the split
    buys room for the cache, not for the weights."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = model._no_split_modules
    total = {i: torch.cuda.get_device_properties(i).total_memory for i in range(gpus)}
    balanced = get_balanced_memory(model, max_memory=total, no_split_module_classes=no_split, low_zero=False)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    used = set(device_map.values())
    if not used <= set(range(gpus)):
        raise ValueError(f"the model does not fit {gpus} GPUs' memory: device_map uses {sorted(map(str, used))}")
    model = dispatch_model(model, device_map)
    model.hf_device_map = device_map
    return model


def _model_gpus(model) -> list[torch.device]:
    """The CUDA devices holding the model's parameters (one, or the GPUs of a device_map split)."""
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=lambda d: d.index)


# ------------------------------------------------------------------------------------- measuring
class _Timer:
    """Wall-clock timer of a forward call: synchronized on every GPU in `gpus`, plain perf_counter on CPU."""

    def __init__(self, gpus: list[torch.device]):
        self.gpus = gpus

    def sync(self):
        for d in self.gpus:
            torch.cuda.synchronize(d)

    @contextlib.contextmanager
    def __call__(self, out: list):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        out.append(time.perf_counter() - t0)


def _allocated(gpus) -> int:
    return sum(torch.cuda.memory_allocated(d) for d in gpus)


def _peak(gpus) -> int:
    """Sum over `gpus` of each one's peak allocation since the last `_reset_peak` (each GPU has to hold
    its own peak, so for capacity the sum is what counts even where the peaks come at different times)."""
    return sum(torch.cuda.max_memory_allocated(d) for d in gpus)


def _reset_peak(gpus) -> None:
    for d in gpus:
        torch.cuda.reset_peak_memory_stats(d)


@contextlib.contextmanager
def _spans(model, cache, device):
    """Time every attention-function call and every `cache.update` of the model (CUDA events on the
    GPU: the interval between the call's first and last kernel on the stream; perf_counter on CPU).
    Yields a function returning (attention seconds, update seconds) recorded so far."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cuda = device.type == "cuda"
    name = model.config._attn_implementation
    spans = {"attn": [], "update": []}

    def timed(kind, fn):
        def wrapped(*args, **kwargs):
            if cuda:
                # On the stream of the call's own GPU (layers of a device_map split run on several).
                dev = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
                stream = torch.cuda.current_stream(dev)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                result = fn(*args, **kwargs)
                end.record(stream)
                spans[kind].append((start, end))
            else:
                t0 = time.perf_counter()
                result = fn(*args, **kwargs)
                spans[kind].append(time.perf_counter() - t0)
            return result

        return wrapped

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had_local, previous = name in local, local.get(name)
    ALL_ATTENTION_FUNCTIONS[name] = timed("attn", ALL_ATTENTION_FUNCTIONS[name])  # instance-local override
    cache.update = timed("update", cache.update)  # instance attribute shadows the method

    def totals():
        if cuda:
            _Timer(_model_gpus(model)).sync()
            return tuple(sum(s.elapsed_time(e) for s, e in spans[k]) / 1e3 for k in ("attn", "update"))
        return tuple(sum(spans[k]) for k in ("attn", "update"))

    try:
        yield totals
    finally:
        if had_local:
            local[name] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS[name]
        del cache.update


def _free(device: torch.device) -> None:
    from .workspace import workspaces

    for ws in workspaces().values():
        ws.clear()
    if device.type == "cuda":  # (a full gc.collect is slow in a big process: only where memory is measured)
        gc.collect()
        torch.cuda.empty_cache()


@torch.inference_mode()
def _forward(model, ids, cache, cache_kw):
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    return out.logits[:, -1:].argmax(-1)  # greedy next token [B, 1]; full-vocab logits of 1 position only


def _measure(model, system: _System, batch: int, context: int, opts: dict, device: torch.device,
             generator: torch.Generator) -> dict:
    """One (system, batch, context) row. Raises on OOM with `_phase` set on the exception."""
    gpus = _model_gpus(model) if device.type == "cuda" else []
    cuda = bool(gpus)
    timer = _Timer(gpus)
    cache_kw = _cache_kwarg(model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    row: dict = {}

    def rand_ids(b, n):  # random token ids in [1, vocab): never zeros (a constant prompt is a degenerate case)
        return torch.randint(1, vocab, (b, n), generator=generator).to(device)

    # Warm-up at a short context with the same batch: compiles every kernel variant of this batch
    # size (Triton specialises on it) and primes the allocator, so TTFT holds no compilation.
    warm = system.make_cache()
    nxt = _forward(model, rand_ids(batch, min(context, opts["warmup_context"])), warm, cache_kw)
    for _ in range(2):
        nxt = _forward(model, nxt, warm, cache_kw)
    timer.sync()
    del warm, nxt
    _free(device)

    ids = rand_ids(batch, context)
    base = _allocated(gpus) if cuda else None
    row["base_mem_bytes"] = base
    cache = system.make_cache()
    phase = "prefill"
    try:
        if cuda:
            _reset_peak(gpus)
        t: list = []
        with timer(t):
            nxt = _forward(model, ids, cache, cache_kw)
        row["ttft_s"] = t[0]
        if cuda:
            row["peak_mem_prefill_bytes"] = _peak(gpus)
            _reset_peak(gpus)
        del ids
        phase = "decode"
        steps: list = []
        for i in range(opts["warmup"] + opts["steps"]):
            dt: list = []
            with timer(dt):
                nxt = _forward(model, nxt, cache, cache_kw)
            if i >= opts["warmup"]:
                steps.append(dt[0])
        if cuda:
            row["peak_mem_decode_bytes"] = _peak(gpus)
            row["peak_mem_bytes"] = max(row["peak_mem_prefill_bytes"], row["peak_mem_decode_bytes"])
        step = statistics.median(steps)
        row.update(
            decode_step_ms=1e3 * step,
            decode_step_ms_mean=1e3 * statistics.fmean(steps),
            decode_step_ms_min=1e3 * min(steps),
            decode_tokens_per_s=batch / step,
            decode_steps=len(steps),
        )
        row["cache_bytes"] = _cache_nbytes(cache)
        row["cache_tokens"] = cache.get_seq_length()
        if isinstance(cache, TurboQuantCache):
            tq = [layer for layer in cache.layers if hasattr(layer, "capacity") and layer.n_quant]
            if tq:
                row["tq_codes_capacity_over_used"] = tq[0].capacity / tq[0].n_quant
        # Attention share: a few more steps with the attention function and cache.update timed.
        if opts["attn_steps"]:
            step_s: list = []
            with _spans(model, cache, device) as totals:
                for _ in range(opts["attn_steps"]):
                    with timer(step_s):
                        nxt = _forward(model, nxt, cache, cache_kw)
                attn_s, update_s = totals()
            n, wall = len(step_s), sum(step_s)
            row.update(attn_ms_per_step=1e3 * attn_s / n, update_ms_per_step=1e3 * update_s / n,
                       attn_share=attn_s / wall, update_share=update_s / wall)
    except BaseException as e:
        e._phase = phase  # type: ignore[attr-defined]
        e._row = row  # type: ignore[attr-defined]
        raise
    finally:
        cache = nxt = None
    return row


def _pareto_skip(failed: dict, system: str, batch: int, context: int) -> str | None:
    for b, c in failed.get(system, ()):
        if batch >= b and context >= c:
            return f"skipped: oom at batch {b} x context {_fmt_ctx(c)}"
    return None


def bench_generate(contexts=DEFAULT_CONTEXTS, batches=DEFAULT_BATCHES, presets=DEFAULT_PRESETS, *,
                   model=None, model_path=None, layers=None, device="auto", dtype="auto",
                   hf_backend="auto", hf_nbits=4, tq_backend="auto", steps=10, warmup=3, attn_steps=2,
                   warmup_context=256, budget_bytes=None, time_budget_s=None, seed=0, progress=True,
                   out_dir=None, name="generate", on_row=None, gpus=1, **shape) -> dict:
    """Prefill + decode of a whole decoder with each cache system; see the module docstring.

    Args:
        contexts, batches: prompt lengths (tokens) and batch sizes; every combination is measured,
            smallest batch x context first. A system that runs out of memory skips the larger shapes.
        presets: TurboQuant presets (each with attn_implementation="turboquant").
        model: an already built decoder (else one is built by `build_model(model_path, layers, ...)`,
            `shape` overriding fields of the Llama-3-8B shape, e.g. hidden_size=256).
        device: "auto" (cuda if present), "cuda" or "cpu". gpus: split the built model's layers over this
            many GPUs (`split_over_gpus`); memory is then summed over them. dtype: "auto" (bf16 on CUDA, fp32 on CPU),
            a name ("bfloat16") or a torch dtype.
        hf_backend: HF QuantizedCache backend: "auto" (first of quanto, hqq, fp8 that is installed),
            one of them, or "none". hf_nbits: its bits (quanto/hqq).
        steps, warmup: decode steps timed (median reported) after `warmup` untimed ones.
        attn_steps: extra decode steps with the attention function and cache.update timed (0: off).
        budget_bytes: memory budget of the capacity estimate (default: the GPU's total memory; on
            CPU the machine's RAM).
        time_budget_s: start no new row after this many seconds (rows left get status "skipped").
        out_dir: if given, `<name>.json`, `<name>.csv` and `<name>_capacity.csv` are rewritten there
            after every row (a killed run keeps what it measured) and `<name>.png` at the end.
    Returns:
        `{"environment", "model", "settings", "rows", "capacity", "notes"}`.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    if isinstance(dtype, str):
        dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    contexts, batches = sorted(set(contexts)), sorted(set(batches))
    if not contexts or not batches or min(contexts) < 1 or min(batches) < 1:
        raise ValueError(f"contexts and batches must be positive, got {contexts}, {batches}")
    for p in presets:
        TurboQuantConfig.from_preset(p)  # unknown names raise here, before the model is built
    if model is None:
        model, info = build_model(model_path, layers, device, dtype, seed,
                                  max_positions=max(contexts) + warmup + steps + attn_steps + 16, gpus=gpus, **shape)
    else:
        if gpus > 1:
            raise ValueError("gpus > 1 splits the model bench_generate builds; split a given model yourself "
                             "(e.g. tq_hf.bench.split_over_gpus) and pass gpus=1")
        info = {"model": type(model).__name__, "dtype": _dtype_name(dtype), "weights_bytes": _model_bytes(model)}
        text = model.config.get_text_config(decoder=True)
        info.update(layers=text.num_hidden_layers, kv_heads=text.num_key_value_heads,
                    head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    cuda = device.type == "cuda"
    env = environment()
    env.update(device=device.type, python=platform.python_version(), cuda=torch.version.cuda)
    if cuda:
        gpu_list = _model_gpus(model) or [device]
        props = [torch.cuda.get_device_properties(d) for d in gpu_list]
        env.update(gpu=props[0].name + (f" x{len(props)}" if len(props) > 1 else ""), gpus=len(props),
                   gpu_memory_bytes=sum(p.total_memory for p in props))
    else:
        env.update(gpu="none (CPU run)", cpu=platform.processor() or platform.machine() or "cpu")
    if budget_bytes is None:
        if cuda:
            budget_bytes = env["gpu_memory_bytes"]
        else:
            budget_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    settings = {"contexts": contexts, "batches": batches, "presets": list(presets), "gpus": env.get("gpus", 0), "hf_backend": hf_backend,
                "hf_nbits": hf_nbits, "tq_backend": tq_backend, "steps": steps, "warmup": warmup,
                "attn_steps": attn_steps, "warmup_context": warmup_context, "budget_bytes": budget_bytes,
                "time_budget_s": time_budget_s, "seed": seed}
    systems = _systems(model, presets, hf_backend, hf_nbits, tq_backend, dtype)
    opts = {"steps": steps, "warmup": warmup, "attn_steps": attn_steps, "warmup_context": warmup_context}
    generator = torch.Generator().manual_seed(seed)
    notes = _notes(cuda)
    result = {"environment": env, "model": info, "settings": settings, "rows": [], "capacity": [], "notes": notes}
    shapes = sorted(((b, c) for b in batches for c in contexts), key=lambda bc: (bc[0] * bc[1], bc[1]))
    failed: dict = {}
    dense_by_shape: dict = {}
    bar = tqdm(total=len(shapes) * len(systems), disable=not progress, desc="bench generate", unit="row")
    try:
        for batch, context in shapes:
            for system in systems:
                bar.set_postfix_str(f"{system.name} B={batch} ctx={_fmt_ctx(context)}")
                row = {**env, **{k: info.get(k) for k in ("model", "layers", "dtype")},
                       "system": system.name, "attn": system.attn, "batch": batch, "context": context,
                       "cpu": not cuda, "timer": "perf_counter + cuda.synchronize" if cuda else "perf_counter",
                       "memory_source": ("torch.cuda.max_memory_allocated" + (" summed over GPUs" if gpus > 1 else "")
                                         if cuda else "cache bytes only (no CUDA allocator)")}
                status = "ok"
                try:
                    if system.unavailable:
                        raise _SkipRow(system.unavailable)
                    skip = _pareto_skip(failed, system.name, batch, context)
                    if skip:
                        raise _SkipRow(skip)
                    if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                        raise _SkipRow(f"skipped: time budget of {time_budget_s:.0f} s spent")
                    model.set_attn_implementation(system.attn)
                    with system.context():
                        row.update(_measure(model, system, batch, context, opts, device, generator))
                except _SkipRow as e:
                    status = str(e)
                except Exception as e:  # noqa: BLE001  (OOM and any failure become the row's status)
                    row.update(getattr(e, "_row", {}))
                    phase = getattr(e, "_phase", "warm-up")
                    if _is_oom(e):
                        status = f"oom ({phase})"
                        failed.setdefault(system.name, []).append((batch, context))
                    else:
                        status = f"error ({phase}): {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    del e
                _free(device)
                row["status"] = status
                _derive(row, info, dense_by_shape, system)
                result["rows"].append(row)
                result["capacity"] = capacity(result["rows"], budget_bytes, contexts, info)
                if out_dir is not None:
                    _write(result, out_dir, name, plot=False)
                if on_row is not None:
                    on_row(row)
                bar.update(1)
    finally:
        bar.close()
    result["elapsed_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        _write(result, out_dir, name, plot=True)
    return result


def _derive(row: dict, info: dict, dense_by_shape: dict, system: _System) -> None:
    """Per-token bytes, the bf16-equivalent cache size and ratios against the dense systems: `*_vs_dense`
    against SDPA as transformers calls it, `decode_speedup_vs_flash` against SDPA forced to FlashAttention."""
    if row.get("cache_bytes") is not None and row.get("cache_tokens"):
        tokens = row["batch"] * row["cache_tokens"]
        row["cache_bytes_per_token"] = row["cache_bytes"] / tokens
        if info.get("layers") and info.get("kv_heads") and info.get("head_dim"):
            bf16 = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * 2 * tokens
            row["cache_vs_bf16"] = row["cache_bytes"] / bf16
    key = (row["batch"], row["context"])
    if system.kind == "dense":
        dense_by_shape.setdefault(key, {})["flash" if system.sdpa_backend else "sdpa"] = row
        return
    dense, flash = (dense_by_shape.get(key, {}).get(k) for k in ("sdpa", "flash"))
    if row.get("status") != "ok":
        return
    if flash is not None and flash.get("status") == "ok" and flash.get("decode_tokens_per_s"):
        row["decode_speedup_vs_flash"] = row["decode_tokens_per_s"] / flash["decode_tokens_per_s"]
    if dense is None or dense.get("status") != "ok":
        return
    if dense.get("decode_tokens_per_s"):
        row["decode_speedup_vs_dense"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    if dense.get("ttft_s"):
        row["ttft_vs_dense"] = row["ttft_s"] / dense["ttft_s"]
    if dense.get("peak_mem_bytes") and row.get("peak_mem_bytes"):
        row["peak_mem_vs_dense"] = row["peak_mem_bytes"] / dense["peak_mem_bytes"]


def capacity(rows: list[dict], budget_bytes: int, contexts, info: dict) -> list[dict]:
    """Largest batch x context per system that fits `budget_bytes` while decoding, computed (not
    measured) from the measured rows:

        capacity_tokens = (budget - fixed) / bytes_per_token

    bytes_per_token: cache bytes / (batch x cached tokens) of the system's largest successful row.
    fixed: on CUDA, the decode-phase peak minus the cache bytes of its smallest batch-1 row (weights,
    activations, workspaces); on CPU the weights alone (no allocator statistics). `max_batch` is
    capacity_tokens // context for each context. A second estimate, `capacity_tokens_peak_fit`, fits
    decode peak memory = a + b x tokens over all rows on CUDA, so per-token transients (DynamicCache's
    `torch.cat`, HF QuantizedCache's dequantized copy of a layer) count too. Prefill must be chunked
    to reach either: a one-shot prefill needs more (see the rows' prefill peaks)."""
    out = []
    systems = list(dict.fromkeys(r["system"] for r in rows))
    dense_name = next((r["system"] for r in rows if r["system"].startswith("DynamicCache")), None)
    for name in systems:
        ok = [r for r in rows if r["system"] == name and r.get("status") == "ok" and r.get("cache_tokens")]
        entry = {"system": name, "budget_bytes": budget_bytes}
        if not ok:
            statuses = sorted({r.get("status", "") for r in rows if r["system"] == name})
            entry["status"] = "no successful row: " + "; ".join(statuses)[:300]
            out.append(entry)
            continue
        big = max(ok, key=lambda r: r["batch"] * r["cache_tokens"])
        bpt = big["cache_bytes"] / (big["batch"] * big["cache_tokens"])
        cuda = not big.get("cpu")
        if cuda:
            small = min(ok, key=lambda r: (r["batch"], r["context"]))
            fixed = small["peak_mem_decode_bytes"] - small["cache_bytes"]
            method = (f"fixed = decode peak - cache bytes at batch {small['batch']} x {_fmt_ctx(small['context'])}; "
                      f"bytes/token from batch {big['batch']} x {_fmt_ctx(big['context'])}")
        else:
            fixed = info.get("weights_bytes", 0)
            method = (f"CPU: fixed = weight bytes (no allocator statistics); bytes/token from batch {big['batch']} "
                      f"x {_fmt_ctx(big['context'])}")
        tokens = max(0, int((budget_bytes - fixed) // bpt))
        entry.update(status="ok", method=method, fixed_bytes=fixed, bytes_per_token=bpt, capacity_tokens=tokens,
                     max_batch={str(c): tokens // c for c in contexts})
        pts = [(r["batch"] * r["cache_tokens"], r["peak_mem_decode_bytes"]) for r in ok if r.get("peak_mem_decode_bytes")]
        if len({t for t, _ in pts}) >= 2:
            n = len(pts)
            mx, my = sum(t for t, _ in pts) / n, sum(m for _, m in pts) / n
            slope = sum((t - mx) * (m - my) for t, m in pts) / sum((t - mx) ** 2 for t, _ in pts)
            if slope > 0:
                intercept = my - slope * mx
                entry.update(peak_fit_bytes_per_token=slope, peak_fit_fixed_bytes=intercept,
                             capacity_tokens_peak_fit=max(0, int((budget_bytes - intercept) // slope)))
        out.append(entry)
    dense = next((e for e in out if e["system"] == dense_name and e.get("status") == "ok"), None)
    for e in out:
        if dense and e.get("status") == "ok" and dense["capacity_tokens"]:
            e["capacity_vs_dense"] = e["capacity_tokens"] / dense["capacity_tokens"]
            if e.get("capacity_tokens_peak_fit") and dense.get("capacity_tokens_peak_fit"):
                e["capacity_peak_fit_vs_dense"] = e["capacity_tokens_peak_fit"] / dense["capacity_tokens_peak_fit"]
    return out


def _notes(cuda: bool) -> list[str]:
    notes = [
        ("Plain forward loop (no generate()): one prefill of the whole prompt with logits for the last "
         "position only, then greedy decode steps, each synchronized; tokens/s = batch / median step."),
        "TTFT: one prefill after a warm-up at a short context with the same batch (no compilation in it).",
        ("Cache bytes: TurboQuantCache.nbytes() (codes, norms, window, means, allocated headroom); tensor bytes "
         "of each layer for DynamicCache and HF QuantizedCache. Capacity is computed from measured bytes per "
         "token and measured fixed memory, not measured by filling the GPU."),
        ("attn_share / update_share: time between the first and last kernel of the attention function / "
         "cache.update calls of a step (CUDA events) over the step's wall time, from extra timed steps."),
        ("TurboQuant decode steps run inside the exact window (< residual_length tokens after prefill): the "
         "code planes hold no headroom yet; the first window flush grows them 1.25x."),
    ]
    if not cuda:
        notes.insert(0, "CPU RUN: times use time.perf_counter on the CPU (PyTorch reference path for "
                        "TurboQuant), memory is cache bytes only; these rows say nothing about GPU speed.")
    return notes


# ------------------------------------------------------------------------------------- output
def _write(result: dict, out_dir: str, name: str, plot: bool) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "csv": os.path.join(out_dir, f"{name}.csv"),
             "capacity_csv": os.path.join(out_dir, f"{name}_capacity.csv")}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, paths["json"])
    _write_csv(paths["csv"], result["rows"])
    cap = [{**e, "max_batch": json.dumps(e.get("max_batch"))} if "max_batch" in e else e for e in result["capacity"]]
    _write_csv(paths["capacity_csv"], [{**{k: result["environment"].get(k) for k in ("gpu", "date")}, **e}
                                       for e in cap])
    if plot:
        png = os.path.join(out_dir, f"{name}.png")
        try:
            plot_generate(result, png)
            paths["png"] = png
        except ImportError as e:
            print(f"bench generate: no plot ({e}); render it elsewhere with "
                  f"`python -m tq_hf.bench generate --plot-only {paths['json']}`", file=sys.stderr)
    return paths


def _write_csv(path: str, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def plot_generate(result: dict | str, path: str) -> str:
    """PNG of decode tokens/s, peak memory and cache size against context, one line per system,
    one row of panels per batch size. `result` is `bench_generate`'s dict or the path of its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(result, str):
        with open(result) as f:
            result = json.load(f)
    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    env, info = result["environment"], result["model"]
    cpu = env.get("device") == "cpu"
    systems = list(dict.fromkeys(r["system"] for r in result["rows"]))
    batches = sorted({r["batch"] for r in result["rows"]}) or [1]
    colors = {s: f"C{i}" for i, s in enumerate(systems)}
    if cpu:  # no allocator statistics on the CPU: the memory panel shows cache bytes
        panels = [("decode_tokens_per_s", "decode tokens/s", 1), ("cache_bytes", "KV-cache size (MiB)", _MIB),
                  ("ttft_s", "prefill time, TTFT (s)", 1)]
    else:
        panels = [("decode_tokens_per_s", "decode tokens/s", 1), ("peak_mem_bytes", "peak GPU memory (GiB)", _GIB),
                  ("cache_bytes", "KV-cache size (GiB)", _GIB)]
    fig, axes = plt.subplots(len(batches), len(panels), figsize=(5.2 * len(panels), 3.8 * len(batches)),
                             squeeze=False)
    contexts = sorted({r["context"] for r in result["rows"]})
    for i, b in enumerate(batches):
        for j, (key, label, div) in enumerate(panels):
            ax = axes[i][j]
            for s in systems:
                pts = sorted((r["context"], r[key] / div) for r in rows
                             if r["system"] == s and r["batch"] == b and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[s], label=s)
                failed = [r for r in result["rows"] if r["system"] == s and r["batch"] == b
                          and str(r.get("status", "")).startswith("oom")]
                for r in failed:  # OOM: a cross on the x axis
                    ax.plot([r["context"]], [0], marker="x", color=colors[s], markersize=9, linestyle="none")
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts)
            ax.set_xticklabels([_fmt_ctx(c) for c in contexts])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"batch {b}")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=min(4, max(1, len(labels))),
               frameon=False, bbox_to_anchor=(0.5, 0.025))
    where = (f"CPU run ({env.get('cpu', 'cpu')}; PyTorch reference path, memory = cache bytes only)" if cpu
             else env.get("gpu", "?"))
    fig.suptitle(f"{info.get('model')} - {info.get('layers')} layers, {info.get('dtype')} - {where}\n"
                 f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
                 f"{env.get('date')}.  tokens/s = batch / median decode step; x on the axis: out of memory",
                 fontsize=10)
    not_run = []
    for s in systems:
        if not any(r["system"] == s for r in rows):
            st = next(r.get("status", "") for r in result["rows"] if r["system"] == s)
            not_run.append(f"{s}: {st[:200]}")
    if not_run:
        fig.text(0.5, 0.005, "not measured - " + " | ".join(not_run), ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.09 if not_run else 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v, spec, div=1):
    if v is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(v / div, spec)


def print_generate(result: dict, file=None) -> None:
    file = file or sys.stdout
    env = result["environment"]
    print(f"\n{result['model'].get('model')}, {result['model'].get('layers')} layers, {result['model'].get('dtype')} "
          f"on {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
          f"{env.get('transformers')}, {env.get('date')}", file=file)
    hdr = (f"{'system':<30} {'B':>3} {'ctx':>5} {'TTFT s':>8} {'step ms':>8} {'tok/s':>8} {'x dense':>7} {'x flash':>7} "
           f"{'peak GiB':>8} {'cache MiB':>10} {'x bf16':>6} {'attn%':>5}  status")
    print(hdr, file=file)
    for r in result["rows"]:
        share = r.get("attn_share")
        print(f"{r['system'][:30]:<30} {r['batch']:>3} {_fmt_ctx(r['context']):>5} {_fmt(r.get('ttft_s'), '8.3f')} "
              f"{_fmt(r.get('decode_step_ms'), '8.1f')} {_fmt(r.get('decode_tokens_per_s'), '8.1f')} "
              f"{_fmt(r.get('decode_speedup_vs_dense'), '7.2f')} {_fmt(r.get('decode_speedup_vs_flash'), '7.2f')} "
              f"{_fmt(r.get('peak_mem_bytes'), '8.1f', _GIB)} "
              f"{_fmt(r.get('cache_bytes'), '10.1f', _MIB)} {_fmt(r.get('cache_vs_bf16'), '6.3f')} "
              f"{_fmt(None if share is None else 100 * share, '5.0f')}  {r.get('status')}", file=file)
    print(f"\ncapacity in a {result['settings']['budget_bytes'] / _GIB:.1f} GiB budget (computed from measured "
          "bytes/token and fixed memory; prefill chunked):", file=file)
    for e in result["capacity"]:
        if e.get("status") != "ok":
            print(f"  {e['system']:<30} {e.get('status')}", file=file)
            continue
        fit = e.get("capacity_tokens_peak_fit")
        print(f"  {e['system']:<30} {e['capacity_tokens']:>11,} tokens ({_fmt(e.get('capacity_vs_dense'), '.2f')}x dense)"
              f"  fixed {e['fixed_bytes'] / _GIB:.2f} GiB, {e['bytes_per_token'] / 1024:.1f} KiB/token"
              + (f"; peak fit {fit:,} tokens ({_fmt(e.get('capacity_peak_fit_vs_dense'), '.2f')}x)" if fit else ""),
              file=file)


# ------------------------------------------------------------------------------------- command line
def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `bench generate` (see `run_generate`)."""
    g = p.add_argument_group("model (default: Llama-3-8B shape, random weights, built on the device)")
    g.add_argument("--model", metavar="PATH", help="local checkpoint folder instead (nothing is downloaded)")
    g.add_argument("--layers", type=int, metavar="N", help="number of decoder layers (default: 32 / the checkpoint's)")
    g.add_argument("--hidden", type=int, metavar="N", help="hidden size (default 4096)")
    g.add_argument("--intermediate", type=int, metavar="N", help="MLP size (default 14336)")
    g.add_argument("--heads", type=int, metavar="N", help="query heads (default 32)")
    g.add_argument("--kv-heads", type=int, metavar="N", help="key/value heads (default 8)")
    g.add_argument("--head-dim", type=int, metavar="N", help="head dim (default 128)")
    g.add_argument("--vocab", type=int, metavar="N", help="vocabulary size (default 128256)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: auto (cuda if present)")
    g.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--seed", type=int, default=0, help="seed of weights and token ids (default 0)")
    g.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="split the layers over N GPUs with accelerate (balanced device_map; default 1); "
                        "the weights must fit one GPU before the split")
    g = p.add_argument_group("grid")
    g.add_argument("--contexts", nargs="+", type=_size, default=list(DEFAULT_CONTEXTS), metavar="N",
                   help="prompt lengths, e.g. 4K 16K 32K 64K (default)")
    g.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES), metavar="B",
                   help="batch sizes (default: 1 8)")
    g.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), metavar="NAME",
                   help="TurboQuant presets (default: 4bit 3bit)")
    g.add_argument("--tq-backend", choices=("auto", "torch", "triton"), default="auto",
                   help="TurboQuant backend (default auto: Triton on CUDA)")
    g.add_argument("--hf-backend", choices=("auto", "none") + HF_QUANT_BACKENDS, default="auto",
                   help="HF QuantizedCache backend (default auto: first installed of quanto, hqq, fp8)")
    g.add_argument("--hf-nbits", type=int, default=4, help="HF QuantizedCache bits for quanto/hqq (default 4)")
    g = p.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=10, help="timed decode steps per row (default 10; median)")
    g.add_argument("--warmup", type=int, default=3, help="untimed decode steps before them (default 3)")
    g.add_argument("--attn-steps", type=int, default=2,
                   help="extra steps timing the attention function and cache.update (default 2; 0: off)")
    g.add_argument("--budget-gib", type=float, help="memory budget of the capacity estimate (default: GPU memory)")
    g.add_argument("--time-budget", type=float, metavar="S",
                   help="start no new row after S seconds; the rest are recorded as skipped")
    g.add_argument("--out", default="bench_results", metavar="DIR", help="output folder (default bench_results)")
    g.add_argument("--name", default=None, help="file name stem (default generate_<gpu|cpu>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--plot-only", metavar="JSON", help="only render the PNG of an existing results JSON")
    return p


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()[:40] or "run"


def run_generate(args: argparse.Namespace) -> int:
    """`bench generate`: run `bench_generate` with parsed `args`, print the table, write the files."""
    if args.plot_only:
        if not os.path.isfile(args.plot_only):
            print(f"bench generate: error: --plot-only {args.plot_only!r} is not a file", file=sys.stderr)
            return 2
        png = os.path.splitext(args.plot_only)[0] + ".png"
        print(plot_generate(args.plot_only, png))
        return 0
    for flag, low in (("steps", 1), ("layers", 1), ("gpus", 1), ("head_dim", 8), ("warmup", 0), ("attn_steps", 0)):
        v = getattr(args, flag)
        if v is not None and v < low:
            print(f"bench generate: error: --{flag.replace('_', '-')} must be >= {low}, got {v}", file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench generate: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    name = args.name or ("generate_" + (_slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu")
                         + (f"_x{args.gpus}" if args.gpus > 1 else ""))

    def log_row(r):  # without a progress bar, one line per finished row (readable in a log file)
        print(f"[{time.strftime('%H:%M:%S')}] {r['system']} B={r['batch']} ctx={_fmt_ctx(r['context'])}: "
              f"{r['status']}; TTFT {_fmt(r.get('ttft_s'), '.3f')} s, step {_fmt(r.get('decode_step_ms'), '.1f')} ms, "
              f"peak {_fmt(r.get('peak_mem_bytes'), '.1f', _GIB)} GiB, cache {_fmt(r.get('cache_bytes'), '.1f', _MIB)} MiB",
              flush=True)

    try:
        result = bench_generate(
            args.contexts, args.batches, args.presets, model_path=args.model, layers=args.layers, device=str(device),
            dtype=args.dtype, hf_backend=args.hf_backend, hf_nbits=args.hf_nbits, tq_backend=args.tq_backend,
            steps=args.steps, warmup=args.warmup, attn_steps=args.attn_steps,
            budget_bytes=None if args.budget_gib is None else int(args.budget_gib * _GIB),
            time_budget_s=args.time_budget, seed=args.seed, progress=not args.no_progress, out_dir=args.out,
            name=name, on_row=log_row if args.no_progress else None, gpus=args.gpus, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
            vocab_size=args.vocab)
    except ValueError as e:
        print(f"bench generate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print_generate(result)
    print(f"\nwrote {os.path.join(args.out, name)}.json/.csv/_capacity.csv/.png in {result['elapsed_s']:.0f} s")
    return 0


def add_kernels_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `bench kernels` (see `run_kernels`)."""
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], metavar="B", help="default: 1 8 32")
    p.add_argument("--contexts", nargs="+", type=_size, default=[1024, 4096, 16384, 65536], metavar="N",
                   help="default: 1K 4K 16K 64K")
    p.add_argument("--presets", nargs="+", default=["4bit", "3bit"], metavar="NAME", help="default: 4bit 3bit")
    p.add_argument("--hq", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--hkv", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    p.add_argument("--out", metavar="JSON", help="also save the rows as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_kernels(args: argparse.Namespace) -> int:
    """`bench kernels`: decode attention alone, each preset vs bf16 SDPA (CUDA only)."""
    if not torch.cuda.is_available():
        print("bench kernels: error: needs a CUDA GPU (the Triton decode kernel is timed on the device)",
              file=sys.stderr)
        return 2
    rows = bench_kernels(tuple(args.batches), tuple(args.contexts), tuple(args.presets), hq=args.hq, hkv=args.hkv,
                         d=args.head_dim, progress=not args.no_progress)
    print_table(rows)
    if args.out:
        save(rows, args.out)
    return 0


def main_generate(argv=None) -> int:
    p = add_generate_arguments(argparse.ArgumentParser(
        prog="python -m tq_hf bench generate",
        description="Prefill + decode speed, peak memory, cache bytes and capacity of bf16 DynamicCache, HF "
                    "QuantizedCache and TurboQuantCache presets on a decoder built from a config."))
    return run_generate(p.parse_args(argv))


def main_kernels(argv=None) -> int:
    p = add_kernels_arguments(argparse.ArgumentParser(
        prog="python -m tq_hf bench kernels",
        description="Decode attention from the packed cache vs bf16 SDPA on the same shapes (CUDA)."))
    return run_kernels(p.parse_args(argv))


def main(argv=None) -> int:
    """`python -m tq_hf.bench {generate,kernels} ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": main_generate, "kernels": main_kernels}
    if not argv or argv[0] not in commands:
        print("usage: python -m tq_hf.bench {generate,kernels} [options]  (--help after the command)",
              file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
