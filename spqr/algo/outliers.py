"""The Hessian-aware outlier criterion of SpQR (§3.3).

A weight's sensitivity is its quantization error weighted by the inverse Hessian:
(w - q(w))² / [H⁻¹]ᵢᵢ, with [H⁻¹]ᵢᵢ the squared diagonal of the Cholesky factor of H⁻¹ used by
the GPTQ sweep. Outliers are the weights whose sensitivity exceeds τ times the layer's typical
sensitivity. Before a group's statistics are fitted, the leave-one-out criterion finds the
weights whose exclusion lowers the group's error most, so outliers don't stretch the grid.
"""

from __future__ import annotations

import torch

from spqr.algo.quantizer import dequantize, minmax_grid, quantize


def layer_sensitivity_scale(weight: torch.Tensor, hinv_cho_diag: torch.Tensor) -> torch.Tensor:
    """Typical sensitivity of a layer: mean over columns of Var_rows(W[:, j]) / d_j².

    weight [rows, cols] fp32 (permuted like the sweep), hinv_cho_diag [cols]. Returns a 0-d tensor.
    """
    return (weight.var(dim=0) / hinv_cho_diag.square()).mean()


def _grid_error(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int,
                inv_d: torch.Tensor) -> torch.Tensor:
    """Per-element Hessian-weighted squared error [rows, g] of x on the min-max grid of [xmin, xmax] [rows]."""
    scale, zero = minmax_grid(xmin, xmax, bits)
    scale, zero = scale[:, None], zero[:, None]
    recon = dequantize(quantize(x, scale, zero, 2**bits - 1), scale, zero)
    return ((recon - x) * inv_d).square()


def leave_one_out_gain(group_weight: torch.Tensor, group_hinv_cho_diag: torch.Tensor, bits: int) -> torch.Tensor:
    """How much the group's Hessian-weighted squared error drops when each weight is left out.

    For every weight, the row's min-max grid is refitted on the other weights of the group and
    the left-out weight costs nothing (it would be kept in fp16). group_weight [rows, g] fp32,
    group_hinv_cho_diag [g]. Returns the gain [rows, g] = baseline error - leave-one-out error.

    Leaving out a weight changes the grid only if it is the row's (first) minimum or maximum,
    so the gain is that weight's own error, except at those two positions, where the grid is
    refitted on the second-smallest / second-largest value: O(rows·g) instead of O(rows·g²).
    """
    rows, g = group_weight.shape
    if g < 2:
        return torch.zeros_like(group_weight)
    inv_d = 1.0 / group_hinv_cho_diag
    low = group_weight.topk(2, dim=1, largest=False)
    high = group_weight.topk(2, dim=1, largest=True)
    xmin, xmin2, argmin = low.values[:, 0], low.values[:, 1], low.indices[:, :1]
    xmax, xmax2, argmax = high.values[:, 0], high.values[:, 1], high.indices[:, :1]

    base = _grid_error(group_weight, xmin, xmax, bits, inv_d)
    gain = base.clone()  # grid unchanged: the gain is the left-out weight's own error
    base_total = base.sum(dim=1, keepdim=True)
    for left_out, lo, hi in ((argmin, xmin2, xmax), (argmax, xmin, xmax2)):
        error = _grid_error(group_weight, lo, hi, bits, inv_d)
        error.scatter_(1, left_out, 0.0)
        gain.scatter_(1, left_out, base_total - error.sum(dim=1, keepdim=True))
    return gain
