"""Needle in a haystack at 128K tokens, batch 1, at the attention level.

Random weights cannot retrieve anything and the shipped reference model retrieves passkeys only at
up to 1024 bytes (its training length), so retrieval at 128K is checked where it is decided: a 131,072-token cache layer holds random keys and values
plus three planted needles (keys along three orthogonal directions, at depths 10 %, 50 % and 90 %),
and each of three query heads points at one needle. With exact attention each head's output is
(almost) its needle's value; the quantized cache must give the same, and hold the context in under
0.30x the bytes of bf16 K/V. On CPU the PyTorch reference path runs (block-wise dequantization);
on CUDA the Triton decode kernel.
"""

from __future__ import annotations

import pytest
import torch

from tq_hf import TurboQuantCache
from tq_hf.attention import turboquant_attention_forward

T, D, HQ = 131072, 128, 3
DEPTHS = (0.1, 0.5, 0.9)


def test_needles_found_in_a_128k_context():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, T, D, generator=g)
    values = torch.randn(1, 1, T, D, generator=g)
    dirs = torch.linalg.qr(torch.randn(D, HQ, generator=g))[0].T  # [HQ, D] orthonormal
    where = [int(d * T) for d in DEPTHS]
    for h, pos in enumerate(where):
        keys[0, 0, pos] = dirs[h] * D**0.5  # a typical key norm, pointing along the needle direction
    # Query norm 20: the needle's scaled score is 20, which exceeds log(T) (~11.8) plus the spread of
    # the 131K other scores (std 20 / sqrt(D) ~ 1.8), so exact attention puts > 99 % weight on it.
    query = (dirs * 20).view(1, HQ, 1, D)
    exact_p = torch.softmax((query.view(HQ, D) @ keys[0, 0].T) * D**-0.5, dim=-1)
    assert all(exact_p[h, pos] > 0.99 for h, pos in enumerate(where))

    cache = TurboQuantCache()  # default preset (4bit)
    k, v = keys.to(device, torch.bfloat16), values.to(device, torch.bfloat16)
    cache.update(k[:, :, :-1], v[:, :, :-1], 0)  # the prompt
    cache.layers[0].claim()  # what the prompt's "turboquant" attention does in a model
    k_new, v_new = cache.update(k[:, :, -1:], v[:, :, -1:], 0)  # one decode step
    assert k_new._tq_layer is cache.layers[0]  # tagged: the attention reads codes, not dequantized K/V
    module = torch.nn.Module()
    out, _ = turboquant_attention_forward(module, query.to(device, torch.bfloat16), k_new, v_new, None,
                                          scaling=D**-0.5)
    out = out.float().cpu().view(HQ, D)  # [B, q, Hq, D] -> [Hq, D]
    layer = cache.layers[0]
    assert layer.n_quant + layer.n_window == T and layer.n_quant >= T - 64
    for h, pos in enumerate(where):
        needle = values[0, 0, pos]
        cos = torch.nn.functional.cosine_similarity(out[h], needle, dim=0)
        assert cos > 0.98, f"needle at depth {DEPTHS[h]}: cosine {cos:.3f} with its value"
    dense_bytes = 2 * T * D * 2
    assert cache.nbytes() <= 0.30 * dense_bytes, (cache.nbytes(), dense_bytes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_needle_decode_reads_no_dense_copy_of_the_context():
    """On the GPU, the 128K decode step allocates far less than bf16 K/V of the context (4 MiB here)."""
    cache = TurboQuantCache()
    k = torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16)
    cache.update(k[:, :, :-1], k[:, :, :-1], 0)
    cache.layers[0].claim()  # what the prompt's "turboquant" attention does in a model
    k_new, v_new = cache.update(k[:, :, -1:], k[:, :, -1:], 0)
    assert k_new._tq_layer is cache.layers[0]
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    module = torch.nn.Module()  # one attention module reads the layer (a cache serves one model)
    turboquant_attention_forward(module, q, k_new, v_new, None)  # warm-up: compile, workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    turboquant_attention_forward(module, q, k_new, v_new, None)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 0.05 * (2 * T * D * 2)
