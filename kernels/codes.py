"""Triton helpers shared by the kernels: reading and writing the packed code bit stream.

A row of D codes of BITS bits is a little-endian bit stream of D*BITS/8 bytes: code i occupies
bits [i*BITS, i*BITS + BITS). Writing packs eight consecutive codes (exactly BITS bytes) into one
integer and stores its bytes.
"""

import triton
import triton.language as tl


@triton.jit
def load_codes(
    base,  # scalar pointer (uint8) to the (batch, head) code plane
    row_off,  # [BLOCK_N] int32 byte offsets of the rows in that plane
    row_mask,  # [BLOCK_N] bool
    d,  # [BLOCK_K] code (coordinate) indices to read
    D: tl.constexpr,
    BITS: tl.constexpr,
):
    """Codes `[BLOCK_N, BLOCK_K]` int32 of columns `d` (0 beyond D or outside row_mask).

    Plain 2-D gathers: a tile's addresses are consecutive bytes of consecutive rows, so the loads
    coalesce and each byte comes from DRAM once (re-reads of a byte hit L1). Offsets stay int32:
    a tile of 64-bit pointers would not fit in registers."""
    bit = d * BITS
    byte = bit >> 3
    mask = row_mask[:, None] & (d[None, :] < D)
    off = row_off[:, None] + byte[None, :]
    val = tl.load(base + off, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:
        # widths that do not divide 8 (3, 5, 6, 7) let a code straddle two bytes
        ROW_BYTES: tl.constexpr = D * BITS // 8
        hi = tl.load(base + off + 1, mask=mask & (byte[None, :] + 1 < ROW_BYTES), other=0).to(tl.int32)
        val = val | (hi << 8)
    return (val >> (bit & 7)[None, :]) & ((1 << BITS) - 1)


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


@triton.jit
def load_code_rows(
    base,  # scalar pointer (uint8) to the (batch, head) code plane
    row_off,  # [BLOCK_N] int32 byte offsets of the rows in that plane
    row_mask,  # [BLOCK_N] bool
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
):
    """Whole rows of codes `[BLOCK_N, BLOCK_D]` int32.

    At a power-of-two D, rows are read whole instead of by per-code gathers: 8-bit rows as
    contiguous bytes (16-byte vector loads), and for BITS <= 4 each group of 8 codes (BITS bytes)
    at once, split with shifts (`load_code_groups`). Other D use `load_codes`' gathers."""
    if (BITS == 8) and (D == BLOCK_D):
        j = tl.arange(0, D)
        codes = tl.load(base + row_off[:, None] + j[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
    elif (BITS <= 4) and (D == BLOCK_D):
        codes = load_code_groups(base, row_off, row_mask, D, BITS)
    else:
        codes = load_codes(base, row_off, row_mask, tl.arange(0, BLOCK_D), D, BITS)
    return codes


@triton.jit
def load_code_groups(base, row_off, row_mask, D: tl.constexpr, BITS: tl.constexpr):
    """Whole rows of codes `[BLOCK_N, D]` int32 for BITS <= 4 (D a multiple of 8): code 8g + j is
    bits [j*BITS, (j+1)*BITS) of the little-endian word made of bytes [g*BITS, (g+1)*BITS).
    4-bit groups are one aligned 32-bit load (rows are D/2 bytes, a multiple of 4); other widths
    take BITS byte loads per group."""
    NG: tl.constexpr = D // 8
    grp = tl.arange(0, NG)
    ptr = base + row_off[:, None] + grp[None, :] * BITS
    if BITS == 4:
        word = tl.load(ptr.to(tl.pointer_type(tl.int32)), mask=row_mask[:, None], other=0)
    else:
        word = tl.zeros([row_off.shape[0], NG], tl.int32)
        for m in tl.static_range(BITS):
            word |= tl.load(ptr + m, mask=row_mask[:, None], other=0).to(tl.int32) << (8 * m)
    j = tl.arange(0, 8)
    # logical shift: a 4-bit group's top code sits in the sign bit of the int32 word
    codes = (word[:, :, None].to(tl.uint32, bitcast=True) >> (BITS * j)[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes.to(tl.int32, bitcast=True), (row_off.shape[0], D))


@triton.jit
def load_group_words(base, row_off, row_mask, D: tl.constexpr, BITS: tl.constexpr):
    """The codes of whole rows as groups of eight, `[BLOCK_N, D // 8]` uint32, BITS in {3, 4}, D a power of
    two >= 32: code 8g + j of a row is bits [j*BITS, (j+1)*BITS) of its entry g (bits from 8*BITS up are
    undefined at 3 bits). Read as aligned 32-bit words only: `base`, the row offsets (bytes) and the rows
    (D*BITS/8 bytes) are multiples of 4 bytes, as the decode launcher's `_word_rows` guarantees. 4 bits:
    one word per group; 3 bits: the 24-bit group g = 4s + t starts at byte 3t % 4 of word 3s + 3t // 4
    and, for t = 1, 2, ends in the next word: two loads and a funnel shift. (Three byte loads per group,
    as `load_code_groups` does, cost ~60 % more instructions per tile with the pair table.)"""
    grp = tl.arange(0, D // 8)
    # int32 pointer arithmetic, so the compiler sees rows of consecutive words (vector loads)
    words = base.to(tl.pointer_type(tl.int32)) + (row_off >> 2)[:, None]
    if BITS == 3:
        t = grp % 4
        wi = (grp // 4) * 3 + (3 * t) // 4
        sh = ((3 * t) % 4) * 8
        lo = tl.load(words + wi[None, :], mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(words + wi[None, :] + 1, mask=row_mask[:, None] & ((t == 1) | (t == 2))[None, :], other=0)
        word = (lo >> sh[None, :]) | (hi.to(tl.uint32, bitcast=True) << ((32 - sh) & 31)[None, :])
    else:
        word = tl.load(words + grp[None, :], mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)
    return word


@triton.jit
def load_pair_indices(base, row_off, row_mask, D: tl.constexpr, BITS: tl.constexpr):
    """Pair indices `[BLOCK_N, D // 2]` int32 of whole rows, BITS in {2, 3, 4}, D a power of two >= 32:
    entry j is c_{2j} | c_{2j+1} << BITS, the 2*BITS-bit field at bit 2j*BITS of the row. 2 bits: a
    32-bit word holds 16 codes, 8 pairs; 3 and 4 bits: `load_group_words`, 4 pairs per group."""
    BLOCK_N: tl.constexpr = row_off.shape[0]
    MASK: tl.constexpr = (1 << (2 * BITS)) - 1
    if BITS == 2:
        w = tl.arange(0, D // 16)
        ptr = (base + row_off[:, None] + w[None, :] * 4).to(tl.pointer_type(tl.int32))
        word = tl.load(ptr, mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        k = tl.arange(0, 8)
        pair = (word[:, :, None] >> (4 * k)[None, None, :]) & MASK
    else:
        # logical shifts: a 4-bit group's top pair sits in the sign byte of the word
        word = load_group_words(base, row_off, row_mask, D, BITS)
        j = tl.arange(0, 4)
        pair = (word[:, :, None] >> (2 * BITS * j)[None, None, :]) & MASK
    return tl.reshape(pair.to(tl.int32, bitcast=True), (BLOCK_N, D // 2))
