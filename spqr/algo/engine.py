"""The SpQR sweep: GPTQ error feedback + small-group bilevel statistics + sparse outliers.

`quantize_weights` compresses one or more weight matrices that read the same input (and so
share one Hessian, e.g. q/k/v projections) in a single sweep over the input columns: one
column loop serves all of them, which is most of what makes this engine fast. Everything here
is pure tensor code on fp32 matrices; nothing knows about models or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spqr.algo.bilevel import QuantizedStat, fit_group_stats
from spqr.algo.outliers import layer_sensitivity_scale, leave_one_out_gain
from spqr.algo.quantizer import dequantize, quantize
from spqr.config import QuantConfig


class HessianError(RuntimeError):
    """The Hessian could not be inverted even after extra damping."""


@dataclass
class QuantizedWeight:
    """One compressed weight matrix W [out, in], as the engine produced it.

    codes:         uint8 [out, in], weight codes with columns in sweep (permuted) order.
    scale, zero:   QuantizedStat batched over column groups: codes [n_groups, out] and
                   second-level fp16 [n_groups, ceil(out/beta2)], or fp16 values [n_groups, out].
    perm:          int64 [in], sweep order of the input columns (None for identity).
    outlier_mask:  bool [out, in], permuted columns.
    outlier_delta: fp16 [out, in], permuted columns: outlier value minus its dense reconstruction
                   (zero elsewhere); dense + delta restores the outlier to fp16 precision of the delta.
    weight:        fp32 [out, in], original column order: exactly what the stored form decodes to.
    relative_error: ‖(W - Ŵ)X‖² / ‖WX‖² estimated through H (0 when no Hessian was given).
    """

    codes: torch.Tensor
    scale: QuantizedStat
    zero: QuantizedStat
    perm: torch.Tensor | None
    outlier_mask: torch.Tensor
    outlier_delta: torch.Tensor
    weight: torch.Tensor
    relative_error: float

    @property
    def outlier_count(self) -> int:
        return int(self.outlier_mask.sum())


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float, max_retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), dampening H by percdamp·mean(diag H).

    hessian [n, n] fp32, already cleaned of dead columns. If the factorization fails the damping
    is multiplied by 10 and retried; after max_retries a HessianError is raised.
    """
    diag_mean = hessian.diagonal().abs().mean()
    damp = percdamp
    for _ in range(max_retries + 1):
        damped = hessian.clone()  # H + damp·mean·I, without materializing the identity (memory)
        damped.diagonal().add_(damp * diag_mean)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
        damp = max(damp * 10, 1e-6)
    raise HessianError(
        f"the Hessian is not positive definite even with damping {damp / 10:g}·mean(diag H); "
        "the calibration activations may contain NaN/Inf or be degenerate"
    )


