"""Quantize + pack on update, and block-wise dequantize, in one kernel each."""

import contextlib

import torch
import triton
import triton.language as tl

from tq_hf.codec import TurboQuantizer

from .codes import load_codes, store_codes


@triton.jit
def _quantize_pack_kernel(
    # pointers
    X,  # [B, H, T, D] model dtype, any strides
    Mean,  # [H, D] fp32 (read if HAS_MEAN)
    Rot,  # [D, D] fp32, rotated = x @ Rot.T
    Bnd,  # [2**BITS - 1] fp32 sorted decision boundaries
    Cent,  # [2**BITS] fp32 centroids
    Codes,  # [B, H, C, D*BITS/8] uint8, contiguous rows
    Norms,  # [B, H, C] fp32
    Mqjl,  # QJL: Rot @ S.T [D, D] fp32
    Sketch,  # QJL: [B, H, C, D/8] uint8, the residual's sign sketch
    Rnorm,  # QJL: [B, H, C] fp32, the residual's norm
    # sizes
    H,
    T,
    offset,  # first position written
    # strides
    sxb, sxh, sxt, sxd,
    scb, sch, sct,
    snb, snh, snt,
    ssb, ssh, sst,
    srb, srh, srt,
    # meta-parameters
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D (tl.arange needs one)
    BLOCK_T: tl.constexpr,  # >= 16: tl.dot's smallest tile
    BLOCK_K: tl.constexpr,  # rotation K-chunk: a [BLOCK_K, BLOCK_D] fp32 tile fits in shared memory
    BLOCK_J: tl.constexpr,  # QJL: sketch columns per chunk, a [BLOCK_D, BLOCK_J] fp32 tile of Rot @ S.T
    BITS: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    NORM_CORRECTION: tl.constexpr,
    QJL: tl.constexpr,  # TurboQuant_prod: also the residual's sign sketch and norm (BITS are the mse bits)
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask, dmask = t < T, d < D
    xrow = X + b * sxb + h * sxh + t * sxt
    x = tl.load(xrow[:, None] + d[None, :] * sxd, mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if HAS_MEAN:
        x -= tl.load(Mean + h * D + d, mask=dmask, other=0.0)[None, :]
    # Scale each vector by 2**-e (e = frexp exponent of max|x|, clamped to +-125), as the PyTorch path
    # does: exact, so ordinary vectors keep their bits, while norms of |x| > 1e19 or < 1e-19 stay finite.
    amax = tl.max(tl.abs(x), axis=1)
    e = tl.minimum(tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 126, -125), 125)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e
    x = x * inv[:, None]
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    # y = (x / norm) @ Rot.T, K-chunked so the Rot tile stays small (D = 256 would not fit in shared
    # memory whole). Indices must match the fp32 reference away from ties: tf32x3 (three tf32 MMAs)
    # errs by at most ~2**-21 (5e-7) per coordinate of the normalized y, inside the tests' 1e-6 tie
    # margin, and is 1.7-2.3x faster than "ieee" (FMA) on an H200 (64 tokens of 32 x 8 heads, K or V:
    # 102 -> 45 us). The QJL residual below is taken against this y too.
    y = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for k0 in tl.static_range(0, BLOCK_D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D
        xk = tl.load(xrow[:, None] + kk[None, :] * sxd, mask=tmask[:, None] & kmask[None, :], other=0.0)
        xk = xk.to(tl.float32)
        if HAS_MEAN:
            xk -= tl.load(Mean + h * D + kk, mask=kmask, other=0.0)[None, :]
        xk = xk * inv[:, None]
        rot_t = tl.load(Rot + d[None, :] * D + kk[:, None], mask=kmask[:, None] & dmask[None, :], other=0.0)
        y += tl.dot(xk, rot_t, input_precision="tf32x3")
    y_raw = y  # x @ Rot.T (scaled): the residual below is taken against it
    # Zero vectors: any code works, the zero norm dequantizes to exactly zero.
    y = y / tl.maximum(norm, 1.1754943508222875e-38)[:, None]
    # Binary search over the sorted boundaries: code = #(boundaries < y), as torch.bucketize.
    code = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    for lvl in tl.static_range(BITS):
        cand = code + (1 << (BITS - 1 - lvl))
        code = tl.where(y > tl.load(Bnd + cand - 1), cand, code)
    code = tl.where(dmask[None, :], code, 0)
    if NORM_CORRECTION or QJL:
        c = tl.where(dmask[None, :], tl.load(Cent + code), 0.0)
    if NORM_CORRECTION:
        norm = norm / tl.sqrt(tl.sum(c * c, axis=1))
    pos = offset + t
    if QJL:
        # r = x - x_mse is r_rot @ Rot with r_rot = x @ Rot.T - norm * c[idx] (the stored norm): its sketch
        # sign(r @ S.T) = sign(r_rot @ (Rot @ S.T)); sign(0) counts as +1, as in the PyTorch codec.
        r = y_raw - norm[:, None] * c
        sk_row = Sketch + b * ssb + h * ssh + pos * sst
        for j0 in tl.static_range(0, BLOCK_D, BLOCK_J):  # sketch columns a chunk at a time: small M tiles
            if j0 < D:
                jj = j0 + tl.arange(0, BLOCK_J)
                m = tl.load(Mqjl + d[:, None] * D + jj[None, :], mask=dmask[:, None] & (jj < D)[None, :], other=0.0)
                sk = tl.dot(r, m, input_precision="ieee")
                store_codes(sk_row + j0 // 8, tmask, (sk >= 0).to(tl.int32), min(BLOCK_J, D - j0), BLOCK_J, 1)
        rn = tl.sqrt(tl.sum(r * r, axis=1)) * ((e + 127) << 23).to(tl.float32, bitcast=True)
        tl.store(Rnorm + b * srb + h * srh + pos * srt, rn, mask=tmask)
    norm = norm * ((e + 127) << 23).to(tl.float32, bitcast=True)  # * 2**e
    store_codes(Codes + b * scb + h * sch + pos * sct, tmask, code, D, BLOCK_D, BITS)
    tl.store(Norms + b * snb + h * snh + pos * snt, norm, mask=tmask)


@triton.jit
def _dequantize_kernel(
    # pointers
    Codes,  # [B, H, C, D*BITS/8] uint8
    Norms,  # [B, H, C] fp32
    Mean,  # [H, D] fp32 (read if HAS_MEAN)
    Rot,  # [D, D] fp32
    Cent,  # [2**BITS] fp32
    Out,  # [B, H, T, D] model dtype, any strides
    # sizes
    H,
    T,
    start,  # first position read
    # strides
    scb, sch, sct,
    snb, snh, snt,
    sob, soh, sot, sod,
    # meta-parameters
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 outputs need an exact un-rotation; tf32 is below bf16 rounding
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask, dmask = t < T, d < D
    pos = start + t
    n = tl.load(Norms + b * snb + h * snh + pos * snt, mask=tmask, other=0.0)
    # x = (n * c[idx]) @ Rot, K-chunked over the code columns
    x = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for k0 in tl.static_range(0, BLOCK_D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D
        xr = tl.where(kmask[None, :], tl.load(Cent + load_codes(Codes + b * scb + h * sch, (pos * sct).to(tl.int32), tmask, kk, D, BITS)), 0.0) * n[:, None]
        rot = tl.load(Rot + kk[:, None] * D + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            x += tl.dot(xr, rot, input_precision="ieee")
        else:
            x += tl.dot(xr, rot)
    if HAS_MEAN:
        x += tl.load(Mean + h * D + d, mask=dmask, other=0.0)[None, :]
    tl.store(Out + b * sob + h * soh + t[:, None] * sot + d[None, :] * sod, x.to(Out.dtype.element_ty),
             mask=tmask[:, None] & dmask[None, :])


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for block sizes. Plain Python: `triton.next_power_of_2`
    is a constexpr function whose wrapper cost ~3 us per call on a 2-core CPU. Replacing its three calls
    in `decode_attention` (and a tensor the workspace allocated per lookup to size a dtype) cut that
    launcher's own Python from 27 to 21 us per call there (launches stubbed out)."""
    return 1 << (n - 1).bit_length()


def on_device(device: torch.device):
    """Context that makes `device` current for a launch: Triton launches on the current CUDA device,
    and with `device_map` a layer's tensors may live on another GPU than the current one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_planes(codes, norms, quantizer):
    if codes.dtype != torch.uint8 or codes.dim() != 4 or codes.stride(-1) != 1:
        raise ValueError("codes must be a uint8 [B, H, C, row_bytes] tensor with contiguous rows")
    if not isinstance(quantizer, TurboQuantizer) or quantizer.mode not in ("mse", "prod"):
        raise ValueError("the Triton codec kernel takes a TurboQuantizer in mode 'mse' or 'prod', not "
                         f"{type(quantizer).__name__}(mode={getattr(quantizer, 'mode', None)!r})")
    if codes.shape[-1] != quantizer.row_bytes:
        raise ValueError(f"codes rows are {codes.shape[-1]} bytes, expected {quantizer.row_bytes}")
    if norms.dtype != torch.float32 or norms.shape != codes.shape[:3]:
        raise ValueError("norms must be fp32 [B, H, C] matching codes")


def _check_mean(mean, H, D, device):
    """The kernels read `mean` as contiguous fp32 `[H, D]`; anything else is refused or converted."""
    if mean is None:
        return None
    if mean.shape != (H, D) or not mean.is_floating_point() or mean.device != device:
        raise ValueError(f"mean must be a float tensor [{H}, {D}] on {device}, got {mean.dtype} "
                         f"{tuple(mean.shape)} on {mean.device}")
    return mean.float().contiguous()  # no copy for the cache's own (contiguous fp32) means


def quantize_pack(x, quantizer, codes, norms, offset, mean=None, qjl=None, block_t=16):
    """Quantize `x` `[B, H, T, D]` with `quantizer` (minus `mean` `[H, D]` if given) and write
    codes/norms at positions [offset, offset + T) of `codes` `[B, H, C, D*mse_bits/8]` / `norms`
    `[B, H, C]`. A "prod" quantizer (TurboQuant_prod) also writes the residual's QJL sketch and
    norm into `qjl` = (sketch `[B, H, C, D/8]` uint8, residual norms `[B, H, C]` fp32)."""
    _check_planes(codes, norms, quantizer)
    B, H, T, D = x.shape
    if D != quantizer.dim or codes.shape[:2] != (B, H) or not 0 <= offset <= codes.shape[2] - T:
        raise ValueError(f"x {tuple(x.shape)} does not fit codes {tuple(codes.shape)} at offset {offset}")
    mean = _check_mean(mean, H, D, x.device)
    prod = quantizer.mode == "prod"
    if prod != (qjl is not None):
        raise ValueError("qjl planes are written for, and only for, a quantizer in 'prod' mode")
    if prod:
        sketch, rnorm = qjl
        if D > 1024:  # sketch chunks of 8192 / D columns must hold whole bytes
            raise ValueError(f"the quantize kernel writes QJL sketches for head_dim <= 1024, got {D}")
        if (sketch.dtype != torch.uint8 or sketch.shape != (*codes.shape[:3], D // 8) or sketch.stride(-1) != 1
                or rnorm.dtype != torch.float32 or rnorm.shape != codes.shape[:3]):
            raise ValueError("qjl must be (uint8 [B, H, C, D/8] with contiguous rows, fp32 [B, H, C]) matching codes")
    if T == 0:
        return
    rot, cent, bnd = quantizer.tensors(x.device)
    m, sketch, rnorm = (quantizer.qjl_rotated(x.device), *qjl) if prod else (rot, codes, norms)
    block_d = max(16, next_pow2(D))
    grid = (B * H, -(-T // block_t))
    with on_device(x.device):
        _quantize_pack_kernel[grid](
            x, mean if mean is not None else rot, rot, bnd, cent, codes, norms, m, sketch, rnorm,
            H, T, offset,
            *x.stride(), *codes.stride()[:3], *norms.stride(), *sketch.stride()[:3], *rnorm.stride(),
            D=D, BLOCK_D=block_d, BLOCK_T=block_t, BITS=quantizer.mse_bits, BLOCK_K=min(64, block_d),
            # the [BLOCK_D, BLOCK_J] chunk of Rot @ S.T stays at 8K fp32 values (32 per thread at 8 warps)
            BLOCK_J=min(64, 8192 // block_d),
            HAS_MEAN=mean is not None, NORM_CORRECTION=quantizer.norm_correction, QJL=prod,
            # QJL holds the residual and sketch tiles too: with 4 warps ptxas (sm_90, Triton 3.6) spills
            # 5.6 KB per thread at D = 128, with 8 warps 0.5 KB.
            num_warps=8 if prod else 4,
        )


def dequantize(codes, norms, quantizer, start, out, mean=None, block_t=32):
    """Dequantize positions [start, start + T) of `codes`/`norms` into `out` `[B, H, T, D]`
    (model dtype, any strides), adding `mean` `[H, D]` if given. For a "prod" quantizer this is the
    mse reconstruction alone, as `TurboQuantizer.dequantize`: the QJL term is never added back."""
    _check_planes(codes, norms, quantizer)
    B, H, T, D = out.shape
    if D != quantizer.dim or codes.shape[:2] != (B, H) or not 0 <= start <= codes.shape[2] - T:
        raise ValueError(f"out {tuple(out.shape)} does not fit codes {tuple(codes.shape)} at start {start}")
    mean = _check_mean(mean, H, D, out.device)
    if T == 0:
        return out
    rot, cent, _ = quantizer.tensors(codes.device)
    block_d = max(16, next_pow2(D))
    grid = (B * H, -(-T // block_t))
    with on_device(codes.device):
        _dequantize_kernel[grid](
            codes, norms, mean if mean is not None else rot, rot, cent, out,
            H, T, start,
            *codes.stride()[:3], *norms.stride(), *out.stride(),
            D=D, BLOCK_D=block_d, BLOCK_T=block_t, BITS=quantizer.mse_bits, BLOCK_K=min(64, block_d),
            HAS_MEAN=mean is not None, IEEE=out.dtype == torch.float32,
        )
    return out
