"""Soak (CPU scale): many generate rounds with varying batch sizes, prompt lengths and answer lengths, all
through ONE TurboQuantCache reused with reset(). Between rounds the cache must hold nothing (nbytes() == 0,
its old buffers actually freed) and the shared workspace must stop growing once the largest round has run.
On a CUDA machine the same loop also checks that allocated GPU memory returns to its baseline.

TQ_SOAK_ROUNDS sets the number of rounds (default 200).
"""

from __future__ import annotations

import os
import random
import weakref

import pytest
import torch
from conftest import cache_kw, greedy_kwargs, left_padded_batch, make_model

from tq_hf import TurboQuantCache, TurboQuantLayer
from tq_hf.attention import HISTORY_BLOCK
from tq_hf.workspace import get_workspace

ROUNDS = int(os.environ.get("TQ_SOAK_ROUNDS", "200"))
MAX_BATCH, MAX_PROMPT, MAX_NEW = 3, 40, 8


def _buffers(cache):
    return [weakref.ref(t) for layer in cache.layers if isinstance(layer, TurboQuantLayer)
            for t in (layer.k_codes, layer.v_codes, layer.k_norms, layer.v_norms, layer.k_win, layer.v_win)
            if t is not None]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_generate_rounds_return_to_baseline(device):
    model = make_model("llama", "turboquant", seed=3).to(device)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = TurboQuantCache(residual_length=4)  # short window: every round quantizes most of its tokens
    ws = get_workspace(device)
    rng = random.Random(0)
    # The largest round first: afterwards the workspace has seen its biggest request.
    shapes = [(MAX_BATCH, MAX_PROMPT, MAX_NEW)] + [
        (rng.randint(1, MAX_BATCH), rng.randint(1, MAX_PROMPT), rng.randint(1, MAX_NEW)) for _ in range(ROUNDS - 1)]
    baseline_gpu = None
    ws_after_warmup = None
    for i, (b, prompt, new) in enumerate(shapes):
        lengths = [prompt] + [rng.randint(1, prompt) for _ in range(b - 1)]
        ids, mask = left_padded_batch(lengths, seed=i, device=device)
        out = model.generate(ids, attention_mask=mask, **greedy_kwargs(new), **cache_kw(cache))
        assert out.shape == (b, prompt + new)
        assert cache.get_seq_length() == prompt + new - 1
        layer = cache.layers[0]
        assert layer.batch_size == b and layer.n_quant + layer.n_window == prompt + new - 1
        assert all(layer.fast_path for layer in cache.layers)
        held = _buffers(cache)
        assert cache.nbytes() > 0
        del out
        cache.reset()
        # no gc.collect(): reference counting alone must free them (no cycles hold cache buffers)
        assert cache.nbytes() == 0
        assert all(r() is None for r in held), "reset() left cache buffers alive"
        if device == "cuda":
            torch.cuda.synchronize()
            # The first round creates what stays by design: the shared workspace, and allocations
            # that torch keeps after a first use (e.g. the cuBLAS workspace, which the caching
            # allocator counts). From then on, only the workspace may grow.
            if i == 0:
                baseline_gpu = torch.cuda.memory_allocated() - ws.nbytes()
            assert torch.cuda.memory_allocated() <= baseline_gpu + ws.nbytes()
        if i == 0:
            ws_after_warmup = (ws.nbytes(), ws.grow_count)
    # The workspace is bounded by its largest request: it has not grown since the biggest round.
    assert (ws.nbytes(), ws.grow_count) == ws_after_warmup
    biggest_tile = MAX_BATCH * cfg.num_key_value_heads * min(HISTORY_BLOCK, MAX_PROMPT + MAX_NEW) * head_dim * 4
    print(f"\n{ROUNDS} rounds on {device}: workspace {ws.nbytes()} B (largest history tile {biggest_tile} B), "
          f"{ws.grow_count} growths in total")
