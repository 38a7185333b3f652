"""The asymmetric min-max quantization grid, shared by every level of SpQR.

A value x is stored as an integer code c in [0, 2^bits - 1] with x ≈ (c - zero) * scale.
These three functions are the single source of truth for that arithmetic: the engine, the
bilevel statistics and the on-disk format's dequantizer all call them, which is what makes a
saved checkpoint reproduce the engine's weights bit for bit.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-9  # scales are clamped to this before dividing, as in the reference implementation


def fit_minmax(x: torch.Tensor, bits: int, max_abs_zero: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one (scale, zero) per row of x [rows, n] (fp32) so that its min and max are representable.

    See `minmax_grid` for the degenerate cases. Returns scale [rows], zero [rows], fp32.
    """
    return minmax_grid(x.amin(dim=1), x.amax(dim=1), bits, max_abs_zero)


def minmax_grid(xmin: torch.Tensor, xmax: torch.Tensor, bits: int,
                max_abs_zero: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric grid (scale, zero) that spans [xmin, xmax] with 2^bits levels (elementwise).

    The zero point is not rounded (it is quantized later by the second level, or kept in fp16).
    Degenerate ranges: a constant c becomes [min(c,0), max(c,0)] and [0, 0] becomes [0, 1], so
    that the constant (and 0) stays exactly representable (zero point 0 or maxq).
    max_abs_zero: if |zero| would exceed it (a range far from 0, relative to its width), the
    range is widened to include 0, which bounds zero to [0, 2^bits - 1] (keeps it fp16-safe).
    """
    maxq = 2**bits - 1
    constant = xmin == xmax
    xmin = torch.where(constant, torch.clamp(xmin, max=0.0), xmin)
    xmax = torch.where(constant, torch.clamp(xmax, min=0.0), xmax)
    both_zero = (xmin == 0) & (xmax == 0)
    xmax = torch.where(both_zero, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = -xmin / scale
    if max_abs_zero is not None:
        far = zero.abs() > max_abs_zero
        if bool(far.any()):
            xmin = torch.where(far, torch.clamp(xmin, max=0.0), xmin)
            xmax = torch.where(far, torch.clamp(xmax, min=0.0), xmax)
            scale = (xmax - xmin) / maxq
            zero = -xmin / scale
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as fp32 values) of x on the grid (scale, zero), clamped to [0, maxq]."""
    out = torch.div(x, scale.clamp_min(SCALE_EPS), out=out)
    return out.add_(zero).round_().clamp_(0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Values (fp32) represented by integer codes on the grid (scale, zero)."""
    return torch.sub(codes, zero, out=out).mul_(scale)
