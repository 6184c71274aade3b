"""Train the reference model shipped in `tq_hf/data/ref_model`: a small byte-level Llama trained on
Python's own standard-library sources, so quality can be measured offline on a trained model
instead of random weights (whose logits are nearly tied).

    # the shipped model: one GPU, ~2-3 min (an H200: 144 s while two other runs shared it)
    python -m tq_hf.train --out tq_hf/data/ref_model --steps 3000 --batch-size 32 --seq-len 1024 \
        --copy-prob 1.0 --lr 1e-3 --eval-every 500
    python -m tq_hf.train --out /tmp/m --steps 20 --batch-size 4  # a smoke run (CPU: seconds)

Data: the top-level `*.py` files of the running interpreter's standard library (`sysconfig`'s
"stdlib" path), sorted by name; the files in `EVAL_FILES` are held out for evaluation (perplexity,
retrieval) and never trained on. Bytes are tokens (`tq_hf.models.ByteTokenizer`: 0-255, BOS 256,
EOS 257); each training sequence is BOS followed by a window of the concatenated training files
at a seeded random offset. With `--copy-prob`, that fraction of the windows also gets one random
string of 8-32 letters and digits written twice, the second time after a copy of the 4-16 bytes of
text that preceded the first (`_plant_copy`).

Why the planted strings: trained on the code alone, a model of this size learns no copying. An
H200 run of 6000 steps x 32 x 1024 bytes (`--copy-prob 0`) memorised the 4.6 MB corpus (train loss
0.53, held-out 1.10 nats per byte) and predicted the second copy of a random string no better
than the first; planting spans of the text itself did not change that. With random strings
planted in every window, 3000 steps bring held-out loss to 0.99-1.01 nats per byte and the second
copy of a 48-letter random string to 0.25-0.35 nats per byte (4.1 for the first). Planted without
the text in front, the model copied a string once it had its first character but, after
`passkey = "`, mostly predicted the `"` of an empty string: greedy passkey retrieval with an exact
cache got 3, 4 and 1 of 24 prompts at 256, 512 and 1024 bytes (a one-off script, run on a CPU);
with the copied text in front, the same script on the H200 that trained it gives 13, 7 and 6
(`train_log.json` has the note), and 15, 11, 8 and 5 of 24 at 128-1024 bytes in `python -m tq_hf
eval` (README).

Larger models (`--layers`, `--hidden-size`, ... and `--corpus tree`, every module below the
standard library's folder: 10.6 MB on the H200's Ubuntu Python 3.12.3, whose test suite is packaged
apart) were tried on 2026-11-30: 4.9-6.5M parameters, 5000 steps, held-out loss 0.90-0.91 nats per
byte at best (step 3000; 0.94-0.95 at the end). They did not move the 4bit preset's top-1 agreement:
98.0-98.2 % on a CPU against the shipped model's 98.1 % (README, "A larger, better-trained reference
model"). The shipped model stays the small one.

Everything that decides the result is seeded (`--seed`: initialisation and window offsets) and
recorded in `train_log.json` next to the weights, with the files and their SHA-256, the Python,
torch and transformers versions, the device, wall time and the loss curve. On a CPU the result is
bit-reproducible for the same versions and thread count; on a GPU (bf16 autocast) it is not bit
for bit. Another Python version has other sources: the shipped model saw Python 3.12.3's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import platform
import sys
import sysconfig
import time

import torch

from .models import ByteTokenizer

__all__ = [
    "EVAL_FILES",
    "REF_MODEL_CONFIG",
    "corpus_files",
    "eval_texts",
    "load_corpus",
    "main",
    "train",
]

# Geometry of the shipped model: head_dim 128 like most real models, GQA (2 query heads share 1 KV
# head), 4 layers, ~2.1M parameters (4.2 MB in bf16). The byte vocabulary of ByteTokenizer.
REF_MODEL_CONFIG = {
    "vocab_size": ByteTokenizer.vocab_size,
    "hidden_size": 256,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "bos_token_id": ByteTokenizer.bos_token_id,
    "eos_token_id": ByteTokenizer.eos_token_id,
    "pad_token_id": ByteTokenizer.pad_token_id,
    "tie_word_embeddings": False,
}

# Command-line flags that override a `REF_MODEL_CONFIG` field.
_SIZE_FLAGS = {"hidden-size": "hidden_size", "intermediate-size": "intermediate_size", "layers": "num_hidden_layers",
               "heads": "num_attention_heads", "kv-heads": "num_key_value_heads"}

# Held out from training: small, stable modules present in every Python >= 3.8.
EVAL_FILES = ("bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "shlex.py", "textwrap.py")


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


# Folders under the standard library's path that are not the standard library.
_NOT_STDLIB = ("site-packages", "dist-packages")


def corpus_files(root: str | None = None, tree: bool = False) -> tuple[list[str], list[str]]:
    """(training files, held-out files): absolute paths of the standard library's `*.py` files,
    sorted by path: the top-level ones, or with `tree` every one below the folder (packages, and
    tests where the installation has them; not `site-packages`). Held out are the top-level
    `EVAL_FILES` that exist, in both cases (a file of that name in a package is trained on)."""
    root = root or stdlib_dir()
    if tree:
        names = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _NOT_STDLIB]  # pruned, not walked and filtered
            rel = os.path.relpath(folder, root)
            names += [os.path.normpath(os.path.join(rel, n)) for n in files
                      if n.endswith(".py") and os.path.isfile(os.path.join(folder, n))]
        names.sort()
    else:
        names = sorted(n for n in os.listdir(root) if n.endswith(".py") and os.path.isfile(os.path.join(root, n)))
    held = [os.path.join(root, n) for n in names if n in EVAL_FILES]
    train = [os.path.join(root, n) for n in names if n not in EVAL_FILES]
    if not train or not held:
        raise RuntimeError(f"no standard-library sources found under {root!r}")
    return train, held


def load_corpus(files: list[str]) -> torch.Tensor:
    """The files' bytes concatenated (a blank line between files) as a uint8 tensor."""
    data = b"\n\n".join(pathlib.Path(f).read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def eval_texts(n_bytes: int | None = None, root: str | None = None) -> list[str]:
    """The held-out files' texts (sorted by name), each cut to its first `n_bytes` bytes if given."""
    _, held = corpus_files(root)
    out = []
    for f in held:
        data = pathlib.Path(f).read_bytes()
        out.append((data[:n_bytes] if n_bytes else data).decode("utf-8", errors="replace"))
    return out


def _sha256(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _batch(corpus: torch.Tensor, starts: torch.Tensor, seq_len: int, copy_prob: float = 0.0,
           gen: torch.Generator | None = None) -> torch.Tensor:
    """`[B, seq_len + 1]` int64: BOS then `seq_len` bytes from each start.

    With `copy_prob` > 0, each sequence (with that probability) gets one random string written at
    two places, the second after a copy of the text before the first, over the text there
    (`_plant_copy`)."""
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    body = corpus[idx].long()
    if copy_prob > 0:
        for i in torch.nonzero(torch.rand(len(body), generator=gen) < copy_prob).flatten().tolist():
            _plant_copy(body[i], gen)  # a view: writes into `body`
    bos = torch.full((len(starts), 1), ByteTokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, body], 1)


_ALNUM = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz0123456789"))
# Shortest row `_plant_copy` fits: two strings of >= 8 bytes, each after up to 16 bytes of text.
_PLANT_MIN_LEN = 48


def _plant_copy(row: torch.Tensor, gen: torch.Generator | None) -> None:
    """Write one random string (8-32 letters and digits) at a random place of `row` and, at a later
    place, copy it again together with the 4-16 bytes of text that preceded it; in place.

    Copying from context is what induction heads do and what a passkey test asks. On source code
    alone a model this small never learns it: the corpus is small enough to memorise, and what
    repeats in code (identifiers) is mostly predictable without looking back. A random string is
    predictable the second time only by finding the first. The copied text in front makes the
    string's *first* character predictable too, from the text it followed (as a passkey's is after
    `passkey = "`); without it the model only continued a string once it had its first byte.
    Needs `row.numel() >= _PLANT_MIN_LEN`."""
    n = row.numel()
    if n < _PLANT_MIN_LEN:
        raise ValueError(f"planted copies need rows of >= {_PLANT_MIN_LEN} tokens, got {n}")
    span = int(torch.randint(8, min(32, (n - 32) // 2) + 1, (1,), generator=gen))
    pre = int(torch.randint(4, 17, (1,), generator=gen))
    text = _ALNUM[torch.randint(0, len(_ALNUM), (span,), generator=gen)]
    src = int(torch.randint(pre, n - 2 * span - pre + 1, (1,), generator=gen))
    dst = int(torch.randint(src + span + pre, n - span + 1, (1,), generator=gen))
    row[src : src + span] = text
    row[dst - pre : dst + span] = row[src - pre : src + span].clone()


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def _eval_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    tot, n = 0.0, 0
    for x in batches:
        logits = model(x[:, :-1]).logits
        tot += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    model.train()
    return tot / n


def train(out: str, steps: int = 600, batch_size: int = 8, seq_len: int = 512, lr: float = 3e-3,
          warmup: int = 40, weight_decay: float = 0.1, seed: int = 0, eval_every: int = 50,
          save_dtype: str = "bfloat16", threads: int | None = None, config_overrides: dict | None = None,
          copy_prob: float = 0.0, corpus: str = "top", command: str | None = None, log=print) -> dict:
    """Train the reference model and save `config.json`, `model.safetensors` and `train_log.json`
    in `out`. Returns the log (also written to `train_log.json`).

    Args:
        out: output folder (created).
        steps / batch_size / seq_len: optimizer steps, sequences per step, bytes per sequence
            (after BOS).
        lr / warmup / weight_decay: AdamW peak learning rate, linear warm-up steps, decoupled decay;
            cosine decay to 10 % of the peak.
        seed: seeds the initialisation and the window offsets.
        eval_every: steps between held-out loss evaluations (a fixed set of 8 windows).
        save_dtype: dtype of the saved weights ("bfloat16" halves the file; the weights train in fp32).
        threads: torch CPU threads (default: torch's own choice); recorded in the log.
        config_overrides: `LlamaConfig` fields replacing `REF_MODEL_CONFIG`.
        copy_prob: fraction of training sequences given one random string planted twice
            (`_plant_copy`); 0 trains on the plain text.
        corpus: "top" (the top-level standard-library files) or "tree" (every file below it;
            `corpus_files`).
        command: the command line, recorded in the log.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    if copy_prob and seq_len < _PLANT_MIN_LEN:  # refused before the corpus is loaded, not at the first batch
        raise ValueError(f"copy_prob needs seq_len >= {_PLANT_MIN_LEN} (two strings of >= 8 bytes, each after up to 16 "
                         f"bytes of text), got {seq_len}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # On a GPU: fp32 weights and optimizer, bf16 autocast for the forward and backward (flash
    # attention, bf16 matmuls). On a CPU: plain fp32, bit-reproducible for one thread count.
    cuda = device.type == "cuda"
    precision = "bf16 autocast, fp32 weights" if cuda else "fp32"
    if corpus not in ("top", "tree"):
        raise ValueError(f"corpus must be 'top' or 'tree', got {corpus!r}")
    train_files, held_files = corpus_files(tree=corpus == "tree")
    data = load_corpus(train_files)
    held = load_corpus(held_files)
    config = LlamaConfig(**{**REF_MODEL_CONFIG, **(config_overrides or {})})
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    # Held-out batches: 8 windows at fixed, evenly spaced offsets of the held-out files.
    held_starts = torch.linspace(0, len(held) - seq_len - 1, 8).long()
    held_batches = [_batch(held, held_starts, seq_len).to(device)]
    log(f"training {n_params / 1e6:.2f}M parameters on {len(train_files)} files ({len(data) / 1e6:.2f} MB), "
        f"{steps} steps x {batch_size} x {seq_len} bytes, device {device} ({precision}), "
        f"{torch.get_num_threads()} threads")
    curve, evals = [], []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup)
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
        x = _batch(data, starts, seq_len, copy_prob, gen).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            ev = _eval_loss(model, held_batches)
            evals.append({"step": step + 1, "held_out_loss": ev, "wall_s": time.perf_counter() - t0})
            recent = curve[-eval_every:]
            log(f"step {step + 1:5d}  train loss {sum(recent) / len(recent):.3f}  held-out {ev:.3f} "
                f"({ev / math.log(2):.2f} bits/byte)  {time.perf_counter() - t0:.0f} s")
    wall = time.perf_counter() - t0

    os.makedirs(out, exist_ok=True)
    model.eval()
    model.to(getattr(torch, save_dtype))
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    # Windows of 50 steps: the curve's summary (the per-step losses would bloat the file).
    window = max(1, min(50, steps))
    summary = [{"steps": f"{i + 1}-{min(i + window, steps)}",
                "mean_train_loss": sum(curve[i:i + window]) / len(curve[i:i + window])}
               for i in range(0, steps, window)]
    root = stdlib_dir()
    info = {
        "command": command,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_seen": steps * batch_size * seq_len,
        "copy_prob": copy_prob,
        "precision": precision,
        "optimizer": {"name": "AdamW", "lr": lr, "betas": [0.9, 0.95], "weight_decay": weight_decay,
                      "warmup": warmup, "schedule": "linear warm-up, cosine to 10 %", "grad_clip": 1.0},
        "parameters": n_params,
        "saved_dtype": save_dtype,
        "config": {**REF_MODEL_CONFIG, **(config_overrides or {})},
        "data": {
            "stdlib_dir": root,
            "corpus": corpus,
            "train_files": [{"name": os.path.relpath(f, root), "bytes": os.path.getsize(f), "sha256": _sha256(f)}
                            for f in train_files],
            "eval_files": [{"name": os.path.relpath(f, root), "bytes": os.path.getsize(f), "sha256": _sha256(f)}
                           for f in held_files],
            "train_bytes": len(data),
            "eval_bytes": len(held),
        },
        "loss": {"first_step": curve[0], "final_train_mean_last_50": sum(curve[-50:]) / len(curve[-50:]),
                 "final_held_out": evals[-1]["held_out_loss"],
                 "final_held_out_bits_per_byte": evals[-1]["held_out_loss"] / math.log(2),
                 "held_out_curve": evals, "train_curve_windows": summary},
        "wall_time_s": wall,
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                       platform.machine()),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"saved to {out} ({wall:.0f} s, final held-out loss {info['loss']['final_held_out']:.3f})")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tq_hf.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (e.g. tq_hf/data/ref_model)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--copy-prob", type=float, default=0.0,
                   help="fraction of sequences given one random string planted twice, the second time after a "
                        f"copy of the text before the first (teaches copying; needs --seq-len >= {_PLANT_MIN_LEN})")
    p.add_argument("--corpus", default="top", choices=("top", "tree"),
                   help="the standard library's top-level files, or every file below it (packages, and tests "
                        "where installed)")
    size = p.add_argument_group("model size (default: REF_MODEL_CONFIG, the shipped model's; head_dim stays 128)")
    for flag, key in _SIZE_FLAGS.items():
        size.add_argument(f"--{flag}", type=int, default=None, help=f"LlamaConfig.{key}")
    a = p.parse_args(argv)
    if not 0.0 <= a.copy_prob <= 1.0:
        p.error("--copy-prob must be in [0, 1]")
    sizes = {flag: getattr(a, flag.replace("-", "_")) for flag in _SIZE_FLAGS}
    sizes = {flag: v for flag, v in sizes.items() if v is not None}
    for name, v in {**{n: getattr(a, n) for n in ("steps", "batch_size", "seq_len", "warmup", "eval_every")},
                    **sizes}.items():
        if v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    overrides = {_SIZE_FLAGS[flag]: v for flag, v in sizes.items()}
    config = {**REF_MODEL_CONFIG, **overrides}
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        p.error(f"--heads ({config['num_attention_heads']}) must be a multiple of --kv-heads "
                f"({config['num_key_value_heads']})")
    train(a.out, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, warmup=a.warmup,
          seed=a.seed, eval_every=a.eval_every, threads=a.threads, save_dtype=a.save_dtype, copy_prob=a.copy_prob,
          corpus=a.corpus, config_overrides=overrides,
          command="python -m tq_hf.train " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
