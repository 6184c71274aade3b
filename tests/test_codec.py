"""TurboQuant_mse reference codec: distortion vs the paper, packing, rotation, codebook, edge cases."""

from __future__ import annotations

import pytest
import torch

from tq_hf.codec import (
    TurboQuantizer,
    codebook,
    pack_codes,
    packed_row_bytes,
    rotation_matrix,
    unpack_codes,
)

# MSE distortion E||x - x^||^2 of unit vectors at d=128 (paper's refined values, DESIGN.md section 1).
PAPER_D128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}
DIMS = (64, 80, 96, 128, 256)


@pytest.fixture(scope="module")
def unit_vectors_128():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(20_000, 128, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def _mse(q: TurboQuantizer, x: torch.Tensor) -> float:
    return ((q.dequantize(q.quantize(x)) - x) ** 2).sum(-1).mean().item()


@pytest.mark.parametrize("bits", sorted(PAPER_D128))
def test_distortion_matches_paper(unit_vectors_128, bits):
    mse = _mse(TurboQuantizer(128, bits, seed=0, norm_correction=False), unit_vectors_128)
    print(f"d=128 b={bits}: MSE {mse:.5f} (paper {PAPER_D128[bits]}, lower bound {4.0**-bits:.5f})")
    assert abs(mse - PAPER_D128[bits]) <= 0.03 * PAPER_D128[bits]
    assert mse >= 4.0**-bits  # information-theoretic lower bound


@pytest.mark.parametrize("bits", range(1, 9))
def test_distortion_respects_lower_bound_and_decreases(unit_vectors_128, bits):
    x = unit_vectors_128[:4000]
    mse = _mse(TurboQuantizer(128, bits), x)
    assert 4.0**-bits <= mse
    # The paper's upper bound sqrt(3) pi / 2 * 4^-b holds for every b.
    assert mse <= (3**0.5 * torch.pi / 2) * 4.0**-bits


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", (1, 3, 4))
def test_norm_correction_makes_norms_exact(dim, bits):
    g = torch.Generator().manual_seed(dim * 10 + bits)
    x = torch.randn(500, dim, generator=g) * torch.rand(500, 1, generator=g) * 10
    q = TurboQuantizer(dim, bits, norm_correction=True)
    xh = q.dequantize(q.quantize(x))
    torch.testing.assert_close(xh.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # Without correction norms shrink on average: E||c[idx]||^2 = 1 - D for Lloyd-Max centroids.
    q0 = TurboQuantizer(dim, bits, norm_correction=False)
    ratio = (q0.dequantize(q0.quantize(x)).norm(dim=-1) / x.norm(dim=-1)) ** 2
    assert ratio.mean() < 1 - 0.5 * 4.0**-bits


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(dim, bits):
    g = torch.Generator().manual_seed(bits * 1000 + dim)
    idx = torch.randint(0, 1 << bits, (2, 3, 7, dim), generator=g)
    # Include the extreme codes so every bit position is exercised.
    idx[0, 0, 0] = 0
    idx[0, 0, 1] = (1 << bits) - 1
    packed = pack_codes(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, 7, dim * bits // 8)
    assert packed.shape[-1] == packed_row_bytes(dim, bits) == dim * bits / 8  # 3 bits cost 3 bits
    assert torch.equal(unpack_codes(packed, bits, dim), idx)


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantize_codes_are_packed_rows(bits):
    q = TurboQuantizer(128, bits)
    out = q.quantize(torch.randn(4, 128))
    assert out["codes"].dtype == torch.uint8 and out["codes"].shape == (4, 128 * bits // 8)
    assert out["norms"].dtype == torch.float32 and out["norms"].shape == (4,)


@pytest.mark.parametrize("dim", DIMS + (8, 32))
def test_rotation_is_orthogonal(dim):
    rot = rotation_matrix(dim, seed=3).double()
    eye = torch.eye(dim, dtype=torch.float64)
    torch.testing.assert_close(rot @ rot.T, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(rot.T @ rot, eye, atol=1e-6, rtol=0)
    # Different seeds give different rotations; the same seed the same one.
    assert not torch.equal(rotation_matrix(dim, seed=3), rotation_matrix(dim, seed=4))
    assert torch.equal(rotation_matrix(dim, seed=3), rotation_matrix(dim, seed=3))


@pytest.mark.parametrize("dim", DIMS)
def test_rotated_coordinates_have_variance_one_over_d(dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(4000, dim, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)
    y = x @ rotation_matrix(dim).T
    assert abs(y.var().item() * dim - 1) < 0.05


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_symmetric_and_sorted(dim, bits):
    c, b = codebook(dim, bits)
    assert c.shape == (1 << bits,) and b.shape == ((1 << bits) - 1,)
    assert c.dtype == torch.float32 and b.dtype == torch.float32
    assert torch.all(c[1:] > c[:-1]) and torch.all(b[1:] > b[:-1])
    assert torch.equal(c, -c.flip(0))  # exactly symmetric: f is even
    # Boundaries are the midpoints between neighbouring centroids, inside [-1, 1].
    torch.testing.assert_close(b, 0.5 * (c[1:] + c[:-1]))
    assert c.abs().max() < 1


def test_codebook_one_bit_is_the_half_normal_mean():
    # b=1 at large d: centroids +-E|N(0, 1/d)| = +-sqrt(2 / (pi d)).
    c, _ = codebook(256, 1)
    torch.testing.assert_close(c[1], torch.tensor((2 / (torch.pi * 256)) ** 0.5), rtol=5e-3, atol=0)


@pytest.mark.parametrize("dim", (0, 7, 12, 100, -8, 64.0, "64"))
def test_invalid_dim_raises(dim):
    with pytest.raises(ValueError, match="dim"):
        TurboQuantizer(dim, 4)


@pytest.mark.parametrize("bits", (0, 9, -1, True, 2.5, "4"))
def test_invalid_bits_raises(bits):
    with pytest.raises(ValueError, match="bits"):
        TurboQuantizer(128, bits)
    with pytest.raises(ValueError, match="bits"):
        codebook(128, bits)


def test_wrong_last_dim_raises():
    with pytest.raises(ValueError, match="last dimension"):
        TurboQuantizer(128, 4).quantize(torch.randn(3, 64))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("dim", (64, 80))
def test_dequantize_keeps_shape_and_dtype(dtype, dim):
    x = torch.randn(2, 3, 5, dim).to(dtype)
    q = TurboQuantizer(dim, 3, norm_correction=True)
    qx = q.quantize(x)
    assert qx["codes"].shape == (2, 3, 5, dim * 3 // 8)
    assert qx["norms"].shape == (2, 3, 5)
    xh = q.dequantize(qx)
    assert xh.shape == x.shape and xh.dtype == dtype
    # And it is an approximation of x, not noise (3-bit MSE at these dims is ~0.03-0.04).
    rel = ((xh.float() - x.float()) ** 2).sum(-1) / (x.float() ** 2).sum(-1)
    assert rel.mean() < 0.06


@pytest.mark.parametrize("norm_correction", (False, True))
@pytest.mark.parametrize("bits", (1, 4, 8))
def test_zero_vector_round_trips_to_zero(norm_correction, bits):
    x = torch.zeros(3, 128)
    x[1] = torch.randn(128)
    q = TurboQuantizer(128, bits, norm_correction=norm_correction)
    qx = q.quantize(x)
    xh = q.dequantize(qx)
    assert torch.isfinite(qx["norms"]).all() and torch.isfinite(xh).all()
    assert torch.equal(xh[0], torch.zeros(128)) and torch.equal(xh[2], torch.zeros(128))
    assert xh[1].abs().sum() > 0


def test_determinism_same_seed_same_codes():
    x = torch.randn(64, 4, 96)
    a = TurboQuantizer(96, 3, seed=7, norm_correction=True).quantize(x)
    b = TurboQuantizer(96, 3, seed=7, norm_correction=True).quantize(x)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["norms"], b["norms"])
    # Rerunning the same quantizer is deterministic too.
    q = TurboQuantizer(128, 4, seed=11)
    y = torch.randn(32, 128)
    assert torch.equal(q.quantize(y)["codes"], q.quantize(y)["codes"])
    # A different seed rotates differently.
    c = TurboQuantizer(96, 3, seed=8, norm_correction=True).quantize(x)
    assert not torch.equal(a["codes"], c["codes"])


def test_dequantize_rotated_matches_dequantize():
    q = TurboQuantizer(128, 4, seed=2, norm_correction=True)
    x = torch.randn(10, 128)
    qx = q.quantize(x)
    rot, _, _ = q.tensors("cpu")
    torch.testing.assert_close(q.dequantize_rotated(qx["codes"], qx["norms"]) @ rot, q.dequantize(qx))
    # Rotation preserves norms, so the rotated-space vector already has ||x|| (norm correction).
    torch.testing.assert_close(q.dequantize_rotated(qx["codes"], qx["norms"]).norm(dim=-1), x.norm(dim=-1))
