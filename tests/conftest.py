"""Shared helpers for the tq_hf test suite.

cpu_only: the codec, config, cache and generate tests run on the CPU through the PyTorch reference
path (backend "torch", or "auto" on CPU tensors). Nothing registered in this file needs a GPU or
network access: models are built from configs with random, seeded weights (no hub downloads).
Without a GPU, TRITON_INTERPRET=1 is set below so that kernel tests can use the Triton interpreter.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

# Without a GPU, kernel tests run under the Triton interpreter. It must be switched on before triton
# is imported at all (triton.language's own @jit helpers such as tl.sum are decorated at import), and
# importing transformers' cache_utils imports triton (through torch._dynamo); `import torch` does not.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import tq_hf  # noqa: F401  (registers attn_implementation="turboquant")

# The models here are tiny: intra-op threads only add synchronisation, and on a loaded 2-core CI box
# oversubscribed OpenMP spin-waits made tests 10x slower (a 6 ms generate took 1 s). OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
FAMILIES = ("llama", "mistral", "qwen2", "gemma2")

# transformers >= 5.24 renamed generate's/forward's `past_key_values=` to `cache=` (the old name warns).
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def cache_kw(cache) -> dict:
    """`{name: cache}` with the cache argument name this transformers version expects."""
    return {CACHE_KWARG: cache}


def _base(**kw):
    base = {
        "vocab_size": VOCAB,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "tie_word_embeddings": False,
    }
    base.update(kw)
    return base


def model_config(family: str, **overrides):
    """A tiny config of `family` (2 layers, vocab 256, head_dim 32 or 64, GQA)."""
    if family == "llama":
        return LlamaConfig(**_base(**overrides))
    if family == "mistral":
        # A window shorter than the test sequences, so the sliding mask matters.
        return MistralConfig(**_base(**{"sliding_window": 8, **overrides}))
    if family == "qwen2":
        # Qwen2 has q/k/v biases, the channel bias that key mean-centring is for.
        return Qwen2Config(**_base(**{"hidden_size": 256, "num_attention_heads": 4, **overrides}))
    if family == "gemma2":
        # Gemma 2: alternating sliding/full layers, attention logit softcap, head_dim set explicitly.
        return Gemma2Config(**_base(**{
            "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 8,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
            **overrides,
        }))
    raise ValueError(f"unknown family {family!r}")


def make_model(family: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """A seeded tiny causal LM of `family` (random weights, transformers' default initializer_range)
    in fp32 eval mode with `attn_implementation=attn`."""
    cfg = model_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = PAD
    return model


def reference_attn(family: str) -> str:
    """The dense attention to compare against: Gemma 2 (softcap) has no SDPA path, use eager."""
    return "eager" if family == "gemma2" else "sdpa"


def left_padded_batch(lengths=(13, 9, 17), seed: int = 1, device="cpu"):
    """Left-padded random prompts: (input_ids [B, max], attention_mask [B, max])."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        ids[i, T - n] = BOS
        mask[i, T - n :] = 1
    return ids.to(device), mask.to(device)


def greedy_kwargs(n: int) -> dict:
    # min_new_tokens keeps every run the same length (random weights may emit EOS early).
    return {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "pad_token_id": PAD}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def model_of(models):
    """`get(family, attn)`: the test module's shared model of `family` (from its `models` fixture)
    switched to attention `attn`; every model gets its original attention back afterwards."""
    original = {f: m.config._attn_implementation for f, m in models.items()}

    def get(family, attn):
        m = models[family]
        m.set_attn_implementation(attn)
        return m

    yield get
    for f, m in models.items():
        m.set_attn_implementation(original[f])


@pytest.fixture
def continuation_calls(monkeypatch):
    """A list that records `(query length, history length)` of every continuation-prefill call (an
    exact new chunk over cached history) of `tq_hf.attention.reference_attention`, which stays real."""
    import tq_hf.attention as tq_attention

    calls = []
    real = tq_attention.reference_attention

    def spy(query, layer, end, chunk_k=None, *args, **kwargs):
        if chunk_k is not None:
            calls.append((query.shape[2], end))
        return real(query, layer, end, chunk_k, *args, **kwargs)

    monkeypatch.setattr(tq_attention, "reference_attention", spy)
    return calls


def decode_on_both_backends(monkeypatch, seed: int, *args, **options):
    """Greedy `generate` (6 new tokens, batch 2, 40-token prompt) of a llama with head_dim 64 and the
    "turboquant" attention, once with `TurboQuantCache(*args, backend="triton", **options)` and once with
    backend "torch" (GPU if present, else the Triton interpreter). Returns `(scores, calls, layers)`:
    the stacked logits per backend, the decode-kernel calls counted, the model's layer count."""
    from tq_hf.kernels import decode as decode_module

    from tq_hf import TurboQuantCache

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model("llama", "turboquant", hidden_size=256).to(dev)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(seed)).to(dev)
    calls = []
    real = decode_module.decode_attention
    monkeypatch.setattr(decode_module, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    scores = {}
    for backend in ("triton", "torch"):
        cache = TurboQuantCache(*args, backend=backend, residual_length=8, **options)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0, **cache_kw(cache))
        scores[backend] = torch.stack(out.scores)
    return scores, calls, model.config.num_hidden_layers

