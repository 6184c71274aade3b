"""TurboQuant_prod (mode="prod"): the QJL inner-product estimator of the reference codec.

The paper's Theorem 2, for b total bits ((b-1)-bit mse codes + 1-bit QJL), unit x and any y:
    unbiased:   E <y, x~> = <y, x>                          (expectation over the random S and Pi)
    distortion: E |<y, x> - <y, x~>|^2 <= sqrt(3) pi^2 / d * 4^-b * ||y||^2
and, on the way (the QJL lemma), the tighter E|err|^2 <= pi / (2d) * ||y||^2 * E||r||^2.
The paper's refined values at b = 2, 3, 4: 0.56/d, 0.18/d, 0.047/d (for ||y|| = 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from tq_hf.codec import TurboQuantizer, qjl_matrix, rotation_matrix

D = 128
N_SEEDS = 60  # independent draws of (Pi, S)
N_PAIRS = 128  # random pairs per draw
RHO = 0.5  # <q, x> of every pair: a fixed true value, so a shrinking (biased) estimator shows


def _pairs(gen, n, d=D, rho=RHO):
    """Unit x `[n, d]` and unit q `[n, d]` with <q, x> = rho exactly."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x /= x.norm(dim=-1, keepdim=True)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z -= (z * x).sum(-1, keepdim=True) * x
    z /= z.norm(dim=-1, keepdim=True)
    return x.float(), (rho * x + math.sqrt(1 - rho * rho) * z).float()


def _errors(bits, mode, norm_correction=False, d=D, n_seeds=N_SEEDS):
    """Estimation errors over N_SEEDS quantizers x N_PAIRS pairs, and the residual norms^2 (prod)."""
    gen = torch.Generator().manual_seed(100 + bits)
    errs, r2 = [], []
    for seed in range(n_seeds):
        x, q = _pairs(gen, N_PAIRS, d)
        qz = TurboQuantizer(d, bits, seed=seed, norm_correction=norm_correction, mode=mode)
        cx = qz.quantize(x)
        errs.append(qz.inner_product(q, cx).double() - RHO)
        if mode == "prod":
            r2.append(cx["residual_norms"].double() ** 2)
    return torch.cat(errs), (torch.cat(r2) if r2 else None)


@pytest.fixture(scope="module")
def prod_errors():
    return {b: _errors(b, "prod") for b in (2, 3, 4)}


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_prod_is_unbiased(prod_errors, bits):
    err, _ = prod_errors[bits]
    se = err.std().item() / math.sqrt(err.numel())
    print(f"b={bits}: mean error {err.mean().item():+.2e} (standard error {se:.1e})")
    assert abs(err.mean().item()) < 4 * se
    # The mse quantizer with the same b-1 bits is biased (E x_mse is a shrunk x): the test has the
    # power to see a bias of that size.
    mse_err, _ = _errors(bits - 1, "mse", n_seeds=10)
    assert mse_err.mean().item() < -20 * se


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_prod_variance_within_paper_bound(prod_errors, bits):
    err, r2 = prod_errors[bits]
    var = (err**2).mean().item()  # ||q|| = ||x|| = 1
    bound = math.sqrt(3) * math.pi**2 / D * 4.0**-bits
    qjl_bound = math.pi / (2 * D) * r2.mean().item()
    print(f"b={bits}: d*E err^2 = {var * D:.4f}  (QJL lemma {qjl_bound * D:.4f}, Theorem 2 {bound * D:.4f})")
    assert var <= bound
    # 3 % allowance for sampling noise of a mean of ~8000 squared errors.
    assert var <= 1.03 * qjl_bound
    # Not vacuous: the estimator's noise is of the size the theory predicts (within 25 %).
    assert var >= 0.75 * qjl_bound


def test_prod_matches_paper_refined_values(prod_errors):
    # Paper: D_prod ~ 0.56/d, 0.18/d at b = 2, 3 (b = 4's 0.047/d assumes D_mse(3) = 0.03; the exact
    # codebook gives 0.034, hence pi/2 * 0.034 = 0.053).
    for bits, paper in ((2, 0.56), (3, 0.18), (4, 0.053)):
        var = (prod_errors[bits][0] ** 2).mean().item() * D
        assert abs(var - paper) <= 0.1 * paper, (bits, var)


