"""Split-KV decode attention straight from the packed TurboQuant cache.

Stage 1: one program per (batch, kv head, split) serves all G query heads of that kv head, so each
code byte is read from memory once. Splits 0..S-1 cover the quantized positions: the query is
rotated once into the code space, scores are q_rot . (norm * c[idx]) (+ q . mean for centred
keys), values are accumulated in the rotated space. Split S is the exact full-precision window,
in the original space. Each split writes its normalised partial output and log-sum-exp.
The centroids c[idx] are read as `_code_table` chooses: for bf16 models (fp16 dot operands) 3- and 4-bit
code rows are looked up in registers by byte permutes (inline PTX, so compiled code only), other
cases gather them from a small table in L1.
Tiles are computed transposed, s^T = K q^T and acc^T = V^T p^T: the centroid tiles are the first
operand of the dot. With the gathers that was 1.3-1.5x faster on an H200 than the [G, N] orientation
(`kernels/PERF_NOTES.md`); Triton still stages the tiles through shared memory to reach the wgmma
operand layout.
Merge (`_merge_splits`): the splits of a (batch, kv head) are merged by their log-sum-exps, the quantized
part is un-rotated once (o = o_rot @ Pi_v + o_window) and the model dtype is written in the `[B, 1, Hq, D]`
layout the model consumes, so no copy or cast kernel follows. Small problems merge in the same launch
(MERGE): the last program of a (batch, kv head) to finish (a counter per (batch, kv head), incremented
atomically, reset by that program) merges, which saves a second launch (~60 us of host time on an H200
machine: decode steps of small problems are bound by it). Large ones run a merge kernel after stage 1: there the device
time counts, and the stage-1 kernel with the merge inside ran 4-8 % slower on an H200 (`kernels/PERF_NOTES.md`).

Split codes (the 2.5bit / 3.5bit presets, SPLIT): a row holds an outlier set and a normal set of
D/2 channels each, in the head's own channel order (KPerm / VPerm, outliers first), each with its
own rotation (Pi is block-diagonal), codebook and norm. The query is permuted and rotated per set,
scores add both sets' products, values accumulate per set, and the merge writes each output column
back to its channel.

QJL keys (TurboQuant_prod, QJL): the codes hold key_bits - 1 bits, and each quantized key's score gets
||r|| sqrt(pi/2) / D * <S q, sign(S r)>, the unbiased estimate of <q, r> for the residual r the codes
miss: S q is computed once per program like the rotated query, the signs are 1-bit code rows.
"""

import os

import torch
import triton
import triton.language as tl

from tq_hf.workspace import get_workspace

from .codes import load_code_rows, load_group_words, load_pair_indices
from .quantize import next_pow2, on_device

_NEG_INF = float("-inf")


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """fp32-accumulated a @ b. "fp16" rounds the operands to fp16 (the fastest tensor-core path);
    otherwise fp32 operands with tl.dot's input_precision ("ieee", "tf32x3" or "tf32")."""
    if PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


# How stage 1 reads the centroids of a code set (`_code_table`; its KLOOKUP, VLOOKUP, ... constexprs):
# one gather per code, one gather per two codes from a pair table, or no memory access (in registers).
GATHER, PAIRS, REGISTERS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# PTX looking up the eight codes of a group (`load_group_words`: code j in bits 4j..4j+bits-1) in a fp16 table
# of eight entries held in four registers (`_register_table`): $8 the group, $9-$10 the low bytes of entries
# 0-3 and 4-7, $11-$12 their high bytes; $0-$7 the fp16 centroids of codes 0-7. prmt picks 4 bytes out of 8 by
# 3-bit selectors, the nibbles of the low 16 bits of its last operand: one prmt gives four codes' low bytes,
# one their high bytes, and two more interleave low and high bytes into fp16 pairs; codes 0-3 first, then
# (shifted down) 4-7. At 3 bits the selectors are the codes. At 4 bits the codebook is antisymmetric
# (c[15 - i] = -c[i], `tq_hf.codec.codebook`), so the table holds the magnitudes c[8..15]: code c >= 8 is
# entry c - 8, code c < 8 is entry 7 - c with the sign bit set in its high byte. That halves the table
# (four registers, not eight) and the byte picks (two prmt per four codes, not six).
def _interleave(first: int) -> str:
    """PTX: the low bytes `lo` and high bytes `hi` of four centroids into fp16 outputs $first..$first+3."""
    return f"""prmt.b32 p, lo, hi, 0x5140;
prmt.b32 q, lo, hi, 0x7362;
mov.b32 {{${first}, ${first + 1}}}, p;
mov.b32 {{${first + 2}, ${first + 3}}}, q;
"""


def _signed(selector: str) -> str:
    """PTX: set the sign bit of the high bytes `hi` of four codes whose top bit is clear. Byte j of `x` carries
    code 2j's negative flag in its top bit, byte j of `n` code 2j + 1's; `selector` picks codes 0-3 or 4-7."""
    return f"""prmt.b32 g, x, n, {selector};
and.b32 g, g, 0x80808080;
xor.b32 hi, hi, g;
"""


