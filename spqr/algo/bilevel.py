"""Bilevel statistics: each group's scale and zero, themselves quantized (SpQR §3.2).

For one group of β1 input columns, every output row gets a first-level (scale, zero) from a
min-max fit. Those per-row values are then quantized with `qq_bits` codes in groups of β2
consecutive rows, each such group with its own fp16 second-level (scale, zero). With
qq_bits=None the first-level statistics are simply stored in fp16 (the GPTQ/RTN grid), or in fp32
(what the reference implementation's simulated GPTQ/RTN baselines compute with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spqr.algo.quantizer import dequantize, fit_minmax, quantize

# |zero| beyond this would lose precision or overflow in fp16; such ranges are widened to include 0.
FP16_SAFE_ZERO = 2.0**15


@dataclass
class QuantizedStat:
    """One statistic (the scales or the zeros of one column group) for `rows` rows.

    codes:        uint8 [rows] codes of `qq_bits` bits, or None when stored as plain values.
    second_scale: fp16 [ceil(rows / beta2)] second-level scales (None for plain values).
    second_zero:  fp16 [ceil(rows / beta2)] second-level zeros (None for plain values).
    values:       fp16 or fp32 [rows] when stored without second-level quantization, else None.
    """

    codes: torch.Tensor | None
    second_scale: torch.Tensor | None
    second_zero: torch.Tensor | None
    values: torch.Tensor | None


def quantize_stat(values: torch.Tensor, qq_bits: int | None, beta2: int,
                  plain_dtype: torch.dtype = torch.float16) -> QuantizedStat:
    """Store per-row statistic values [rows] (fp32) with qq_bits codes in groups of beta2 rows, or (qq_bits
    None) as plain values of plain_dtype (fp16 or fp32)."""
    if qq_bits is None:
        return QuantizedStat(None, None, None, values.to(plain_dtype))
    rows = values.shape[0]
    n_groups = -(-rows // beta2)
    # Edge-replicate a ragged last group: a repeated value changes neither its min nor its max.
    padded = F.pad(values[None, None], (0, n_groups * beta2 - rows), mode="replicate")[0, 0]
    scale, zero = fit_minmax(padded.view(n_groups, beta2), qq_bits, max_abs_zero=FP16_SAFE_ZERO)
    second_scale, second_zero = scale.to(torch.float16), zero.to(torch.float16)
    codes = quantize(values, expand_groups(second_scale.float(), beta2, rows),
                     expand_groups(second_zero.float(), beta2, rows), 2**qq_bits - 1)
    return QuantizedStat(codes.to(torch.uint8), second_scale, second_zero, None)


def dequantize_stat(stat: QuantizedStat, beta2: int) -> torch.Tensor:
    """Values (fp32, [..., rows]) that a stored statistic represents. Works batched over leading dims."""
    if stat.values is not None:
        return stat.values.float()
    assert stat.codes is not None and stat.second_scale is not None and stat.second_zero is not None
    rows = stat.codes.shape[-1]
    return dequantize(stat.codes.float(), expand_groups(stat.second_scale.float(), beta2, rows),
                      expand_groups(stat.second_zero.float(), beta2, rows))


def expand_groups(per_group: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """Repeat each value of per_group [..., n_groups] group_size times along the last dim, cut to length."""
    return per_group.repeat_interleave(group_size, dim=-1)[..., :length]


@dataclass
class GroupStats:
    """Statistics of one column group: the fp32 values used to quantize, and how they are stored."""

    scale: torch.Tensor  # fp32 [rows]
    zero: torch.Tensor  # fp32 [rows]
    stored_scale: QuantizedStat
    stored_zero: QuantizedStat


def fit_group_stats(group_weight: torch.Tensor, wbits: int, qq_bits: int | None, beta2: int,
                    plain_dtype: torch.dtype = torch.float16) -> GroupStats:
    """Min-max statistics of group_weight [rows, group_cols] (fp32), stored bilevel or (qq_bits None) as plain
    values of plain_dtype.

    The returned scale/zero are exactly what the stored form dequantizes to.
    """
    max_abs_zero = FP16_SAFE_ZERO if qq_bits is None and plain_dtype == torch.float16 else None
    scale, zero = fit_minmax(group_weight, wbits, max_abs_zero=max_abs_zero)
    stored_scale = quantize_stat(scale, qq_bits, beta2, plain_dtype)
    stored_zero = quantize_stat(zero, qq_bits, beta2, plain_dtype)
    return GroupStats(dequantize_stat(stored_scale, beta2), dequantize_stat(stored_zero, beta2),
                      stored_scale, stored_zero)
