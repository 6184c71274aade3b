"""Quality of TurboQuant presets on a model: perplexity, KL and top-1 agreement against the
full-precision cache, and a retrieval (passkey) test.

    python -m tq_hf.evaluate                                  # the shipped reference model, all presets
    python -m tq_hf.evaluate --model PATH --presets 4bit,3bit --out results/

Protocol (all of it reads the quantized cache, none of it is a prefill over exact K/V):

* **Teacher-forced decode.** Each text is cut to `seq_len` tokens. The first `prefix_len` tokens are
  prefilled, then the rest is fed one token per forward call, through the cache, as `generate` does.
  Only the logits of those decode steps are scored; they see every earlier token through the cache
  (quantized beyond the preset's full-precision window). All configurations run in lockstep on the
  same tokens, and the reference is the same model with transformers' `DynamicCache`:
  - `ppl`: perplexity of the text under the decode-step logits (and `ppl_delta_pct` vs the reference);
  - `kl`: mean KL(reference || quantized) of the next-token distributions, in nats; `kl_max` its max;
  - `top1`: fraction of steps whose argmax equals the reference's; `top1_clear` the same over the steps
    whose reference top-1 probability exceeds its top-2 by at least `CLEAR_MARGIN` (0.1): a small model has
    many near-ties, which any perturbation flips (bf16 alone flips some), and this separates those flips
    from changed predictions (the share of such steps is `clear_steps` in the settings);
  - `cache_vs_bf16`: bytes the cache holds at the end / bytes of a bf16 `DynamicCache` for the same
    tokens (codes, norms, the full-precision window and capacity headroom all count);
  - `tq_layers`: layers the preset actually quantizes (`k3v2` keeps the first and last two in full
    precision: on a 4-layer model that is all of them).
* **Passkey retrieval.** A line `passkey = "<6 random letters and digits>"` is planted in held-out
  filler text at several depths of prompts of several lengths; the prompt ends with the query
  `passkey = "`. The part of the prompt before the query line is prefilled (and quantized), the query
  is fed token by token, and the answer is decoded greedily. A retrieval counts when the decoded
  text starts with the key. The key is random, so only copying it from the context can get it right
  (induction); the reference row shows what the model can do with an exact cache. Prompt by prompt,
  `passkey_lost` / `passkey_gained` count the prompts a row misses that the reference retrieves and
  the reverse, and `passkey_p` is the exact two-sided sign-test (McNemar) p-value of that split: a
  small p says the row retrieves differently from the reference, a large one that the prompts cannot
  tell them apart.

Every preset runs twice, with and without key mean-centring (`key_mean_centering`), and, for an fp32
model, `DynamicCache` on a bf16 copy of the model gives the scale of the differences that bf16 alone
makes. With `qjl_ablation` (`--qjl-ablation`) every preset also runs with `key_qjl=True`: the same key
bit budget spent as TurboQuant_prod (one bit fewer of codes, one bit of QJL sketch whose unbiased
estimate the attention adds to the scores).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import inspect
import json
import math
import os
import pathlib
import platform
import random
import sys
import time

import torch

from .cache import TurboQuantCache, TurboQuantLayer
from .config import PRESETS, TurboQuantConfig

__all__ = ["EvalConfig", "default_configs", "evaluate", "format_table", "main", "passkey_prompts", "save_results",
           "sign_test_p"]

PASSKEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
CLEAR_MARGIN = 0.1  # `top1_clear`: reference top-1 minus top-2 probability
COLUMNS = ("name", "preset", "key_bits", "value_bits", "centring", "qjl", "tq_layers", "ppl", "ppl_delta_pct", "kl", "kl_max",
           "top1", "top1_clear", "passkey", "passkey_lost", "passkey_gained", "passkey_p", "cache_vs_bf16", "seconds")


@dataclasses.dataclass
class EvalConfig:
    """One row of the evaluation: a cache (None: the reference `DynamicCache`) on a model.

    `model` None means the evaluated model itself; `reference` marks the row the others compare to."""

    name: str
    config: TurboQuantConfig | None = None
    preset: str | None = None
    model: torch.nn.Module | None = None
    reference: bool = False


def default_configs(presets=None, centring_ablation: bool = True, residual_length: int | None = None,
                    backend: str = "auto", qjl_ablation: bool = False) -> list[EvalConfig]:
    """Rows for `presets` (names or `TurboQuantConfig`s, which are named "custom 1", "custom 2", ...;
    default: every preset in `PRESETS`), each followed by its copy without key mean-centring when
    `centring_ablation`, and by its copy with `key_qjl=True` when `qjl_ablation` (presets whose keys
    allow it: >= 2 bits, no outlier split)."""
    presets = list(PRESETS) if presets is None else list(presets)
    if len({p for p in presets if isinstance(p, str)}) < sum(isinstance(p, str) for p in presets):
        raise ValueError(f"presets {presets} name a preset twice: rows are keyed by name")
    rows, customs = [], 0
    for p in presets:
        if isinstance(p, str):
            name, cfg = p, TurboQuantConfig.from_preset(p)
        else:
            customs += 1
            name, cfg = f"custom {customs}", p
        over = {"backend": backend}
        if residual_length is not None:
            over["residual_length"] = residual_length
        cfg = cfg.replace(**over)
        rows.append(EvalConfig(name, cfg, name))
        if centring_ablation:
            rows.append(EvalConfig(f"{name} no-centring", cfg.replace(key_mean_centering=not cfg.key_mean_centering),
                                   name))
        if qjl_ablation and cfg.key_bits >= 2 and not cfg.outlier_fraction and not cfg.key_qjl:
            rows.append(EvalConfig(f"{name} + QJL keys", cfg.replace(key_qjl=True, backend="auto"), name))
    return rows


# ------------------------------------------------------------------------------------------ helpers
def _cache_kwarg(model) -> str:
    # transformers >= 5.24 renamed forward's `past_key_values=` to `cache=` (the old name warns).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _encode(tokenizer, text: str, bos: bool) -> list[int]:
    if hasattr(tokenizer, "add_special_tokens") or "add_special_tokens" in inspect.signature(tokenizer.encode).parameters:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if bos and getattr(tokenizer, "bos_token_id", None) is not None:
            ids = [tokenizer.bos_token_id] + ids
        return ids
    return tokenizer.encode(text, add_bos=bos)


def _new_cache(row: EvalConfig, model):
    from transformers import DynamicCache

    if row.config is None:
        return DynamicCache()
    return TurboQuantCache(row.config, model_config=model.config)


@torch.no_grad()
def _forward(model, ids, cache, kw):
    return model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1].float()


# ------------------------------------------------------------------------------------- teacher-forced
def _valid_prefix_len(prefix_len: int, seq_len: int) -> bool:
    """At least one prefilled token and at least one scored step after it (the last token is only a target)."""
    return 1 <= prefix_len < seq_len - 1


@torch.no_grad()
def _teacher_forced(model, rows: list[EvalConfig], ids: torch.Tensor, prefix_len: int, log=None) -> dict:
    """Lockstep decode of `ids` `[B, T]` under every row; metrics of each row against the reference."""
    kw = _cache_kwarg(model)
    B, T = ids.shape
    if not _valid_prefix_len(prefix_len, T):
        raise ValueError(f"prefix_len must be in [1, {T - 2}] for sequences of {T} tokens, got {prefix_len}")
    ref_i = next(i for i, r in enumerate(rows) if r.reference)
    caches = [_new_cache(r, r.model or model) for r in rows]
    stats = [{"nll": 0.0, "kl": 0.0, "kl_max": 0.0, "agree": 0, "agree_clear": 0, "seconds": 0.0} for _ in rows]
    n_clear = 0
    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        _forward(r.model or model, ids[:, :prefix_len], caches[i], kw)
        stats[i]["seconds"] += time.perf_counter() - t0
    n = 0
    for t in range(prefix_len, T - 1):
        logps = []
        for i, r in enumerate(rows):
            t0 = time.perf_counter()
            logps.append(torch.log_softmax(_forward(r.model or model, ids[:, t : t + 1], caches[i], kw), -1))
            stats[i]["seconds"] += time.perf_counter() - t0
        target = ids[:, t + 1]
        ref = logps[ref_i]
        p_ref = ref.exp()
        top_ref = ref.argmax(-1)
        top2 = p_ref.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] >= CLEAR_MARGIN
        n_clear += clear.sum().item()
        for i, lp in enumerate(logps):
            kl = (p_ref * (ref - lp)).sum(-1).clamp_min(0)
            s = stats[i]
            s["nll"] -= lp.gather(-1, target[:, None]).sum().item()
            s["kl"] += kl.sum().item()
            s["kl_max"] = max(s["kl_max"], kl.max().item())
            agree = lp.argmax(-1) == top_ref
            s["agree"] += agree.sum().item()
            s["agree_clear"] += (agree & clear).sum().item()
        n += B
        if log and (t - prefix_len + 1) % 64 == 0:
            log(f"  teacher-forced step {t - prefix_len + 1}/{T - 1 - prefix_len}")
    out = {}
    for r, s, c in zip(rows, stats, caches):
        ratio = tq_layers = None
        if isinstance(c, TurboQuantCache):
            ratio = c.nbytes() / c.dense_nbytes() if c.dense_nbytes() else None
            tq_layers = sum(isinstance(layer, TurboQuantLayer) for layer in c.layers)
        out[r.name] = {"ppl": math.exp(s["nll"] / n), "kl": s["kl"] / n, "kl_max": s["kl_max"], "top1": s["agree"] / n,
                       "top1_clear": s["agree_clear"] / n_clear if n_clear else None, "clear_steps": n_clear,
                       "cache_vs_bf16": ratio, "tq_layers": tq_layers, "seconds": s["seconds"], "scored_tokens": n}
    return out


# ------------------------------------------------------------------------------------------ passkey
def passkey_prompts(tokenizer, filler_text: str, length: int, depths=(0.1, 0.5, 0.9), trials: int = 4,
                    key_len: int = 6, seed: int = 0) -> list[dict]:
    """Prompts of exactly `length` tokens (BOS included): filler with a planted line
    `passkey = "<key>"` at each depth (fraction of the filler before it), ending with the query.

    Returns dicts with `context` (token ids up to the query line), `query` (its token ids), `key`,
    `depth` and `length`. The filler is `filler_text` tokenized, read from a different offset per
    trial; it is cut at a line break so the planted line starts a line."""
    rng = random.Random(seed * 1_000_003 + length)
    filler = _encode(tokenizer, filler_text, bos=False)
    newline = _encode(tokenizer, "\n", bos=False)
    query = _encode(tokenizer, '\npasskey = "', bos=False)
    out = []
    for depth in depths:
        for trial in range(trials):
            key = "".join(rng.choice(PASSKEY_ALPHABET) for _ in range(key_len))
            needle = _encode(tokenizer, f'\npasskey = "{key}"\n', bos=False)
            n_fill = length - 1 - len(needle) - len(query)
            if n_fill < 8:
                raise ValueError(f"passkey length {length} is too short for the needle and the query")
            if len(filler) < n_fill + 1:
                raise ValueError(f"filler text has {len(filler)} tokens, a {length}-token prompt needs {n_fill}")
            start = rng.randrange(0, len(filler) - n_fill)
            body = filler[start : start + n_fill]
            cut = round(depth * n_fill)
            # Plant the needle after a line break near the cut (so it reads as a statement of its own).
            for j in range(cut, max(0, cut - 200), -1):
                if body[j - len(newline) : j] == newline:
                    cut = j
                    break
            ctx = [getattr(tokenizer, "bos_token_id", None)] + body[:cut] + needle + body[cut:]
            ctx = [t for t in ctx if t is not None]
            out.append({"context": ctx, "query": query, "key": key, "depth": depth, "length": len(ctx) + len(query)})
    return out


@torch.no_grad()
def _passkey(model, tokenizer, rows: list[EvalConfig], prompts: list[dict], answer_tokens: int) -> dict:
    """Greedy answers of every row for a batch of equal-length prompts: {row name: [bool per prompt]}."""
    kw = _cache_kwarg(model)
    device = next(model.parameters()).device
    ctx = torch.tensor([p["context"] for p in prompts], device=device)
    query = torch.tensor([p["query"] for p in prompts], device=device)
    res = {}
    for r in rows:
        m = r.model or model
        cache = _new_cache(r, m)
        _forward(m, ctx, cache, kw)
        for j in range(query.shape[1]):
            logits = _forward(m, query[:, j : j + 1], cache, kw)
        answer = []
        for _ in range(answer_tokens):
            nxt = logits.argmax(-1)
            answer.append(nxt)
            logits = _forward(m, nxt[:, None], cache, kw)
        answer = torch.stack(answer, 1).tolist()
        res[r.name] = [tokenizer.decode(a).startswith(p["key"]) for a, p in zip(answer, prompts)]
    return res


# ------------------------------------------------------------------------------------------ evaluate
def evaluate(model, tokenizer, texts: list[str], presets=None, *, seq_len: int = 512, prefix_len: int = 64,
             centring_ablation: bool = True, bf16_row: bool = True, residual_length: int | None = None,
             backend: str = "auto", qjl_ablation: bool = False, passkey: bool = True, passkey_lengths=(128, 256, 512),
             passkey_depths=(0.1, 0.5, 0.9), passkey_trials: int = 8, seed: int = 0, log=print) -> dict:
    """Evaluate TurboQuant presets on `model` against its own full-precision `DynamicCache`.

    Args:
        model: a causal LM (any attention implementation; "turboquant" reads the codes directly,
            others take the dequantizing fallback). Evaluated in its own dtype and device.
        tokenizer: a transformers tokenizer or `tq_hf.models.ByteTokenizer` (anything with
            `encode` and `decode`).
        texts: held-out texts; each must have at least `seq_len` tokens (shorter ones are dropped
            with a message). Batched together for the teacher-forced decode.
        presets: preset names or `TurboQuantConfig`s (default: all of `PRESETS`).
        seq_len / prefix_len: tokens per text (BOS included), of which the first `prefix_len` are
            prefilled and the rest decoded one per step.
        centring_ablation: also run every preset with key mean-centring switched off.
        qjl_ablation: also run every preset with `key_qjl=True` (see `default_configs`).
        bf16_row: for an fp32 model, also run `DynamicCache` on a bf16 copy of the model.
        residual_length: override the presets' full-precision window (None: keep each preset's).
        backend: the caches' backend ("auto": Triton on CUDA, PyTorch on CPU).
        passkey / passkey_lengths / passkey_depths / passkey_trials: the retrieval test (prompt
            lengths in tokens; lengths beyond the model's `max_position_embeddings` are skipped).
        seed: seeds the passkey keys and filler offsets.
        log: progress callback (None: silent).
    Returns:
        `{"rows": [one dict per configuration, keys COLUMNS + passkey details], "settings": {...}}`;
        the passkey details are accuracy per length and per (length, depth), and the outcome of every
        prompt (`passkey_retrieved`, JSON only).
    """
    log = log or (lambda *_: None)
    device = next(model.parameters()).device
    rows = [EvalConfig(f"{_dtype_name(model.dtype)} DynamicCache", None, None, None, reference=True)]
    if bf16_row and model.dtype == torch.float32:
        rows.append(EvalConfig("bf16 DynamicCache", None, None, copy.deepcopy(model).to(torch.bfloat16)))
    rows += default_configs(presets, centring_ablation, residual_length, backend, qjl_ablation)

    encoded = [_encode(tokenizer, t, bos=True) for t in texts]
    keep = [e[:seq_len] for e in encoded if len(e) >= seq_len]
    if len(keep) < len(encoded):
        log(f"dropped {len(encoded) - len(keep)} of {len(encoded)} texts shorter than seq_len={seq_len} tokens")
    if not keep:
        raise ValueError(f"no text has seq_len={seq_len} tokens")
    ids = torch.tensor(keep, device=device)
    log(f"teacher-forced decode: {len(keep)} texts x {seq_len} tokens ({prefix_len} prefilled), {len(rows)} rows")
    t0 = time.perf_counter()
    tf = _teacher_forced(model, rows, ids, prefix_len, log)

    pk: dict[str, dict] = {r.name: {} for r in rows}
    lengths = []
    if passkey:
        max_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 10**9
        lengths = [n for n in passkey_lengths if n <= max_pos]
        filler = "\n".join(texts)
        for n in lengths:
            prompts = passkey_prompts(tokenizer, filler, n, passkey_depths, passkey_trials, seed=seed)
            answer_tokens = len(_encode(tokenizer, prompts[0]["key"], bos=False))
            log(f"passkey: {len(prompts)} prompts of {n} tokens")
            res = _passkey(model, tokenizer, rows, prompts, answer_tokens)
            for name, ok in res.items():
                pk[name][n] = {"accuracy": sum(ok) / len(ok), "retrieved": ok,
                               "by_depth": {d: sum(o for o, p in zip(ok, prompts) if p["depth"] == d) / passkey_trials
                                            for d in passkey_depths}}

    ref_ppl = tf[rows[0].name]["ppl"]
    ref_ok = [o for n in lengths for o in pk[rows[0].name][n]["retrieved"]]
    out_rows = []
    for r in rows:
        m = tf[r.name]
        row = {
            "name": r.name, "preset": r.preset,
            "key_bits": r.config.key_bits if r.config else None,
            "value_bits": r.config.value_bits if r.config else None,
            "centring": r.config.key_mean_centering if r.config else None,
            "qjl": r.config.key_qjl if r.config else None,
            "residual_length": r.config.residual_length if r.config else None,
            "tq_layers": m["tq_layers"],
            "ppl": m["ppl"], "ppl_delta_pct": 100 * (m["ppl"] / ref_ppl - 1), "kl": m["kl"], "kl_max": m["kl_max"],
            "top1": m["top1"], "top1_clear": m["top1_clear"], "cache_vs_bf16": m["cache_vs_bf16"], "seconds": m["seconds"],
            "passkey": (sum(v["accuracy"] for v in pk[r.name].values()) / len(lengths)) if lengths else None,
            "passkey_by_length": {n: v["accuracy"] for n, v in pk[r.name].items()},
            "passkey_by_length_depth": {n: v["by_depth"] for n, v in pk[r.name].items()},
            # per prompt, in `passkey_prompts` order: which prompts a preset loses or gains against the reference
            "passkey_retrieved": {n: v["retrieved"] for n, v in pk[r.name].items()},
        }
        if lengths:
            ok = [o for n in lengths for o in pk[r.name][n]["retrieved"]]
            lost, gained = sum(a and not b for a, b in zip(ref_ok, ok)), sum(b and not a for a, b in zip(ref_ok, ok))
            row.update(passkey_lost=lost, passkey_gained=gained, passkey_p=sign_test_p(lost, gained))
        else:
            row.update(passkey_lost=None, passkey_gained=None, passkey_p=None)
        out_rows.append(row)
    settings = {
        "texts": len(keep), "seq_len": seq_len, "prefix_len": prefix_len, "scored_tokens": tf[rows[0].name]["scored_tokens"],
        "clear_steps": tf[rows[0].name]["clear_steps"], "clear_margin": CLEAR_MARGIN,
        "passkey_lengths": lengths, "passkey_depths": list(passkey_depths), "passkey_trials": passkey_trials,
        "residual_length_override": residual_length, "backend": backend, "seed": seed,
        "model_dtype": _dtype_name(model.dtype), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "wall_s": time.perf_counter() - t0,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    return {"rows": out_rows, "settings": settings}


def sign_test_p(lost: int, gained: int) -> float:
    """Exact two-sided sign-test p-value of paired binary outcomes that differ `lost` times one way and
    `gained` times the other (McNemar's exact test): the probability of a split at least this uneven if
    either way were equally likely."""
    n, k = lost + gained, min(lost, gained)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _fmt(v, col):
    if v is None:
        return "-"
    if col in ("ppl",):
        return f"{v:.4f}"
    if col == "ppl_delta_pct":
        return f"{v:+.2f}%"
    if col in ("kl", "kl_max"):
        return f"{v:.2e}"
    if col in ("top1", "top1_clear", "passkey"):
        return f"{100 * v:.1f}%"
    if col == "passkey_p":
        return f"{v:.2f}"
    if col == "cache_vs_bf16":
        return f"{v:.3f}"
    if col == "seconds":
        return f"{v:.1f}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def format_table(result: dict) -> str:
    """The rows as a Markdown table (passkey accuracy per length in extra columns)."""
    lengths = result["settings"]["passkey_lengths"]
    cols = [c for c in COLUMNS if c not in ("preset",)]
    head = cols[:cols.index("passkey") + 1] + [f"passkey@{n}" for n in lengths] + cols[cols.index("passkey") + 1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = []
        for c in head:
            if c.startswith("passkey@"):
                v = r["passkey_by_length"].get(int(c.split("@")[1]))
                cells.append(_fmt(v, "passkey"))
            else:
                cells.append(_fmt(r[c], c))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_results(result: dict, out_dir: str, stem: str = "eval") -> tuple[str, str]:
    """Write `<stem>.json` (rows and settings) and `<stem>.csv` (one line per row) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, cpath = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.csv")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1, default=str)
    lengths = result["settings"]["passkey_lengths"]
    fields = [c for c in COLUMNS] + ["residual_length"] + [f"passkey@{n}" for n in lengths]
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**{k: r.get(k) for k in fields if not k.startswith("passkey@")},
                        **{f"passkey@{n}": r["passkey_by_length"].get(n) for n in lengths}})
    return jpath, cpath


