"""Triton kernels against the PyTorch reference (DESIGN.md §5).

On a CUDA machine these run on the GPU with the full matrix; on the CPU they run under
TRITON_INTERPRET=1 (set by conftest before triton is imported) on tiny shapes.

Tolerance rule for attention: with K^, V^ the reference dequantization (fp32), out_ref is
attention in fp64 and out_pt the same attention computed by PyTorch in the model dtype;
    max|out - out_ref| <= 3 max|out_pt - out_ref| + 1e-5,
    mean|out - out_ref| <= 1.5 mean|out_pt - out_ref| + 2**-20.
The 2**-20 (8 fp32 ulps at unit scale) is what makes the mean rule meaningful for fp32 models:
there out_pt is itself a few ulps from out_ref, and the kernel's different but equally valid
order of fp32 operations (scores in the rotated space, one un-rotation of the output) costs a few
ulps too. For fp16/bf16 the term is negligible next to the dtype's rounding.
One more term under the interpreter only: Triton 3.9's interpreter casts fp32 to bf16 by
truncation (round toward zero) where GPUs round to nearest even, so there the bf16 bound adds
one bf16 ulp of |out_ref| to the max rule and half of one to the mean rule.
"""

import math
import os
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tq_hf import TurboQuantCache, TurboQuantConfig
from tq_hf.cache import in_model_order, make_quantizers
from tq_hf.codec import TurboQuantizer, codebook, pack_codes, unpack_codes

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

if CUDA or INTERPRET:
    from tq_hf.kernels import decode_attention, dequantize, plan_splits, quantize_pack

    from tq_hf.workspace import get_workspace


def _seed(request):
    # A different seed for every test case, reproducible from its id; TQ_SEED shifts them all.
    torch.manual_seed(zlib.crc32(request.node.name.encode()) + int(os.environ.get("TQ_SEED", "0")))


