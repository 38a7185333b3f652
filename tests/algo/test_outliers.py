"""spqr.algo.outliers: the leave-one-out gain (vs a plain O(g²) refit) and the layer sensitivity scale."""

from __future__ import annotations

import pytest
import torch

from spqr.algo.outliers import layer_sensitivity_scale, leave_one_out_gain
from spqr.algo.quantizer import minmax_grid


def _ref_grid_error(values: list[float], fit_on: list[float], bits: int, inv_d: list[float]) -> list[float]:
    """Per-value Hessian-weighted squared error of `values` on the min-max grid fitted to `fit_on` (float32).

    The grid itself (including its degenerate cases) is spqr's `minmax_grid`, tested on its own in
    test_quantizer; what is checked here is the leave-one-out logic.
    """
    maxq = 2**bits - 1
    scale, zero = minmax_grid(torch.tensor([min(fit_on)]), torch.tensor([max(fit_on)]), bits)
    x = torch.tensor(values)
    recon = (torch.clamp(torch.round(x / scale + zero), 0, maxq) - zero) * scale
    return (((recon - x) * torch.tensor(inv_d)) ** 2).tolist()


def ref_leave_one_out_gain(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    rows, g = w.shape
    inv_d = (1.0 / d).tolist()
    out = torch.zeros(rows, g, dtype=torch.float64)
    for r in range(rows):
        row = w[r].tolist()
        base = sum(_ref_grid_error(row, row, bits, inv_d))
        for k in range(g):
            others = row[:k] + row[k + 1:]
            inv_others = inv_d[:k] + inv_d[k + 1:]
            out[r, k] = base - sum(_ref_grid_error(others, others, bits, inv_others))
    return out


def _check(w: torch.Tensor, d: torch.Tensor, bits: int) -> None:
    gain = leave_one_out_gain(w, d, bits)
    assert gain.shape == w.shape
    ref = ref_leave_one_out_gain(w, d, bits)
    # absolute tolerance relative to each row's total error (the gain is a difference of sums)
    scale = torch.stack([torch.tensor(_ref_grid_error(w[r].tolist(), w[r].tolist(), bits, (1 / d).tolist())).sum()
                         for r in range(w.shape[0])]).double()[:, None]
    tol = 1e-5 * (ref.abs() + scale) + 1e-12
    assert bool(((gain.double() - ref).abs() <= tol).all()), (gain, ref)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [2, 3, 8, 16])
def test_gain_matches_quadratic_reference_random(bits, g):
    gen = torch.Generator().manual_seed(bits * 100 + g)
    w = torch.randn(6, g, generator=gen)
    w[0, 0] = 8.0  # a clear outlier
    d = 0.5 + torch.rand(g, generator=gen)
    _check(w, d, bits)


def test_gain_with_ties_constant_rows_and_zeros():
    w = torch.tensor([
        [-1.0, -1.0, 0.5, 2.0, 2.0, 0.1],    # tied minimum and tied maximum
        [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],      # constant
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],      # all zero
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],      # one non-zero
        [5.0, -5.0, 0.0, 0.0, 1.0, -1.0],    # symmetric
        [0.2, 0.2, 0.2, 0.2, 0.2, -4.0],     # unique minimum among ties
    ])
    d = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.8, 1.3])
    for bits in (2, 3):
        _check(w, d, bits)


def test_gain_g2_and_g1():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.5], [0.0, 3.0]])
    d = torch.tensor([0.7, 1.1])
    _check(w, d, 3)
    single = leave_one_out_gain(torch.randn(4, 1), torch.ones(1), 3)
    assert torch.equal(single, torch.zeros(4, 1))


def test_outlier_has_the_largest_gain():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=gen) * 0.1
    cols = torch.randint(0, 16, (8,), generator=gen)
    w[torch.arange(8), cols] = 5.0
    gain = leave_one_out_gain(w, torch.ones(16), 3)
    assert torch.equal(gain.argmax(1), cols)


def test_layer_sensitivity_scale_formula():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(9, 7, generator=gen) * torch.rand(7, generator=gen)
    d = 0.3 + torch.rand(7, generator=gen)
    total = 0.0
    for j in range(7):
        col = w[:, j].tolist()
        mean = sum(col) / len(col)
        var = sum((v - mean) ** 2 for v in col) / (len(col) - 1)  # unbiased, as torch.var
        total += var / d[j].item() ** 2
    out = layer_sensitivity_scale(w, d)
    assert out.ndim == 0
    assert out.item() == pytest.approx(total / 7, rel=1e-5)