def test_prod_unbiased_with_norm_correction_and_any_norm():
    # The QJL term corrects whatever residual the mse part leaves, norm correction included; the
    # estimator is linear in ||x||.
    err, _ = _errors(3, "prod", norm_correction=True, n_seeds=20)
    assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(err.numel())
    qz = TurboQuantizer(D, 3, seed=1, mode="prod")
    x, q = _pairs(torch.Generator().manual_seed(0), 16)
    torch.testing.assert_close(qz.inner_product(q, qz.quantize(7.5 * x)), 7.5 * qz.inner_product(q, qz.quantize(x)),
                               rtol=1e-4, atol=1e-4)


def test_prod_quantize_fields_and_dequantize_is_mse_part():
    qz = TurboQuantizer(D, 4, seed=3, mode="prod")
    assert qz.bits == 4 and qz.mse_bits == 3
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    cx = qz.quantize(x)
    assert cx["codes"].shape == (2, 5, D * 3 // 8) and cx["codes"].dtype == torch.uint8
    assert cx["qjl"].shape == (2, 5, D // 8) and cx["qjl"].dtype == torch.uint8
    assert cx["norms"].shape == cx["residual_norms"].shape == (2, 5)
    assert cx["residual_norms"].dtype == torch.float32
    # dequantize returns exactly the 3-bit mse reconstruction (same seed), in x's dtype.
    mse = TurboQuantizer(D, 3, seed=3)
    xh = qz.dequantize(cx)
    assert xh.dtype == torch.bfloat16 and torch.equal(xh, mse.dequantize(mse.quantize(x)))
    torch.testing.assert_close(cx["residual_norms"], (x.float() - mse.dequantize(mse.quantize(x.float()))).norm(dim=-1))
    # The sketch is sign(S r): recompute it from the public pieces.
    r = x.float() - mse.dequantize(mse.quantize(x.float()))
    from tq_hf.codec import unpack_codes

    signs = unpack_codes(cx["qjl"], 1, D).bool()
    assert torch.equal(signs, (r @ qjl_matrix(D, 3).T) >= 0)


def test_inner_product_shapes_broadcast():
    qz = TurboQuantizer(64, 3, seed=0, mode="prod")
    x = torch.randn(7, 64)
    q = torch.randn(4, 64)
    cx = qz.quantize(x)
    assert qz.inner_product(torch.randn(7, 64), cx).shape == (7,)
    allpairs = qz.inner_product(q[:, None], cx)
    assert allpairs.shape == (4, 7) and allpairs.dtype == torch.float32
    torch.testing.assert_close(allpairs[2], qz.inner_product(q[2].expand(7, 64), cx))
    # mse mode: <q, dequantize(x)>.
    m = TurboQuantizer(64, 3, seed=0)
    cm = m.quantize(x)
    torch.testing.assert_close(m.inner_product(q[:, None], cm), q @ m.dequantize(cm).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last dimension"):
        qz.inner_product(torch.randn(3, 32), cx)


def test_prod_needs_two_bits_and_valid_mode():
    with pytest.raises(ValueError, match="bits >= 2"):
        TurboQuantizer(D, 1, mode="prod")
    with pytest.raises(ValueError, match="mode"):
        TurboQuantizer(D, 4, mode="qjl")
    assert TurboQuantizer(D, 4).mode == "mse"  # default unchanged


def test_qjl_matrix_seeded_and_independent_of_rotation():
    s = qjl_matrix(96, seed=5)
    assert s.shape == (96, 96) and torch.equal(s, qjl_matrix(96, seed=5))
    assert not torch.equal(s, qjl_matrix(96, seed=6))
    assert abs(s.var().item() - 1) < 0.05 and abs(s.mean().item()) < 0.02
    # Not the rotation (nor a multiple of it): rows have norm ~ sqrt(d), not 1.
    assert not torch.allclose(s / s[0].norm(), rotation_matrix(96, seed=5))


@pytest.mark.parametrize("dim", (64, 80, 96))
def test_prod_other_dims_finite_and_zero_vector(dim):
    qz = TurboQuantizer(dim, 2, seed=0, mode="prod")
    x = torch.randn(4, dim)
    x[0] = 0
    cx = qz.quantize(x)
    est = qz.inner_product(torch.randn(4, dim), cx)
    assert torch.isfinite(est).all() and est[0] == 0
