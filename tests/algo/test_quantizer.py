"""spqr.algo.quantizer: the asymmetric min-max grid, against plain per-row reference computations."""

from __future__ import annotations

import pytest
import torch

from spqr.algo.quantizer import dequantize, fit_minmax, minmax_grid, quantize
from tests.helpers import ref_minmax_row


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fit_minmax_matches_per_row_reference(bits):
    torch.manual_seed(bits)
    x = torch.randn(13, 21) * torch.rand(13, 1) * 5 + torch.randn(13, 1)
    scale, zero = fit_minmax(x, bits)
    assert scale.shape == zero.shape == (13,)
    assert scale.dtype == zero.dtype == torch.float32
    for r in range(13):
        s_ref, z_ref = ref_minmax_row(x[r].tolist(), bits)
        assert scale[r].item() == pytest.approx(s_ref, rel=1e-6)
        assert zero[r].item() == pytest.approx(z_ref, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_in_range_and_error_within_half_step(bits):
    torch.manual_seed(100 + bits)
    maxq = 2**bits - 1
    x = torch.randn(17, 40) * 3 - 1
    scale, zero = fit_minmax(x, bits)
    codes = quantize(x, scale[:, None], zero[:, None], maxq)
    assert torch.equal(codes, codes.round()), "codes must be integers"
    assert int(codes.min()) >= 0 and int(codes.max()) <= maxq
    # both ends of every row are used: the grid spans the row exactly
    assert torch.equal(codes.amin(1), torch.zeros(17))
    assert torch.equal(codes.amax(1), torch.full((17,), float(maxq)))
    err = (dequantize(codes, scale[:, None], zero[:, None]) - x).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-4) + 1e-6).all())
    # values outside the fitted range are clamped to the end codes
    outside = torch.stack([x.amin(1) - 10, x.amax(1) + 10], dim=1)
    c_out = quantize(outside, scale[:, None], zero[:, None], maxq)
    assert torch.equal(c_out, torch.tensor([[0.0, maxq]] * 17))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_is_round_to_nearest_on_the_grid(bits):
    """The code is the nearest grid level: no other level of [0, maxq] is strictly closer."""
    torch.manual_seed(7)
    maxq = 2**bits - 1
    x = torch.randn(5, 30)
    scale, zero = fit_minmax(x, bits)
    codes = quantize(x, scale[:, None], zero[:, None], maxq)
    levels = (torch.arange(maxq + 1).float()[None, None, :] - zero[:, None, None]) * scale[:, None, None]
    dist = (levels - x[:, :, None]).abs()
    chosen = dist.gather(2, codes.long()[:, :, None])[:, :, 0]
    assert bool((chosen <= dist.min(2).values + 1e-6).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_zero_row_is_reconstructed_exactly(bits):
    """[0, 0] gets the grid of [-1, 1]; an all-zero row must still decode to exactly zero.

    (Reconstructing a row of zeros as ±scale/2 = ±1/maxq, e.g. ±0.33 at 2 bits, would put large
    non-zero weights where the matrix has none.)
    """
    x = torch.zeros(2, 16)
    scale, zero = fit_minmax(x, bits)
    maxq = 2**bits - 1
    assert bool((scale > 0).all())
    codes = quantize(x, scale[:, None], zero[:, None], maxq)
    assert int(codes.min()) >= 0 and int(codes.max()) <= maxq
    recon = dequantize(codes, scale[:, None], zero[:, None])
    assert torch.equal(recon, torch.zeros_like(x)), f"all-zero row decodes to {recon[0, 0].item()}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("c", [2.5, -0.75, 1e-3, -300.0])
def test_constant_rows(bits, c):
    """A constant c gets the range [min(c,0), max(c,0)]: c itself is an end point and decodes (almost) exactly."""
    maxq = 2**bits - 1
    x = torch.full((3, 9), c)
    scale, zero = fit_minmax(x, bits)
    s_ref, z_ref = ref_minmax_row([c] * 9, bits)
    assert torch.allclose(scale, torch.full((3,), s_ref), rtol=1e-6)
    assert torch.allclose(zero, torch.full((3,), z_ref), rtol=1e-6, atol=1e-6)
    assert torch.allclose(scale, torch.full((3,), abs(c) / maxq), rtol=1e-6)
    codes = quantize(x, scale[:, None], zero[:, None], maxq)
    assert torch.equal(codes, torch.full_like(x, float(maxq) if c > 0 else 0.0))
    recon = dequantize(codes, scale[:, None], zero[:, None])
    assert torch.allclose(recon, x, rtol=1e-5)
    # zero also decodes within half a step of 0 on that grid
    z_code = quantize(torch.zeros(3, 1), scale[:, None], zero[:, None], maxq)
    assert bool((dequantize(z_code, scale[:, None], zero[:, None]).abs() <= scale[:, None] / 2 + 1e-6).all())


def test_minmax_grid_is_elementwise_over_any_shape():
    torch.manual_seed(3)
    lo = -torch.rand(4, 5)
    hi = torch.rand(4, 5)
    scale, zero = minmax_grid(lo, hi, 3)
    assert scale.shape == zero.shape == (4, 5)
    assert torch.allclose(scale, (hi - lo) / 7)
    assert torch.allclose(zero, -lo / ((hi - lo) / 7))
    # the ends are exactly representable: code 0 -> lo, code maxq -> hi
    assert torch.allclose(dequantize(torch.zeros(4, 5), scale, zero), lo, atol=1e-6)
    assert torch.allclose(dequantize(torch.full((4, 5), 7.0), scale, zero), hi, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_max_abs_zero_widens_ranges_far_from_zero(bits):
    maxq = 2**bits - 1
    # rows: far above 0, far below 0, ordinary (straddling 0), narrow but close to 0
    x = torch.tensor([
        [1000.0, 1000.01, 1000.005],
        [-1000.01, -1000.0, -1000.004],
        [-1.0, 0.5, 1.0],
        [0.1, 0.2, 0.15],
    ])
    s_free, z_free = fit_minmax(x, bits)
    assert abs(z_free[0].item()) > 1e5 and abs(z_free[1].item()) > 1e5
    scale, zero = fit_minmax(x, bits, max_abs_zero=2.0**15)
    # widened rows include 0 in their range: [0, max] and [min, 0]
    assert scale[0].item() == pytest.approx(1000.01 / maxq, rel=1e-6)
    assert zero[0].item() == pytest.approx(0.0, abs=1e-6)
    assert scale[1].item() == pytest.approx(1000.01 / maxq, rel=1e-6)
    assert zero[1].item() == pytest.approx(maxq, rel=1e-6)
    # rows whose zero is already small are untouched
    assert torch.equal(scale[2:], s_free[2:]) and torch.equal(zero[2:], z_free[2:])
    assert bool((zero.abs() <= 2.0**15).all())
    # values still decode within half a (widened) step
    codes = quantize(x, scale[:, None], zero[:, None], maxq)
    err = (dequantize(codes, scale[:, None], zero[:, None]) - x).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-4)).all())


def test_quantize_clamps_tiny_scales_instead_of_dividing_by_zero():
    x = torch.tensor([[0.0, 1e-12, 2e-12]])
    codes = quantize(x, torch.tensor([[0.0]]), torch.tensor([[0.0]]), 15)
    assert bool(torch.isfinite(codes).all())
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
