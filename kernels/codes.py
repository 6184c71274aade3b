"""Triton helpers shared by the kernels: reading and writing the packed code bit stream.

A row of D codes of BITS bits is a little-endian bit stream of D*BITS/8 bytes. Eight consecutive
codes form a group of exactly BITS bytes (group g = bytes [g*BITS, g*BITS + BITS)), so every
bit width is handled the same way: gather the BITS bytes of each group into one integer and
shift the eight codes out of it. Each byte is loaded once.
"""

import triton
import triton.language as tl


@triton.jit
def load_codes(
    row_ptr,  # [BLOCK_N] pointers to the first byte of each row (uint8)
    row_mask,  # [BLOCK_N] bool
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
):
    """Codes `[BLOCK_N, BLOCK_D]` int32 of the rows (0 beyond D or outside row_mask)."""
    NG: tl.constexpr = BLOCK_D // 8
    g = tl.arange(0, NG)
    gmask = row_mask[:, None] & (g[None, :] < D // 8)
    ptr = row_ptr[:, None] + g[None, :] * BITS
    word = tl.zeros([row_ptr.shape[0], NG], dtype=tl.int64)
    for m in tl.static_range(BITS):
        byte = tl.load(ptr + m, mask=gmask, other=0)
        word |= byte.to(tl.int64) << (8 * m)
    shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
    codes = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes.to(tl.int32), (row_ptr.shape[0], BLOCK_D))


@triton.jit
def store_codes(
    row_ptr,  # [BLOCK_N] pointers to the first byte of each row (uint8)
    row_mask,  # [BLOCK_N] bool
    codes,  # [BLOCK_N, BLOCK_D] int32, < 2**BITS
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_D // 8
    grouped = tl.reshape(codes.to(tl.int64), (row_ptr.shape[0], NG, 8))
    shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
    word = tl.sum(grouped << shifts[None, None, :], axis=2)
    g = tl.arange(0, NG)
    gmask = row_mask[:, None] & (g[None, :] < D // 8)
    ptr = row_ptr[:, None] + g[None, :] * BITS
    for m in tl.static_range(BITS):
        tl.store(ptr + m, ((word >> (8 * m)) & 255).to(tl.uint8), mask=gmask)