# ------------------------------------------------------------------------------------------ CLI
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def build_parser(prog: str = "python -m tq_hf.evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Quality of TurboQuant presets: perplexity, KL and top-1 "
                                "agreement vs the full-precision cache, and passkey retrieval.")
    p.add_argument("--model", default=None, help="local checkpoint folder (default: the shipped reference model)")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names (default: all)")
    p.add_argument("--texts", nargs="*", default=None,
                   help="text files to evaluate on (default: the reference model's held-out stdlib files)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prefix-len", type=int, default=64)
    p.add_argument("--residual-length", type=int, default=None, help="override the presets' full-precision window")
    p.add_argument("--no-centring-ablation", action="store_true", help="skip the rows without key mean-centring")
    p.add_argument("--no-bf16-row", action="store_true", help="skip DynamicCache on a bf16 copy of an fp32 model")
    p.add_argument("--qjl-ablation", action="store_true",
                   help="also run every preset with key_qjl=True (TurboQuant_prod keys: 1 bit of QJL sketch)")
    p.add_argument("--no-passkey", action="store_true")
    p.add_argument("--passkey-lengths", type=_ints, default=[128, 256, 512])
    p.add_argument("--passkey-depths", type=_floats, default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-trials", type=int, default=8,
                   help="prompts per depth and length (default 8: 24 per length at 3 depths)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tq_eval", help="folder for eval.json and eval.csv")
    return p


