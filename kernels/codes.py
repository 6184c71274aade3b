"""Triton helpers shared by the kernels: reading and writing packed code rows.

A row of D codes of BITS bits is a little-endian bit stream of D*BITS/8 bytes: code i occupies
bits [i*BITS, i*BITS + BITS). At 3 bits the first 32 * (D // 32) codes are stored in units of 32
codes (three 32-bit words, `tq_hf.codec.pack_codes`): code 8w + j of a unit (w < 3) is bits [4j, 4j + 3)
of word w, bit k of code 24 + j is bit 4j + 3 of word k; the rest follow as a plain stream.
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
    bit = d * BITS  # where the code (its bit 0) starts in the row
    UNITS: tl.constexpr = D // 32 if BITS == 3 else 0  # 3-bit units of 32 codes
    if UNITS > 0:
        r = d % 32
        in_unit = d < 32 * UNITS
        bit = tl.where(in_unit, (d // 32) * 96 + tl.where(r < 24, 32 * (r // 8) + 4 * (r % 8), 4 * (r - 24) + 3), bit)
    byte = bit >> 3
    mask = row_mask[:, None] & (d[None, :] < D)
    off = row_off[:, None] + byte[None, :]
    val = tl.load(base + off, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:
        # widths that do not divide 8 (3, 5, 6, 7) let a code straddle two bytes
        ROW_BYTES: tl.constexpr = D * BITS // 8
        hi = tl.load(base + off + 1, mask=mask & (byte[None, :] + 1 < ROW_BYTES), other=0).to(tl.int32)
        val = val | (hi << 8)
    code = (val >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
    if UNITS > 0:
        # codes 24..31 of a unit: bit k is in word k of the unit, 4k bytes after bit 0's byte
        spread = (in_unit & (r >= 24))[None, :]
        sh = (bit & 7)[None, :]
        b1 = tl.load(base + off + 4, mask=mask & spread, other=0).to(tl.int32)
        b2 = tl.load(base + off + 8, mask=mask & spread, other=0).to(tl.int32)
        code = tl.where(spread, ((val >> sh) & 1) | (((b1 >> sh) & 1) << 1) | (((b2 >> sh) & 1) << 2), code)
    return code


@triton.jit
def store_codes(
    row_ptr,  # [BLOCK_N] pointers to the first byte of each row (uint8)
    row_mask,  # [BLOCK_N] bool
    codes,  # [BLOCK_N, BLOCK_D] int32, < 2**BITS
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
):
    """Write codes `[BLOCK_N, BLOCK_D]` (columns from D on ignored) as the module docstring lays them out."""
    BLOCK_N: tl.constexpr = row_ptr.shape[0]
    NG: tl.constexpr = BLOCK_D // 8
    # groups of eight codes (BITS bytes) of the plain stream; at 3 bits only those after the units
    FIRST: tl.constexpr = 4 * (D // 32) if BITS == 3 else 0
    if FIRST < D // 8:
        grouped = tl.reshape(codes.to(tl.int64), (BLOCK_N, NG, 8))
        shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
        word = tl.sum(grouped << shifts[None, None, :], axis=2)
        g = tl.arange(0, NG)
        gmask = row_mask[:, None] & (g[None, :] >= FIRST) & (g[None, :] < D // 8)
        ptr = row_ptr[:, None] + g[None, :] * BITS
        for m in tl.static_range(BITS):
            tl.store(ptr + m, ((word >> (8 * m)) & 255).to(tl.uint8), mask=gmask)
    if FIRST > 0:
        # 3-bit units: word w < 3 holds codes 8w..8w+7 in its nibbles, bit k of code 24 + j in bit 3 of
        # nibble j of word k
        NU: tl.constexpr = BLOCK_D // 32
        unit = tl.reshape(codes.to(tl.int64), (BLOCK_N, NU, 4, 8))
        w = tl.arange(0, 4)[None, None, :, None]
        last = tl.sum(tl.where(w == 3, unit, 0), axis=2)  # [BLOCK_N, NU, 8]: codes 24..31
        nib = unit | (((last[:, :, None, :] >> w) & 1) << 3)
        word = tl.sum(nib << (4 * tl.arange(0, 8)).to(tl.int64)[None, None, None, :], axis=3)  # [BLOCK_N, NU, 4]
        u = tl.arange(0, NU)[None, :, None]
        wi = tl.arange(0, 4)[None, None, :]
        umask = row_mask[:, None, None] & (u < D // 32) & (wi < 3)
        ptr = row_ptr[:, None, None] + u * 12 + wi * 4
        for m in tl.static_range(4):
            tl.store(ptr + m, ((word >> (8 * m)) & 255).to(tl.uint8), mask=umask)


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
    """Whole rows of codes `[BLOCK_N, D]` int32 for BITS <= 4 (D a multiple of 8). 4 bits, and 3 bits at
    D >= 32 (D a power of two, so whole 3-bit units): the groups of `load_group_words`, code 8g + j in bits
    [4j, 4j + BITS) of word g. Otherwise code 8g + j is bits [j*BITS, (j+1)*BITS) of the little-endian
    word made of bytes [g*BITS, (g+1)*BITS), BITS byte loads per group. The word reads need `base` and the
    rows 4-byte aligned, as `load_group_words` says."""
    tl.static_assert((BITS != 3) or (D < 32) or (D % 32 == 0), "3-bit rows of whole units only")
    NG: tl.constexpr = D // 8
    j = tl.arange(0, 8)
    if (BITS == 4) or ((BITS == 3) and (D >= 32)):
        word = load_group_words(base, row_off, row_mask, D, BITS)
        codes = (word[:, :, None] >> (4 * j)[None, None, :]) & ((1 << BITS) - 1)
    else:
        grp = tl.arange(0, NG)
        ptr = base + row_off[:, None] + grp[None, :] * BITS
        word = tl.zeros([row_off.shape[0], NG], tl.int32)
        for m in tl.static_range(BITS):
            word |= tl.load(ptr + m, mask=row_mask[:, None], other=0).to(tl.int32) << (8 * m)
        codes = (word[:, :, None].to(tl.uint32, bitcast=True) >> (BITS * j)[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes.to(tl.int32, bitcast=True), (row_off.shape[0], D))


@triton.jit
def load_group_words(base, row_off, row_mask, D: tl.constexpr, BITS: tl.constexpr):
    """The codes of whole rows as groups of eight, `[BLOCK_N, D // 8]` uint32, BITS in {3, 4}, D a power of
    two >= 32: code 8g + j of a row is bits [4j, 4j + BITS) of its entry g (at 3 bits bit 4j + 3 is not
    part of it). Read as aligned 32-bit words only: `base`, the row offsets (bytes) and the rows
    (D*BITS/8 bytes) are multiples of 4 bytes, as the decode launcher's `_word_rows` guarantees. 4 bits:
    one word per group; 3 bits: the unit of words 3s, 3s + 1, 3s + 2 (module docstring) is groups 4s..4s+2
    as they are, and group 4s + 3 gathered from their nibbles' top bits: three loads and six operations
    per 32 codes. (The plain 3-bit stream took 8 loads per 32 codes, and 12 operations per 8 codes to
    spread them into nibbles: 24 % more instructions per tile.)"""
    # int32 pointer arithmetic, so the compiler sees rows of consecutive words (vector loads)
    words = base.to(tl.pointer_type(tl.int32)) + (row_off >> 2)[:, None]
    if BITS == 3:
        s3 = tl.arange(0, D // 32)[None, :] * 3
        a = tl.load(words + s3, mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        b = tl.load(words + s3 + 1, mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        c = tl.load(words + s3 + 2, mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        d = ((a >> 3) & 0x11111111) | ((b >> 2) & 0x22222222) | ((c >> 1) & 0x44444444)
        # join appends an axis, so join(join(g0, g2), join(g1, g3)) holds group t = 2i + j at [..., i, j]
        word = tl.join(tl.join(a, c), tl.join(b, d))
        word = tl.reshape(word, (row_off.shape[0], D // 8))
    else:
        grp = tl.arange(0, D // 8)
        word = tl.load(words + grp[None, :], mask=row_mask[:, None], other=0).to(tl.uint32, bitcast=True)
    return word


@triton.jit
def load_pair_indices(base, row_off, row_mask, D: tl.constexpr, BITS: tl.constexpr):
    """Pair indices `[BLOCK_N, D // 2]` int32 of whole rows, BITS in {2, 3, 4}, D a power of two >= 32:
    entry j is c_{2j} | c_{2j+1} << 2 at 2 bits (a 32-bit word holds 16 codes, 8 pairs), c_{2j} | c_{2j+1} << 4
    at 3 and 4 bits (a byte of `load_group_words`' groups, 4 pairs per group)."""
    BLOCK_N: tl.constexpr = row_off.shape[0]
    MASK: tl.constexpr = 15 if BITS == 2 else 0x77 if BITS == 3 else 0xFF
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
        pair = (word[:, :, None] >> (8 * j)[None, None, :]) & MASK
    return tl.reshape(pair.to(tl.int32, bitcast=True), (BLOCK_N, D // 2))
