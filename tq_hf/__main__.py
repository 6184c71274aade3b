"""Command line of tq_hf: `python -m tq_hf demo [...]`.

demo: generate one prompt greedily with `DynamicCache` and with `TurboQuantCache(preset)` and print
cache bytes, compression, tokens/s, greedy agreement and both texts. Without `--model` it runs a
built-in tiny Llama with random weights (no download); with `--model PATH` a local checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings

DEFAULT_PROMPT = (
    "TurboQuant stores every key and value vector of the cache as one norm plus a few bits per "
    "coordinate of its randomly rotated direction, so a long context fits in a fraction of the memory. "
    "Here is a short story about it:"
)


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- helpers
def _printable(text: str) -> str:
    # Random-weight models emit arbitrary bytes: keep the terminal safe and the output one line.
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
    return "".join(out)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    )


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        # bf16 is what models run in on GPUs; on CPUs fp32 is the fast and exact choice.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_local(path: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(path):
        raise UsageError(f"--model {path!r} does not exist (the demo only loads local checkpoints, nothing is downloaded)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--model {path!r} has no loadable transformers config: {e}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(
            f"--model {path!r} is an encoder-decoder model ({config.model_type}); TurboQuantCache serves "
            "decoder-only causal language models"
        )
    if getattr(config, "is_decoder", None) is False:
        # BERT-style encoders map to a *LMHeadModel in AutoModelForCausalLM but attend bidirectionally.
        raise UsageError(
            f"--model {path!r} is an encoder ({config.model_type}, is_decoder=False); TurboQuantCache serves "
            "decoder-only causal language models"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, attn_implementation="turboquant", dtype=dtype
        )
    except ValueError as e:
        raise UsageError(
            f"--model {path!r} ({config.model_type}) cannot be loaded as a decoder-only causal LM with "
            f"attn_implementation='turboquant': {e}"
        ) from None
    except OSError as e:
        raise UsageError(f"--model {path!r}: the weights cannot be loaded: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--model {path!r}: no tokenizer could be loaded from the folder: {e}") from None
    return model.to(device).eval(), tokenizer, f"{os.path.basename(os.path.normpath(path))} ({config.model_type})"


class _Progress:
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


def _generate(model, inputs, cache, max_new_tokens, progress_desc=None):
    """Greedy generate with `cache`; returns (new token ids [n], seconds)."""
    import torch
    from tqdm.auto import tqdm

    # transformers >= 5.24 names the argument `cache` (the old `past_key_values` warns); 5.17 knows only
    # `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kwargs = dict(inputs, max_new_tokens=max_new_tokens, do_sample=False, **{cache_kw: cache})
    if progress_desc:
        kwargs["streamer"] = _Progress(tqdm(total=max_new_tokens, desc=progress_desc, unit="tok", leave=False))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**kwargs)
    sync()
    return out[0, inputs["input_ids"].shape[1]:].tolist(), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- demo
def demo(args) -> int:
    from transformers import DynamicCache

    import tq_hf
    from tq_hf.config import PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)

    if args.model is None:
        from tq_hf.models import tiny_llama

        model, tokenizer = tiny_llama(seed=args.seed, dtype=dtype)
        model = model.to(device)
        name = f"built-in tiny Llama (random weights, seed {args.seed})"
    else:
        model, tokenizer, name = _load_local(args.model, device, dtype)

    encoded = tokenizer(args.prompt, return_tensors="pt")
    inputs = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask") if k in encoded}
    n_prompt = inputs["input_ids"].shape[1]
    preset = PRESETS[args.preset].replace(backend=args.backend)

    def new_tq_cache():
        try:
            return tq_hf.TurboQuantCache(preset, model_config=model.config)
        except ValueError as e:
            raise UsageError(f"{name}: {e}") from None

    def run(make_cache, n_tokens, desc=None):
        cache = make_cache()
        try:
            ids, seconds = _generate(model, inputs, cache, n_tokens, desc)
        except (ValueError, NotImplementedError) as e:
            if not isinstance(cache, tq_hf.TurboQuantCache):
                raise
            raise UsageError(f"{name} is not supported by TurboQuantCache: {str(e).splitlines()[0]}") from None
        return cache, ids, seconds

    print(f"tq_hf {tq_hf.__version__} demo: {name}")
    print(
        f"device {device.type}, {str(dtype).removeprefix('torch.')}; preset {args.preset!r} "
        f"(K {preset.key_bits} bit, V {preset.value_bits} bit, residual window {preset.residual_length}); "
        f"prompt {n_prompt} tokens, {args.max_new_tokens} new tokens, greedy"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Warm-up outside the timed runs: codebooks are solved, allocators primed and, on CUDA, every
        # kernel variant the run will need is compiled (so the warm-up covers the whole length there;
        # on CPU a short one is enough and keeps the demo quick).
        warm = args.max_new_tokens if device.type == "cuda" else 2
        run(lambda: DynamicCache(config=model.config), warm)
        run(new_tq_cache, warm)
        dense, dense_ids, dense_s = run(lambda: DynamicCache(config=model.config), args.max_new_tokens, "DynamicCache")
        tq, tq_ids, tq_s = run(new_tq_cache, args.max_new_tokens, f"TurboQuant {args.preset}")

    agree = 0
    for a, b in zip(dense_ids, tq_ids):
        if a != b:
            break
        agree += 1
    dense_bytes, tq_bytes = _cache_bytes(dense), tq.nbytes()
    # Both caches hold the prompt plus all but the last generated token.
    dense_tok, tq_tok = n_prompt + len(dense_ids) - 1, n_prompt + len(tq_ids) - 1
    ratio = (dense_bytes / dense_tok) / (tq_bytes / tq_tok) if tq_bytes and dense_tok and tq_tok else float("nan")

    rows = [
        ("cache", "bytes held", "vs dense", "tokens/s", "greedy agreement"),
        ("DynamicCache", _fmt_bytes(dense_bytes), "1.00x", f"{len(dense_ids) / dense_s:.1f}", "(reference)"),
        (
            f"TurboQuant {args.preset}",
            _fmt_bytes(tq_bytes),
            f"{ratio:.2f}x",
            f"{len(tq_ids) / tq_s:.1f}",
            f"first {agree}/{len(dense_ids)} tokens identical",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j in (0, 4) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    tq_layers = [layer for layer in tq.layers if isinstance(layer, tq_hf.TurboQuantLayer)]
    if tq_layers:
        lay = tq_layers[0]
        print(
            f"\n{len(tq_layers)}/{len(tq.layers)} layers quantized, each holding {lay.n_quant} tokens as codes and "
            f"{lay.n_window} in the exact window; bytes include allocated headroom, window, norms and means. "
            f"A bf16 DynamicCache would hold {_fmt_bytes(tq.dense_nbytes())}. tokens/s: end to end, prefill "
            f"included, {'Triton' if lay.backend == 'triton' else 'PyTorch reference'} path."
        )
    else:
        print(f"\nno layer is quantized: preset {args.preset!r} keeps all {len(tq.layers)} layers in full precision")
    if args.model is None:
        print("The built-in model has random weights: its text is noise and its logits are nearly tied, so greedy "
              "agreement here says little about quality (use --model PATH for a real checkpoint).")
    print(f"\nprompt:        {_printable(args.prompt)}")
    print(f"DynamicCache:  {_printable(tokenizer.decode(dense_ids, skip_special_tokens=True))}")
    print(f"TurboQuant:    {_printable(tokenizer.decode(tq_ids, skip_special_tokens=True))}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tq_hf", description="TurboQuant KV cache for transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "demo",
        help="generate with DynamicCache and TurboQuantCache and compare them",
        description="Generate one prompt greedily with DynamicCache and with TurboQuantCache(preset); print cache "
        "bytes, compression, tokens/s, greedy agreement and the texts. Without --model a tiny random-weight "
        "Llama is built locally (no download).",
    )
    p.add_argument("--model", metavar="PATH", help="local checkpoint folder (config, weights, tokenizer)")
    p.add_argument("--preset", default="4bit", help="TurboQuant preset (default: 4bit; see tq_hf.PRESETS)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default: 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto (cuda if present)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="prompt text")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="TurboQuant backend (default: auto = Triton on CUDA, PyTorch reference elsewhere)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the built-in model (default: 0)")
    p.set_defaults(func=demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
