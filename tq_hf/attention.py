"""The "turboquant" attention function, its mask, and the PyTorch reference attention.

`turboquant_attention_forward` keeps `sdpa_attention_forward`'s signature and returns
`([B, q, Hq, D], None)`. It dispatches on what the cache handed it:

* tensors tagged by a `TurboQuantLayer` (see tq_hf.cache):
    - first prefill (no history): exact attention on the chunk's own K/V;
    - decode (q = 1): the Triton split-KV kernel on CUDA, reading packed codes (no full-precision
      K/V of the context is built), or the block-wise reference below on CPU;
    - continuation prefill (history and q > 1): history dequantized block by block into
      workspace tiles with an online softmax, then the exact new chunk;
* anything else (DynamicCache, StaticCache, no cache): plain attention, SDPA-equivalent.

`output_attentions=True` takes a dense fallback: the history is dequantized and the probabilities are
computed in fp32 and returned (as "eager" would), so generate/forward get real attention weights.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import TurboQuantLayer, tagged_layer
from .workspace import get_workspace

__all__ = ["reference_attention", "register", "turboquant_attention_forward"]

HISTORY_BLOCK = 1024  # tokens dequantized per workspace tile in continuation prefill
EAGER_BLOCK_BYTES = 2**28  # fp32 scores per block of query rows in dense attention (first prefill with softcap
                           # or sinks); a few such temporaries live at once


def _eager(q, k, v, mask, scaling, softcap, return_weights=False, sinks=None):
    """Dense attention in fp32 with GQA, bool mask `[B, 1|H, q, kv]` (True = attend; None = causal),
    optional softcap and attention-sink logits `sinks` `[Hq]` (one more softmax column, attending to nothing).
    q `[B, Hq, q, D]`, k/v `[B, Hkv, kv, D]` -> `[B, q, Hq, D]` in q's dtype (and, with `return_weights`,
    the probabilities `[B, Hq, q, kv]` in q's dtype). Without `return_weights`, long queries (a first
    prefill) run a block of rows at a time, so the fp32 scores of a block take about EAGER_BLOCK_BYTES."""
    B, Hq, L, _ = q.shape
    first = k.shape[2] - L  # query i sits at key position first + i
    rows = max(1, EAGER_BLOCK_BYTES // (4 * B * Hq * k.shape[2]))
    if return_weights or L <= rows:
        return _eager_rows(q, k, v, mask, scaling, softcap, return_weights, sinks, first)
    return torch.cat([
        _eager_rows(q[:, :, i : i + rows], k, v,
                    mask if mask is None or mask.shape[-2] == 1 else mask[..., i : i + rows, :],
                    scaling, softcap, False, sinks, first + i)
        for i in range(0, L, rows)
    ], 1)


def _eager_rows(q, k, v, mask, scaling, softcap, return_weights, sinks, first):
    """`_eager` for query rows at key positions first, first + 1, ... (for the causal mask when None)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    qf = q.float().view(B, k.shape[1], G, L, D)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qf, k.float()).mul_(scaling)  # in place: s is the big temporary
    if softcap:
        s.div_(softcap).tanh_().mul_(softcap)
    if mask is None and first < k.shape[2] - 1:
        # The mask function returns None for an unpadded causal batch (SDPA then sets is_causal).
        mask = torch.ones(L, k.shape[2], dtype=torch.bool, device=q.device).tril(first)[None, None]
    if mask is not None:
        s.masked_fill_(~_group_mask(mask, k.shape[1], G), float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, k.shape[1], G, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink], -1)
    # fully masked rows (padding queries) give 0
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)[..., : k.shape[2]]
    o = torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
    o = o.reshape(B, Hq, L, D).transpose(1, 2).to(q.dtype)
    if return_weights:
        return o, p.reshape(B, Hq, L, -1).to(q.dtype)
    return o


def _group_mask(mask, hkv, g):
    # [B, 1|Hq, q, kv] -> broadcastable to [B, Hkv, G, q, kv]
    if mask.shape[1] == 1:
        return mask.unsqueeze(1)
    return mask.view(mask.shape[0], hkv, g, *mask.shape[2:])


def _as_bool_mask(mask):
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 keeps, min drops