def quantize_weights(weights: list[torch.Tensor], hessian: torch.Tensor | None,
                     config: QuantConfig) -> list[QuantizedWeight]:
    """Quantize matrices W_i [out_i, in] that share the Hessian H [in, in] of their common input.

    hessian may be None only when config.needs_hessian is False (plain RTN).
    Returns one QuantizedWeight per input matrix, in order.
    """
    if hessian is None and config.needs_hessian:
        raise ValueError("this configuration needs a Hessian (error feedback, outliers or act_order)")
    in_features = weights[0].shape[1]
    if any(w.ndim != 2 or w.shape[1] != in_features for w in weights):
        raise ValueError(f"matrices sharing a Hessian must all have {in_features} input columns: "
                         f"{[tuple(w.shape) for w in weights]}")

    # Pad each matrix's rows to a multiple of beta2 (edge rows repeated) so that second-level
    # groups never straddle two matrices; padded rows are dropped at the end.
    out_sizes = [w.shape[0] for w in weights]
    padded_sizes = [-(-n // config.beta2) * config.beta2 for n in out_sizes]
    weight = torch.cat([
        F.pad(w.detach().float()[None], (0, 0, 0, p - n), mode="replicate")[0] if p > n else w.detach().float()
        for w, n, p in zip(weights, out_sizes, padded_sizes)
    ])

    perm = None
    if config.perm == "act_order":
        assert hessian is not None
        perm = torch.argsort(hessian.diagonal(), descending=True, stable=True)
        weight = weight[:, perm]

    if hessian is not None:
        H = hessian.detach().float().clone() if perm is None else hessian.detach().float()[perm][:, perm]
        dead = H.diagonal() == 0
        H[dead, dead] = 1.0
        weight[:, dead] = 0.0
        hinv_cho = inverse_hessian_cholesky(H, config.percdamp)
        d = hinv_cho.diagonal()
    else:
        H = None
        hinv_cho = None
        d = torch.ones(in_features)

    thresholds = _row_thresholds(weight, d, out_sizes, padded_sizes, config)
    codes, recon, outlier_mask, outlier_delta, scale_stats, zero_stats = _sweep(weight, hinv_cho, d, thresholds, config)

    results = []
    start = 0
    for n, p in zip(out_sizes, padded_sizes):
        rows = slice(start, start + n)
        g_rows = slice(start // config.beta2, start // config.beta2 + -(-n // config.beta2))
        relative_error = 0.0
        if H is not None:
            diff = weight[rows] - recon[rows]
            reference = ((weight[rows] @ H) * weight[rows]).sum().clamp_min(1e-30)
            relative_error = float(((diff @ H) * diff).sum() / reference)
        w_hat = recon[rows]
        if perm is not None:
            w_hat = w_hat[:, torch.argsort(perm)]
        results.append(QuantizedWeight(
            codes=codes[rows].to(torch.uint8).contiguous(),
            scale=_slice_stat(scale_stats, rows, g_rows),
            zero=_slice_stat(zero_stats, rows, g_rows),
            perm=perm,
            outlier_mask=outlier_mask[rows].contiguous(),
            outlier_delta=outlier_delta[rows].contiguous(),
            weight=w_hat.contiguous(),
            relative_error=relative_error,
        ))
        start += p
    return results


def _row_thresholds(weight: torch.Tensor, d: torch.Tensor, out_sizes: list[int], padded_sizes: list[int],
                    config: QuantConfig) -> torch.Tensor:
    """τ · (typical sensitivity of the matrix each row belongs to), one value per (padded) row."""
    if not config.has_outliers:
        return torch.full((weight.shape[0],), math.inf)
    parts = []
    start = 0
    for n, p in zip(out_sizes, padded_sizes):
        scale = layer_sensitivity_scale(weight[start:start + n], d) if n > 1 else torch.tensor(math.inf)
        parts.append((config.outlier_threshold * scale).expand(p))
        start += p
    return torch.cat(parts)


def _sweep(weight: torch.Tensor, hinv_cho: torch.Tensor | None, d: torch.Tensor, thresholds: torch.Tensor,
           config: QuantConfig):
    """Column sweep with lazy block updates over weight [rows, cols] (fp32; left unchanged).

    Works on a transposed copy, so that each column is a contiguous vector and the error
    feedback updates the copy.
    Returns codes, reconstruction, outlier mask and deltas [rows, cols], and stacked statistics.
    """
    weight_t = weight.T.contiguous()
    cols, rows = weight_t.shape
    maxq = 2**config.wbits - 1
    feedback = config.error_feedback and hinv_cho is not None
    codes_t = torch.empty(cols, rows)
    recon_t = torch.empty(cols, rows)
    outlier_t = torch.zeros(cols, rows, dtype=torch.bool)
    delta_t = torch.zeros(cols, rows, dtype=torch.float16)
    errors_t = torch.zeros(min(config.sweep_block, cols), rows)  # a blocksize past the width: one block
    d_list = d.tolist()
    scale_stats: list[QuantizedStat] = []
    zero_stats: list[QuantizedStat] = []
    thr_col = thresholds[:, None]

    for b0 in range(0, cols, config.sweep_block):
        b1 = min(b0 + config.sweep_block, cols)
        for g0 in range(b0, b1, config.beta1):
            g1 = min(g0 + config.beta1, cols)
            group = weight_t[g0:g1].T  # [rows, g]
            if config.has_outliers:
                # Fit the grid without the weights that are likely outliers (leave-one-out gain).
                likely = leave_one_out_gain(group, d[g0:g1], config.wbits) > thr_col
                keep = (~likely).float()
                mean_kept = (group * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                group = torch.where(likely, mean_kept, group)
            stats = fit_group_stats(group, config.wbits, config.qq_bits, config.beta2, config.plain_stats_dtype)
            scale_stats.append(stats.stored_scale)
            zero_stats.append(stats.stored_zero)
            scale, zero = stats.scale, stats.zero
            for j in range(g0, g1):
                w = weight_t[j]
                q = dequantize(quantize(w, scale, zero, maxq, out=codes_t[j]), scale, zero, out=recon_t[j])
                diff = w - q
                err = torch.div(diff, d_list[j], out=errors_t[j - b0])
                if config.has_outliers:
                    is_outlier = torch.gt(err.square(), thresholds, out=outlier_t[j])
                    delta = delta_t[j]
                    diff.mul_(is_outlier)
                    delta.copy_(diff)  # the stored (fp16) difference
                    q += delta
                    torch.div(w - q, d_list[j], out=err)
                if feedback:
                    weight_t[j + 1:b1].addr_(hinv_cho[j, j + 1:b1], err, alpha=-1)
        if feedback and b1 < cols:
            weight_t[b1:].addmm_(hinv_cho[b0:b1, b1:].T, errors_t[:b1 - b0], alpha=-1)
    return (codes_t.T, recon_t.T, outlier_t.T, delta_t.T,
            _stack_stats(scale_stats), _stack_stats(zero_stats))


def _stack_stats(stats: list[QuantizedStat]) -> QuantizedStat:
    """Stack per-group statistics into one QuantizedStat with a leading [n_groups] dim."""
    def stack(name: str) -> torch.Tensor | None:
        values = [getattr(s, name) for s in stats]
        return None if values[0] is None else torch.stack(values)
    return QuantizedStat(stack("codes"), stack("second_scale"), stack("second_zero"), stack("values"))


def _slice_stat(stat: QuantizedStat, rows: slice, group_rows: slice) -> QuantizedStat:
    def cut(t: torch.Tensor | None, s: slice) -> torch.Tensor | None:
        return None if t is None else t[:, s].contiguous()
    return QuantizedStat(cut(stat.codes, rows), cut(stat.second_scale, group_rows),
                         cut(stat.second_zero, group_rows), cut(stat.values, rows))
