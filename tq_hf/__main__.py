"""Command line of tq_hf: `python -m tq_hf demo [...]`.

demo: generate one prompt greedily with `DynamicCache` and with `TurboQuantCache(preset)` and print
cache bytes, compression, tokens/s, greedy agreement and both texts. Without `--model` it runs the
small trained reference model shipped with tq_hf (no download); `--model random` a tiny Llama with
random weights; `--model PATH` a local checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# The reference model learned Python's standard library: a code prompt gives it something to continue.
DEFAULT_PROMPT = (
    "class Counter(dict):\n"
    '    """Dict subclass for counting hashable items."""\n\n'
    "    def __init__(self, iterable=None, /, **kwds):\n"
    "        super().__init__()\n"
    "        self."
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


# ---------------------------------------------------------------------------------------------- demo
def demo(args) -> int:
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    import tq_hf
    from tq_hf.analysis import (
        ModelLoadError,
        cache_nbytes,
        common_prefix,
        generate_timed,
        load_model,
        resolve_device,
        resolve_dtype,
    )
    from tq_hf.config import PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except ModelLoadError as e:
        raise UsageError(str(e)) from None
    try:
        path = {None: "reference", "random": None}.get(args.model, args.model)
        model, tokenizer, name = load_model(path, device, dtype, seed=args.seed)
    except ModelLoadError as e:
        # The library names the path "model path"; on the command line it is --model.
        hint = " (--model random runs a random-weight model instead)" if args.model is None else ""
        raise UsageError(str(e).replace("model path", "--model", 1) + hint) from None

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
        bar = tqdm(total=n_tokens, desc=desc, unit="tok", leave=False) if desc else None
        try:
            ids, seconds, _ = generate_timed(model, inputs, cache, n_tokens, progress=bar)
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

    agree = common_prefix(dense_ids, tq_ids)
    dense_bytes, tq_bytes = cache_nbytes(dense), tq.nbytes()
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
        print("The built-in reference model is tiny (2.1M parameters, trained for minutes on Python's standard "
              "library): it continues code plausibly but its next-byte choices are often near-ties, so a few "
              "differing tokens are expected (use --model PATH for a real checkpoint).")
    elif args.model == "random":
        print("The random-weight model's text is noise and its logits are nearly tied, so greedy agreement here "
              "says little about quality.")
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
        "bytes, compression, tokens/s, greedy agreement and the texts. Without --model the small trained "
        "reference model shipped with tq_hf runs (no download).",
    )
    p.add_argument("--model", metavar="PATH",
                   help="local checkpoint folder (config, weights, tokenizer), or 'random' for a tiny random-weight "
                   "Llama (default: the shipped reference model)")
    p.add_argument("--preset", default="4bit", help="TurboQuant preset (default: 4bit; see tq_hf.PRESETS)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default: 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto (cuda if present)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="prompt text")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="TurboQuant backend (default: auto = Triton on CUDA, PyTorch reference elsewhere)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of --model random (default: 0)")
    p.set_defaults(func=demo)

    from . import bench

    b = sub.add_parser("bench", help="GPU benchmarks (kernels, generate)").add_subparsers(
        dest="bench_command", metavar="BENCH", required=True)
    bench.add_generate_arguments(b.add_parser("generate", help="generate(): TTFT, tokens/s, memory, capacity"))\
        .set_defaults(func=bench.run_generate)
    bench.add_kernels_arguments(b.add_parser("kernels", help="decode attention vs bf16 SDPA"))\
        .set_defaults(func=bench.run_kernels)
    # Listed for --help only: main() hands `eval`'s arguments to tq_hf.evaluate, which parses its own.
    sub.add_parser("eval", add_help=False, help="perplexity, KL, top-1 agreement, retrieval per preset "
                   "(python -m tq_hf eval --help)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        from . import evaluate

        return evaluate.main(argv[1:], prog="python -m tq_hf eval")
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