def reference_attention(query, layer: TurboQuantLayer, end, chunk_k=None, chunk_v=None, mask=None,
                        scaling=None, softcap=None, block=HISTORY_BLOCK, sinks=None):
    """Attention of `query` `[B, Hq, q, D]` over cached positions [0, end) of `layer` (dequantized
    block by block, online softmax) followed, if given, by the exact chunk `[B, Hkv, q, D]` at
    positions [end, end + q). `mask` is bool `[B, 1|Hq, q, >= end (+ q)]` (True = attend) or None
    (history fully visible, chunk causal). `sinks`: optional attention-sink logits `[Hq]`, one more
    term of the softmax's denominator. Returns `[B, q, Hq, D]` in query's dtype.
    This is the spec of the decode kernel (q = 1, no chunk)."""
    B, Hq, L, D = query.shape
    Hkv = layer.num_heads
    G = Hq // Hkv
    scaling = D**-0.5 if scaling is None else scaling
    q = query.float().view(B, Hkv, G, L, D)
    m = torch.full((B, Hkv, G, L), float("-inf"), device=query.device)
    den = torch.zeros((B, Hkv, G, L), device=query.device)
    acc = torch.zeros((B, Hkv, G, L, D), device=query.device)
    ws = get_workspace(query.device)

    def step(k, v, blk_mask, s0=None):
        # s0: the block's first cache position, for blocks read from the cache (None: the exact chunk)
        nonlocal m, den, acc
        s = torch.einsum("bhgqd,bhkd->bhgqk", q, k.float())
        if layer.config.key_qjl and s0 is not None and s0 < layer.n_quant:
            # TurboQuant_prod: add the QJL estimate of <q, residual> to the scores of quantized keys
            n = min(layer.n_quant, s0 + k.shape[2]) - s0
            s[..., :n] += layer.qjl_scores(q, s0, s0 + n)
        s = s * scaling
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if blk_mask is not None:
            s = s.masked_fill(~blk_mask, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - safe.unsqueeze(-1))
        corr = torch.exp(m - safe)
        den = den * corr + p.sum(-1)
        acc = acc * corr.unsqueeze(-1) + torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
        m = m_new

    for s0 in range(0, end, block):
        s1 = min(end, s0 + block)
        tile = tuple(ws.get(f"hist_{n}", (B, Hkv, s1 - s0, D), layer.dtype) for n in "kv")
        k, v = layer.dequantize_range(s0, s1, out=tile)
        step(k, v, None if mask is None else _group_mask(mask[..., s0:s1], Hkv, G), s0)
    if chunk_k is not None:
        if mask is None:
            causal = torch.ones(L, L, dtype=torch.bool, device=query.device).tril()
            cm = causal.view(1, 1, 1, L, L)
        else:
            cm = _group_mask(mask[..., end : end + L], Hkv, G)
        step(chunk_k, chunk_v, cm)
    if sinks is not None:
        den = den + torch.exp(sinks.float().view(1, Hkv, G, 1) - torch.where(torch.isinf(m), 0.0, m))
    out = acc / den.unsqueeze(-1)
    out = torch.where(den.unsqueeze(-1) > 0, out, torch.zeros_like(out))
    return out.reshape(B, Hq, L, D).transpose(1, 2).to(query.dtype)


def turboquant_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for `attn_implementation="turboquant"`.

    Args:
        query: `[B, Hq, q, D]`. key, value: `[B, Hkv, kv, D]` (for a TurboQuantCache, the new chunk
            tagged with its layer). attention_mask: bool `[B, 1, q, kv_total]` from the registered
            mask function, or None. scaling: softmax scale (default D**-0.5).
        kwargs: `softcap` and `s_aux` (attention-sink logits `[Hq]`, GPT-OSS) are honoured. Attention
            with either that is not read from the codes (a first prefill, other caches) is dense fp32
            attention, as "eager" computes it.
    Returns:
        `([B, q, Hq, D], None)`.
    """
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    layer = tagged_layer(key)
    if kwargs.get("output_attentions"):
        return _with_weights(module, query, key, value, attention_mask, scaling, softcap, layer, dropout, sinks)
    if layer is None or tagged_layer(value) is not layer:
        if softcap or sinks is not None:
            if dropout:
                raise ValueError("the 'turboquant' attention with softcap or attention sinks is inference-only: "
                                 "attention dropout must be 0")
            return _eager(query, key, value, _as_bool_mask(attention_mask), scaling or query.shape[-1] ** -0.5,
                          softcap, sinks=sinks), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout:
        raise ValueError("TurboQuantCache is an inference cache: attention dropout must be 0")
    layer.claim(module)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = _as_bool_mask(attention_mask)
    total, L = layer.get_seq_length(), query.shape[2]
    history = total - layer.last_update_len
    if history == 0:
        if softcap or sinks is not None:
            return _eager(query, key, value, mask, scaling, softcap, sinks=sinks), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if L == 1:
        flat = None if mask is None else mask[:, 0, 0, :total]
        if layer.backend == "triton":
            # The submodule, not the name: `from .kernels import decode_attention` would go through the
            # package's lazy __getattr__ at every call (2.8 us per layer on a CPU host, this 0.2 us).
            from .kernels import decode

            return decode.decode_attention(query, layer, flat, scaling, softcap, sinks=sinks), None
        return reference_attention(query, layer, total, mask=mask, scaling=scaling, softcap=softcap, sinks=sinks), None
    return reference_attention(query, layer, history, key, value, mask, scaling, softcap, sinks=sinks), None


def _with_weights(module, query, key, value, attention_mask, scaling, softcap, layer, dropout, sinks=None):
    """The `output_attentions=True` fallback: dense fp32 attention that also returns its probabilities
    `[B, Hq, q, kv]`. For a TurboQuantCache layer the history is dequantized (the whole context in
    full precision: slow, as "eager" is) and the new chunk is exact, as on the fast path."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = _as_bool_mask(attention_mask)
    if layer is not None and tagged_layer(value) is layer:
        if dropout:
            raise ValueError("TurboQuantCache is an inference cache: attention dropout must be 0")
        layer.claim(module)
        history = layer.get_seq_length() - layer.last_update_len
        if history:
            hk, hv = layer.dequantize_range(0, history)
            key, value = torch.cat([hk, key], 2), torch.cat([hv, value], 2)
    if mask is not None:
        mask = mask[..., : key.shape[2]]
    return _eager(query, key, value, mask, scaling, softcap, return_weights=True, sinks=sinks)


def register() -> None:
    """Register "turboquant" with transformers' attention and mask interfaces (done on import)."""
    AttentionInterface.register("turboquant", turboquant_attention_forward)
    # Without a registered mask function a custom attention gets attention_mask=None, and padded
    # batches would silently attend to padding.
    AttentionMaskInterface.register("turboquant", sdpa_mask)
