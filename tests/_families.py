"""Tiny random-weight models of every decoder family the support matrix covers (README "Support matrix").

Each entry builds a config offline (no hub access) with the family's distinguishing feature kept: Llama 3
rope scaling, Mistral's sliding window, Qwen2's q/k/v biases with 7:1 GQA, Qwen3's q/k norms with 7:1 GQA,
Gemma 2's logit softcap and alternating sliding layers, Gemma 3's 2:1 sliding/full pattern, Phi-3's
head_dim 96, Gemma's head_dim 256, GPT-OSS's attention sinks. The unsupported ones (MLA, linear
attention) live in UNSUPPORTED. Shared by test_models.py, test_modes.py and test_robustness.py.
"""

from __future__ import annotations

import torch
import transformers
from conftest import PAD, _base
from transformers import AutoModelForCausalLM


def _cfg(name, **kw):
    return getattr(transformers, name)(**_base(**kw))


# family -> (config factory, dense reference attention, what the family exercises)
FAMILIES = {
    "llama3": (lambda: _cfg("LlamaConfig", num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}), "sdpa", "GQA 4:1, llama3 rope"),
    "mistral": (lambda: _cfg("MistralConfig", sliding_window=8), "sdpa", "sliding window 8 on every layer"),
    "qwen2": (lambda: _cfg("Qwen2Config", hidden_size=448, num_attention_heads=14, num_key_value_heads=2),
              "sdpa", "q/k/v bias, GQA 7:1"),
    "qwen3": (lambda: _cfg("Qwen3Config", num_attention_heads=14, num_key_value_heads=2, head_dim=32),
              "sdpa", "q/k RMSNorm, GQA 7:1"),
    "gemma2": (lambda: _cfg("Gemma2Config", head_dim=64, query_pre_attn_scalar=64, sliding_window=8,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            hidden_activation="gelu_pytorch_tanh"), "eager", "softcap, sliding/full alternating"),
    "gemma3": (lambda: _cfg("Gemma3TextConfig", num_hidden_layers=3, head_dim=64, query_pre_attn_scalar=64,
                            sliding_window=8, hidden_activation="gelu_pytorch_tanh",
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
               "sdpa", "hybrid sliding:full 2:1, q/k norm"),
    "phi3": (lambda: _cfg("Phi3Config", hidden_size=192, num_attention_heads=2, num_key_value_heads=1),
             "sdpa", "head_dim 96 (dense rotation)"),
    "gemma_d256": (lambda: _cfg("GemmaConfig", head_dim=256, num_attention_heads=2, num_key_value_heads=1,
                                hidden_activation="gelu_pytorch_tanh"), "sdpa", "head_dim 256"),
    # Every expert active: with top-2 of 4, routing flips under any perturbation of the attention output
    # dominate the logit error (relative L2 0.23 at 4 bits against 0.04 with all 4 experts active).
    "gpt_oss": (lambda: _cfg("GptOssConfig", head_dim=32, num_local_experts=2, num_experts_per_tok=2,
                             sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                "eager", "attention sinks, sliding/full alternating"),
}

UNSUPPORTED = {
    # Multi-head latent attention: the cache is handed a compressed latent and a rotary key of other widths.
    "deepseek_v3": lambda: _cfg("DeepseekV3Config", num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=2,
                                n_group=1, topk_group=1),
    "deepseek_v2": lambda: _cfg("DeepseekV2Config", num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=2),
    # Linear attention (gated delta rule) alternating with full attention.
    "qwen3_next": lambda: _cfg("Qwen3NextConfig", head_dim=32, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=64, shared_expert_intermediate_size=64,
                               linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
                               linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
    # Short convolutions alternating with full attention.
    "lfm2": lambda: _cfg("Lfm2Config", layer_types=["conv", "full_attention"]),
}


def build(config, attn: str, seed: int = 0):
    """A seeded fp32 eval-mode model of `config` with `attn_implementation=attn`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = PAD
    # Random weights emit EOS at random: greedy_kwargs' min_new_tokens keeps runs the same length.
    return model


def family_model(family: str, attn: str | None = None, seed: int = 0):
    factory, ref_attn, _ = FAMILIES[family]
    return build(factory(), attn or ref_attn, seed)


def reference_attn(family: str) -> str:
    return FAMILIES[family][1]