_LOOK = """prmt.b32 lo, $9, $10, s;
prmt.b32 hi, $11, $12, s;
"""
# 4 bits. n: bit 3 of nibble i set if code i < 8 (negative); s: each code's magnitude entry, c & 7 for
# c >= 8 and 7 - c = (c & 7) ^ 7 for c < 8 (n - (n >> 3) puts 7 in the nibbles of negative codes).
_LOOKUP4_PTX = tl.constexpr("""{
.reg .b32 n, s, x, g, lo, hi, p, q;
and.b32 n, $8, 0x88888888;
xor.b32 n, n, 0x88888888;
shr.b32 s, n, 3;
sub.u32 s, n, s;
and.b32 x, $8, 0x77777777;
xor.b32 s, s, x;
shl.b32 x, n, 4;
""" + _LOOK + _signed("0x5140") + _interleave(0) + """shr.b32 s, s, 16;
""" + _LOOK + _signed("0x7362") + _interleave(4) + "}")
# 3 bits (codes in nibbles, as `load_group_words` gives them). s: each code's 3 bits.
_LOOKUP3_PTX = tl.constexpr("""{
.reg .b32 s, lo, hi, p, q;
and.b32 s, $8, 0x77777777;
""" + _LOOK + _interleave(0) + """shr.b32 s, s, 16;
""" + _LOOK + _interleave(4) + "}")


@triton.jit
def _register_rows(base, row_off, row_mask, Table, D: tl.constexpr, BITS: tl.constexpr):
    """fp16 centroids `[BLOCK_N, D]` of whole rows of 3- or 4-bit codes, looked up in registers
    (`_LOOKUP4_PTX`, `_LOOKUP3_PTX`); Table: the int32 words of `_register_table`."""
    word = load_group_words(base, row_off, row_mask, D, BITS)
    t0, t1, t2, t3 = tl.load(Table), tl.load(Table + 1), tl.load(Table + 2), tl.load(Table + 3)
    c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
        _LOOKUP4_PTX if BITS == 4 else _LOOKUP3_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [word, t0, t1, t2, t3],
        dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    # join appends an axis: [BLOCK_N, D/8, 2, 2, 2] holds code 8g + 4i + 2j + k at [:, g, i, j, k]
    x = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    return tl.reshape(x, (row_off.shape[0], D))


@triton.jit
def _centroid_rows(base, row_off, row_mask, Table, D: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
                   LOOKUP: tl.constexpr):
    """The centroids of whole code rows, `[BLOCK_N, BLOCK_D]`, read as `_code_table` chose: REGISTERS looks 3- or
    4-bit codes up in registers (Table: `_register_table`'s words), PAIRS gathers two codes' centroids at once
    from the pair table (indexed by `load_pair_indices`), GATHER each code's from the centroids themselves."""
    if LOOKUP == REGISTERS:
        return _register_rows(base, row_off, row_mask, Table, D, BITS)
    elif LOOKUP == PAIRS:
        pair = load_pair_indices(base, row_off, row_mask, D, BITS)
        vals = tl.load(Table + pair[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])
        return tl.reshape(vals, (row_off.shape[0], D))
    else:
        return tl.load(Table + load_code_rows(base, row_off, row_mask, D, BLOCK_D, BITS))


