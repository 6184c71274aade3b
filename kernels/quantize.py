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
    # sizes
    H,
    T,
    offset,  # first position written
    # strides
    sxb, sxh, sxt, sxd,
    scb, sch, sct,
    snb, snh, snt,
    # meta-parameters
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D (tl.arange needs one)
    BLOCK_T: tl.constexpr,  # >= 16: tl.dot's smallest tile
    BLOCK_K: tl.constexpr,  # rotation K-chunk: a [BLOCK_K, BLOCK_D] fp32 tile fits in shared memory
    BITS: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    NORM_CORRECTION: tl.constexpr,
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
    # memory whole); ieee: indices must match the fp32 reference away from ties.
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
        y += tl.dot(xk, rot_t, input_precision="ieee")
    # Zero vectors: any code works, the zero norm dequantizes to exactly zero.
    y = y / tl.maximum(norm, 1.1754943508222875e-38)[:, None]
    # Binary search over the sorted boundaries: code = #(boundaries < y), as torch.bucketize.
    code = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    for lvl in tl.static_range(BITS):
        cand = code + (1 << (BITS - 1 - lvl))
        code = tl.where(y > tl.load(Bnd + cand - 1), cand, code)
    code = tl.where(dmask[None, :], code, 0)
    if NORM_CORRECTION:
        c = tl.where(dmask[None, :], tl.load(Cent + code), 0.0)
        norm = norm / tl.sqrt(tl.sum(c * c, axis=1))
    norm = norm * ((e + 127) << 23).to(tl.float32, bitcast=True)  # * 2**e
    pos = offset + t
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


def on_device(device: torch.device):
    """Context that makes `device` current for a launch: Triton launches on the current CUDA device,
    and with `device_map` a layer's tensors may live on another GPU than the current one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_planes(codes, norms, quantizer):
    if codes.dtype != torch.uint8 or codes.dim() != 4 or codes.stride(-1) != 1:
        raise ValueError("codes must be a uint8 [B, H, C, row_bytes] tensor with contiguous rows")
    if not isinstance(quantizer, TurboQuantizer) or quantizer.mode != "mse":
        raise ValueError("the Triton codec kernels read plain TurboQuant_mse codes, not "
                         f"{type(quantizer).__name__}(mode={getattr(quantizer, 'mode', None)!r})")
    if codes.shape[-1] != quantizer.row_bytes:
        raise ValueError(f"codes rows are {codes.shape[-1]} bytes, expected {quantizer.row_bytes}")
    if norms.dtype != torch.float32 or norms.shape != codes.shape[:3]:
        raise ValueError("norms must be fp32 [B, H, C] matching codes")


def quantize_pack(x, quantizer, codes, norms, offset, mean=None, block_t=16):
    """Quantize `x` `[B, H, T, D]` with `quantizer` (minus `mean` `[H, D]` if given) and write
    codes/norms at positions [offset, offset + T) of `codes` `[B, H, C, D*bits/8]` / `norms` `[B, H, C]`."""
    _check_planes(codes, norms, quantizer)
    B, H, T, D = x.shape
    if D != quantizer.dim or codes.shape[:2] != (B, H) or offset + T > codes.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} does not fit codes {tuple(codes.shape)} at offset {offset}")
    if T == 0:
        return
    rot, cent, bnd = quantizer.tensors(x.device)
    grid = (B * H, -(-T // block_t))
    with on_device(x.device):
        _quantize_pack_kernel[grid](
            x, mean if mean is not None else rot, rot, bnd, cent, codes, norms,
            H, T, offset,
            *x.stride(), *codes.stride()[:3], *norms.stride(),
            D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=block_t, BITS=quantizer.bits,
            BLOCK_K=min(64, max(16, triton.next_power_of_2(D))),
            HAS_MEAN=mean is not None, NORM_CORRECTION=quantizer.norm_correction,
        )


def dequantize(codes, norms, quantizer, start, out, mean=None, block_t=32):
    """Dequantize positions [start, start + T) of `codes`/`norms` into `out` `[B, H, T, D]`
    (model dtype, any strides), adding `mean` `[H, D]` if given."""
    _check_planes(codes, norms, quantizer)
    B, H, T, D = out.shape
    if D != quantizer.dim or codes.shape[:2] != (B, H) or start + T > codes.shape[2]:
        raise ValueError(f"out {tuple(out.shape)} does not fit codes {tuple(codes.shape)} at start {start}")
    if T == 0:
        return out
    rot, cent, _ = quantizer.tensors(codes.device)
    grid = (B * H, -(-T // block_t))
    with on_device(codes.device):
        _dequantize_kernel[grid](
            codes, norms, mean if mean is not None else rot, rot, cent, out,
            H, T, start,
            *codes.stride()[:3], *norms.stride(), *out.stride(),
            D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=block_t, BITS=quantizer.bits,
            BLOCK_K=min(64, max(16, triton.next_power_of_2(D))),
            HAS_MEAN=mean is not None, IEEE=out.dtype == torch.float32,
        )
    return out
