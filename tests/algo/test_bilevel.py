"""spqr.algo.bilevel: second-level quantization of the per-row scales and zeros."""

from __future__ import annotations

import pytest
import torch

from spqr.algo.bilevel import (
    FP16_SAFE_ZERO,
    QuantizedStat,
    dequantize_stat,
    expand_groups,
    fit_group_stats,
    quantize_stat,
)
from spqr.algo.quantizer import fit_minmax
from tests.helpers import ref_second_level


def _stat_values(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.01 + 0.1 * torch.rand(rows, generator=g)


@pytest.mark.parametrize("qq_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,beta2", [(64, 16), (37, 16), (5, 16), (33, 8), (16, 1)])
def test_round_trip_error_within_half_second_level_step(qq_bits, rows, beta2):
    values = _stat_values(rows, seed=rows * 10 + qq_bits)
    stat = quantize_stat(values, qq_bits, beta2)
    n_groups = -(-rows // beta2)
    assert stat.values is None
    assert stat.codes.dtype == torch.uint8 and stat.codes.shape == (rows,)
    assert stat.second_scale.dtype == stat.second_zero.dtype == torch.float16
    assert stat.second_scale.shape == stat.second_zero.shape == (n_groups,)
    assert int(stat.codes.max()) <= 2**qq_bits - 1
    recon = dequantize_stat(stat, beta2)
    assert recon.dtype == torch.float32 and recon.shape == (rows,)
    step = expand_groups(stat.second_scale.float(), beta2, rows)
    # fp16 rounding of the second-level grid may push an end value a hair outside it
    assert bool(((recon - values).abs() <= step / 2 * 1.01 + 1e-6).all())
    assert torch.allclose(recon, ref_second_level(values, qq_bits, beta2), atol=1e-7)


@pytest.mark.parametrize("qq_bits", [2, 3])
def test_ragged_rows_equal_fitting_each_group_separately(qq_bits):
    rows, beta2 = 53, 16
    values = _stat_values(rows, seed=5) * 10 - 0.3
    whole = quantize_stat(values, qq_bits, beta2)
    for g, r0 in enumerate(range(0, rows, beta2)):
        part = values[r0:r0 + beta2]
        alone = quantize_stat(part, qq_bits, part.numel())  # one group, no padding
        assert torch.equal(whole.codes[r0:r0 + beta2], alone.codes)
        assert torch.equal(whole.second_scale[g:g + 1], alone.second_scale)
        assert torch.equal(whole.second_zero[g:g + 1], alone.second_zero)
        # and the group's grid is the plain min-max grid of its own members, rounded to fp16
        lo, hi = part.min().item(), part.max().item()
        assert whole.second_scale[g].item() == pytest.approx((hi - lo) / (2**qq_bits - 1), rel=1e-3)


def test_fp16_mode_stores_values_in_half_precision():
    values = _stat_values(30, seed=1) * 1000
    stat = quantize_stat(values, None, 16)
    assert stat.codes is None and stat.second_scale is None and stat.second_zero is None
    assert stat.values.dtype == torch.float16
    assert torch.equal(stat.values, values.half())
    recon = dequantize_stat(stat, 16)
    assert recon.dtype == torch.float32
    assert torch.equal(recon, values.half().float())


def test_constant_and_zero_statistics():
    """Degenerate second-level groups (all equal values, all zeros) still round-trip closely."""
    values = torch.cat([torch.full((16,), 0.25), torch.zeros(16), torch.full((7,), -3.0)])
    stat = quantize_stat(values, 3, 16)
    recon = dequantize_stat(stat, 16)
    assert torch.allclose(recon[:16], values[:16], rtol=1e-3)
    assert torch.allclose(recon[32:], values[32:], rtol=1e-3)
    assert bool((recon[16:32].abs() <= 2 / 7 / 2 + 1e-6).all())


def test_dequantize_stat_is_batched_over_leading_dims():
    beta2 = 8
    stats = [quantize_stat(_stat_values(21, seed=s), 3, beta2) for s in range(4)]
    batched = QuantizedStat(torch.stack([s.codes for s in stats]), torch.stack([s.second_scale for s in stats]),
                            torch.stack([s.second_zero for s in stats]), None)
    out = dequantize_stat(batched, beta2)
    assert out.shape == (4, 21)
    for i, s in enumerate(stats):
        assert torch.equal(out[i], dequantize_stat(s, beta2))


def test_expand_groups_matches_plain_repetition():
    per_group = torch.arange(12.0).view(3, 4)
    out = expand_groups(per_group, 5, 18)
    ref = torch.tensor([[per_group[r, c // 5].item() for c in range(18)] for r in range(3)])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("qq_bits", [None, 2, 3, 4])
@pytest.mark.parametrize("rows", [16, 37])
def test_fit_group_stats_returns_exactly_what_is_stored(qq_bits, rows):
    torch.manual_seed(rows)
    wbits, beta2 = 3, 16
    group = torch.randn(rows, 16) * torch.rand(rows, 1)
    stats = fit_group_stats(group, wbits, qq_bits, beta2)
    assert torch.equal(stats.scale, dequantize_stat(stats.stored_scale, beta2))
    assert torch.equal(stats.zero, dequantize_stat(stats.stored_zero, beta2))
    # first level: plain min-max grid of each row
    lo, hi = group.min(1).values, group.max(1).values
    s1 = (hi - lo) / (2**wbits - 1)
    z1 = -lo / s1
    if qq_bits is None:
        assert torch.equal(stats.stored_scale.values, s1.half())
        assert torch.allclose(stats.zero, z1.half().float(), atol=1e-3)
    else:
        assert torch.allclose(stats.scale, ref_second_level(s1, qq_bits, beta2), atol=1e-6)
        assert torch.allclose(stats.zero, ref_second_level(z1, qq_bits, beta2), atol=1e-5)


def test_fit_group_stats_fp16_keeps_zero_fp16_safe():
    group = torch.tensor([[5000.0, 5000.1, 5000.05], [-0.5, 0.5, 0.0]])
    stats = fit_group_stats(group, 4, None, 16)
    assert bool(torch.isfinite(stats.zero).all())
    assert bool((stats.zero.abs() <= FP16_SAFE_ZERO).all())
    s_free, z_free = fit_minmax(group, 4)
    assert abs(z_free[0].item()) > FP16_SAFE_ZERO  # would not have been fp16-safe unwidened
