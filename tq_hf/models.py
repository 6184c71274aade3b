"""Small models built from configs, for the demo and the tests: no download, no tokenizer files.

`tiny_llama` builds a Llama-architecture model with random weights from a fixed seed, and a byte-level
tokenizer (one token per UTF-8 byte). Its generations are noise; what it shows is the cache mechanics:
bytes held, speed of the PyTorch path, and whether greedy decoding matches `DynamicCache`.
"""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["REFERENCE_MODEL_DIR", "TINY_LLAMA_DEFAULTS", "ByteTokenizer", "reference_model", "tiny_llama"]

# The trained reference model shipped with the package (see tq_hf.train and its train_log.json).
REFERENCE_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ref_model")

# head_dim 128 like most real models (so bytes per token match the README's table); GQA with 2 query
# heads per KV head; 6 layers so the k3v2 preset (first and last two layers unquantized) still
# quantizes two.
TINY_LLAMA_DEFAULTS = {
    "vocab_size": 258,  # 256 bytes + BOS + EOS
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 257,
    "tie_word_embeddings": False,
}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, plus BOS (256) and EOS/pad (257). Enough of the transformers
    tokenizer interface for `generate`: `__call__(text, return_tensors="pt")`, `encode`, `decode`."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257
    vocab_size = 258

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_bos else []) + list(text.encode("utf-8"))

    def __call__(self, text: str | list[str], return_tensors: str | None = "pt"):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t) for t in texts]
        width = max(len(i) for i in ids)
        # Left padding, as decoder-only generation needs.
        input_ids = [[self.pad_token_id] * (width - len(i)) + i for i in ids]
        mask = [[0] * (width - len(i)) + [1] * len(i) for i in ids]
        if return_tensors != "pt":
            return {"input_ids": input_ids, "attention_mask": mask}
        return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="backslashreplace")


def tiny_llama(seed: int = 0, attn_implementation: str = "turboquant", dtype: torch.dtype = torch.float32,
               **overrides):
    """A randomly initialised Llama-style model and its `ByteTokenizer`.

    Args:
        seed: seed of the weight initialisation (the same seed gives the same weights).
        attn_implementation: attention to load the model with ("turboquant" is registered on import of tq_hf).
        dtype: parameter dtype.
        overrides: `LlamaConfig` fields replacing `TINY_LLAMA_DEFAULTS` (e.g. `num_hidden_layers=2`).
    Returns:
        `(model, tokenizer)`, the model in eval mode on the CPU.
    """
    import tq_hf  # noqa: F401  (registers the "turboquant" attention)

    config = LlamaConfig(**{**TINY_LLAMA_DEFAULTS, **overrides})
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    # Random weights emit EOS at random: generate always runs to max_new_tokens, so runs compare.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval(), ByteTokenizer()


def reference_model(attn_implementation: str = "turboquant", dtype: torch.dtype = torch.float32, device=None,
                    path: str | None = None):
    """The trained reference model shipped in `tq_hf/data/ref_model` and its `ByteTokenizer`.

    A 4-layer byte-level Llama (head_dim 128, 2 query heads sharing 1 KV head, ~2.1M parameters,
    weights stored in bf16) trained by `python -m tq_hf.train` on Python's standard-library sources
    (3000 steps on an H200, a random string planted twice per window, the second time after the
    text that preceded the first; held-out loss 1.01 nats = 1.46 bits per byte); `train_log.json`
    beside the weights records data, steps, loss and wall time. Unlike `tiny_llama` its logits are
    peaked and depend on the context, so KL and top-1 agreement under quantization mean something.
    It copies a repeated random string and, with an exact cache, retrieves a passkey in 21-63 % of
    the prompts of `python -m tq_hf eval` (fewer as the context grows from 128 to 1024 bytes).
    Loaded locally: no download.

    Args:
        attn_implementation: attention to load the model with ("turboquant" is registered on import of tq_hf).
        dtype: parameter dtype (the bf16 weights are upcast for float32).
        device: where to put the model (default: CPU).
        path: another folder written by `tq_hf.train` (default: the shipped one).
    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    import tq_hf  # noqa: F401  (registers the "turboquant" attention)

    path = path or REFERENCE_MODEL_DIR
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(
            f"no reference model at {path!r}: train one with `python -m tq_hf.train --out {path}`"
        )
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype,
                                             local_files_only=True)
    if device is not None:
        model = model.to(device)
    # It was trained without EOS (windows of concatenated files): generate runs to max_new_tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval(), ByteTokenizer()
