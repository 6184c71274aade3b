"""Split-KV decode attention straight from the packed TurboQuant cache.

Stage 1: one program per (batch, kv head, split) serves all G query heads of that kv head, so each
code byte is read from memory once. Splits 0..S-1 cover the quantized positions: the query is
rotated once into the code space, scores are q_rot . (norm * c[idx]) (+ q . mean for centred
keys), values are accumulated in the rotated space. Split S is the exact full-precision window,
in the original space. Each split writes its normalised partial output and log-sum-exp.
Stage 2: one program per (batch, kv head) merges the splits, un-rotates the quantized part
once (o = o_rot @ Pi_v + o_window) and writes the model dtype in the `[B, 1, Hq, D]` layout
the model consumes, so no copy or cast kernel follows.
"""

import torch
import triton
import triton.language as tl

from tq_hf.workspace import get_workspace

from .codes import load_code_rows
from .quantize import on_device

_NEG_INF = float("-inf")


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """fp32-accumulated a @ b. "fp16" rounds the operands to fp16 (the fastest tensor-core path);
    otherwise fp32 operands with tl.dot's input_precision ("ieee", "tf32x3" or "tf32")."""
    if PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _online_softmax_step(s, v, m, l, acc, DOT_PRECISION: tl.constexpr, v_scale=None):
    """Fold scores `s` [BLOCK_G, BLOCK_N] (masked = -inf) and values `v` [BLOCK_N, BLOCK_D] (times
    `v_scale` [BLOCK_N] if given) into the running max `m`, denominator `l` [BLOCK_G] and
    accumulator `acc` [BLOCK_G, BLOCK_D]."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if v_scale is not None:
        p = p * v_scale[None, :]
    pv = _dot(p, v, DOT_PRECISION)
    return m_new, l, acc * alpha[:, None] + pv


@triton.jit
def _decode_stage1_kernel(
    # pointers
    Q,  # [B, Hq, 1, D] model dtype
    Kc, Kn,  # [B, Hkv, C, D*KBITS/8] uint8, [B, Hkv, C] fp32
    Vc, Vn,  # [B, Hkv, C, D*VBITS/8] uint8, [B, Hkv, C] fp32
    Kmean,  # [Hkv, D] fp32
    RotK,  # [D, D] fp32
    CentK, CentV,  # [2**KBITS], [2**VBITS] fp32
    Kw, Vw,  # [B, Hkv, R, D] model dtype: the exact window
    Mask,  # [B, kv] uint8, 1 = attend (read if HAS_MASK)
    MidO,  # [B, Hq, S + 1, BLOCK_D] fp32
    MidL,  # [B, Hq, S + 1] fp32
    # sizes
    Hkv, n_quant, n_window, chunk, scale, softcap,
    # strides
    sqb, sqh, sqd,
    skcb, skch, skct, sknb, sknh, sknt,
    svcb, svch, svct, svnb, svnh, svnt,
    swb, swh, swt, swd,
    smb, smk,
    sob, soh, sos,
    slb, slh,
    # meta-parameters
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= 16: tl.dot's smallest tile
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rotation K-chunk
    KBITS: tl.constexpr,
    VBITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # ieee for fp32 models; tf32x3 otherwise (plain tf32 is coarser than fp16)
):
    # (batch, head) bases are 64-bit scalars; per-element offsets inside a plane stay int32.
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1) - 1
    b, h = pid_bh // Hkv, pid_bh % Hkv
    kc_base, kn_base = Kc + b * skcb + h * skch, Kn + b * sknb + h * sknh
    vc_base, vn_base = Vc + b * svcb + h * svch, Vn + b * svnb + h * svnh
    kw_base, vw_base = Kw + b * swb + h * swh, Vw + b * swb + h * swh
    mask_base = Mask + b * smb
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask, dmask = g < G, d < D
    q = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + d[None, :] * sqd,
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    if split < num_splits:
        # q_rot = q @ RotK.T, K-chunked so the Rot tile fits in shared memory at D = 256
        q_rot = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for k0 in tl.static_range(0, BLOCK_D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < D
            qk = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + kk[None, :] * sqd,
                         mask=gmask[:, None] & kmask[None, :], other=0.0).to(tl.float32) * scale
            rot_t = tl.load(RotK + d[None, :] * D + kk[:, None], mask=kmask[:, None] & dmask[None, :], other=0.0)
            q_rot += _dot(qk, rot_t, DOT_PRECISION)
        # Keys were centred before quantizing: q.k = q.mean + q_rot.(norm * c[idx]).
        q_mean = tl.sum(q * tl.load(Kmean + h * D + d, mask=dmask, other=0.0)[None, :], axis=1)
        start = split * chunk
        end = tl.minimum(start + chunk, n_quant)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + n_off
            nmask = n < end
            kc = tl.load(CentK + load_code_rows(kc_base, n * skct, nmask, D, BLOCK_D, KBITS))
            if D != BLOCK_D:
                kc = tl.where(dmask[None, :], kc, 0.0)
            s = _dot(q_rot, tl.trans(kc), DOT_PRECISION)
            kn = tl.load(kn_base + n * sknt, mask=nmask, other=0.0)
            s = s * kn[None, :] + q_mean[:, None]
            if HAS_SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
            keep = nmask
            if HAS_MASK:
                keep &= tl.load(mask_base + n * smk, mask=nmask, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
            v = tl.load(CentV + load_code_rows(vc_base, n * svct, nmask, D, BLOCK_D, VBITS))
            if D != BLOCK_D:
                v = tl.where(dmask[None, :], v, 0.0)
            vn = tl.load(vn_base + n * svnt, mask=nmask, other=0.0)
            # the value norms scale the probabilities ([G, N]) rather than the value tile ([N, D])
            m, l, acc = _online_softmax_step(s, v, m, l, acc, DOT_PRECISION, vn)
    else:
        for n0 in range(0, n_window, BLOCK_N):
            n = n0 + n_off
            nmask = n < n_window
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(kw_base + n[:, None] * swt + d[None, :] * swd, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k.to(tl.float32)), DOT_PRECISION)
            if HAS_SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            keep = nmask
            if HAS_MASK:
                keep &= tl.load(mask_base + (n_quant + n) * smk, mask=nmask, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
            v = tl.load(vw_base + n[:, None] * swt + d[None, :] * swd, mask=kv_mask, other=0.0)
            m, l, acc = _online_softmax_step(s, v.to(tl.float32), m, l, acc, DOT_PRECISION)
    # Empty or fully masked split: lse = -inf, output 0, so it weighs nothing in the merge.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    hq = h * G + g
    tl.store(MidO + b * sob + hq[:, None] * soh + split * sos + d[None, :], out, mask=gmask[:, None])
    tl.store(MidL + b * slb + hq * slh + split, lse, mask=gmask)


@triton.jit
def _decode_stage2_kernel(
    # pointers
    MidO,  # [B, Hq, S + 1, BLOCK_D] fp32
    MidL,  # [B, Hq, S + 1] fp32
    RotV,  # [D, D] fp32
    Out,  # [B, 1, Hq, D] model dtype
    # sizes
    Hkv, num_splits,
    # strides
    sob, soh, sos,
    slb, slh,
    sub, suh,
    # meta-parameters
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,  # output columns per un-rotation step: bounds the Rot tile in registers
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b, h = pid_bh // Hkv, pid_bh % Hkv
    g = tl.arange(0, BLOCK_G)
    hq = h * G + g
    gmask = g < G
    s_idx = tl.arange(0, BLOCK_S)
    lse = tl.load(MidL + b * slb + hq[:, None] * slh + s_idx[None, :],
                  mask=gmask[:, None] & (s_idx[None, :] <= num_splits), other=float("-inf"))
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp(lse - m[:, None]), axis=1)
    den = tl.where(den > 0, den, 1.0)
    d = tl.arange(0, BLOCK_D)
    o_rot = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(num_splits):
        w = tl.exp(tl.load(MidL + b * slb + hq * slh + s, mask=gmask, other=float("-inf")) - m)
        o_rot += w[:, None] * tl.load(MidO + b * sob + hq[:, None] * soh + s * sos + d[None, :],
                                      mask=gmask[:, None], other=0.0)
    w_win = tl.exp(tl.load(MidL + b * slb + hq * slh + num_splits, mask=gmask, other=float("-inf")) - m)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < D
        rot = tl.load(RotV + d[:, None] * D + c[None, :], mask=(d[:, None] < D) & cmask[None, :], other=0.0)
        o = _dot(o_rot, rot, DOT_PRECISION)
        o += w_win[:, None] * tl.load(MidO + b * sob + hq[:, None] * soh + num_splits * sos + c[None, :],
                                      mask=gmask[:, None] & cmask[None, :], other=0.0)
        o = o / den[:, None]
        tl.store(Out + b * sub + hq[:, None] * suh + c[None, :], o.to(Out.dtype.element_ty),
                 mask=gmask[:, None] & cmask[None, :])


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so tests cover the merge


def plan_splits(n_quant: int, programs_per_split: int, num_sms: int, block_n: int,
                num_splits: int | None = None) -> tuple[int, int]:
    """(number of quantized splits S, tokens per split). About four programs per SM, rounded down so
    that the grid fills whole waves of the two programs an SM holds at once (a last, partly filled wave
    idles most SMs), never a split shorter than one tile; `num_splits` forces S (tests)."""
    if n_quant == 0:
        return 0, block_n
    tiles = triton.cdiv(n_quant, block_n)
    if num_splits is None:
        num_splits = (4 * num_sms) // programs_per_split
    num_splits = max(1, min(num_splits, tiles))
    chunk = triton.cdiv(tiles, num_splits) * block_n
    return triton.cdiv(n_quant, chunk), chunk


def decode_attention(query, layer, mask=None, scaling=None, softcap=None, num_splits=None,
                     block_n=64, num_warps=8, num_stages=1, precision=None, maxnreg=None):
    """Decode attention of one query token over every position cached in `layer`.

    Args:
        query: `[B, Hq, 1, D]` (fp16/bf16/fp32). layer: a `TurboQuantLayer` on this device.
        mask: bool `[B, kv]` (True = attend) over the layer's `get_seq_length()` positions, or None.
        scaling: softmax scale (default D**-0.5). softcap: optional tanh soft-capping of scores.
        num_splits: force the number of quantized splits (default: from SM count and length).
        precision: dot precision, "ieee" | "tf32x3" | "tf32" | "fp16". Default: "ieee" for fp32,
            "tf32x3" for fp16 (plain tf32 is as coarse as fp16 itself) and "fp16" operands with fp32
            accumulation for bf16 (finer than bf16; 2.4x faster than tf32x3 on an H200; values must
            stay within fp16's range, |v| < 65504, as they do in practice).
        block_n: tokens per tile, >= 32 (16-token tiles gave wrong results on an H200 with Triton 3.6).
        num_warps, num_stages, maxnreg: stage 1's launch options. maxnreg caps its registers per thread;
            by default 128 for D <= 128, which lets two 8-warp programs share an SM (uncapped it takes
            138 at D = 128 with Triton 3.9; the cap costs 8 bytes of stack) and was 4-10 % faster on
            an H200. Larger D would spill under the cap, so it stays uncapped there.
    Returns:
        `[B, 1, Hq, D]` in query's dtype.
    """
    B, Hq, L, D = query.shape
    Hkv = layer.num_heads
    if layer.config.outlier_fraction:
        raise ValueError("this layer holds split codes (outlier_fraction > 0), which the Triton kernels do not "
                         "read yet; use tq_hf.attention.reference_attention")
    if L != 1:
        raise ValueError(f"decode_attention takes one query token, got {L}")
    if (B, D) != (layer.batch_size, layer.head_dim) or Hq % Hkv:
        raise ValueError(f"query {tuple(query.shape)} does not match the cache (B={layer.batch_size}, "
                         f"Hkv={Hkv}, D={layer.head_dim})")
    if query.device != layer.device:
        raise ValueError(f"query on {query.device}, cache on {layer.device}")
    total = layer.get_seq_length()
    if mask is not None and (mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] < total):
        raise ValueError(f"mask must be [B, >= {total}], got {tuple(mask.shape)}")
    G = Hq // Hkv
    BLOCK_D = max(16, triton.next_power_of_2(D))
    S, chunk = plan_splits(layer.n_quant, B * Hkv, _num_sms(query.device), block_n, num_splits)
    ws = get_workspace(query.device)
    mid_o = ws.get("decode_mid_o", (B, Hq, S + 1, BLOCK_D), torch.float32)
    mid_l = ws.get("decode_mid_lse", (B, Hq, S + 1), torch.float32)
    out = torch.empty(B, 1, Hq, D, dtype=query.dtype, device=query.device)
    kq, vq = layer.key_quantizer, layer.value_quantizer
    rot_k, cent_k, _ = kq.tensors(query.device)
    rot_v, cent_v, _ = vq.tensors(query.device)
    # Before the first flush there are no code planes; any fp32/uint8 tensor stands in (never read).
    kc = layer.k_codes if layer.k_codes is not None else torch.empty(1, 1, 1, 1, dtype=torch.uint8,
                                                                    device=query.device)
    kn = layer.k_norms if layer.k_norms is not None else rot_k.view(1, 1, -1)
    vc = layer.v_codes if layer.v_codes is not None else kc
    vn = layer.v_norms if layer.v_norms is not None else kn
    kmean = layer.k_mean if layer.k_mean is not None else rot_k
    kw = layer.k_win if layer.k_win is not None else query.new_empty(1, 1, 1, 1)
    vw = layer.v_win if layer.v_win is not None else kw
    mask_u8 = mask.view(torch.uint8) if mask is not None else kc.view(-1)[:1].view(1, 1)
    if precision is None:
        precision = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "fp16"}[query.dtype]
    if precision not in ("ieee", "tf32x3", "tf32", "fp16"):
        raise ValueError(f"precision={precision!r}; choose 'ieee', 'tf32x3', 'tf32' or 'fp16'")
    if block_n < 32 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 32, got {block_n}")
    BLOCK_G = max(16, triton.next_power_of_2(G))
    if maxnreg is None and BLOCK_D <= 128 and num_warps == 8:
        maxnreg = 128
    with on_device(query.device):
        _decode_stage1_kernel[(B * Hkv, S + 1)](
            query, kc, kn, vc, vn, kmean, rot_k, cent_k, cent_v, kw, vw, mask_u8, mid_o, mid_l,
            Hkv, layer.n_quant, layer.n_window, chunk, scaling if scaling is not None else D**-0.5,
            softcap or 0.0,
            query.stride(0), query.stride(1), query.stride(3),
            *kc.stride()[:3], *kn.stride()[:3],
            *vc.stride()[:3], *vn.stride()[:3],
            *kw.stride(),
            *mask_u8.stride(),
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_l.stride(0), mid_l.stride(1),
            G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, BLOCK_N=block_n, BLOCK_K=min(BLOCK_D, 64),
            KBITS=kq.bits, VBITS=vq.bits, HAS_MASK=mask is not None, HAS_SOFTCAP=bool(softcap),
            DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        )
        _decode_stage2_kernel[(B * Hkv,)](
            mid_o, mid_l, rot_v, out,
            Hkv, S,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_l.stride(0), mid_l.stride(1),
            out.stride(0), out.stride(2),
            G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, BLOCK_C=min(BLOCK_D, 64),
            BLOCK_S=triton.next_power_of_2(S + 1), DOT_PRECISION=precision, num_warps=4,
        )
    return out
