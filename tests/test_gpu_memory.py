"""GPU: a decode step with TurboQuantCache + attn_implementation="turboquant" never materialises the
full-precision K/V of the context (DESIGN.md §2, requirement 1).

Method. A 2-layer Llama-shaped model (Hq=32, Hkv=8, head_dim=128 as Llama-3-8B, bf16) prefills a
random prompt of `CONTEXT` tokens (32K) at batch 1; then, with the allocator's peak reset, it runs one
decode step and reads `torch.cuda.max_memory_allocated() - memory_allocated()` before the step: every
byte the step allocated at its high-water mark, transient or kept.

Bound. One layer's bf16 K/V of the context is DENSE_LAYER = 2 * Hkv * CONTEXT * head_dim * 2 bytes =
128 MiB at 32K. A step that dequantized the context of even one layer, K or V alone, would allocate
>= 64 MiB. What a Triton decode step may legitimately allocate is independent of the context and
small: the one-token activations (hidden 1024, vocab 1024: KBs), the split-KV workspace
(`[B, Hq, S+1, 128]` fp32 with S <= ~2 x SMs / Hkv: < 1 MiB) and the output. So the bound is
DENSE_LAYER / 16 = 8 MiB: 8x below one dequantized K or V, > 8x above what the step needs.

Two more checks make the measurement trustworthy:
* context independence: the step's allocation at 16K and at 32K differs by < 4 MiB, where a
  dequantizing step would add 64 MiB (one layer's K/V of the extra 16K tokens). This one also runs
  the PyTorch reference backend on the GPU, whose 1024-token dequantization tiles take tens of MiB
  but never grow with the context;
* a positive control: the same cache under attn_implementation="sdpa" (the documented dequantizing
  fallback) must allocate >= 0.9 x DENSE_LAYER in its decode step: the method sees materialisation.

Runs only on CUDA (skipped otherwise); uses only torch 2.11 / transformers 5.17 APIs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cache_kw

from tq_hf import TurboQuantCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: measures torch.cuda.max_memory_allocated around a decode step"),
]

CONTEXT = 32768
HQ, HKV, D = 32, 8, 128
MIB = 1 << 20
DENSE_LAYER = 2 * HKV * CONTEXT * D * 2  # bf16 K + V of one layer, batch 1: 128 MiB
BOUND = DENSE_LAYER // 16  # 8 MiB
GROWTH_TOL = 4 * MIB  # allocator rounding (blocks, 512-byte granules); a dequantizing step adds 64 MiB


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    import tq_hf  # noqa: F401  (registers "turboquant")

    cfg = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                      max_position_embeddings=CONTEXT + 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM._from_config(cfg, attn_implementation="turboquant", dtype=torch.bfloat16)
    yield m.eval()
    del m
    torch.cuda.empty_cache()


def _decode_step_bytes(model, attn: str, context: int, backend: str = "auto"):
    """(bytes one decode step allocates at its peak, the cache) after prefilling `context` random tokens."""
    from tq_hf.workspace import workspaces

    model.set_attn_implementation(attn)
    for ws in workspaces().values():  # each measurement pays for its own scratch buffers
        ws.clear()
    torch.cuda.empty_cache()
    cache = TurboQuantCache("4bit", backend=backend)
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(1, 1024, (1, context), generator=g).cuda()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kw(cache))
        nxt = out.logits[:, -1:].argmax(-1)
        del out, ids
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **cache_kw(cache))
        torch.cuda.synchronize()
        step = torch.cuda.max_memory_allocated() - before
        assert torch.isfinite(out.logits).all()
        del out
    assert cache.get_seq_length() == context + 1
    return step, cache


def test_turboquant_decode_step_allocates_far_less_than_one_layer_of_bf16_kv(model):
    step, cache = _decode_step_bytes(model, "turboquant", CONTEXT)
    layers = cache.layers
    assert all(layer.fast_path and layer.backend == "triton" for layer in layers), "the fast path was not taken"
    assert layers[0].n_quant >= CONTEXT - cache.config.residual_length, "the prompt was not quantized"
    # "Something is actually packed": 4-bit codes + norms + the 64-token window, vs bf16.
    assert cache.nbytes() < 0.35 * cache.dense_nbytes()
    assert step < BOUND, (
        f"one decode step allocated {step / MIB:.1f} MiB at its peak; bound {BOUND / MIB:.0f} MiB "
        f"(1/16 of one layer's bf16 K/V of {CONTEXT} tokens = {DENSE_LAYER / MIB:.0f} MiB)"
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_turboquant_decode_step_memory_does_not_grow_with_context(model, backend):
    small, _ = _decode_step_bytes(model, "turboquant", CONTEXT // 2, backend)
    large, cache = _decode_step_bytes(model, "turboquant", CONTEXT, backend)
    assert all(layer.fast_path and layer.backend == backend for layer in cache.layers)
    assert large - small < GROWTH_TOL, (
        f"{backend}: a decode step allocated {small / MIB:.1f} MiB at {CONTEXT // 2} tokens and "
        f"{large / MIB:.1f} MiB at {CONTEXT}: it grows with the context (a dequantized K/V would add "
        f"{DENSE_LAYER / 2 / MIB:.0f} MiB)"
    )


def test_positive_control_dequantizing_fallback_is_detected(model):
    """The same measurement under "sdpa": TurboQuantCache dequantizes the whole layer every step."""
    try:
        small, _ = _decode_step_bytes(model, "sdpa", CONTEXT // 2)
        large, cache = _decode_step_bytes(model, "sdpa", CONTEXT)
    finally:
        model.set_attn_implementation("turboquant")
    assert not any(layer.fast_path for layer in cache.layers)
    assert large >= 0.9 * DENSE_LAYER, f"the dequantizing fallback allocated only {large / MIB:.1f} MiB"
    assert large - small >= 0.9 * DENSE_LAYER / 2
