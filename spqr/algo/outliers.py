"""The Hessian-aware outlier criterion of SpQR (§3.3).

A weight's sensitivity is its quantization error weighted by the inverse Hessian:
(w - q(w))² / [H⁻¹]ᵢᵢ, with [H⁻¹]ᵢᵢ the squared diagonal of the Cholesky factor of H⁻¹ used by
the GPTQ sweep. Outliers are the weights whose sensitivity exceeds τ times the layer's typical
sensitivity. Before a group's statistics are fitted, the leave-one-out criterion finds the
weights whose exclusion lowers the group's error most, so outliers don't stretch the grid.
"""

from __future__ import annotations

import torch

from spqr.algo.quantizer import dequantize, fit_minmax, quantize


def layer_sensitivity_scale(weight: torch.Tensor, hinv_cho_diag: torch.Tensor) -> torch.Tensor:
    """Typical sensitivity of a layer: mean over columns of Var_rows(W[:, j]) / d_j².

    weight [rows, cols] fp32 (permuted like the sweep), hinv_cho_diag [cols]. Returns a 0-d tensor.
    """
    return (weight.var(dim=0) / hinv_cho_diag.square()).mean()


def leave_one_out_gain(group_weight: torch.Tensor, group_hinv_cho_diag: torch.Tensor, bits: int) -> torch.Tensor:
    """How much the group's Hessian-weighted squared error drops when each weight is left out.

    For every weight, the row's grid is refitted on the other weights of the group; the left-out
    weight itself costs nothing (it would be kept in fp16). group_weight [rows, g] fp32,
    group_hinv_cho_diag [g]. Returns the gain [rows, g] (baseline error minus leave-one-out error).
    """
    rows, g = group_weight.shape
    if g < 2:
        return torch.zeros_like(group_weight)
    maxq = 2**bits - 1
    # loo_index[k] lists the g-1 column indices other than k.
    index = torch.arange(g, device=group_weight.device)
    loo_index = index[1:] - (index[:, None] >= index[1:]).to(index.dtype)  # [g, g-1]
    loo_weight = group_weight[:, loo_index]  # [rows, g, g-1]
    flat = loo_weight.reshape(rows * g, g - 1)
    scale, zero = fit_minmax(flat, bits)
    loo_recon = dequantize(quantize(flat, scale[:, None], zero[:, None], maxq), scale[:, None], zero[:, None])
    loo_error = ((loo_recon.view_as(loo_weight) - loo_weight) / group_hinv_cho_diag[loo_index]).square().sum(-1)

    scale, zero = fit_minmax(group_weight, bits)
    recon = dequantize(quantize(group_weight, scale[:, None], zero[:, None], maxq), scale[:, None], zero[:, None])
    base_error = ((recon - group_weight) / group_hinv_cho_diag).square().sum(dim=1, keepdim=True)
    return base_error - loo_error
