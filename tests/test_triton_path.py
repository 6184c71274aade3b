"""generate() through the Triton backend (on the GPU, or under TRITON_INTERPRET=1 on the CPU):
a spy proves the kernels ran, and the tokens match the PyTorch reference backend."""

import os

import pytest
import torch
from conftest import cache_kw
from transformers import AutoModelForCausalLM, LlamaConfig

import tq_hf
from tq_hf.workspace import get_workspace

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                       reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="turboquant").to(DEV).eval()


def _generate(model, ids, mask, cache, n):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=0, **cache_kw(cache))


def test_generate_runs_the_kernels_and_matches_reference(monkeypatch):
    import tq_hf.kernels.decode as decode_mod
    import tq_hf.kernels.quantize as quantize_mod

    calls = {"decode": 0, "quantize": 0, "dequantize": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(decode_mod, "decode_attention", spy("decode", decode_mod.decode_attention))
    monkeypatch.setattr(quantize_mod, "quantize_pack", spy("quantize", quantize_mod.quantize_pack))
    monkeypatch.setattr(quantize_mod, "dequantize", spy("dequantize", quantize_mod.dequantize))

    model = _model()
    ids = torch.randint(1, 128, (2, 24), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    n = 6
    out_tri = _generate(model, ids, mask, tq_hf.TurboQuantCache(residual_length=4, backend="triton"), n)
    assert calls["decode"] == 2 * (n - 1)  # every decode step of both layers
    assert calls["quantize"] > 0
    out_ref = _generate(model, ids, mask, tq_hf.TurboQuantCache(residual_length=4, backend="torch"), n)
    assert torch.equal(out_tri, out_ref)

    # Continuation prefill (history + several new tokens) reads history through workspace tiles
    # filled by the Triton dequantize kernel.
    cache_t = tq_hf.TurboQuantCache(residual_length=4, backend="triton")
    cache_r = tq_hf.TurboQuantCache(residual_length=4, backend="torch")
    first_t = _generate(model, ids, mask, cache_t, 3)
    first_r = _generate(model, ids, mask, cache_r, 3)
    more = torch.randint(1, 128, (2, 5), device=DEV)
    mask2 = torch.cat([mask, torch.ones(2, 3 + 5, dtype=mask.dtype, device=DEV)], 1)
    second_t = _generate(model, torch.cat([first_t, more], 1), mask2, cache_t, 3)
    second_r = _generate(model, torch.cat([first_r, more], 1), mask2, cache_r, 3)
    assert calls["dequantize"] > 0
    assert torch.equal(second_t, second_r)
    assert "hist_k" in get_workspace(DEV)._buffers


def test_attention_sinks_decode_on_the_kernel(monkeypatch):
    """GPT-OSS (attention sinks, sliding and full layers, every layer quantized): greedy decode through the
    Triton kernel, which gets the sinks, matches the PyTorch reference backend."""
    import tq_hf.kernels.decode as decode_mod
    from _families import _cfg, build

    sinks_seen = []
    real = decode_mod.decode_attention
    monkeypatch.setattr(decode_mod, "decode_attention",
                        lambda *a, **k: sinks_seen.append(k.get("sinks")) or real(*a, **k))
    cfg = _cfg("GptOssConfig", head_dim=64, num_local_experts=2, num_experts_per_tok=2, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"])
    model = build(cfg, "turboquant").to(DEV)
    for m in model.modules():  # transformers initialises sinks near 0; spread them so head order and scale matter
        if hasattr(m, "sinks"):
            m.sinks.data.copy_(torch.randn(m.sinks.shape, generator=torch.Generator().manual_seed(4)) * 3)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(3)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    scores = {}
    for backend in ("triton", "torch"):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 **cache_kw(tq_hf.TurboQuantCache(residual_length=8, backend=backend)))
        scores[backend] = torch.stack(out.scores)
    assert len(sinks_seen) == 2 * 4 and all(s is not None for s in sinks_seen)
    torch.testing.assert_close(scores["triton"], scores["torch"], rtol=0, atol=1e-3)