@triton.jit
def _softmax_update(s, m, l):
    """Fold transposed scores `s` [BLOCK_N, BLOCK_G] (masked = -inf) into the running max `m` and
    denominator `l` [BLOCK_G]. Returns (m, l, alpha, p): accumulators are rescaled by alpha [BLOCK_G]
    and take p [BLOCK_N, BLOCK_G]."""
    m_new = tl.maximum(m, tl.max(s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[None, :])
    return m_new, l * alpha + tl.sum(p, axis=0), alpha, p


@triton.jit
def _finish_scores(s, keep, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
    return tl.where(keep[:, None], s, float("-inf"))


@triton.jit
def _rotated_query(q_row, gmask, Perm, Rot, sqd, scale, OFF: tl.constexpr, N: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                   HAS_PERM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The query rotated into an N-dim code space, [BLOCK_G, BLOCK]: (scale * q[:, c_k]) @ R.T with
    R = Rot[OFF:OFF+N, OFF:OFF+N] and c_k = Perm[OFF + k] (HAS_PERM) or OFF + k. `q_row`: [BLOCK_G, 1]
    pointers to the query rows. K-chunked so the Rot tile fits in shared memory at D = 256."""
    o = tl.arange(0, BLOCK)
    omask = o < N
    acc = tl.zeros([BLOCK_G, BLOCK], tl.float32)
    for k0 in tl.static_range(0, BLOCK, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < N
        if HAS_PERM:
            ch = tl.load(Perm + OFF + kk, mask=kmask, other=0)
        else:
            ch = OFF + kk
        qk = tl.load(q_row + ch[None, :] * sqd, mask=gmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        rot_t = tl.load(Rot + (OFF + o[None, :]) * D + OFF + kk[:, None], mask=kmask[:, None] & omask[None, :],
                        other=0.0)
        acc += _dot(qk * scale, rot_t, DOT_PRECISION)
    return acc


@triton.jit
def _store_partial(mid_row, col0: tl.constexpr, acc_t, l, gmask):
    """Normalised partial output acc / l into columns [col0, col0 + W) of the split's rows, from the
    transposed accumulator `acc_t` [W, BLOCK_G] (transposed back before the store: storing it as it is
    compiled to more barriers in the tile loop, 68 against 52 per tile)."""
    acc = tl.trans(acc_t)
    c = col0 + tl.arange(0, acc.shape[1])
    tl.store(mid_row + c[None, :], acc / tl.where(l > 0, l, 1.0)[:, None], mask=gmask[:, None])


@triton.jit
def _decode_stage1_kernel(
    # pointers
    Q,  # [B, Hq, 1, D] model dtype
    Kc, Kn,  # [B, Hkv, C, row bytes] uint8, [B, Hkv, C] fp32 ([B, Hkv, C, 2] for split codes)
    Vc, Vn,  # likewise for values
    Kmean,  # [Hkv, D] fp32
    RotK,  # [D, D] fp32
    TabK, TabV,  # centroid tables (`_code_table`) of the key / value codes (of the outlier set if SPLIT)
    TabK2, TabV2,  # split codes: those of the normal set (read if SPLIT)
    KPerm,  # [Hkv, D] int64: channel order of the split key codes, outliers first (read if SPLIT)
    Kq, Kr,  # key_qjl: [B, Hkv, C, D/8] uint8 sign sketch of the residual, [B, Hkv, C] fp32 its norm (read if QJL)
    Sqjl,  # key_qjl: the QJL matrix S [D, D] fp32 (read if QJL)
    Kw, Vw,  # [B, Hkv, R, D] model dtype: the exact window
    Mask,  # [B, kv] uint8, 1 = attend (read if HAS_MASK)
    MidO,  # [B, Hq, S + 1, BLOCK_D] fp32: each split's normalised partial output
    MidL,  # [B, Hq, S + 1] fp32: its log-sum-exp
    Count,  # [B * Hkv] int32: programs of each (batch, kv head) done; 0 between calls
    RotV,  # [D, D] fp32 (block-diagonal for split codes)
    VPerm,  # [Hkv, D] int64: channel order of split value codes (read if SPLIT)
    Sinks,  # [Hq] attention-sink logits, any float dtype (read if HAS_SINKS)
    Out,  # [B, 1, Hq, D] model dtype
    # sizes
    Hkv, n_quant, n_window, chunk, scale, softcap,
    # strides
    sqb, sqh, sqd,
    skcb, skch, skct, sknb, sknh, sknt,
    skqb, skqh, skqt, skrb, skrh, skrt,
    svcb, svch, svct, svnb, svnh, svnt,
    swb, swh, swt, swd,
    smb, smk,
    sob, soh, sos,
    slb, slh,
    sub, suh,
    # meta-parameters
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= 16: tl.dot's smallest tile
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # tokens per tile of the full-precision window
    BLOCK_K: tl.constexpr,  # rotation K-chunk
    KBITS: tl.constexpr,  # split codes: of the outlier set
    VBITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # ieee for fp32 models; tf32x3 otherwise (plain tf32 is coarser than fp16)
    SPLIT: tl.constexpr,  # split codes (outlier channels): two sets of D/2 channels, two norms per vector
    KBITS2: tl.constexpr,  # split codes: bits of the normal set, which starts at byte KSPLIT of a row
    VBITS2: tl.constexpr,
    KSPLIT: tl.constexpr,
    VSPLIT: tl.constexpr,
    KLOOKUP: tl.constexpr,  # how TabK is read (`_code_table`'s lookup); likewise the others
    VLOOKUP: tl.constexpr,
    KLOOKUP2: tl.constexpr,
    VLOOKUP2: tl.constexpr,
    QJL: tl.constexpr,  # TurboQuant_prod keys: add the QJL estimate of <q, residual> to the scores
    BLOCK_C: tl.constexpr,  # merge: output columns per un-rotation step (bounds the RotV tile)
    HAS_SINKS: tl.constexpr,
    MERGE: tl.constexpr,  # the last program of each (batch, kv head) merges its splits
):
    # (batch, head) bases are 64-bit scalars; per-element offsets inside a plane stay int32.
    pid_bh = tl.program_id(0).to(tl.int64)
    split_id = tl.program_id(1)  # 0..num_splits-1: a chunk of the quantized positions; num_splits: the window
    num_splits = tl.num_programs(1) - 1
    b, h = pid_bh // Hkv, pid_bh % Hkv
    kc_base, kn_base = Kc + b * skcb + h * skch, Kn + b * sknb + h * sknh
    vc_base, vn_base = Vc + b * svcb + h * svch, Vn + b * svnb + h * svnh
    kw_base, vw_base = Kw + b * swb + h * swh, Vw + b * swb + h * swh
    mask_base = Mask + b * smb
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask, dmask = g < G, d < D
    q_row = Q + b * sqb + (h * G + g[:, None]) * sqh
    q = tl.load(q_row + d[None, :] * sqd, mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    mid_row = MidO + b * sob + (h * G + g[:, None]) * soh + split_id * sos
    if split_id < num_splits:
        # Keys were centred before quantizing: q.k = q.mean + q_rot.(norm * c[idx]).
        q_mean = tl.sum(q * tl.load(Kmean + h * D + d, mask=dmask, other=0.0)[None, :], axis=1)
        start = split_id * chunk
        end = tl.minimum(start + chunk, n_quant)
        if SPLIT:
            # Two channel sets of D/2 (outliers first, in KPerm's order), each in its own rotated space
            # with its own norm: q.k = q.mean + n_a * qa.c_a[idx_a] + n_b * qb.c_b[idx_b].
            HALF: tl.constexpr = D // 2
            BLOCK_KH: tl.constexpr = min(HALF, 64)
            qa = _rotated_query(q_row, gmask, KPerm + h * D, RotK, sqd, scale, 0, HALF, BLOCK_G, HALF, BLOCK_KH, D,
                                True, DOT_PRECISION)
            qb = _rotated_query(q_row, gmask, KPerm + h * D, RotK, sqd, scale, HALF, HALF, BLOCK_G, HALF, BLOCK_KH, D,
                                True, DOT_PRECISION)
            qa, qb = tl.trans(qa), tl.trans(qb)
            acc_a = tl.zeros([HALF, BLOCK_G], tl.float32)
            acc_b = tl.zeros([HALF, BLOCK_G], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                n = n0 + n_off
                nmask = n < end
                ka = _centroid_rows(kc_base, n * skct, nmask, TabK, HALF, HALF, KBITS, KLOOKUP)
                kb = _centroid_rows(kc_base + KSPLIT, n * skct, nmask, TabK2, HALF, HALF, KBITS2, KLOOKUP2)
                s = _dot(ka, qa, DOT_PRECISION) * tl.load(kn_base + n * sknt, mask=nmask, other=0.0)[:, None]
                s += _dot(kb, qb, DOT_PRECISION) * tl.load(kn_base + n * sknt + 1, mask=nmask, other=0.0)[:, None]
                keep = nmask
                if HAS_MASK:
                    keep &= tl.load(mask_base + n * smk, mask=nmask, other=0) != 0
                s = _finish_scores(s + q_mean[None, :], keep, softcap, HAS_SOFTCAP)
                m, l, alpha, p = _softmax_update(s, m, l)
                va = _centroid_rows(vc_base, n * svct, nmask, TabV, HALF, HALF, VBITS, VLOOKUP)
                vb = _centroid_rows(vc_base + VSPLIT, n * svct, nmask, TabV2, HALF, HALF, VBITS2, VLOOKUP2)
                vna = tl.load(vn_base + n * svnt, mask=nmask, other=0.0)
                vnb = tl.load(vn_base + n * svnt + 1, mask=nmask, other=0.0)
                acc_a = acc_a * alpha[None, :] + _dot(tl.trans(va), p * vna[:, None], DOT_PRECISION)
                acc_b = acc_b * alpha[None, :] + _dot(tl.trans(vb), p * vnb[:, None], DOT_PRECISION)
            _store_partial(mid_row, 0, acc_a, l, gmask)
            _store_partial(mid_row, HALF, acc_b, l, gmask)
        else:
            q_rot = _rotated_query(q_row, gmask, KPerm, RotK, sqd, scale, 0, D, BLOCK_G, BLOCK_D, BLOCK_K, D, False,
                                   DOT_PRECISION)
            if QJL:
                # ||r|| sqrt(pi/2) / D * <S q, sign(S r)>: the unbiased estimate of <q, r>, r = k - k_mse
                q_sk = _rotated_query(q_row, gmask, KPerm, Sqjl, sqd, scale, 0, D, BLOCK_G, BLOCK_D, BLOCK_K, D,
                                      False, DOT_PRECISION)
                q_sk = tl.trans(q_sk)
                kq_base, kr_base = Kq + b * skqb + h * skqh, Kr + b * skrb + h * skrh
            q_rot = tl.trans(q_rot)
            acc = tl.zeros([BLOCK_D, BLOCK_G], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                n = n0 + n_off
                nmask = n < end
                kc = _centroid_rows(kc_base, n * skct, nmask, TabK, D, BLOCK_D, KBITS, KLOOKUP)
                if D != BLOCK_D:
                    kc = tl.where(dmask[None, :], kc, 0.0)
                s = _dot(kc, q_rot, DOT_PRECISION)
                kn = tl.load(kn_base + n * sknt, mask=nmask, other=0.0)
                s = s * kn[:, None] + q_mean[None, :]
                if QJL:
                    sign = load_code_rows(kq_base, n * skqt, nmask, D, BLOCK_D, 1).to(tl.float32) * 2.0 - 1.0
                    if D != BLOCK_D:
                        sign = tl.where(dmask[None, :], sign, 0.0)
                    rn = tl.load(kr_base + n * skrt, mask=nmask, other=0.0) * (1.2533141373155003 / D)  # sqrt(pi/2)/D
                    s += _dot(sign, q_sk, DOT_PRECISION) * rn[:, None]
                keep = nmask
                if HAS_MASK:
                    keep &= tl.load(mask_base + n * smk, mask=nmask, other=0) != 0
                s = _finish_scores(s, keep, softcap, HAS_SOFTCAP)
                m, l, alpha, p = _softmax_update(s, m, l)
                v = _centroid_rows(vc_base, n * svct, nmask, TabV, D, BLOCK_D, VBITS, VLOOKUP)
                if D != BLOCK_D:
                    v = tl.where(dmask[None, :], v, 0.0)
                vn = tl.load(vn_base + n * svnt, mask=nmask, other=0.0)
                # the value norms scale the probabilities ([N, G]) rather than the value tile ([N, D])
                acc = acc * alpha[None, :] + _dot(tl.trans(v), p * vn[:, None], DOT_PRECISION)
            _store_partial(mid_row, 0, acc, l, gmask)
    else:
        # 32-token tiles: the window is short, and full-precision tiles of BLOCK_N = 128 tokens would
        # raise the whole kernel's register count (246 instead of 184 at D = 128, 4 warps, Triton 3.6)
        q_t = tl.trans(q)
        acc = tl.zeros([BLOCK_D, BLOCK_G], tl.float32)
        for n0 in range(0, n_window, BLOCK_W):
            n = n0 + tl.arange(0, BLOCK_W)
            nmask = n < n_window
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(kw_base + n[:, None] * swt + d[None, :] * swd, mask=kv_mask, other=0.0)
            keep = nmask
            if HAS_MASK:
                keep &= tl.load(mask_base + (n_quant + n) * smk, mask=nmask, other=0) != 0
            s = _finish_scores(_dot(k.to(tl.float32), q_t, DOT_PRECISION), keep, softcap, HAS_SOFTCAP)
            m, l, alpha, p = _softmax_update(s, m, l)
            v = tl.load(vw_base + n[:, None] * swt + d[None, :] * swd, mask=kv_mask, other=0.0)
            acc = acc * alpha[None, :] + _dot(tl.trans(v.to(tl.float32)), p, DOT_PRECISION)
        _store_partial(mid_row, 0, acc, l, gmask)
    # Empty or fully masked split: lse = -inf, output 0, so it weighs nothing in the merge.
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    tl.store(MidL + b * slb + (h * G + g) * slh + split_id, lse, mask=gmask)
    if MERGE:
        # The last of the num_splits + 1 programs of (b, h) to get here merges them. The barrier orders every
        # thread's stores above before the (one-thread, gpu-scope acq_rel) increment that publishes them;
        # the program that reads num_splits sees all the others' partials, and resets the counter.
        tl.debug_barrier()
        if tl.atomic_add(Count + pid_bh, 1, sem="acq_rel") == num_splits:
            tl.atomic_xchg(Count + pid_bh, 0, sem="relaxed")
            _merge_splits(MidO, MidL, RotV, VPerm, Sinks, Out, b, h, num_splits, sob, soh, sos, slb, slh, sub, suh,
                          G, BLOCK_G, D, BLOCK_D, BLOCK_C, DOT_PRECISION, SPLIT, HAS_SINKS)


@triton.jit
def _decode_merge_kernel(MidO, MidL, RotV, VPerm, Sinks, Out, Hkv, num_splits, sob, soh, sos, slb, slh, sub, suh,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
                         HAS_SINKS: tl.constexpr):
    """The merge of stage 1's splits as its own launch: one program per (batch, kv head)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    _merge_splits(MidO, MidL, RotV, VPerm, Sinks, Out, pid_bh // Hkv, pid_bh % Hkv, num_splits, sob, soh, sos, slb,
                  slh, sub, suh, G, BLOCK_G, D, BLOCK_D, BLOCK_C, DOT_PRECISION, SPLIT, HAS_SINKS)


@triton.jit
def _merge_splits(MidO, MidL, RotV, VPerm, Sinks, Out, b, h, num_splits, sob, soh, sos, slb, slh, sub, suh,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Merge the `num_splits` quantized partials (rotated space) and the window's (split `num_splits`, model
    space) of kv head `h` of batch row `b` by their log-sum-exps, un-rotate the quantized part (o_rot @ RotV;
    SPLIT: column c goes to channel VPerm[h, c]) and store `[G, D]` rows of Out `[B, 1, Hq, D]`. Partials
    written by other programs are loaded with .cg (from L2, never a stale L1 line).
    Short B x Hkv grids have ~70 splits per head: the max runs over [G, 64] tiles of log-sum-exps, and the
    partials are read 4 splits per step, so their loads overlap (one split per step waits out an L2 round
    trip each)."""
    g = tl.arange(0, BLOCK_G)
    hq = h * G + g
    gmask = g < G
    lse_row = MidL + b * slb + hq * slh
    o_rows = MidO + b * sob + hq[:, None] * soh
    # elementwise in the loop, reduced after it (a reduction inside the loop trips an assertion in Triton
    # 3.6's OptimizeThreadLocality pass when the JIT specializes the strides)
    m_tile = tl.full([BLOCK_G, 64], float("-inf"), tl.float32)
    for s0 in range(0, num_splits + 1, 64):
        s = s0 + tl.arange(0, 64)
        m_tile = tl.maximum(m_tile, tl.load(lse_row[:, None] + s[None, :], mask=gmask[:, None] & (s <= num_splits)[None, :],
                                            other=float("-inf"), cache_modifier=".cg"))
    m = tl.max(m_tile, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    d = tl.arange(0, BLOCK_D)
    den = tl.zeros([BLOCK_G], tl.float32)
    o_rot = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, 4):
        for u in tl.static_range(4):
            ok = gmask & (g * 0 + s0 + u < num_splits)  # a [BLOCK_G] mask (the interpreter refuses a scalar one)
            w = tl.exp(tl.load(lse_row + s0 + u, mask=ok, other=float("-inf"), cache_modifier=".cg") - m)
            den += w
            o_rot += w[:, None] * tl.load(o_rows + (s0 + u) * sos + d[None, :], mask=ok[:, None], other=0.0,
                                          cache_modifier=".cg")
    w_win = tl.exp(tl.load(lse_row + num_splits, mask=gmask, other=float("-inf"), cache_modifier=".cg") - m)
    den += w_win
    if HAS_SINKS:
        # A sink is one more logit in the softmax's denominator, with no value: it only scales the output.
        den += tl.exp(tl.load(Sinks + hq, mask=gmask, other=float("-inf")).to(tl.float32) - m)
    den = tl.where(den > 0, den, 1.0)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < D
        rot = tl.load(RotV + d[:, None] * D + c[None, :], mask=(d[:, None] < D) & cmask[None, :], other=0.0)
        o = _dot(o_rot, rot, DOT_PRECISION)
        if SPLIT:
            c = tl.load(VPerm + h * D + c, mask=cmask, other=0)  # the model's channel of column c
        o += w_win[:, None] * tl.load(o_rows + num_splits * sos + c[None, :], mask=gmask[:, None] & cmask[None, :],
                                      other=0.0, cache_modifier=".cg")
        o = o / den[:, None]
        tl.store(Out + b * sub + hq[:, None] * suh + c[None, :], o.to(Out.dtype.element_ty),
                 mask=gmask[:, None] & cmask[None, :])


def _word_rows(bits: int, d: int) -> bool:
    """Whether rows of `d` codes of `bits` bits are read as whole 32-bit words (`load_group_words`,
    `load_pair_indices`): 2-4 bits, a power-of-two `d` >= 32, so rows are a multiple of 4 bytes."""
    return 2 <= bits <= 4 and d >= 32 and d & (d - 1) == 0


def _runs_ptx(device: torch.device) -> bool:
    """Whether kernels on `device` run as compiled PTX, as inline PTX needs: NVIDIA GPUs, outside the
    interpreter (TRITON_INTERPRET=1) and ROCm. tests/_compile_sm90.py patches it to compile without a GPU."""
    return device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


def _register_lookup(bits: int, d: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether rows of `d` codes of `bits` bits are looked up in registers (`_register_rows`): 3- and 4-bit
    word rows, fp16 dot operands (bf16 models), compiled PTX."""
    return bits in (3, 4) and _word_rows(bits, d) and dtype == torch.float16 and _runs_ptx(device)


def _register_table(cent: torch.Tensor) -> torch.Tensor:
    """The fp16 table of the 8 or 16 centroids `cent` as `_register_rows` reads it, int32 `[4]`: the low bytes
    of entries 0-3 and 4-7 (entry 4w in the lowest byte of word w), then their high bytes. The entries are the
    3-bit centroids, or the magnitudes of the 4-bit ones, c[8..15] (the lookup negates c[i] = -c[15 - i])."""
    if cent.numel() == 16:
        if not torch.equal(cent[:8], -cent.flip(0)[:8]):
            raise ValueError("the 4-bit register lookup needs an antisymmetric codebook (c[15 - i] = -c[i])")
        cent = cent[8:]
    byte = cent.to(torch.float16).view(torch.uint8).view(-1, 2)  # little-endian: low byte first
    return byte.t().contiguous().view(torch.int32).view(-1)


_TABLES: dict = {}


def _code_table(cent: torch.Tensor, bits: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(table, lookup): how stage 1 reads the centroids `cent` [2**bits] (fp32) of `d`-code rows
    (`_centroid_rows`).
    - REGISTERS, where `_register_lookup`: `_register_table(cent)`, looked up in registers, no memory access
      per code: on an H200 1.5x faster than the pair table at 4 bits, 1.03x at 3 bits (`kernels/PERF_NOTES.md`).
    - PAIRS, other word rows: the pair table T[P] = (cent[c0], cent[c1]) for the pair index P = c0 | c1 << s
      of `load_pair_indices` (s = 4 at 3 and 4 bits, 2 at 2 bits), `[2**(s + bits), 2]` in `dtype`; one gather
      fetches two codes' centroids (1.1x at 4 bits and 1.5x at 3 bits faster than GATHER on an H200).
    - GATHER: `cent` itself, one gather per code.
    Built once per (d, bits, device, dtype): `cent` is the codebook of d-dimensional vectors at `bits`
    (`tq_hf.codec.codebook`), a function of (d, bits) alone, so every layer shares one table."""
    if not _word_rows(bits, d):
        return cent, GATHER.value
    lookup = REGISTERS.value if _register_lookup(bits, d, dtype, cent.device) else PAIRS.value
    key = (d, bits, cent.device, dtype, lookup)
    if key not in _TABLES:
        if lookup == REGISTERS.value:
            _TABLES[key] = _register_table(cent)
        else:
            step, m = (4 if bits > 2 else 2), (1 << bits) - 1
            p = torch.arange(1 << (step + bits), device=cent.device)
            _TABLES[key] = torch.stack([cent[p & m], cent[(p >> step) & m]], -1).to(dtype).contiguous()
    return _TABLES[key], lookup


# Quantized positions (B x Hkv x tokens) from which decode_attention merges in a second launch. A launch costs
# ~60 us of host time on an H200 machine; stage 1 with the merge inside runs 4-8 % longer on the device (same
# run, bit-identical outputs). Which matters depends on which side bounds a model's decode step: an 8B-shaped
# 32-layer step in transformers took ~26 ms of host time at every size up to 8 x 8 x 32K = 2**21 positions per
# layer (attention ~0.25 ms on the device there), so below 2**22 the host is the bound and one launch less
# saves time; from 2**22 (8 x 8 x 64K: ~0.5 ms per layer, 15 ms and more per step) the device time counts.
ONE_LAUNCH_POSITIONS = 1 << 22


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
    # Plain integer ceil-divisions: triton.cdiv is a @jit function, ~1.5 us per call from Python.
    tiles = -(-n_quant // block_n)
    if num_splits is None:
        num_splits = (4 * num_sms) // programs_per_split
    num_splits = max(1, min(num_splits, tiles))
    chunk = -(-tiles // num_splits) * block_n
    return -(-n_quant // chunk), chunk


def _launch_shape(klook: int, vlook: int, kbits: int, vbits: int, split: bool, qjl: bool,
                  block_d: int) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages): stage 1's default launch, the best measured on an H200
    (`kernels/PERF_NOTES.md`), from how the key / value codes are read (`_code_table`'s lookups), their bits,
    split codes, QJL keys and BLOCK_D.
    - Register lookups at D = 128: 256-token tiles, 4 warps; two stages where keys and values are both looked
      up in registers (4bit, 3bit, k4v3), one for split codes and QJL keys.
    - D = 64 with 4 bits: 128-token tiles, two stages.
    - Otherwise 128 tokens, 4 warps, one stage, except 64 tokens and 8 warps for pair tables and gathers at
      D = 256. More stages made every other path slower (up to 2.7x)."""
    registers = REGISTERS.value in (klook, vlook)
    both = klook == vlook == REGISTERS.value and not split and not qjl
    lut4 = both and kbits == vbits == 4 and block_d <= 128
    wide = block_d == 128 and registers
    small = block_d <= 128 or registers
    block_n = 256 if wide else 128 if small else 64
    num_warps = 4 if small else 8
    num_stages = 2 if lut4 or (wide and both) else 1
    return block_n, num_warps, num_stages


def decode_attention(query, layer, mask=None, scaling=None, softcap=None, num_splits=None,
                     block_n=None, num_warps=None, num_stages=None, precision=None, maxnreg=None, sinks=None,
                     one_launch=None):
    """Decode attention of one query token over every position cached in `layer`.

    Args:
        query: `[B, Hq, 1, D]` (fp16/bf16/fp32). layer: a `TurboQuantLayer` on this device.
        mask: bool `[B, kv]` (True = attend) over the layer's `get_seq_length()` positions, or None.
        scaling: softmax scale (default D**-0.5). softcap: optional tanh soft-capping of scores.
        sinks: optional attention-sink logits `[Hq]` (GPT-OSS's `s_aux`, any float dtype): one extra
            logit per query head in the softmax's denominator, attending to nothing.
        num_splits: force the number of quantized splits (default: from SM count and length).
        precision: dot precision, "ieee" | "tf32x3" | "tf32" | "fp16". Default: "ieee" for fp32,
            "tf32x3" for fp16 (plain tf32 is as coarse as fp16 itself) and "fp16" operands with fp32
            accumulation for bf16 (finer than bf16; 2.4x faster than tf32x3 on an H200; values must
            stay within fp16's range, |v| < 65504, as they do in practice).
        block_n: tokens per tile, a power of two >= 32 (16-token tiles gave wrong results on an H200
            with Triton 3.6). num_warps, num_stages, maxnreg: stage 1's launch options. The defaults
            depend on how the codes are read (`_code_table`, `_launch_shape`) and are the best measured on an H200
            (`kernels/PERF_NOTES.md`). maxnreg caps the registers per thread: by default 128 when the
            caller asks for 8 warps at D <= 128 without register lookups (two 8-warp programs then
            share an SM); the default launches are uncapped.
        one_launch: merge the splits inside stage 1 (True) or in a second kernel (False). Default: one launch
            below `ONE_LAUNCH_POSITIONS` quantized positions (B x Hkv x tokens), where the host's launch
            cost exceeds the device time it saves, except while a CUDA graph is captured (replays have no
            host cost per launch).
    Scratch (split partials, merge counters) comes from the device's shared workspace: calls on one device
    must not run concurrently on several streams.
    Returns:
        `[B, 1, Hq, D]` in query's dtype.
    """
    if not layer.is_initialized or layer.get_seq_length() == 0:
        raise ValueError("decode_attention needs a layer holding at least one token")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be fp16, bf16 or fp32, got {query.dtype}")
    B, Hq, L, D = query.shape
    Hkv = layer.num_heads
    if L != 1:
        raise ValueError(f"decode_attention takes one query token, got {L}")
    if (B, D) != (layer.batch_size, layer.head_dim) or Hq % Hkv:
        raise ValueError(f"query {tuple(query.shape)} does not match the cache (B={layer.batch_size}, "
                         f"Hkv={Hkv}, D={layer.head_dim})")
    if query.device != layer.device:
        raise ValueError(f"query on {query.device}, cache on {layer.device}")
    total = layer.get_seq_length()
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != B
                             or mask.shape[1] < total or mask.device != query.device):
        raise ValueError(f"mask must be bool [B, >= {total}] on {query.device} (True = attend), got {mask.dtype} "
                         f"{tuple(mask.shape)} on {mask.device}")
    if sinks is not None and (sinks.shape != (Hq,) or sinks.device != query.device or not sinks.is_floating_point()
                              or not sinks.is_contiguous()):
        raise ValueError(f"sinks must be a contiguous float tensor [{Hq}] on {query.device}, got "
                         f"{sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")
    G = Hq // Hkv
    BLOCK_D = max(16, next_pow2(D))
    # Split codes (outlier channels, half the channels each): two code spaces of D/2.
    split = bool(layer.config.outlier_fraction)
    if split and not (layer.key_quantizer.kernel_readable and layer.value_quantizer.kernel_readable):
        raise ValueError(f"split codes are read by the kernel for half/half splits of a power-of-two head dim >= 64; "
                         f"this layer has D={D} with {layer.key_quantizer.n_outlier} outlier channels: use "
                         "tq_hf.attention.reference_attention")
    split = split and layer.n_quant > 0
    if precision is None:
        precision = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "fp16"}[query.dtype]
    if precision not in ("ieee", "tf32x3", "tf32", "fp16"):
        raise ValueError(f"precision={precision!r}; choose 'ieee', 'tf32x3', 'tf32' or 'fp16'")
    kq, vq = layer.key_quantizer, layer.value_quantizer
    rot_k, cent_k, cent_k2 = kq.kernel_tensors(query.device)
    rot_v, cent_v, cent_v2 = vq.kernel_tensors(query.device)
    (kbits, kbits2, ksplit), (vbits, vbits2, vsplit) = kq.code_layout, vq.code_layout
    # With fp16 dot operands the tables hold fp16: the values tl.dot would round the centroids to.
    table_dtype = torch.float16 if precision == "fp16" else torch.float32
    width = D // 2 if split else D  # codes per row of one set

    def table(cent, bits, read):
        # a code set the kernel never reads (only the window yet; no second set) takes no table, so no
        # launch variant is compiled for one
        return _code_table(cent, bits, width, table_dtype) if read else (cent, GATHER.value)

    (tab_k, klook), (tab_v, vlook) = table(cent_k, kbits, layer.n_quant), table(cent_v, vbits, layer.n_quant)
    (tab_k2, klook2), (tab_v2, vlook2) = table(cent_k2, kbits2, split), table(cent_v2, vbits2, split)
    shape = _launch_shape(klook, vlook, kbits, vbits, split, layer.config.key_qjl, BLOCK_D)
    block_n, num_warps, num_stages = (x if x is not None else d for x, d in zip((block_n, num_warps, num_stages), shape))
    registers = REGISTERS.value in (klook, vlook)
    if block_n < 32 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 32, got {block_n}")
    S, chunk = plan_splits(layer.n_quant, B * Hkv, _num_sms(query.device), block_n, num_splits)
    ws = get_workspace(query.device)
    mid_o = ws.get("decode_mid_o", (B, Hq, S + 1, BLOCK_D), torch.float32)
    mid_l = ws.get("decode_mid_lse", (B, Hq, S + 1), torch.float32)
    if one_launch is None:
        # A CUDA graph being captured replays without host cost per launch: there only the device time counts.
        capturing = False
        if query.device.type == "cuda":
            with on_device(query.device):  # capture is a property of the query device's current stream
                capturing = torch.cuda.is_current_stream_capturing()
        one_launch = not capturing and B * Hkv * layer.n_quant < ONE_LAUNCH_POSITIONS
    # one launch: the merging programs count in here (zeroed once, each counter reset by its merging program)
    count = ws.get("decode_count", (B * Hkv,), torch.int32, zeroed=True) if one_launch else mid_l
    out = torch.empty(B, 1, Hq, D, dtype=query.dtype, device=query.device)
    # Before the first flush there are no code planes, and without a window no window planes: a tensor
    # already at hand of the right dtype and rank stands in (never read: no quantized split runs / the
    # window is empty), so the workspace holds scratch only.
    kc = layer.k_codes if layer.k_codes is not None else mid_o.view(torch.uint8)
    kn = layer.k_norms if layer.k_norms is not None else rot_k.view(1, 1, -1)
    vc = layer.v_codes if layer.v_codes is not None else kc
    vn = layer.v_norms if layer.v_norms is not None else kn
    k_perm = layer.k_perm if split else kc
    v_perm = layer.v_perm if split else k_perm
    kmean = layer.k_mean if layer.k_mean is not None else rot_k
    qjl = layer.config.key_qjl and layer.n_quant > 0
    k_sketch, k_rnorm = (layer.k_qjl, layer.k_rnorm) if qjl else (kc, kn)
    s_qjl = kq.qjl_tensor(query.device) if qjl else rot_k
    kw = layer.k_win if layer.k_win is not None else query
    vw = layer.v_win if layer.v_win is not None else kw
    # (strides fixed for a layer: a stand-in whose strides vary with S would compile more stage-1 variants)
    mask_u8 = mask.view(torch.uint8) if mask is not None else rot_k.view(torch.uint8)
    BLOCK_G = max(16, next_pow2(G))
    BLOCK_C = min(BLOCK_D, 64)  # merge: output columns per un-rotation step
    sinks_arg = sinks if sinks is not None else mid_l  # any fp pointer stands in (read if HAS_SINKS)
    if maxnreg is None and BLOCK_D <= 128 and num_warps == 8 and not registers:
        maxnreg = 128
    with on_device(query.device):
        _decode_stage1_kernel[(B * Hkv, S + 1)](
            query, kc, kn, vc, vn, kmean, rot_k, tab_k, tab_v, tab_k2, tab_v2, k_perm, k_sketch, k_rnorm, s_qjl,
            kw, vw, mask_u8,
            mid_o, mid_l, count, rot_v, v_perm, sinks_arg if one_launch else mid_l, out,
            Hkv, layer.n_quant, layer.n_window, chunk, scaling if scaling is not None else D**-0.5,
            softcap or 0.0,
            query.stride(0), query.stride(1), query.stride(3),
            *kc.stride()[:3], *kn.stride()[:3],
            *k_sketch.stride()[:3], *k_rnorm.stride()[:3],
            *vc.stride()[:3], *vn.stride()[:3],
            *kw.stride(),
            *mask_u8.stride(),
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_l.stride(0), mid_l.stride(1),
            out.stride(0), out.stride(2),
            G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, BLOCK_N=block_n, BLOCK_W=32, BLOCK_K=min(BLOCK_D, 64),
            KBITS=kbits, VBITS=vbits, HAS_MASK=mask is not None, HAS_SOFTCAP=bool(softcap),
            DOT_PRECISION=precision, SPLIT=split, KBITS2=kbits2, VBITS2=vbits2, KSPLIT=ksplit, VSPLIT=vsplit,
            KLOOKUP=klook, VLOOKUP=vlook, KLOOKUP2=klook2, VLOOKUP2=vlook2, QJL=qjl,
            BLOCK_C=BLOCK_C, HAS_SINKS=sinks is not None and one_launch, MERGE=one_launch,
            num_warps=num_warps, num_stages=num_stages,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        )
        if not one_launch:
            _decode_merge_kernel[(B * Hkv,)](
                mid_o, mid_l, rot_v, v_perm, sinks_arg, out, Hkv, S,
                mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
                out.stride(0), out.stride(2),
                G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, BLOCK_C=BLOCK_C, DOT_PRECISION=precision,
                SPLIT=split, HAS_SINKS=sinks is not None, num_warps=4,
            )
    return out