# ---------------------------------------------------------------- quantize + pack
@pytest.mark.parametrize("dim,bits", [(64, 1), (80, 3), (96, 2), (128, 4), (128, 3), (256, 8)])
def test_quantize_pack_matches_reference(request, dim, bits):
    _seed(request)
    B, H, T, off, cap = 2, 3, 19, 5, 30
    qz = TurboQuantizer(dim, bits, seed=3, norm_correction=bits % 2 == 1)
    x = torch.randn(B, H, T, dim, device=DEV, dtype=torch.bfloat16) * 3
    mean = torch.randn(H, dim, device=DEV)
    codes = torch.full((B, H, cap, dim * bits // 8), 0xAB, dtype=torch.uint8, device=DEV)
    norms = torch.full((B, H, cap), float("nan"), device=DEV)
    quantize_pack(x, qz, codes, norms, off, mean=mean)

    xc = x.float() - mean[None, :, None, :]
    idx, n = qz.indices(xc)
    got = codes[:, :, off : off + T]
    ref = pack_codes(idx, bits)
    # Exact equality away from ties: a coordinate within 1e-6 of a decision boundary may round
    # either way between two fp32-accurate evaluations of the rotation (the kernel's is tf32x3: at
    # most ~5e-7 from the exact value for the unit vectors here, torch's fp32 matmul less).
    rot, _, bnd = qz.tensors(DEV)
    y = (xc / xc.norm(dim=-1, keepdim=True)) @ rot.T
    near_tie = ((y.unsqueeze(-1) - bnd).abs().min(-1).values < 1e-6).any(-1)
    differs = (got != ref).any(-1)
    assert not (differs & ~near_tie).any()
    torch.testing.assert_close(norms[:, :, off : off + T], n, rtol=1e-5, atol=0)
    # untouched positions keep their poison
    assert (codes[:, :, :off] == 0xAB).all() and (codes[:, :, off + T :] == 0xAB).all()
    assert norms[:, :, :off].isnan().all() and norms[:, :, off + T :].isnan().all()


@pytest.mark.parametrize("dim,bits", [(64, 3), (80, 2), (128, 4), (256, 3)])
def test_quantize_pack_qjl_matches_reference(request, dim, bits):
    """TurboQuant_prod: (bits - 1)-bit codes as the mse kernel writes them, plus the residual's QJL sign
    sketch and norm, against `TurboQuantizer(mode="prod").quantize`; poisoned planes stay poisoned
    outside the written range. Rows whose codes or a sketch entry sit at a tie (within fp32 rounding of
    a decision boundary, or of zero) may differ."""
    _seed(request)
    B, H, T, off, cap = 2, 3, 19, 5, 30
    qz = TurboQuantizer(dim, bits, seed=3, mode="prod")
    x = torch.randn(B, H, T, dim, device=DEV, dtype=torch.bfloat16) * 3
    mean = torch.randn(H, dim, device=DEV)
    codes = torch.full((B, H, cap, qz.row_bytes), 0xAB, dtype=torch.uint8, device=DEV)
    norms = torch.full((B, H, cap), float("nan"), device=DEV)
    sketch = torch.full((B, H, cap, dim // 8), 0xAB, dtype=torch.uint8, device=DEV)
    rnorm = torch.full((B, H, cap), float("nan"), device=DEV)
    quantize_pack(x, qz, codes, norms, off, mean=mean, qjl=(sketch, rnorm))

    xc = x.float() - mean[None, :, None, :]
    idx, n = qz.indices(xc)
    rot, cent, bnd = qz.tensors(DEV)
    y = (xc / xc.norm(dim=-1, keepdim=True)) @ rot.T
    near_tie = ((y.unsqueeze(-1) - bnd).abs().min(-1).values < 1e-6).any(-1)
    w = slice(off, off + T)
    assert not ((codes[:, :, w] != pack_codes(idx, bits - 1)).any(-1) & ~near_tie).any()
    residual = xc - (cent[idx] * n.unsqueeze(-1)) @ rot
    sk = residual @ qz.qjl_tensor(DEV).T
    # a D-term fp32 product is good to D * 2**-24 of |r| |S_i| (|S_i| ~ sqrt(D)): D**1.5 * 2**-24 |r|
    sign_tie = (sk.abs() < dim**1.5 * 2**-24 * residual.norm(dim=-1, keepdim=True)).any(-1)
    sure = ~near_tie & ~sign_tie
    assert sure.float().mean() > 0.9
    assert torch.equal(sketch[:, :, w][sure], pack_codes((sk >= 0).long(), 1)[sure])
    torch.testing.assert_close(norms[:, :, w], n, rtol=1e-5, atol=0)
    torch.testing.assert_close(rnorm[:, :, w][~near_tie], residual.norm(dim=-1)[~near_tie], rtol=1e-4, atol=0)
    for plane in (codes, sketch):
        assert (plane[:, :, :off] == 0xAB).all() and (plane[:, :, off + T :] == 0xAB).all()
    for plane in (norms, rnorm):
        assert plane[:, :, :off].isnan().all() and plane[:, :, off + T :].isnan().all()
    with pytest.raises(ValueError, match="only for, a quantizer in 'prod' mode"):
        quantize_pack(x, qz, codes, norms, off, mean=mean)


def test_quantize_zero_vector():
    qz = TurboQuantizer(64, 4)
    x = torch.zeros(1, 1, 16, 64, device=DEV)
    codes = torch.empty(1, 1, 16, 32, dtype=torch.uint8, device=DEV)
    norms = torch.empty(1, 1, 16, device=DEV)
    quantize_pack(x, qz, codes, norms, 0)
    assert (norms == 0).all()


# ---------------------------------------------------------------- dequantize
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,bits", [(64, 2), (80, 4), (128, 3), (80, 3)])
def test_dequantize_matches_reference(request, dtype, dim, bits):
    _seed(request)
    B, H, cap, start, T = 2, 2, 40, 7, 23
    qz = TurboQuantizer(dim, bits, seed=1)
    idx = torch.randint(0, 2**bits, (B, H, cap, dim), device=DEV)
    codes = pack_codes(idx, bits)
    norms = torch.rand(B, H, cap, device=DEV) + 0.5
    mean = torch.randn(H, dim, device=DEV)
    out = torch.full((B, H, T, dim), float("nan"), dtype=dtype, device=DEV)
    dequantize(codes, norms, qz, start, out, mean=mean)
    s = slice(start, start + T)
    ref = qz.dequantize({"codes": codes[:, :, s], "norms": norms[:, :, s], "dtype": torch.float32})
    ref = ref + mean[None, :, None, :]
    rounding = (ref.to(dtype).float() - ref).abs().max()
    assert (out.float() - ref).abs().max() <= 3 * rounding + 1e-5


# ---------------------------------------------------------------- decode attention
def _make_layer(B, Hkv, D, T, R, dtype, key_bits=4, value_bits=4, decode_steps=3, preset=None, **options):
    bits = {} if preset else {"key_bits": key_bits, "value_bits": value_bits}
    cache = TurboQuantCache(preset, residual_length=R, backend="triton", **bits, **options)
    k = torch.randn(B, Hkv, T, D, dtype=dtype, device=DEV) * 1.5 + 0.7  # a channel bias to centre away
    v = torch.randn(B, Hkv, T, D, dtype=dtype, device=DEV)
    cache.update(k, v, 0)
    for _ in range(decode_steps):
        cache.update(torch.randn(B, Hkv, 1, D, dtype=dtype, device=DEV),
                     torch.randn(B, Hkv, 1, D, dtype=dtype, device=DEV), 0)
    layer = cache.layers[0]
    layer.claim()
    return layer


def _reference_kv(layer):
    """K^, V^ `[B, H, n, D]` in fp32 from the PyTorch codec (independent of the Triton dequantize)."""
    nq, kq, vq = layer.n_quant, layer.key_quantizer, layer.value_quantizer
    if nq == 0:
        return layer.k_win[:, :, : layer.n_window].float(), layer.v_win[:, :, : layer.n_window].float()
    k = kq.dequantize({"codes": layer.k_codes[:, :, :nq], "norms": layer.k_norms[:, :, :nq], "dtype": torch.float32})
    v = vq.dequantize({"codes": layer.v_codes[:, :, :nq], "norms": layer.v_norms[:, :, :nq], "dtype": torch.float32})
    if layer.k_perm is not None:  # split codes
        k, v = in_model_order(k, layer.k_perm), in_model_order(v, layer.v_perm)
    k = k + layer.k_mean[None, :, None, :]
    if layer.n_window:
        k = torch.cat([k, layer.k_win[:, :, : layer.n_window].float()], 2)
        v = torch.cat([v, layer.v_win[:, :, : layer.n_window].float()], 2)
    return k, v


def _attention(q, k, v, mask, scale, softcap, dtype, layer=None, sinks=None):
    """Dense attention in `dtype`; with a `key_qjl` layer its quantized keys' scores get the QJL estimate
    ||r|| sqrt(pi/2) / D <S q, sign(S r)> of <q, residual> (TurboQuant_prod). `sinks` `[Hq]`: one more
    softmax column per query head whose probability multiplies no value (as GPT-OSS's eager attention)."""
    _B, Hq, _, D = q.shape
    G = Hq // k.shape[1]
    q, k, v = q.to(dtype), k.repeat_interleave(G, 1).to(dtype), v.repeat_interleave(G, 1).to(dtype)
    s = q @ k.transpose(-1, -2)
    if layer is not None and layer.config.key_qjl:
        nq = layer.n_quant
        S = layer.key_quantizer.qjl_tensor(q.device).to(dtype)
        sign = (unpack_codes(layer.k_qjl[:, :, :nq], 1, D).to(dtype) * 2 - 1).repeat_interleave(G, 1)
        rn = layer.k_rnorm[:, :, :nq].to(dtype).repeat_interleave(G, 1)
        s[..., :nq] += (q @ S.T) @ sign.transpose(-1, -2) * rn[:, :, None, :] * (math.sqrt(math.pi / 2) / D)
    s = s * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
        return (torch.softmax(s, -1)[..., :-1] @ v).transpose(1, 2)
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def _check_decode(q, layer, mask, softcap, num_splits, sinks=None, one_launch=None):
    D = q.shape[-1]
    scale = D**-0.5
    out = decode_attention(q, layer, mask, scale, softcap, num_splits=num_splits, sinks=sinks, one_launch=one_launch)
    assert out.shape == (q.shape[0], 1, q.shape[1], D) and out.dtype == q.dtype
    k, v = _reference_kv(layer)
    ref = _attention(q.double(), k.double(), v.double(), mask, scale, softcap, torch.float64, layer, sinks)
    pt = _attention(q, k, v, mask, scale, softcap, q.dtype, layer, sinks)
    err, err_pt = (out.double() - ref).abs(), (pt.double() - ref).abs()
    trunc = ref.abs() * 2**-7 if (INTERPRET and not CUDA and q.dtype == torch.bfloat16) else torch.zeros_like(ref)
    assert not out.isnan().any()
    assert (err - trunc).max() <= 3 * err_pt.max() + 1e-5, (err.max().item(), err_pt.max().item())
    assert (err - trunc / 2).mean() <= 1.5 * err_pt.mean() + 2**-20, (err.mean().item(), err_pt.mean().item())
    return out


SMALL = [  # B, Hkv, G, D, T, R
    (1, 1, 1, 64, 1, 0),
    (2, 2, 4, 128, 15, 0),
    (2, 1, 8, 96, 16, 8),
    (3, 2, 1, 80, 17, 16),
    (1, 2, 4, 256, 40, 4),
    (2, 2, 4, 128, 339, 32),
]
LARGE = [(2, 8, 4, 128, 799, 64), (1, 8, 4, 128, 4096, 64), (4, 2, 8, 64, 4096, 0),
         (1, 8, 4, 128, 65536, 64), (8, 8, 4, 128, 16384, 64)]


@pytest.mark.parametrize("num_splits", [None, 1, 2, 3])
@pytest.mark.parametrize("shape", SMALL + (LARGE if CUDA else []), ids=str)
def test_decode_matches_reference(request, shape, num_splits):
    _seed(request)
    B, Hkv, G, D, T, R = shape
    dtype = DTYPES[zlib.crc32(str((shape, num_splits)).encode()) % 3]
    layer = _make_layer(B, Hkv, D, T, R, dtype)
    n = layer.get_seq_length()
    # ragged, left-padded batch: row b ignores its first b * 3 positions
    mask = torch.ones(B, n, dtype=torch.bool, device=DEV)
    for b in range(B):
        mask[b, : min(b * 3, n - 1)] = False
    q = torch.randn(B, Hkv * G, 1, D, dtype=dtype, device=DEV)
    # the merge runs inside stage 1 (small problems' default) and, with 3 splits, as a second launch
    _check_decode(q, layer, mask if B > 1 else None, None, num_splits, one_launch=num_splits != 3)


@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("splits", [70, 64, 63])
def test_decode_merges_many_splits(request, one_launch, splits):
    """S one-tile splits plus the window: the merge's max runs over one or two 64-split chunks (S + 1 = 64, 65,
    71) and its 4-split steps end on a full or a partial one; inside stage 1 and as a second launch."""
    _seed(request)
    layer = _make_layer(2, 1, 64, 32 * splits - 3, 0, torch.float32)  # + 3 decode steps: 32 * S positions
    assert plan_splits(layer.n_quant, 2, 132, 32, num_splits=splits) == (splits, 32)
    q = torch.randn(2, 2, 1, 64, device=DEV)
    mask = torch.ones(2, layer.get_seq_length(), dtype=torch.bool, device=DEV)
    mask[1, :1000] = False
    D = 64
    out = decode_attention(q, layer, mask, D**-0.5, None, num_splits=splits, block_n=32, one_launch=one_launch)
    ref = _check_decode(q, layer, mask, None, 1)  # one split: no merge of quantized partials
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_softcap_and_bits(request, dtype):
    _seed(request)
    for kb, vb in [(3, 2), (8, 4), (1, 3)]:
        layer = _make_layer(2, 2, 64, 37, 8, dtype, key_bits=kb, value_bits=vb)
        q = torch.randn(2, 8, 1, 64, dtype=dtype, device=DEV) * 3
        _check_decode(q, layer, None, 20.0, None)


@pytest.mark.parametrize("shape", [(2, 2, 4, 64, 45, 8), (1, 2, 8, 128, 20, 20), (3, 1, 2, 80, 9, 0)] + (
    [(2, 8, 8, 64, 4096, 128)] if CUDA else []), ids=str)
def test_decode_attention_sinks(request, shape):
    """GPT-OSS's attention sinks (`s_aux`, one logit per query head): the kernel against dense attention
    with the sink column, and the PyTorch reference (the spec) against it too, on a ragged batch; the
    window-only case (R >= T) and a fully masked row included. Sinks of both signs and up to ~10, one of 40."""
    from tq_hf.attention import reference_attention

    _seed(request)
    B, Hkv, G, D, T, R = shape
    dtype = DTYPES[zlib.crc32(str(shape).encode()) % 3]
    layer = _make_layer(B, Hkv, D, T, R, dtype)
    n = layer.get_seq_length()
    mask = torch.ones(B, n, dtype=torch.bool, device=DEV)
    mask[1:, : min(5, n - 1)] = False
    mask[2:] = False  # a fully masked row: the sink takes all the probability, the output is 0
    sinks = (torch.randn(Hkv * G, device=DEV) * 4).to(dtype)
    sinks[0] = 40.0  # far above every score: head 0's output is ~0
    q = torch.randn(B, Hkv * G, 1, D, dtype=dtype, device=DEV)
    out = _check_decode(q, layer, mask, None, None, sinks)
    torch.testing.assert_close(decode_attention(q, layer, mask, D**-0.5, sinks=sinks, one_launch=False), out,
                               rtol=0, atol=0)  # the merge as a second launch: the same arithmetic
    # The spec (PyTorch reference) against the same attention written out in fp64 over the K/V it reads (its
    # dequantized tiles, in the model dtype): it computes in fp32 and rounds once to the model dtype.
    kd, vd = layer.dequantize_range(0, n)
    exact = _attention(q.double(), kd.double(), vd.double(), mask, D**-0.5, None, torch.float64, sinks=sinks)
    spec = reference_attention(q, layer, n, mask=mask[:, None, None, :], sinks=sinks)
    assert (spec.double() - exact).abs().max() <= 2 * torch.finfo(dtype).eps * exact.abs().max() + 1e-5
    without = decode_attention(q, layer, mask, D**-0.5)
    assert (out.float() - without.float()).abs().max() > 1e-2  # the sinks changed the output
    with pytest.raises(ValueError, match="sinks must be"):
        decode_attention(q, layer, mask, D**-0.5, sinks=sinks[:-1])


@pytest.mark.skipif(not CUDA, reason="a race needs programs running at once: the interpreter runs them in turn")
@pytest.mark.parametrize("preset", ["4bit", "3.5bit"])
def test_one_launch_merge_is_race_free(request, preset):
    """The merge inside stage 1 (last program of a head merges; an atomic counter decides) against the merge as
    a second launch, bit for bit, over many repeated calls with ~70 splits per head finishing together."""
    _seed(request)
    layer = _make_layer(1, 8, 128, 16384, 64, torch.bfloat16, preset=preset)
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device=DEV)
    want = decode_attention(q, layer, None, 128**-0.5, one_launch=False)
    outs = [decode_attention(q, layer, None, 128**-0.5, one_launch=True) for _ in range(300)]
    assert sum(not torch.equal(o, want) for o in outs) == 0
    assert not get_workspace(DEV)._buffers["decode_count"].any()


@pytest.mark.parametrize("one_launch", [True, False])
def test_decode_window_only_with_sinks(request, one_launch):
    """No code planes yet (S = 0: the window's program alone, what a captured graph of a short prompt runs),
    with sinks, the merge in stage 1 and as a second launch."""
    _seed(request)
    layer = _make_layer(2, 2, 64, 3, 8, torch.float32, decode_steps=1)
    assert layer.n_quant == 0 and layer.n_window == 4
    sinks = torch.randn(8, device=DEV) * 2
    _check_decode(torch.randn(2, 8, 1, 64, device=DEV), layer, None, None, None, sinks, one_launch=one_launch)


@pytest.mark.parametrize("preset", ["2.5bit", "3.5bit"])
@pytest.mark.parametrize("shape", [(2, 2, 4, 128, 70, 16), (1, 1, 8, 64, 33, 0)] + (
    [(2, 8, 4, 128, 4096, 64), (1, 2, 4, 256, 999, 64)] if CUDA else []), ids=str)
def test_decode_split_codes_match_reference(request, preset, shape):
    """Split codes (outlier channels): two code sets, two norms, permuted channels, read by the kernel."""
    _seed(request)
    B, Hkv, G, D, T, R = shape
    dtype = DTYPES[zlib.crc32(str((preset, shape)).encode()) % 3]
    layer = _make_layer(B, Hkv, D, T, R, dtype, preset=preset)
    assert layer.k_perm is not None and layer.k_norms.shape[-1] == 2
    n = layer.get_seq_length()
    mask = torch.ones(B, n, dtype=torch.bool, device=DEV)
    mask[-1, :3] = False
    q = torch.randn(B, Hkv * G, 1, D, dtype=dtype, device=DEV)
    for num_splits in (None, 2):
        _check_decode(q, layer, mask if B > 1 else None, 30.0 if D == 64 else None, num_splits,
                      one_launch=num_splits is None)  # the merge in stage 1, and as a second launch


@pytest.mark.parametrize("shape", [(2, 2, 4, 128, 70, 16), (1, 2, 1, 80, 40, 0), (2, 1, 8, 64, 339, 8)] + (
    [(2, 8, 4, 128, 8191, 64)] if CUDA else []), ids=str)
def test_decode_qjl_keys_match_reference(request, shape):
    """key_qjl (TurboQuant_prod): the kernel adds the QJL estimate of <q, residual> to each quantized key's
    score; without that term the output would be measurably different (positive control)."""
    _seed(request)
    B, Hkv, G, D, T, R = shape
    dtype = DTYPES[zlib.crc32(str(shape).encode()) % 3]
    layer = _make_layer(B, Hkv, D, T, R, dtype, key_bits=3, key_qjl=True)
    assert layer.k_qjl is not None and layer.n_quant > 0
    mask = torch.ones(B, layer.get_seq_length(), dtype=torch.bool, device=DEV)
    mask[1:, :5] = False  # ragged, left-padded
    q = torch.randn(B, Hkv * G, 1, D, dtype=dtype, device=DEV) * 2
    out = _check_decode(q, layer, mask, None, None)
    if T > 1000:  # the control is sized for short contexts (checked on the CPU); long ones check the match only
        return
    k, v = _reference_kv(layer)
    args = (q.double(), k.double(), v.double(), mask, D**-0.5, None, torch.float64)
    with_qjl, without = _attention(*args, layer), _attention(*args)
    assert (with_qjl - without).abs().max() > 10 * (out.double() - with_qjl).abs().max()


@pytest.mark.skipif(not CUDA, reason="long contexts run on the GPU only")
@pytest.mark.parametrize("kb,vb", [(3, 3), (4, 3), (2, 2)])
def test_decode_low_bits_long_context(request, kb, vb):
    """The grouped (BITS <= 4, not 4) code reader over many tiles and splits."""
    _seed(request)
    layer = _make_layer(2, 8, 128, 8191, 64, torch.bfloat16, key_bits=kb, value_bits=vb)
    q = torch.randn(2, 32, 1, 128, dtype=torch.bfloat16, device=DEV)
    _check_decode(q, layer, None, None, None)


def test_decode_window_only_and_deterministic(request):
    _seed(request)
    layer = _make_layer(2, 2, 64, 5, 16, torch.bfloat16, decode_steps=1)  # everything in the window
    assert layer.n_quant == 0 and layer.n_window == 6
    q = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16, device=DEV)
    out = _check_decode(q, layer, None, None, None)
    layer = _make_layer(2, 2, 64, 100, 16, torch.bfloat16)
    a = decode_attention(q, layer, None, 0.125)
    b = decode_attention(q, layer, None, 0.125)
    assert torch.equal(a, b) and not torch.equal(a, out)


def test_launchers_refuse_what_they_would_misread(request):
    """Inputs the kernels would read wrongly are refused with a message: non-bool decode masks (an int64 or
    additive float mask read as bytes), fp64 queries, an empty layer, negative or overflowing offsets, means
    that are not [H, D] floats on the device. A non-contiguous fp16 mean is converted, not misread."""
    _seed(request)
    layer = _make_layer(2, 2, 64, 20, 4, torch.float32)
    q = torch.randn(2, 8, 1, 64, device=DEV)
    n = layer.get_seq_length()
    for bad in (torch.ones(2, n, dtype=torch.int64, device=DEV), torch.zeros(2, n, device=DEV)):
        with pytest.raises(ValueError, match="mask must be bool"):
            decode_attention(q, layer, bad)
    with pytest.raises(ValueError, match="query must be fp16, bf16 or fp32"):
        decode_attention(q.double(), layer)
    with pytest.raises(ValueError, match="at least one token"):
        decode_attention(q, _empty_layer())
    qz = layer.key_quantizer
    x = torch.randn(2, 2, 3, 64, device=DEV)
    codes, norms = layer.k_codes, layer.k_norms
    for offset in (-1, codes.shape[2] - 2):
        with pytest.raises(ValueError, match="does not fit codes"):
            quantize_pack(x, qz, codes, norms, offset)
    out = torch.empty(2, 2, 3, 64, device=DEV)
    with pytest.raises(ValueError, match="does not fit codes"):
        dequantize(codes, norms, qz, -1, out)
    for bad in (torch.zeros(64, device=DEV), torch.zeros(2, 64, dtype=torch.int32, device=DEV)):
        with pytest.raises(ValueError, match=r"mean must be a float tensor \[2, 64\]"):
            quantize_pack(x, qz, codes, norms, 0, mean=bad)
    mean = torch.randn(64, 2, device=DEV)
    dequantize(codes, norms, qz, 0, out, mean=mean.t().half())
    ref = torch.empty_like(out)
    dequantize(codes, norms, qz, 0, ref, mean=mean.t().half().float().contiguous())
    assert torch.equal(out, ref)


def _empty_layer():
    from tq_hf import TurboQuantLayer

    return TurboQuantLayer(TurboQuantConfig(backend="triton"), layer_idx=0)


def test_pair_tables():
    """Where the decode kernel does not look codes up in registers (CPU here), it gathers 2-4-bit codes of
    word rows two at a time from T[c0 | c1 << s] = (cent[c0], cent[c1]) (s = 4 at 3 and 4 bits, the nibbles of
    `load_group_words`; 2 at 2 bits); other widths and non-power-of-two rows gather the centroids themselves."""
    from tq_hf.kernels.decode import _code_table

    for bits, step in ((3, 4), (4, 4), (2, 2)):
        cent = codebook(128, bits)[0]
        table, lookup = _code_table(cent, bits, 128, torch.float16)
        assert lookup == 1 and table.shape == (1 << (step + bits), 2) and table.dtype == torch.float16
        c0, c1 = torch.randint(0, 1 << bits, (2, 100))
        assert torch.equal(table[c0 | c1 << step], torch.stack([cent[c0], cent[c1]], -1).half())
        assert _code_table(cent, bits, 128, torch.float16)[0] is table  # built once
    for bits, d in ((1, 128), (8, 128), (3, 80), (4, 16)):
        c = torch.randn(1 << bits)
        assert _code_table(c, bits, d, torch.float32) == (c, 0)


def test_register_lookup_dispatch(monkeypatch):
    """Which rows the decode kernel looks up in registers: 3- and 4-bit rows of a power-of-two width >= 32
    (whole 32-bit words: rows and split offsets of every preset are multiples of 4 bytes), with fp16 dot
    operands (bf16 models), where kernels run as compiled PTX (not under the interpreter)."""
    from tq_hf.kernels import decode as dec

    cuda, cpu, f16 = torch.device("cuda"), torch.device("cpu"), torch.float16
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dec._runs_ptx(cuda) == (torch.version.hip is None) and not dec._runs_ptx(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not dec._runs_ptx(cuda)  # interpreted CUDA tensors
    monkeypatch.setattr(dec, "_runs_ptx", lambda device: True)
    assert dec._register_lookup(4, 128, f16, cuda) and dec._register_lookup(3, 64, f16, cuda)
    assert dec._register_lookup(4, 256, f16, cuda) and dec._register_lookup(3, 32, f16, cuda)
    assert not dec._register_lookup(4, 128, torch.float32, cuda)  # fp32 / fp16 models: fp32 tables, gathered
    assert not any(dec._register_lookup(b, 128, f16, cuda) for b in (1, 2, 5, 8))
    assert not dec._register_lookup(4, 96, f16, cuda) and not dec._register_lookup(4, 16, f16, cuda)
    for preset in ("4bit", "3bit", "2.5bit", "3.5bit"):
        for d in (64, 128, 256):
            for qz in make_quantizers(TurboQuantConfig.from_preset(preset), d):
                bits, bits2, at = qz.code_layout
                width = d // 2 if at else d
                assert dec._word_rows(bits, width) and dec._word_rows(bits2, width) and at % 4 == 0


def _run_ptx(asm: str, regs: dict) -> dict:
    """Run `asm`, a block of the PTX instructions and.b32 / or.b32 / xor.b32 / sub.u32 / shl.b32 / shr.b32 /
    prmt.b32 (default mode) and `mov.b32 {lo, hi}, r`, on `regs` {"$8": ...}: unsigned 32-bit values, numbers or NumPy arrays
    (element-wise). Returns every register."""
    regs = {r: np.asarray(v, dtype=np.uint64) for r, v in regs.items()}
    for ins in asm.strip().strip("{}").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, args = ins.split(None, 1)
        if op == "mov.b32":  # split a 32-bit register into two 16-bit halves, low half first
            lo, hi, src = [a.strip("{} ") for a in args.split(",")]
            regs[lo], regs[hi] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        dst, *src = [a.strip() for a in args.split(",")]
        a, b, *c = [regs[x] if x in regs else np.uint64(int(x, 0)) for x in src]
        if op == "and.b32":
            regs[dst] = a & b
        elif op == "xor.b32":
            regs[dst] = a ^ b
        elif op == "sub.u32":
            regs[dst] = (a + np.uint64(2**32) - b) & 0xFFFFFFFF
        elif op == "or.b32":
            regs[dst] = a | b
        elif op == "shl.b32":
            regs[dst] = (a << b) & 0xFFFFFFFF
        elif op == "shr.b32":
            regs[dst] = a >> b
        elif op == "prmt.b32":  # byte i of the result = byte (nibble i of c) of the 8 bytes b:a
            sel = [(c[0] >> np.uint64(4 * i)) & 15 for i in range(4)]
            assert not any(np.any(x & 8) for x in sel), "sign-replicating selector"
            eight = a | (b << np.uint64(32))
            regs[dst] = sum(((eight >> (8 * x)) & 0xFF) << np.uint64(8 * i) for i, x in enumerate(sel))
        else:
            raise AssertionError(f"no model of {op}")
    return regs


def _fp16(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint16).view(np.float16).copy())


@pytest.mark.parametrize("dim,bits", [(64, 4), (128, 4), (256, 4), (64, 3), (128, 3), (256, 3)])
def test_register_lookup_ptx(request, dim, bits):
    """The register lookup's PTX, run by a model of its instructions, turns random groups of eight codes
    (`load_group_words`: code j in bits 4j..4j+bits-1; at 3 bits the bits 4j+3 belong to another group)
    into their fp16 centroids."""
    from tq_hf.kernels.decode import _LOOKUP3_PTX, _LOOKUP4_PTX, _register_table

    _seed(request)
    cent = codebook(dim, bits)[0]
    table = {f"${9 + i}": w & 0xFFFFFFFF for i, w in enumerate(_register_table(cent).tolist())}
    words = torch.randint(0, 2**32, (300,)).tolist() + [0, 2**32 - 1]
    regs = _run_ptx((_LOOKUP4_PTX if bits == 4 else _LOOKUP3_PTX).value, {"$8": words, **table})
    got = torch.stack([_fp16(regs[f"${i}"]) for i in range(8)], 1)
    codes = torch.tensor([[w >> (4 * i) & ((1 << bits) - 1) for i in range(8)] for w in words])
    assert torch.equal(got, cent.half()[codes])


@pytest.mark.skipif(CUDA, reason="on a GPU the decode tests run the compiled PTX")
@pytest.mark.parametrize("case", [
    {"key_bits": 4, "value_bits": 4, "D": 128, "T": 600}, {"key_bits": 3, "value_bits": 3, "D": 64},
    {"key_bits": 4, "value_bits": 3, "D": 128}, {"key_bits": 3, "value_bits": 2, "D": 64},
    {"key_bits": 4, "value_bits": 4, "D": 64, "key_qjl": True}, {"preset": "3.5bit", "D": 128}, {"preset": "2.5bit", "D": 64},
], ids=str)
def test_decode_register_lookup_interpreted(request, monkeypatch, case):
    """The decode kernel's register-lookup path end to end on the CPU: the interpreter runs the inline PTX
    through `_run_ptx`, the launcher picks that path and its launch shapes as on a GPU (bf16 models)."""
    import triton.language as tl
    import triton.runtime.interpreter as interp
    from tq_hf.kernels import decode as dec

    calls = []

    def inline_asm(self, asm, constraints, values, types, is_pure, pack):
        assert pack == 1
        n_out = constraints.count("=")
        data = np.broadcast_arrays(*[np.asarray(v.data).astype(np.int64) & 0xFFFFFFFF for v in values])
        regs = _run_ptx(asm, {f"${n_out + i}": x for i, x in enumerate(data)})
        calls.append(asm)
        outs = [interp.TensorHandle(regs[f"${i}"].astype(np.uint16).view(np.float16), tl.float16)
                for i in range(n_out)]
        return SimpleNamespace(get_result=outs.__getitem__)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_inline_asm", inline_asm)
    monkeypatch.setattr(dec, "_runs_ptx", lambda device: True)
    _seed(request)
    case = dict(case)
    D, T = case.pop("D"), case.pop("T", 300)
    layer = _make_layer(2, 2, D, T, 16, torch.bfloat16, **case)
    mask = torch.ones(2, layer.get_seq_length(), dtype=torch.bool)
    mask[1, :5] = False
    q = torch.randn(2, 8, 1, D, dtype=torch.bfloat16)
    for num_splits in (None, 2):
        _check_decode(q, layer, mask, None, num_splits)
    assert calls  # the register path ran


@pytest.mark.skipif(not CUDA, reason="compiled PTX runs on the GPU only")
@pytest.mark.parametrize("preset", ["4bit", "3bit", "3.5bit", "2.5bit", "k4v3", "qjl"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_decode_register_lookup_matches_pair_tables(request, monkeypatch, preset, D):
    """bf16 models on the GPU: the register lookup (compiled PTX) against the reference, and bit for bit
    against the pair tables at the same launch shape (both read the same fp16 centroids)."""
    from tq_hf.kernels import decode as dec

    _seed(request)
    opts = ({"key_bits": 4, "value_bits": 3} if preset == "k4v3" else
            {"key_bits": 4, "value_bits": 4, "key_qjl": True} if preset == "qjl" else {"preset": preset})
    layer = _make_layer(2, 4, D, 1500, 64, torch.bfloat16, **opts)
    q = torch.randn(2, 16, 1, D, dtype=torch.bfloat16, device=DEV)
    mask = torch.ones(2, layer.get_seq_length(), dtype=torch.bool, device=DEV)
    mask[1, :7] = False
    fast = _check_decode(q, layer, mask, None, None)
    # and at D = 128 the launch decode_attention picks for 4-bit codes over long contexts
    shapes = [{"block_n": 128, "num_warps": 4, "num_stages": 1}]
    shapes += [{"block_n": 128, "num_warps": 8, "num_stages": 3}] if D == 128 else []
    regs = [decode_attention(q, layer, mask, D**-0.5, **shape) for shape in shapes]
    monkeypatch.setattr(dec, "_runs_ptx", lambda device: False)
    pairs = [decode_attention(q, layer, mask, D**-0.5, **shape) for shape in shapes]
    assert all(torch.equal(r, p) for r, p in zip(regs, pairs)) and not fast.isnan().any()


def test_launch_shapes():
    """Stage 1's default launch per code path (`_launch_shape`, the H200 measurements of kernels/PERF_NOTES.md)."""
    from tq_hf.kernels.decode import GATHER, PAIRS, REGISTERS, _launch_shape

    R, P, G = REGISTERS.value, PAIRS.value, GATHER.value
    assert _launch_shape(R, R, 4, 4, False, False, 128) == (256, 4, 2)  # 4bit
    assert _launch_shape(R, R, 3, 3, False, False, 128) == (256, 4, 2)  # 3bit
    assert _launch_shape(R, R, 4, 3, False, False, 128) == (256, 4, 2)  # k4v3
    assert _launch_shape(R, R, 4, 3, True, False, 128) == (256, 4, 1)  # split codes
    assert _launch_shape(R, R, 3, 4, False, True, 128) == (256, 4, 1)  # QJL keys
    assert _launch_shape(R, R, 4, 4, False, False, 64) == (128, 4, 2)
    assert _launch_shape(R, R, 3, 3, False, False, 64) == (128, 4, 1)
    assert _launch_shape(R, R, 4, 4, False, False, 256) == (128, 4, 1)
    assert _launch_shape(P, P, 4, 4, False, False, 128) == (128, 4, 1)  # fp32 / fp16 models
    assert _launch_shape(P, P, 4, 4, False, False, 256) == (64, 8, 1)
    assert _launch_shape(G, G, 8, 8, False, False, 128) == (128, 4, 1)


def test_plan_splits():
    assert plan_splits(0, 8, 132, 64) == (0, 64)
    s, chunk = plan_splits(100_000, 8, 132, 64)
    assert s * chunk >= 100_000 and (s - 1) * chunk < 100_000 and chunk % 64 == 0
    assert plan_splits(10, 8, 132, 64) == (1, 64)  # never a split shorter than a tile
    assert plan_splits(1000, 8, 132, 64, num_splits=3)[0] == 3


def test_workspace_shared_and_bounded(request):
    """All layers take decode scratch from one per-device workspace that stops growing."""
    _seed(request)
    ws = get_workspace(DEV)
    ws.clear()  # earlier tests in this process sized it for their own, larger shapes
    layers = [_make_layer(2, 2, 64, t, 8, torch.bfloat16) for t in (30, 200, 700)]
    # window only (no code planes yet) and codes only (no window): nothing stands in from the workspace
    layers += [_make_layer(2, 2, 64, 3, 8, torch.bfloat16, decode_steps=1),
               _make_layer(2, 2, 64, 40, 0, torch.bfloat16, decode_steps=0)]
    assert layers[-2].k_codes is None and layers[-1].k_win is None
    q = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16, device=DEV)
    for layer in layers:
        decode_attention(q, layer, None, 0.125)
    assert set(ws._buffers) == {"decode_mid_o", "decode_mid_lse", "decode_count"}
    grown, size = ws.grow_count, ws.nbytes()
    ptr = ws._buffers["decode_mid_o"].data_ptr()
    for _ in range(2):
        for layer in layers:
            decode_attention(q, layer, None, 0.125, num_splits=2)
    assert ws.grow_count == grown and ws.nbytes() == size
    assert ws._buffers["decode_mid_o"].data_ptr() == ptr
    # the merging program of each (batch, kv head) reset its counter: the next call starts from zero
    assert not ws._buffers["decode_count"].any()
    # scratch scales with the number of splits, not with the context length
    assert size < 64 * 1024 * 16


@pytest.mark.parametrize("scale", [1e25, 1e-25, 1e35])
@pytest.mark.parametrize("preset", ["4bit", "3.5bit"])
def test_quantize_huge_and_tiny_vectors_match_reference_backend(request, scale, preset):
    """The kernel scales each vector by a power of two as the PyTorch path does: norms stay finite
    and codes/norms match the reference backend where a plain fp32 norm would overflow/underflow.
    Split codes (3.5bit) go through the same kernel once per channel set (scaled per set, where the
    PyTorch path scales the whole vector: the same codes unless the sets' magnitudes differ by
    ~2**75), and dequantize back to the model's channel order."""
    _seed(request)
    k = torch.randn(1, 2, 20, 64, device=DEV) * scale
    v = torch.randn(1, 2, 20, 64, device=DEV) * scale
    layers = []
    for backend in ("triton", "torch"):
        cache = TurboQuantCache(preset, residual_length=0, backend=backend)
        cache.update(k, v, 0)
        layers.append(cache.layers[0])
    tri, ref = layers
    for name in ("k_codes", "v_codes"):
        assert torch.equal(getattr(tri, name)[:, :, :20], getattr(ref, name)[:, :, :20])
    for name in ("k_norms", "v_norms"):
        got, want = getattr(tri, name)[:, :, :20], getattr(ref, name)[:, :, :20]
        assert torch.isfinite(got).all() and (got > 0).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for got, want in zip(tri.dequantize_range(0, 20), ref.dequantize_range(0, 20)):
        # two fp32 evaluations of a 64-term rotation: each element within 64 ulps of the largest
        torch.testing.assert_close(got, want, rtol=0, atol=64 * 2**-24 * want.abs().max().item())