def _load(model_path, dtype, device):
    from .models import ByteTokenizer, reference_model

    if model_path is None:
        return reference_model(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(model_path):
        raise SystemExit(f"error: --model {model_path!r} is not a folder")
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="turboquant", dtype=dtype,
                                                 local_files_only=True).to(device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError):
        if model.config.vocab_size != ByteTokenizer.vocab_size:
            raise SystemExit(f"error: no tokenizer in {model_path!r}") from None
        tok = ByteTokenizer()  # a folder written by tq_hf.train
    return model, tok


def main(argv=None, prog: str = "python -m tq_hf.evaluate") -> int:
    """Command line (see `build_parser`); `python -m tq_hf eval` can call `main(argv, prog=...)`.
    Prints the table, writes eval.json/eval.csv to --out; returns 0, or 2 with a one-line error for bad
    arguments (an unknown preset, a device this machine lacks, a missing text file, settings the cache or
    the evaluation refuses)."""
    args = build_parser(prog).parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        print(f"error: unknown preset(s) {bad}; valid presets: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        return _run(args, presets, prog, argv)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _run(args, presets, prog, argv) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device")
    if not _valid_prefix_len(args.prefix_len, args.seq_len):  # `_teacher_forced`'s rule, before the model loads
        raise ValueError(f"--prefix-len must be in [1, --seq-len - 2], got {args.prefix_len} and {args.seq_len}")
    if not all(0 <= d <= 1 for d in args.passkey_depths):
        raise ValueError(f"--passkey-depths must lie in [0, 1], got {args.passkey_depths}")
    if args.residual_length is not None:  # TurboQuantConfig's own check, before the model loads
        TurboQuantConfig(residual_length=args.residual_length)
    if args.texts:
        texts = [pathlib.Path(f).read_bytes().decode("utf-8", errors="replace") for f in args.texts]
    else:
        from .train import eval_texts

        texts = eval_texts()
    model, tok = _load(args.model, getattr(torch, args.dtype), device)
    result = evaluate(model, tok, texts, presets, seq_len=args.seq_len, prefix_len=args.prefix_len,
                      centring_ablation=not args.no_centring_ablation, bf16_row=not args.no_bf16_row,
                      residual_length=args.residual_length, backend=args.backend, qjl_ablation=args.qjl_ablation,
                      passkey=not args.no_passkey,
                      passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
                      passkey_trials=args.passkey_trials, seed=args.seed,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    result["settings"]["model"] = args.model or "tq_hf reference model"
    result["settings"]["command"] = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(result))
    s = result["settings"]
    pk = (f"; passkey {len(s['passkey_depths'])} depths x {s['passkey_trials']} trials per length"
          if s["passkey_lengths"] else "")
    print(f"\n{s['texts']} texts x {s['seq_len']} tokens, {s['scored_tokens']} scored decode steps "
          f"({s['clear_steps']} with a reference margin >= {s['clear_margin']}: top1_clear){pk}; "
          f"{s['wall_s']:.0f} s")
    jpath, cpath = save_results(result, args.out)
    print(f"saved {jpath} and {cpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
